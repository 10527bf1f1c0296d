"""Exact incremental decoding for TRM: one key/value cache per TinyNet call, each new token computes only
its own position.

Every TinyNet call is causal and position-wise outside attention, so once position i has gone through
supervision step s its states never change when tokens are appended. A `Decoder` keeps, per sequence,
the embeddings x, the y/z rows after every supervision step, a key/value cache for every TinyNet call of
the recursion (supervision x deep x latent x 2 calls) and, per step, the sum of y over valid positions
(the seed's pooled q input, kept in float32). Two schedules give the same tokens:

- lazy (CPU default): a step runs only when the halting rule asks for it (one host sync per step); a
  token that needs a step that earlier tokens skipped first catches that step up over the missing
  positions, so the halting keeps its exact meaning.
- all-steps (CUDA default): every token runs every step and the halting rule only selects which step's
  y gives the logits. A decode step then needs no host sync and is captured in a CUDA graph with static
  buffers; greedy decoding runs entirely on the GPU, the host reads the tokens every `sync_every` steps
  (one burst ahead, so the GPU does not wait for it). Short prompts of one length are prefilled by
  replays of the same graph, one position each, instead of hundreds of eager launches.

The captured step is made of the decode kernels (`trm_fast.kernels`: matrix-vector linears with fused
bias/GELU/add+LayerNorm, attention over the cache, and the step's bookkeeping), each with a torch version.
"""
from __future__ import annotations

import weakref
from collections import deque
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import cuda_graphs, reference, torch_ops
from .dispatch import decode_ops, programmatic_launches

NO_HALTING = 2.0  # a threshold no sigmoid output exceeds: `q_threshold=None`
REPLAY_PREFILL_MAX = 32  # graph decoders prefill prompts of one length up to this by replays of the step
CAPACITY_STEP = 64  # capacities are rounded up to this so that captured graphs are reused across calls
MAX_DECODERS = 4  # per model (a batch that shrinks by compaction uses one decoder per size)
SMALL_BATCH = 4  # up to this many rows the decode linears are matrix-vector kernels (`kernels/decode_linear.py`)


class Decoder:
    """Decoding state of a batch of sequences (static buffers, so a decode step can be graph-captured)."""

    def __init__(self, model: reference.TRMModel, batch: int, capacity: int, steps: int, lazy: bool):
        cfg = model.config
        weight = model.token_embed.weight
        self.model, self.batch, self.capacity, self.steps, self.lazy = model, batch, capacity, steps, lazy
        self.device, self.dtype = weight.device, weight.dtype
        self.calls_per_step = 2 * cfg.deep_steps * cfg.latent_steps
        D, H = cfg.d_model, cfg.n_heads

        def zeros(*shape, dtype=self.dtype):
            return torch.zeros(shape, dtype=dtype, device=self.device)

        self.kv = zeros(steps * self.calls_per_step, batch, capacity, 2, H, D // H)
        self.x = zeros(batch, capacity, D)
        self.y = zeros(steps, batch, capacity, D)
        self.z = zeros(steps, batch, capacity, D)
        self.token_valid = zeros(batch, capacity, dtype=torch.bool)
        self.pooled = zeros(steps, batch, D, dtype=torch.float32)
        self.count = zeros(batch, dtype=torch.float32)
        self.active = zeros(batch, dtype=torch.bool)
        self.threshold = zeros(dtype=torch.float32)
        self.stop_ids = zeros(2, dtype=torch.long)
        self.greedy = zeros(dtype=torch.bool)  # the graph's argmax is the token: stop ids end rows there
        self.per_sequence = zeros(dtype=torch.bool)  # halting rule (a tensor: a captured graph reads it)
        self.pos_table = zeros(capacity, D)
        self.token = zeros(batch, dtype=torch.long)  # the token to append next (graph input)
        self.pos = zeros(batch, dtype=torch.long)  # its position
        self.out = zeros(capacity, batch, dtype=torch.long)  # greedy tokens written by the graph, one row per step
        self.first_pos = zeros(batch, dtype=torch.long)  # position of each row's first appended token
        self.ys = zeros(steps, batch, D)  # the graph step's y after each supervision step
        self.q = zeros(steps, batch, dtype=torch.float32)  # and its q_hat
        self.logits = zeros(batch, cfg.vocab_size)
        self.xyz = zeros(batch, 3 * D)  # the graph step's x | y | z of the new token, read in place by the projections
        self.rows = torch.arange(batch, device=self.device)
        self.key_positions = torch.arange(capacity, device=self.device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.lengths: List[int] = []
        self.replay_prefill = False
        self.units = 0  # 1 for the prompt + 1 per appended token
        self.done = [0] * steps  # units computed so far at each supervision step

    # -- state ---------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv, self.x, self.y, self.z, self.pos_table))

    def start(self, prompts: Sequence[Sequence[int]], q_threshold: Optional[float], per_sequence: bool,
              stop_ids: Sequence[int] = (), greedy: bool = False) -> None:
        """Reset every buffer in place (a captured graph keeps pointing at them) and load the prompts."""
        model, cfg = self.model, self.model.config
        for t in (self.kv, self.y, self.z, self.token_valid, self.pooled, self.count, self.out):
            t.zero_()
        table = model.pos_embed.weight
        n = min(table.size(0), self.capacity)
        self.pos_table[:n] = table[:n]
        self.pos_table[n:] = table[-1]
        self.threshold.fill_(NO_HALTING if q_threshold is None else q_threshold)
        self.active.fill_(True)
        self.stop_ids.copy_(torch.as_tensor((list(stop_ids) or [-1]) * 2)[:2])
        self.greedy.fill_(greedy)
        self.per_sequence.fill_(per_sequence)
        self.lengths = [len(p) for p in prompts]
        P = max(self.lengths)
        ids = torch.full((self.batch, P), cfg.pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
        ids = ids.to(self.device)
        self.units, self.done = 1, [0] * self.steps
        self.replay_prefill = self.graph is not None and len(set(self.lengths)) == 1 and P <= REPLAY_PREFILL_MAX
        if self.replay_prefill:  # `_prefill_by_replays` appends the prompt token by token
            self.prompt_ids, self.greedy_after = ids, greedy
            self.greedy.fill_(False)  # no row may end on a prompt position's argmax
            self.pos.zero_()
            self.first_pos.zero_()
            return
        self.x[:, :P] = F.embedding(ids, model.token_embed.weight) + self.pos_table[:P]
        in_prompt = self.key_positions[:P] < torch.as_tensor(self.lengths, device=self.device)[:, None]
        self.token_valid[:, :P] = in_prompt & (ids != cfg.pad_token_id)
        self.count.copy_(self.token_valid.sum(dim=1))
        self.pos.copy_(torch.as_tensor(self.lengths, device=self.device))
        self.first_pos.copy_(self.pos)

    def compacted(self, keep: List[int]) -> "Decoder":
        """The state of rows `keep` only: in place when eager, in a smaller (graph) decoder otherwise."""
        index = torch.as_tensor(keep, device=self.device)
        target = self if self.graph is None else decoder_for(self.model, len(keep), self.capacity, self.steps,
                                                               self.lazy, graph=True)
        for name, dim in _BATCHED:
            rows = getattr(self, name).index_select(dim, index)
            if target is self:
                setattr(self, name, rows)
            else:
                getattr(target, name).copy_(rows)
        if target is self:
            self.batch, self.rows = len(keep), self.rows[: len(keep)]
        else:
            for name in ("pos_table", "threshold", "stop_ids", "greedy", "per_sequence"):
                getattr(target, name).copy_(getattr(self, name))
        target.lengths = [self.lengths[r] for r in keep]
        target.units, target.done = self.units, list(self.done)
        return target

    # -- the recursion on a chunk of positions ---------------------------------------------------------
    def _tiny_call(self, call: int, proj: torch.nn.Linear, inputs, pos, attn_bias, keyless):
        """One TinyNet call (projection + TinyBlock) on rows at `pos` [B, m], caching their keys/values."""
        block = self.model.tiny_net.block
        attn = block.attn
        h = F.linear(torch.cat(inputs, dim=-1), proj.weight, proj.bias)
        B, m, D = h.shape
        H = attn.num_heads
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).view(B, m, 3, H, D // H)
        kv = self.kv[call]
        kv[self.rows[:, None], pos] = qkv[:, :, 1:]
        keys = kv[:, : attn_bias.size(-1)]
        o = F.scaled_dot_product_attention(qkv[:, :, 0].transpose(1, 2), keys[:, :, 0].transpose(1, 2),
                                           keys[:, :, 1].transpose(1, 2), attn_mask=attn_bias)
        o = o.transpose(1, 2).reshape(B, m, D)
        if keyless is not None:  # as the drop-in: a query with no valid key attends to nothing
            o = o.masked_fill(keyless[..., None], 0.0)
        h = F.layer_norm(h + F.linear(o, attn.out_proj.weight, attn.out_proj.bias), (D,), block.ln1.weight,
                         block.ln1.bias, block.ln1.eps)
        ffn = block.ffn
        f = F.linear(F.gelu(F.linear(h, ffn[0].weight, ffn[0].bias)), ffn[2].weight, ffn[2].bias)
        return F.layer_norm(h + f, (D,), block.ln2.weight, block.ln2.bias, block.ln2.eps)

    def _run_step(self, step: int, pos: torch.Tensor, query_valid: Optional[torch.Tensor], key_len: int) -> None:
        """Supervision step `step` on rows at `pos` [B, m]: reads step-1's y/z there, writes this step's,
        adds the valid rows to the pooled sum. `query_valid` masks the padding of a ragged chunk."""
        cfg, net = self.model.config, self.model.tiny_net
        rows = self.rows[:, None]
        x = self.x[rows, pos]
        y, z = (x, torch.zeros_like(x)) if step == 0 else (self.y[step - 1][rows, pos], self.z[step - 1][rows, pos])
        allowed = self.token_valid[:, None, :key_len] & (self.key_positions[:key_len] <= pos[..., None])
        keyless = None
        if query_valid is not None:
            keyless = ~allowed.any(dim=-1)
            allowed = allowed | keyless[..., None]
        attn_bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        attn_bias = attn_bias.masked_fill(~allowed, float("-inf")).unsqueeze(1)
        call = step * self.calls_per_step
        for _ in range(cfg.deep_steps):
            for _ in range(cfg.latent_steps):
                z = self._tiny_call(call, net.xyz_proj, (x, y, z), pos, attn_bias, keyless)
                y = self._tiny_call(call + 1, net.yz_proj, (y, z), pos, attn_bias, keyless)
                call += 2
        self.y[step][rows, pos] = y
        self.z[step][rows, pos] = z
        weight = self.token_valid[rows, pos]
        if query_valid is not None:
            weight = weight & query_valid
        self.pooled[step] += (y.float() * weight[..., None]).sum(dim=1)

    def _catch_up(self, step: int) -> None:
        """Run `step` over every unit it has not seen yet (eager: positions come from the host)."""
        first, last = self.done[step], self.units
        if first == last:
            return
        lengths = torch.as_tensor(self.lengths)
        start = torch.zeros_like(lengths) if first == 0 else lengths + first - 1
        end = lengths + last - 1
        width = int((end - start).max())
        pos = (start[:, None] + torch.arange(width)).to(self.device)
        query_valid = (pos < end[:, None].to(self.device)) if first == 0 else None
        self._run_step(step, pos, query_valid, int(end.max()))
        self.done[step] = last

    def _q_hat(self, step: int) -> torch.Tensor:
        norm, linear = self.model.q_head
        return torch_ops.q_hat(self.pooled[step], self.count, norm.weight, norm.bias, norm.eps, linear.weight,
                               linear.bias, self.dtype)

    def _halted(self, q: torch.Tensor) -> torch.Tensor:
        return torch_ops.halted(q, self.threshold, self.per_sequence, self.active)

    def _head(self, chosen: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        y = self.y[chosen, self.rows, last]
        return self.model.output_head(y)

    # -- one token -------------------------------------------------------------------------------------
    def next_logits(self) -> torch.Tensor:
        """Logits [B, vocab] of the next token after the current units (eager: prefill or decode)."""
        if self.replay_prefill and self.done[0] == 0:
            return self._prefill_by_replays()
        chosen = torch.full((self.batch,), self.steps - 1, dtype=torch.long, device=self.device)
        if self.lazy:
            undecided = torch.ones(self.batch, dtype=torch.bool, device=self.device)
            for step in range(self.steps):
                self._catch_up(step)
                halt = self._halted(self._q_hat(step)) & undecided
                chosen[halt] = step
                undecided &= ~halt
                if not bool(undecided.any()):
                    break
        else:
            for step in range(self.steps):
                self._catch_up(step)
            chosen = self._select_step()
        last = torch.as_tensor(self.lengths, device=self.device) + self.units - 2
        return self._head(chosen, last)

    def _prefill_by_replays(self) -> torch.Tensor:
        """The prompt through the captured step, one position per replay: a few replays instead of the
        eager prefill's hundreds of launches. Every position runs every supervision step, as in the eager
        all-steps prefill; the halting rule only picks the logits, and the last replay's see the whole
        prompt pooled, as the eager prefill's do."""
        for i in range(self.prompt_ids.size(1)):
            self.token.copy_(self.prompt_ids[:, i])
            self.graph.replay()
        self.greedy.fill_(self.greedy_after)
        self.first_pos.copy_(self.pos)
        self.units, self.done = 1, [1] * self.steps
        return self.logits

    def _select_step(self) -> torch.Tensor:
        """The first step whose halting rule fires, else the last one (device-side, no sync)."""
        chosen = torch.full((self.batch,), self.steps - 1, dtype=torch.long, device=self.device)
        for step in reversed(range(self.steps - 1)):
            chosen = torch.where(self._halted(self._q_hat(step)), step, chosen)
        return chosen

    def append(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row and return the next logits (eager)."""
        pos = torch.as_tensor(self.lengths, device=self.device) + self.units - 1
        torch_ops.append_tokens(tokens, pos, self.model.token_embed.weight, self.pos_table,
                                self.model.config.pad_token_id, self.x, self.token_valid, self.count)
        self.units += 1
        return self.next_logits()

    def _decode_call(self, call: int, proj: torch.nn.Linear, inputs: torch.Tensor, out: torch.Tensor) -> None:
        """One TinyNet call on the new token of each row: `inputs` [B, 3D or 2D] (views of `xyz`), result
        written into `out` (the z or y slot of `xyz`). Decode kernels: the linear layers (bias and GELU fused),
        attention over the cache, the add + LayerNorms (the first one fused into the FFN's first linear up
        to SMALL_BATCH rows, the second one into the FFN beyond)."""
        block = self.model.tiny_net.block
        attn, ffn = block.attn, block.ffn
        ops = decode_ops()
        h = ops.decode_linear(inputs, proj.weight, proj.bias, False)
        qkv = ops.decode_linear(h, attn.in_proj_weight, attn.in_proj_bias, False)
        o = ops.decode_attention(qkv, self.kv[call], self.token_valid, self.pos, attn.num_heads)
        o = ops.decode_linear(o, attn.out_proj.weight, attn.out_proj.bias, False)
        h1 = torch.empty_like(h)
        if self.batch > SMALL_BATCH:
            ops.add_layer_norm_into(h, o, block.ln1.weight, block.ln1.bias, block.ln1.eps, h1)
            ops.decode_ffn_add_norm(h1, ffn[0].weight, ffn[0].bias, ffn[2].weight, ffn[2].bias, block.ln2.weight,
                                    block.ln2.bias, block.ln2.eps, out)
            return
        a = ops.decode_add_norm_linear(h, o, block.ln1.weight, block.ln1.bias, block.ln1.eps, h1, ffn[0].weight,
                                       ffn[0].bias, True)
        ops.add_layer_norm_into(h1, ops.decode_linear(a, ffn[2].weight, ffn[2].bias, False), block.ln2.weight,
                                block.ln2.bias, block.ln2.eps, out)

    def _graph_step(self) -> None:
        """Append `self.token` at `self.pos`, run every step on it, write logits and the greedy token."""
        cfg, net, model, ops = self.model.config, self.model.tiny_net, self.model, decode_ops()
        D, xyz = cfg.d_model, self.xyz
        ops.decode_append(self.token, self.pos, model.token_embed.weight, self.pos_table, cfg.pad_token_id, self.x,
                          self.token_valid, self.count, xyz)
        for step in range(self.steps):
            call = step * self.calls_per_step
            for _ in range(cfg.deep_steps * cfg.latent_steps):
                self._decode_call(call, net.xyz_proj, xyz, xyz[:, 2 * D:])
                self._decode_call(call + 1, net.yz_proj, xyz[:, D:], xyz[:, D: 2 * D])
                call += 2
            norm, linear = model.q_head
            ops.decode_pool(xyz[:, D: 2 * D], self.token_valid, self.pos, self.count, norm.weight, norm.bias, norm.eps,
                            linear.weight, linear.bias, self.ys[step], self.pooled[step], self.q[step])
        y = ops.decode_select(self.ys, self.q, self.active, self.threshold, self.per_sequence)
        logits = ops.decode_linear(y, model.output_head.weight, None, False)
        ops.decode_emit(logits, self.stop_ids, self.greedy, self.first_pos, self.token, self.out, self.active,
                        self.pos, self.logits)

    def capture(self) -> None:
        """Capture `_graph_step` (warm-up on a side stream first; `start` resets what it touched), its kernels
        launched with programmatic dependent launch where the GPU has it (no kernel of the step writes a
        weight)."""
        self.start([[0]] * self.batch, None, False)
        with programmatic_launches():
            self.graph = cuda_graphs.capture(self._graph_step, warmups=2)

    def replay(self) -> None:
        """One decode step of the captured graph (all-steps schedule)."""
        self.graph.replay()
        self.units += 1
        self.done = [self.units] * self.steps


_BATCHED = (("kv", 1), ("x", 0), ("y", 1), ("z", 1), ("token_valid", 0), ("pooled", 1), ("count", 0),
            ("active", 0), ("token", 0), ("pos", 0), ("first_pos", 0), ("out", 1), ("logits", 0))

# Decoders (buffers and captured graphs) kept per model between calls; `TRMModel.reset_state` drops them.
_DECODERS: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[tuple, Decoder]]" = weakref.WeakKeyDictionary()


def decoder_for(model, batch: int, capacity: int, steps: int, lazy: bool, graph: bool) -> Decoder:
    """A decoder for these sizes, reused while the model's parameters stay the same tensors."""
    if graph:
        capacity = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
    params = tuple((p.data_ptr(), p.dtype, tuple(p.shape)) for name, p in model.named_parameters()
                   if name != "pos_embed.weight")  # copied into the decoder's own table by `start`
    key = (batch, capacity, steps, lazy, graph, params)
    store = _DECODERS.setdefault(model, {})
    decoder = store.pop(key, None)
    if decoder is None:
        while len(store) >= MAX_DECODERS:
            store.pop(next(iter(store)))
        decoder = Decoder(model, batch, capacity, steps, lazy)
        if graph:
            decoder.capture()
    store[key] = decoder  # most recently used last
    return decoder


def reset_decoders(model) -> None:
    _DECODERS.pop(model, None)


def _sample(logits: torch.Tensor, seen: List[List[int]], temperature: float, top_k: int, top_p: float,
            repetition_penalty: float) -> torch.Tensor:
    """The seed's sampling rule applied row by row (for one row: exactly `reference.TRMModel.generate`'s)."""
    logits = logits / max(temperature, 1e-5)
    if repetition_penalty != 1.0:
        logits = torch.cat([reference.apply_repetition_penalty(logits[row: row + 1], torch.as_tensor(
            [ids], device=logits.device), repetition_penalty) for row, ids in enumerate(seen)])
    return reference.sample_logits(logits, top_k=top_k, top_p=top_p)


def grow_positions(model, embedded_length: int) -> None:
    """The seed's side effect of a forward over `embedded_length` positions: the positional table grows,
    one row per forward as in the seed's generation (each growth draws from the random generator)."""
    while embedded_length > model.pos_embed.num_embeddings:
        model._grow_positional_table(model.pos_embed.num_embeddings + 1)


def decode(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 0.0, repetition_penalty: float = 1.0,
           supervision_steps: Optional[int] = None, q_threshold: Optional[float] = 0.7,
           per_sequence_halting: bool = False, stop_ids: Sequence[int] = (), schedule: str = "auto",
           cuda_graph: Optional[bool] = None, sync_every: int = 16) -> Iterator[Tuple[int, int]]:
    """Yield `(sequence index, new token)` in order; a sequence ends after one of `stop_ids`.

    `schedule`: "lazy", "all_steps" or "auto" (all_steps on CUDA, lazy elsewhere). `cuda_graph`: capture
    the decode step (default: on CUDA with the all-steps schedule, outside autocast). With greedy decoding
    (`top_k=1`, no repetition penalty) a graph runs `sync_every` steps between two reads by the host.
    """
    if max_new_tokens == 0:
        return
    on_cuda = model.token_embed.weight.is_cuda
    lazy = {"auto": not on_cuda, "lazy": True, "all_steps": False}[schedule]
    if cuda_graph is None:
        cuda_graph = on_cuda and not lazy and not torch.is_autocast_enabled("cuda")
    steps = supervision_steps or model.config.supervision_steps
    capacity = max(len(p) for p in prompts) + max_new_tokens - 1
    decoder = decoder_for(model, len(prompts), capacity, steps, lazy, cuda_graph)
    stops = set(stop_ids)
    graph_greedy = decoder.graph is not None and top_k == 1 and repetition_penalty == 1.0
    decoder.start(prompts, q_threshold, per_sequence_halting, sorted(stops), graph_greedy)
    row_seq: List[Optional[int]] = list(range(len(prompts)))  # sequence index of each decoder row
    seen = [list(p) for p in prompts]
    logits = decoder.next_logits()
    for produced in range(1, max_new_tokens + 1):
        live = [r for r, s in enumerate(row_seq) if s is not None]
        grow_positions(model, max(len(seen[row_seq[r]]) for r in live))
        tokens = torch.full((decoder.batch,), model.config.pad_token_id, dtype=torch.long, device=decoder.device)
        tokens[live] = _sample(logits[live], [seen[row_seq[r]] for r in live], temperature, top_k, top_p,
                               repetition_penalty)
        for r, t in zip(live, tokens[live].tolist()):
            seen[row_seq[r]].append(t)
            yield row_seq[r], t
            if t in stops:
                row_seq[r] = None
        finished = [r for r in live if row_seq[r] is None]
        live = [r for r in live if row_seq[r] is not None]
        if produced == max_new_tokens or not live:
            return
        if finished:
            decoder.active[finished] = False
            if decoder.graph is None or 2 * len(live) <= decoder.batch:
                decoder = decoder.compacted(live)
                row_seq, tokens = [row_seq[r] for r in live], tokens[live]
        if graph_greedy:  # the graph takes over: it appends each token and chooses the next one itself
            yield from _greedy_bursts(model, decoder, row_seq, seen, stops, max_new_tokens - produced, sync_every,
                                      tokens)
            return
        if decoder.graph is None:
            logits = decoder.append(tokens)
        else:
            decoder.token.copy_(tokens)
            decoder.replay()
            logits = decoder.logits


def _greedy_bursts(model, decoder: Decoder, row_seq: List[Optional[int]], seen: List[List[int]], stops: set,
                   remaining: int, sync_every: int, tokens: torch.Tensor) -> Iterator[Tuple[int, int]]:
    """Greedy decoding by graph replays, `sync_every` per burst. The next burst is enqueued before the
    host reads the last one (a pinned copy behind an event), so the GPU does not wait for the host. The
    step itself ends rows that emit a stop id; the tokens it computes for them afterwards are not read."""
    decoder.token.copy_(tokens)
    done: set = {None}  # sequences that ended (None: a row whose sequence ended before the bursts)
    pending: deque = deque()
    launched = 0
    while launched < remaining or pending:
        while launched < remaining and len(pending) < 2:  # two bursts in flight
            count = min(sync_every, remaining - launched)
            first = decoder.units - 1  # the out row of the burst's first token
            for _ in range(count):
                decoder.replay()
            pending.append((_copy_to_host(decoder.out[first: first + count]), list(row_seq)))
            launched += count
        (burst, ready), rows = pending.popleft()
        if ready is not None:
            ready.synchronize()
        for seq, column in zip(rows, burst.t().tolist()):
            if seq in done:
                continue
            for t in column:
                seen[seq].append(t)
                yield seq, t
                if t in stops:
                    done.add(seq)
                    break
        grow_positions(model, max(len(s) - 1 for s in seen))
        live = [r for r, seq in enumerate(row_seq) if seq not in done]
        if not live:
            return
        if 2 * len(live) <= decoder.batch:  # to a smaller graph
            decoder = decoder.compacted(live)
            row_seq = [row_seq[r] for r in live]


def _copy_to_host(rows: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.cuda.Event]]:
    """A copy of `rows` on the host: on CUDA asynchronous, into pinned memory, with the event to wait on."""
    if not rows.is_cuda:
        return rows.clone(), None
    host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    host.copy_(rows, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready

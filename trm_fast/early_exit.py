"""Confidence-routed token-level early exit in TRM inference (SPEC §3).

After each supervision step (from `min_steps` on) a valid token whose confidence reaches `threshold`
exits: its logits are those of that step and its y / z freeze, staying visible as attention context to
the tokens still active. Pad positions never run (their logits are zero). Inference only: no gradients,
no dropout.

`masked_early_exit` defines the semantics: every token runs every call and frozen states are restored
after each call. `compacted_early_exit` realizes the saving: projections, attention queries, FFN and
the output head run on the active rows only (`route_rows` lists them, `gather_rows` / `scatter_rows`
compact the states and write them back), with the keys / values of frozen tokens cached when they exit.
The two agree (tests, fp32). On CUDA with the Triton kernels (`compact_attention`, one-launch confidence)
and the extension's CUDA row ops, nothing in a step reads back to the host, so each step (with its
routing) and each routed step's exits is a CUDA graph captured per row count (padded to GRAPH_ROWS) and
replayed; the host reads only the counts after each routed step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import cuda_graphs
from .data import dataset_batches
from .dispatch import early_exit_kernels, tinynet_ops
from .ops import CUDA_FALLBACK, gather_rows, hidden_confidence, route_rows, scatter_rows

CRITERIA = ("max_prob", "q_head")


@dataclass(frozen=True)
class EarlyExit:
    threshold: float
    criterion: str = "max_prob"
    min_steps: int = 1

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"early exit threshold must be a number in [0, 1], got {self.threshold!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown early-exit criterion {self.criterion!r}; choose one of {CRITERIA}")
        if not isinstance(self.min_steps, int) or isinstance(self.min_steps, bool) or self.min_steps < 1:
            raise ValueError(f"min_steps must be a positive int, got {self.min_steps!r}")


def _confidence(model, y: torch.Tensor, criterion: str) -> torch.Tensor:
    """[..., D] -> float32 [...]: max softmax probability of the output head (without materializing the
    logits: hidden_confidence; one Triton launch for [N, D] on CUDA), or the q head applied per token."""
    if criterion == "max_prob":
        if y.is_cuda and y.dim() == 2:
            return early_exit_kernels().confidence(y, model.output_head.weight)
        return hidden_confidence(y, model.output_head.weight)
    return torch.sigmoid(model.q_head(y)).squeeze(-1).float()


def states_after(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """y after `steps` supervision steps of the plain recursion (no exit), where confidences are taken."""
    x = model._embed(input_ids)
    y, z = model._init_states(x)
    for _ in range(steps):
        _, _, y, z = model._deep_recursion_step(x, y, z, attention_mask)
    return y


def _check(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], config: EarlyExit, model):
    if not isinstance(config, EarlyExit):
        raise TypeError(f"early_exit must be an EarlyExit, got {type(config).__name__}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq_len] tensor, got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = (input_ids != model.config.pad_token_id).long()
    return attention_mask


def _result(logits, exit_step, valid, steps, active_per_step) -> Dict:
    n_valid = int(valid.sum())
    counts = [int(((exit_step == s) & valid).sum()) for s in range(1, steps + 1)]
    return {"logits": logits, "exit_step": exit_step, "exit_counts": counts,
            "shallow_ratio": sum(counts[:-1]) / max(n_valid, 1),
            "compute_cost": sum(active_per_step) / max(steps * n_valid, 1)}


@torch.no_grad()
def masked_early_exit(model, input_ids: torch.Tensor, config: EarlyExit, attention_mask: Optional[torch.Tensor] = None,
                      supervision_steps: Optional[int] = None) -> Dict:
    """The semantics, by masks: logits [B, L, V], exit_step [B, L] (1-based; 0 at pads), exit_counts per
    step, shallow_ratio (valid tokens exiting before the last step) and compute_cost (token-steps run /
    token-steps without exit)."""
    attention_mask = _check(input_ids, attention_mask, config, model)
    steps = supervision_steps or model.config.supervision_steps
    was_training = model.training
    model.eval()
    x = model._embed(input_ids)
    y, z = model._init_states(x)
    valid = attention_mask.bool()
    active = valid.clone()
    logits = torch.zeros(*input_ids.shape, model.config.vocab_size, device=x.device, dtype=x.dtype)
    exit_step = torch.zeros(input_ids.shape, dtype=torch.long, device=x.device)
    active_per_step = []
    for step in range(1, steps + 1):
        active_per_step.append(int(active.sum()))
        keep = active.unsqueeze(-1)
        for _ in range(model.config.deep_steps):
            for _ in range(model.config.latent_steps):
                z = torch.where(keep, model.tiny_net.forward_xyz(x, y, z, attention_mask), z)
                y = torch.where(keep, model.tiny_net.forward_yz(y, z, attention_mask), y)
        step_logits = model._output_logits(y)
        if step == steps:
            exits = active.clone()
        elif step >= config.min_steps:
            exits = active & (_confidence(model, y, config.criterion) >= config.threshold)
        else:
            exits = torch.zeros_like(active)
        logits[exits] = step_logits[exits]
        exit_step[exits] = step
        active &= ~exits
    model.train(was_training)
    return _result(logits, exit_step, valid, steps, active_per_step)


GRAPH_ROWS = 64  # CUDA-graph runs pad the active rows to a multiple of this: one captured graph per size


def compact_index(mask: torch.Tensor, out: torch.Tensor) -> None:
    """out[:k] = the indices where `mask` [N] holds, ascending; out[k:] = -1. No host sync."""
    n = mask.numel()
    slot = torch.where(mask, mask.long().cumsum(0) - 1, n)
    spill = torch.full((n + 1,), -1, dtype=torch.long, device=mask.device)
    spill.index_copy_(0, slot, torch.arange(n, device=mask.device))  # unlisted entries all land on slot n
    out.copy_(spill[:n])


class _Run:
    """Static buffers of an early-exit forward over [B, L] tokens, and its pieces, written without host syncs
    where the attention op allows it, so that on CUDA each piece is captured once per shape and replayed
    (`use_graphs`). A step is one piece: on the first step the batch's embedding and row list, then the
    recursion of the rows listed in `rows`, and their routing, or on the last step every valid token's logits
    (from its y: the exited tokens' y stayed frozen). The keys / values that a routed step's exits show from
    then on are a piece of their own, sized by the step's rows (known before the routing), so it is launched
    before the host reads the counts and hides the launch of the next step; the host reads only those counts,
    which size the next step."""

    def __init__(self, model, batch: int, length: int, use_graphs: bool):
        self.model, self.net, self.B, self.L = model, model.tiny_net, batch, length
        self.H = self.net.block.attn.num_heads
        w = model.token_embed.weight
        N, D, V = batch * length, model.config.d_model, model.config.vocab_size

        def zeros(*shape, dtype=w.dtype):
            return torch.zeros(*shape, device=w.device, dtype=dtype)
        self.x, self.y, self.z = zeros(N, D), zeros(N, D), zeros(N, D)
        self.kv = {kind: zeros(N, 2 * D) for kind in ("xyz", "yz")}  # key | value per token and call kind
        self.input_ids = zeros(batch, length, dtype=torch.long)
        self.key_valid = zeros(batch, length, dtype=torch.bool)
        self.rows, self.exited_rows, self.valid_rows = (zeros(N, dtype=torch.long) for _ in range(3))
        self.counts, self.valid = zeros(2, dtype=torch.long), zeros((), dtype=torch.long)
        self.step = zeros((), dtype=torch.long)
        self.logits, self.exit_step = zeros(N, V), zeros(N, dtype=torch.long)
        self.ops = tinynet_ops(getattr(self.net, "kernels", "torch"), w.device)
        self.use_graphs = use_graphs
        self.row_multiple = GRAPH_ROWS if use_graphs else 1
        self.graphs: Dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self.host_counts = torch.zeros(2, dtype=torch.long, pin_memory=use_graphs)
        self.counts_copied = torch.cuda.Event() if use_graphs else None

    def copy_counts(self) -> None:
        """Start copying the counts of the routing just launched to the host (to pinned memory with graphs)."""
        self.host_counts.copy_(self.counts, non_blocking=True)
        if self.counts_copied is not None:
            self.counts_copied.record()

    def read_counts(self) -> list:
        """[exited, still active] of the last routing, once `copy_counts` has landed."""
        if self.counts_copied is not None:
            self.counts_copied.synchronize()
        return self.host_counts.tolist()

    def size(self, rows: int) -> int:
        """The row count a piece runs at: padded to `row_multiple` (GRAPH_ROWS with graphs, else 1)."""
        return min(-(-rows // self.row_multiple) * self.row_multiple, self.B * self.L)

    def launch(self, key: tuple, piece) -> None:
        """Run `piece()`; with graphs, the first time as the warm-up of its capture (a real run, on a side
        stream), afterwards as a replay of that graph."""
        if not self.use_graphs:
            return piece()
        if key in self.graphs:
            return self.graphs[key].replay()
        self.graphs[key] = cuda_graphs.capture(piece, pool=self.pool)

    def take(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Copy a batch into `input_ids` / `key_valid`, where the pieces read it."""
        self.input_ids.copy_(input_ids)
        self.key_valid.copy_(attention_mask.bool())

    def load(self) -> None:
        """The batch in `input_ids` / `key_valid`: embedding, initial states, every valid token listed."""
        x = self.model._embed(self.input_ids).reshape(self.B * self.L, -1)
        y, z = self.model._init_states(x)
        for buffer, value in ((self.x, x), (self.y, y), (self.z, z)):
            buffer.copy_(value)
        compact_index(self.key_valid.flatten(), self.valid_rows)
        self.rows.copy_(self.valid_rows)
        self.valid.copy_(self.key_valid.sum())
        self.step.fill_(1)
        for buffer in (*self.kv.values(), self.logits, self.exit_step):
            buffer.zero_()

    def _project(self, kind, x, y, z):
        proj = self.net.xyz_proj if kind == "xyz" else self.net.yz_proj
        return self.ops.concat_linear((x, y, z) if kind == "xyz" else (y, z), proj.weight, proj.bias)

    def _qkv(self, h):
        attn = self.net.block.attn
        return F.linear(h, attn.in_proj_weight, attn.in_proj_bias)

    def _store_kv(self, kind, rows, kv):
        """Write keys / values `kv` [rows, 2D] into the call kind's table at the listed rows."""
        scatter_rows(self.kv[kind], rows, kv)

    def _call(self, kind, rows, starts, x, y, z):
        """One TinyNet call on the listed rows: projection, attention of their queries over all keys (theirs
        written into the call kind's key / value table, the frozen tokens' kept there), output projection,
        LayerNorms, FFN (on the model's TinyNet ops)."""
        block, D, ops = self.net.block, x.size(-1), self.ops
        h = self._project(kind, x, y, z)
        qkv = self._qkv(h)
        self._store_kv(kind, rows, qkv[:, D:])
        a = early_exit_kernels().attention(qkv[:, :D], self.kv[kind], rows, starts, self.key_valid, self.H)
        a = F.linear(a, block.attn.out_proj.weight, block.attn.out_proj.bias)
        h = ops.add_layer_norm(h, a, block.ln1.weight, block.ln1.bias, block.ln1.eps, 0.0)
        f = ops.feed_forward(h, block.ffn[0].weight, block.ffn[0].bias, block.ffn[2].weight, block.ffn[2].bias)
        return ops.add_layer_norm(h, f, block.ln2.weight, block.ln2.bias, block.ln2.eps, 0.0)

    def recurse(self, size: int, first: bool = False, routing: Optional[Tuple[float, str]] = None,
                last: bool = False) -> None:
        """One supervision step (the number in `step`) as one piece: `first`: load the batch; then the rows
        listed in `rows[:size]` recurse and, given `routing` = (threshold, criterion), are routed, or, `last`,
        all exit with this step's logits."""
        if first:
            self.load()
        else:
            self.step.add_(1)
        rows = self.rows[:size]
        starts = torch.searchsorted(torch.where(rows >= 0, rows, self.B * self.L),
                                    torch.arange(self.B + 1, device=rows.device) * self.L)
        x, y, z = (gather_rows(t, rows) for t in (self.x, self.y, self.z))
        for _ in range(self.model.config.deep_steps):
            for _ in range(self.model.config.latent_steps):
                z = self._call("xyz", rows, starts, x, y, z)
                y = self._call("yz", rows, starts, x, y, z)
        scatter_rows(self.y, rows, y)
        if last:
            active = self.key_valid.flatten() & (self.exit_step == 0)
            self.exit_step.copy_(torch.where(active, self.step, self.exit_step))  # (masked_fill_ would read step back)
            self.write_logits()
            return
        scatter_rows(self.z, rows, z)
        if routing is not None:
            self.route(rows, y, *routing)

    def route(self, rows: torch.Tensor, y: torch.Tensor, threshold: float, criterion: str) -> None:
        """The routing of the listed rows by the confidence of their y (two launches: confidence, `route_rows`):
        exited tokens listed in `exited_rows` and marked with this step, the rest left in `rows`, `counts` =
        [exited, still active]."""
        route_rows(_confidence(self.model, y, criterion), rows, self.exited_rows[:rows.numel()], self.exit_step,
                   self.counts, self.step, threshold)

    def finish(self, size: int) -> None:
        """The keys / values of both call kinds that the tokens listed in `exited_rows[:size]` show from now on,
        from their frozen states."""
        rows = self.exited_rows[:size]
        x, y, z = (gather_rows(t, rows) for t in (self.x, self.y, self.z))
        attn, D = self.net.block.attn, x.size(-1)
        for kind in self.kv:
            kv = F.linear(self._project(kind, x, y, z), attn.in_proj_weight[D:], attn.in_proj_bias[D:])
            self._store_kv(kind, rows, kv)

    def write_logits(self) -> None:
        """Every valid token's logits, from its y."""
        rows = self.valid_rows
        scatter_rows(self.logits, rows, self.model._output_logits(gather_rows(self.y, rows)))


_RUNS_ATTRIBUTE = "_early_exit_runs"


def reset_runs(model) -> None:
    """Drop the early-exit buffers and captured graphs kept on `model`."""
    model.__dict__.pop(_RUNS_ATTRIBUTE, None)


def _run_for(model, batch: int, length: int) -> _Run:
    """The model's buffers (and captured graphs) for [batch, length] inputs, kept between calls."""
    w = model.token_embed.weight
    runs = model.__dict__.setdefault(_RUNS_ATTRIBUTE, {})
    key = (batch, length, w.device, w.dtype, getattr(model.tiny_net, "kernels", None), cuda_graphs.weights_key(model))
    if key not in runs:
        runs.clear()  # other shapes or reallocated weights: their graphs would point at stale memory
        head_dim = model.config.d_model // model.config.n_heads
        use_graphs = (w.is_cuda and not early_exit_kernels().syncs(w.device, head_dim)
                      and not {"gather_rows", "scatter_rows", "route_rows"} & CUDA_FALLBACK)  # (fallbacks read back)
        runs[key] = _Run(model, batch, length, use_graphs)
    return runs[key]


@torch.no_grad()
def compacted_early_exit(model, input_ids: torch.Tensor, config: EarlyExit, attention_mask: Optional[torch.Tensor] = None,
                         supervision_steps: Optional[int] = None) -> Dict:
    """The same results as `masked_early_exit`, computing only the active tokens' rows. On CUDA with the
    Triton attention op, each step (the first with the batch's load) and the exits of each routed step are
    CUDA graph replays, captured per row count (padded to GRAPH_ROWS), with one host read per routed step
    (the counts, copied to pinned memory as soon as the routing wrote them). Steps before the first routed one
    run every position of the batch (padding as empty rows)."""
    attention_mask = _check(input_ids, attention_mask, config, model)
    steps = supervision_steps or model.config.supervision_steps
    was_training = model.training
    if was_training:  # (eval() walks every module: host time on each call otherwise)
        model.eval()
    B, L = input_ids.shape
    run = _run_for(model, B, L)
    run.take(input_ids, attention_mask)
    size, entering = B * L, None  # entering: the tokens active at a step (None: every valid one)
    active_per_step, exit_counts = [], []
    for step in range(1, steps + 1):
        if entering == 0:  # all exited: the logits are written without a last step
            active_per_step.append(0)
            exit_counts.append(0)
            if step == steps:
                run.launch(("logits",), run.write_logits)
            continue
        routing = (float(config.threshold), config.criterion) if config.min_steps <= step < steps else None
        last = step == steps
        run.launch(("step", size, step == 1, routing, last), lambda: run.recurse(size, step == 1, routing, last))
        active_per_step.append(entering)
        if routing is not None:
            run.copy_counts()
            listed = size
            run.launch(("exit", listed), lambda: run.finish(listed))
            exited, entering = run.read_counts()
            exit_counts.append(exited)
            size = run.size(entering)
        else:
            exit_counts.append(entering if last else 0)
    valid = int(run.valid)
    active_per_step = [valid if n is None else n for n in active_per_step]
    exit_counts = [valid if n is None else n for n in exit_counts]
    if was_training:
        model.train()
    return {"logits": run.logits.view(B, L, -1).clone(), "exit_step": run.exit_step.view(B, L).clone(),
            "exit_counts": exit_counts, "shallow_ratio": sum(exit_counts[:-1]) / max(valid, 1),
            "compute_cost": sum(active_per_step) / max(steps * valid, 1)}


def calibrate_threshold(model, batches, hard_ratio: float, criterion: str = "max_prob", exit_step: int = 1) -> float:
    """The confidence threshold below which a `hard_ratio` fraction of the valid validation tokens falls,
    the confidence taken after supervision step `exit_step`: torch.quantile's linear interpolation,
    computed by sorting, so without its 16M-element limit. `batches` yields input_ids or
    (input_ids, attention_mask)."""
    if isinstance(hard_ratio, bool) or not isinstance(hard_ratio, (int, float)) or not 0.0 <= hard_ratio <= 1.0:
        raise ValueError(f"hard_ratio must be in [0, 1], got {hard_ratio!r}")
    EarlyExit(0.5, criterion)  # validates the criterion
    was_training = model.training
    model.eval()
    values = []
    with torch.no_grad():
        for batch in batches:
            ids, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
            mask = (ids != model.config.pad_token_id).long() if mask is None else mask
            confidence = _confidence(model, states_after(model, ids, mask, exit_step), criterion)
            values.append(confidence[mask.bool()].flatten())
    model.train(was_training)
    ordered = torch.cat(values).sort().values if values else torch.empty(0)
    if ordered.numel() == 0:
        raise ValueError("calibrate_threshold needs at least one valid token")
    position = hard_ratio * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


@torch.no_grad()
def evaluate_early_exit(model, dataset, config: EarlyExit, batch_size: int = 16) -> Dict[str, float]:
    """acc, ppl, shallow_ratio and compute_cost of early-exit inference over a TokenDataset (every valid
    target token counts once)."""
    device = next(model.parameters()).device
    loss_sum, correct, tokens, shallow, work = 0.0, 0, 0, 0, 0.0
    for batch in dataset_batches(dataset, batch_size):
        ids, targets, mask = (batch[k].to(device) for k in ("input_ids", "target_ids", "attention_mask"))
        out = compacted_early_exit(model, ids, config, mask)
        valid = mask.bool()
        logits = out["logits"][valid].float()
        loss_sum += float(F.cross_entropy(logits, targets[valid], reduction="sum"))
        correct += int((logits.argmax(-1) == targets[valid]).sum())
        n = int(valid.sum())
        tokens += n
        shallow += sum(out["exit_counts"][:-1])
        work += out["compute_cost"] * n
    if tokens == 0:
        raise ValueError("evaluate_early_exit needs a dataset with at least one valid token")
    return {"acc": correct / tokens, "ppl": float(torch.tensor(loss_sum / tokens).exp()),
            "shallow_ratio": shallow / tokens, "compute_cost": work / tokens}

"""Confidence-routed token-level early exit in TRM inference (SPEC §3).

After each supervision step (from `min_steps` on) a valid token whose confidence reaches `threshold`
exits: its logits are those of that step and its y / z freeze, staying visible as attention context to
the tokens still active. Pad positions never run (their logits are zero). Inference only: no gradients,
no dropout.

`masked_early_exit` defines the semantics: every token runs every call and frozen states are restored
after each call. `compacted_early_exit` realizes the saving: projections, attention queries, FFN and
the output head run on the active rows only (`route_tokens` lists them, `gather_rows` / `scatter_rows`
compact the states and write them back), with the keys / values of frozen tokens cached when they exit.
The two agree (tests, fp32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .data import dataset_batches
from .ops import gather_rows, hidden_confidence, route_tokens, scatter_rows

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
    logits: hidden_confidence), or the q head applied per token."""
    if criterion == "max_prob":
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


class _CompactBlock:
    """One TinyNet call on the active rows: projection, attention of the active queries over all keys
    (frozen tokens' keys / values cached per call kind), output projection, LayerNorms and FFN."""

    def __init__(self, model, batch: int, length: int):
        net = model.tiny_net
        self.net, self.block, self.B, self.L = net, net.block, batch, length
        self.H = self.block.attn.num_heads
        D = model.config.d_model
        w = model.token_embed.weight
        self.kv = {kind: torch.zeros(batch * length, 2, D, device=w.device, dtype=w.dtype) for kind in ("xyz", "yz")}

    def project(self, kind, x, y, z):
        if kind == "xyz":
            return F.linear(torch.cat([x, y, z], dim=-1), self.net.xyz_proj.weight, self.net.xyz_proj.bias)
        return F.linear(torch.cat([y, z], dim=-1), self.net.yz_proj.weight, self.net.yz_proj.bias)

    def _qkv(self, h):
        return F.linear(h, self.block.attn.in_proj_weight, self.block.attn.in_proj_bias).chunk(3, dim=-1)

    def freeze(self, rows, x, y, z):
        """Cache the keys / values that the tokens at `rows` (flat indices) show from now on."""
        for kind in self.kv:
            _, k, v = self._qkv(self.project(kind, x, y, z))
            scatter_rows(self.kv[kind].view(self.B * self.L, -1), rows, torch.cat([k, v], dim=-1))

    def route(self, rows: torch.Tensor, key_valid: torch.Tensor):
        """Per-sequence layout of the active rows for attention (one host sync per supervision step)."""
        batch, pos = rows // self.L, rows % self.L
        counts = torch.bincount(batch, minlength=self.B)
        slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[batch]
        width = max(int(counts.max()), 1)
        query_pos = torch.full((self.B, width), -1, dtype=torch.long, device=rows.device)
        query_pos[batch, slot] = pos
        keys = torch.arange(self.L, device=rows.device)
        mask = (keys <= query_pos.unsqueeze(-1)) & key_valid.unsqueeze(1)  # [B, width, L]
        mask[query_pos < 0] = True  # padding slots: any finite row, dropped afterwards
        self.layout = (batch, slot, width, mask.unsqueeze(1))

    def __call__(self, kind, rows, x, y, z):
        D, H = x.size(-1), self.H
        h = self.project(kind, x, y, z)
        q, k, v = self._qkv(h)
        kv = self.kv[kind].index_copy(0, rows, torch.stack([k, v], dim=1)).view(self.B, self.L, 2, H, D // H)
        batch, slot, width, mask = self.layout
        queries = q.new_zeros(self.B, width, H, D // H)
        queries[batch, slot] = q.view(-1, H, D // H)
        a = F.scaled_dot_product_attention(queries.transpose(1, 2), kv[:, :, 0].transpose(1, 2),
                                           kv[:, :, 1].transpose(1, 2), attn_mask=mask)
        a = a.transpose(1, 2)[batch, slot].reshape(-1, D)
        attn, block = self.block.attn, self.block
        h = block.ln1(h + F.linear(a, attn.out_proj.weight, attn.out_proj.bias))
        return block.ln2(h + block.ffn(h))


@torch.no_grad()
def compacted_early_exit(model, input_ids: torch.Tensor, config: EarlyExit, attention_mask: Optional[torch.Tensor] = None,
                         supervision_steps: Optional[int] = None) -> Dict:
    """The same results as `masked_early_exit`, computing only the active tokens' rows."""
    attention_mask = _check(input_ids, attention_mask, config, model)
    steps = supervision_steps or model.config.supervision_steps
    was_training = model.training
    model.eval()
    B, L = input_ids.shape
    x_all = model._embed(input_ids).reshape(B * L, -1)
    y_all, z_all = model._init_states(x_all)
    valid = attention_mask.bool().reshape(-1)
    active = valid.clone()
    rows = valid.nonzero().flatten()
    logits = torch.zeros(B * L, model.config.vocab_size, device=x_all.device, dtype=x_all.dtype)
    exit_step = torch.zeros(B * L, dtype=torch.long, device=x_all.device)
    call = _CompactBlock(model, B, L)
    active_per_step = []
    for step in range(1, steps + 1):
        active_per_step.append(rows.numel())
        if rows.numel() == 0:
            continue
        call.route(rows, attention_mask.bool())
        x, y, z = (gather_rows(t, rows) for t in (x_all, y_all, z_all))
        for _ in range(model.config.deep_steps):
            for _ in range(model.config.latent_steps):
                z = call("xyz", rows, x, y, z)
                y = call("yz", rows, x, y, z)
        scatter_rows(y_all, rows, y)
        scatter_rows(z_all, rows, z)
        if step == steps:
            logits[rows] = model._output_logits(y)
            exit_step[rows] = step
            break
        if step < config.min_steps:
            continue
        confidence = torch.zeros(B * L, device=x_all.device)
        confidence[rows] = _confidence(model, y, config.criterion)
        exited, index, counts = route_tokens(confidence, active, float(config.threshold))
        exited_rows = exited[rows]
        logits[rows[exited_rows]] = model._output_logits(y[exited_rows])  # the head runs on exiting rows only
        exit_step[exited] = step
        active &= ~exited
        call.freeze(rows[exited_rows], x[exited_rows], y[exited_rows], z[exited_rows])
        rows = index[: int(counts[1])]
    model.train(was_training)
    return _result(logits.view(B, L, -1), exit_step.view(B, L), valid.view(B, L), steps, active_per_step)


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

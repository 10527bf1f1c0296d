"""Output head + cross-entropy without the [N, vocab] logits (issue 3, item 4).

`linear_cross_entropy(hidden, weight, targets, ignore_index)` equals
`F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index)` (mean over the counted tokens)
and also returns whether each token's argmax is its target (the seed's ACT labels need it). Rows go in
chunks: each chunk's logits are formed (under autocast from its dtype's matmul, as the seed's head's are),
reduced to its loss, and turned at once into its share of the gradients (softmax - one-hot; on CUDA one
Triton pass over the chunk, kernels/cross_entropy.py, writes the gradient over the logits), so the forward
keeps grad_hidden [N, D] and grad_weight [V, D] and never more than [chunk, V] of logits; the backward
scales them by the incoming gradient. Against the logits kept for autograd (the seed's way), the gradient is
written by the forward's kernel over the logits (no backward kernel reads them again) and never scaled in a
pass of its own.

The default chunk holds up to CHUNK_BYTES of logits: at the seed's config (8192 tokens, vocab 16000, bf16)
the whole batch is one chunk, whose gradients are single matmuls (no float32 accumulation over chunks).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .torch_ops import autocast_dtype

CHUNK_BYTES = 1 << 28  # logits per chunk by default (256 MiB)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk: int, with_grad: bool, dtype: torch.dtype):
        counted = targets != ignore_index
        count = counted.sum()
        scale = 1.0 / count.clamp(min=1).float()
        needs_grad = with_grad and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        w = weight.to(dtype)
        loss = hidden.new_zeros((), dtype=torch.float32)
        correct = torch.zeros_like(counted)
        grad_hidden = torch.empty_like(hidden, dtype=dtype) if needs_grad else None
        grad_weight = None  # the first chunk's, then a float32 sum over chunks
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows].to(dtype)
            chunk_loss, correct[rows], grad_logits = cross_entropy_and_grad(
                h @ w.t(), targets[rows], ignore_index, scale.reshape(1) if needs_grad else None, in_place=True)
            loss += chunk_loss
            if needs_grad:
                torch.mm(grad_logits, w, out=grad_hidden[rows])
                part = grad_logits.t() @ h
                grad_weight = part if grad_weight is None else grad_weight.float() + part
        loss = torch.where(count > 0, loss * scale, torch.full_like(loss, float("nan")))  # F.cross_entropy's 0/0
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_loss = grad_loss.float().reshape(1)  # one element, not a 0-dim tensor: the products are float32
        return ((grad_hidden * grad_loss).to(hidden_dtype) if ctx.needs_input_grad[0] else None,
                (grad_weight * grad_loss).to(weight_dtype) if ctx.needs_input_grad[1] else None, None, None, None, None,
                None)


def cross_entropy_and_grad(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                           grad_scale: Optional[torch.Tensor], in_place: bool = False) -> tuple:
    """Of logits [N, V]: (summed loss of the rows whose target is not `ignore_index`, float32; bool [N] argmax ==
    target; with `grad_scale` (one element), (softmax - one-hot) * grad_scale in the logits' dtype, 0 on rows not
    counted, else None). On CUDA one pass of kernels/cross_entropy.py, the gradient written over the logits with
    `in_place`, else into a new tensor; elsewhere (or without Triton) the torch steps."""
    rows_kernel = _cross_entropy_rows_kernel(logits.device)
    if rows_kernel is not None:
        grad = None if grad_scale is None else logits if in_place else torch.empty_like(logits)
        rows, _, correct = rows_kernel(logits, targets, ignore_index, grad_scale, grad)
        return rows.sum(), correct, grad
    keep = targets != ignore_index
    x = logits.float()
    safe_targets = torch.where(keep, targets, 0)
    loss = ((torch.logsumexp(x, dim=-1) - x.gather(1, safe_targets[:, None]).squeeze(1)) * keep).sum()
    correct = x.argmax(-1) == targets
    if grad_scale is None:
        return loss, correct, None
    grad = torch.softmax(x, dim=-1)
    grad[torch.arange(len(targets), device=targets.device), safe_targets] -= 1.0
    return loss, correct, (grad * (keep[:, None] * grad_scale)).to(logits.dtype)


def _cross_entropy_rows_kernel(device: torch.device):
    """`kernels/cross_entropy.py`'s row kernel on CUDA when Triton imports, else None (the torch steps)."""
    if device.type != "cuda":
        return None
    try:
        from trm_fast.kernels.cross_entropy import cross_entropy_rows_triton
    except ImportError:
        return None
    return cross_entropy_rows_triton


def check_targets(op: str, targets: torch.Tensor, rows: torch.Tensor) -> None:
    """targets: int64 [N] on the device of `rows` ([N, ...]: the logits or hidden states they label)."""
    if targets.shape != rows.shape[:1] or targets.dtype != torch.long or targets.device != rows.device:
        raise ValueError(f"{op}: targets must be int64 [{rows.shape[0]}] on {rows.device}, got {targets.dtype} "
                         f"{tuple(targets.shape)} on {targets.device}")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over tokens whose target is not `ignore_index`, bool [N] argmax == target) for
    hidden [N, D], weight [V, D], targets [N] int64; float32 loss. `chunk`: rows of logits formed at a time
    (default: as many as fit in CHUNK_BYTES)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden [N, D] and weight [V, D] must agree, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    check_targets("linear_cross_entropy", targets, hidden)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"linear_cross_entropy: chunk must be None or a positive int, got {chunk!r}")
    # under no_grad the forward computes the loss only (needs_input_grad does not see grad mode); under autocast
    # the logits are computed in its dtype, as the seed's output head's are
    dtype = autocast_dtype(hidden.device.type) or hidden.dtype
    if chunk is None:
        chunk = max(1, CHUNK_BYTES // (weight.shape[0] * dtype.itemsize))
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk, torch.is_grad_enabled(), dtype)

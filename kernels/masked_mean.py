"""`trm_fast::masked_mean`: the q head's pooling of a supervision step's y,
`(y * mask).sum(1) / mask.sum(1).clamp(min=1)` for y [B, L, D] and attention_mask [B, L] (the seed's
`_pool_for_q`), forward and backward.

The seed's torch steps take ~35 us a step at B16 L512 d512 on the H100 (a [B, L, D] product written and read
back by the sum over L) and ~28 us in the backward (the product's gradient, then a copy); here one program per
(sequence, column block) reads y once and keeps the per-sequence count for the backward, which writes
grad y = mask * grad / count in one pass. Float32 sums whatever y's dtype; the result in y's dtype.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from trm_fast import torch_ops
from trm_fast.kernels.halting_loss import mask_operand

_BLOCK_D = 64  # forward: one program per (sequence, 64 columns), 128 rows a load (16 x 8 programs at B16 d512)
_FWD_BLOCK_L = 128
_BWD_BLOCK_L = 32


@triton.jit
def _masked_mean_fwd_kernel(y_ptr, mask_ptr, out_ptr, count_ptr, L, D, stride_yb, stride_yl, stride_mb,
                            BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    count = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        rows = start + tl.arange(0, BLOCK_L)
        weight = tl.load(mask_ptr + b * stride_mb + rows, mask=rows < L, other=0).to(tl.float32)
        y = tl.load(y_ptr + b * stride_yb + rows[:, None] * stride_yl + cols[None, :],
                    mask=(rows[:, None] < L) & (cols[None, :] < D), other=0.0).to(tl.float32)
        acc += y * weight[:, None]
        count += weight
    total = tl.maximum(tl.sum(count, axis=0), 1.0)
    tl.store(out_ptr + b * D + cols, (tl.sum(acc, axis=0) / total).to(out_ptr.dtype.element_ty), mask=cols < D)
    if tl.program_id(1) == 0:
        tl.store(count_ptr + b, total)


@triton.jit
def _masked_mean_bwd_kernel(grad_ptr, mask_ptr, count_ptr, grad_y_ptr, L, D, stride_mb, BLOCK_L: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    weight = tl.load(mask_ptr + b * stride_mb + rows, mask=rows < L, other=0).to(tl.float32) / tl.load(count_ptr + b)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        grad = tl.load(grad_ptr + b * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(grad_y_ptr + (b * L + rows[:, None]) * D + cols[None, :],
                 (weight[:, None] * grad[None, :]).to(grad_y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < L) & (cols[None, :] < D))


def masked_mean_fwd_triton(y: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pooled [B, D] in y's dtype, count [B] float32: the mask's sum clamped to >= 1) for y [B, L, D] with unit
    column stride and attention_mask [B, L]."""
    B, L, D = y.shape
    y = y if y.stride(-1) == 1 else y.contiguous()
    mask = mask_operand(attention_mask)
    out = torch.empty(B, D, device=y.device, dtype=y.dtype)
    count = torch.empty(B, device=y.device, dtype=torch.float32)
    block_l = min(_FWD_BLOCK_L, triton.next_power_of_2(L))
    _masked_mean_fwd_kernel[(B, triton.cdiv(D, _BLOCK_D))](y, mask, out, count, L, D, y.stride(0), y.stride(1),
                                                          mask.stride(0), BLOCK_L=block_l, BLOCK_D=_BLOCK_D,
                                                          num_warps=8)
    return out, count


def masked_mean_bwd_triton(grad: torch.Tensor, attention_mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """grad y [B, L, D] (grad's dtype) = mask * grad / count, for grad [B, D]."""
    B, D = grad.shape
    L = attention_mask.shape[1]
    mask = mask_operand(attention_mask)
    grad_y = torch.empty(B, L, D, device=grad.device, dtype=grad.dtype)
    _masked_mean_bwd_kernel[(B, triton.cdiv(L, _BWD_BLOCK_L))](grad.contiguous(), mask, count, grad_y, L, D,
                                                               mask.stride(0), BLOCK_L=_BWD_BLOCK_L, BLOCK_D=_BLOCK_D)
    return grad_y


def _check(y, attention_mask):
    if not isinstance(y, torch.Tensor) or y.dim() != 3 or not y.is_floating_point():
        raise ValueError(f"masked_mean: y must be a float [B, L, D] tensor, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != y.shape[:2] or \
            attention_mask.device != y.device:
        got = (f"{tuple(attention_mask.shape)} on {attention_mask.device}" if isinstance(attention_mask, torch.Tensor)
               else type(attention_mask).__name__)
        raise ValueError(f"masked_mean: attention_mask must be a {tuple(y.shape[:2])} tensor on {y.device}, got {got}")


def _count_torch(y, attention_mask) -> torch.Tensor:
    return attention_mask.to(y.dtype).sum(dim=1).clamp(min=1.0).float()


def masked_mean_forward(y, attention_mask) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pooled [B, D], count [B] float32): Triton on CUDA, the seed's torch steps elsewhere."""
    _check(y, attention_mask)
    if y.is_cuda:
        return masked_mean_fwd_triton(y, attention_mask)
    return torch_ops.masked_mean(y, attention_mask), _count_torch(y, attention_mask)


def masked_mean_backward(grad, attention_mask, count) -> torch.Tensor:
    if grad.is_cuda:
        return masked_mean_bwd_triton(grad, attention_mask, count)
    weight = attention_mask.to(grad.dtype) / count.to(grad.dtype)[:, None]
    return weight[:, :, None] * grad[:, None, :]


@torch.library.custom_op("trm_fast::masked_mean", mutates_args=())
def masked_mean_op(y: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pooled [B, D], count [B] float32)."""
    return masked_mean_forward(y, attention_mask)


@masked_mean_op.register_fake
def _(y, attention_mask):
    return y.new_empty(y.shape[0], y.shape[2]), y.new_empty(y.shape[0], dtype=torch.float32)


@torch.library.custom_op("trm_fast::masked_mean_backward", mutates_args=())
def masked_mean_backward_op(grad: torch.Tensor, attention_mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return masked_mean_backward(grad, attention_mask, count)


@masked_mean_backward_op.register_fake
def _(grad, attention_mask, count):
    return grad.new_empty(grad.shape[0], attention_mask.shape[1], grad.shape[1])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _grad_count):
    return masked_mean_backward_op(grad, *ctx.saved_tensors), None


masked_mean_op.register_autograd(_backward, setup_context=_setup_context)


class _MaskedMean(torch.autograd.Function):
    """The eager path (see kernels/concat_linear.py)."""

    @staticmethod
    def forward(ctx, y, attention_mask):
        pooled, count = masked_mean_forward(y, attention_mask)
        ctx.save_for_backward(attention_mask, count)
        return pooled

    @staticmethod
    def backward(ctx, grad):
        return masked_mean_backward(grad, *ctx.saved_tensors), None


def masked_mean(y: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The op table's q-head pooling (the signature of `torch_ops.masked_mean`): [B, D] in y's dtype."""
    if torch.compiler.is_compiling():
        return masked_mean_op(y, attention_mask)[0]
    return _MaskedMean.apply(y, attention_mask)

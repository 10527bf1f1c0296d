"""`trm_fast::halting_loss`: a supervision step's ACT loss, the seed's binary cross-entropy (float32, mean over the
batch) of q_hat [B, 1] against its ACT labels: per sequence whether the share of its tokens (attention_mask != 0)
whose argmax is their target reaches `threshold` (all of them at 1.0 or more). Forward and backward.

The seed's torch steps take ~12 small kernels a step for the labels (an and, casts, sums, a clamp, a division, a
compare) and 7 more for the loss and its gradient (q_hat's cast, the loss, its mean, a copy; the gradient and its
cast); here one program each way. The labels and the gradient are torch's bit for bit (IEEE divisions, the mean's
division as a product with 1 / B, as torch's `div_` forms it); the loss's logarithms are Triton's log (log1p(-x) from
it, Goldberg's correction), within a few float32 units of torch's.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

# rows of sequences, tokens a tile; the forward's [16, 512] tile on 16 warps (H100: 5.5 us, 11 on 4 warps)
BLOCK_B, BLOCK_L = 16, 512


@triton.jit
def _labels(correct_ptr, mask_ptr, rows, row_ok, L, stride_c, stride_m, threshold, ALL: tl.constexpr,
            BLOCK_L: tl.constexpr):
    """Per row of `rows`, 1.0 where its share of counted tokens that are correct reaches threshold, else 0.0."""
    hits = tl.zeros(rows.shape, tl.int32)
    valid = tl.zeros(rows.shape, tl.int32)
    rows = rows.to(tl.int64)
    for start in range(0, L, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        inside = row_ok[:, None] & (cols < L)[None, :]
        counted = tl.load(mask_ptr + rows[:, None] * stride_m + cols[None, :], mask=inside, other=0) != 0
        correct = tl.load(correct_ptr + rows[:, None] * stride_c + cols[None, :], mask=inside, other=0) != 0
        hits += tl.sum((correct & counted).to(tl.int32), axis=1)
        valid += tl.sum(counted.to(tl.int32), axis=1)
    if ALL:
        label = hits == valid
    else:
        label = tl.math.div_rn(hits.to(tl.float32), tl.maximum(valid, 1).to(tl.float32)) >= threshold
    return label.to(tl.float32)


@triton.jit
def _binary_cross_entropy(x, t):
    """torch's (t - 1) * max(log1p(-x), -100) - t * max(log(x), -100)."""
    w = 1.0 - x
    log1p_neg = tl.where(w == 1.0, -x, tl.log(w) * (-x / (w - 1.0)))
    return (t - 1.0) * tl.maximum(log1p_neg, -100.0) - t * tl.maximum(tl.log(x), -100.0)


@triton.jit
def _halting_loss_fwd_kernel(correct_ptr, mask_ptr, q_ptr, labels_ptr, loss_ptr, B, L, stride_c, stride_m, stride_q,
                             threshold, inv_b, ALL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr):
    """One program: labels[b] of every sequence and loss = (sum over b of the cross-entropy) * inv_b."""
    total = tl.zeros([BLOCK_B], tl.float32)
    for first in range(0, B, BLOCK_B):
        rows = first + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        t = _labels(correct_ptr, mask_ptr, rows, row_ok, L, stride_c, stride_m, threshold, ALL, BLOCK_L)
        tl.store(labels_ptr + rows, t, mask=row_ok)
        x = tl.load(q_ptr + rows * stride_q, mask=row_ok, other=0.5).to(tl.float32)
        total += tl.where(row_ok, _binary_cross_entropy(x, t), 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) * inv_b)


@triton.jit
def _halting_loss_bwd_kernel(grad_ptr, q_ptr, labels_ptr, grad_q_ptr, B, stride_q, inv_b, BLOCK_B: tl.constexpr):
    """One program: grad q[b] = grad * (x - t) / max((1 - x) x, 1e-12) * inv_b, in q's dtype."""
    g = tl.load(grad_ptr).to(tl.float32)
    for first in range(0, B, BLOCK_B):
        rows = first + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        x = tl.load(q_ptr + rows * stride_q, mask=row_ok, other=0.5).to(tl.float32)
        t = tl.load(labels_ptr + rows, mask=row_ok, other=0.0)
        grad_x = tl.math.div_rn(g * (x - t), tl.maximum((1.0 - x) * x, 1e-12)) * inv_b
        tl.store(grad_q_ptr + rows, grad_x.to(grad_q_ptr.dtype.element_ty), mask=row_ok)


def mask_operand(mask: torch.Tensor) -> torch.Tensor:
    """A [B, L] bool or integer tensor as the kernels read it: unit column stride, bool viewed as int8."""
    mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    return mask.view(torch.int8) if mask.dtype == torch.bool else mask


def float32_inverse(count: int) -> float:
    """1 / count rounded to float32 (as torch's float32 division gives it: a double's rounding is exact here)."""
    return float(torch.tensor(1.0 / count, dtype=torch.float32))


def halting_loss_fwd_triton(correct, attention_mask, q_hat, threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, 0-dim float32; labels [B] float32) of bool correct [B, L], an integer or bool attention_mask [B, L] and
    q_hat [B, 1]."""
    B, L = correct.shape
    correct, mask = mask_operand(correct), mask_operand(attention_mask)
    labels = torch.empty(B, device=correct.device, dtype=torch.float32)
    loss = torch.empty((), device=correct.device, dtype=torch.float32)
    _halting_loss_fwd_kernel[(1,)](correct, mask, q_hat, labels, loss, B, L, correct.stride(0), mask.stride(0),
                                   q_hat.stride(0), float(threshold), float32_inverse(B), ALL=threshold >= 1.0,
                                   BLOCK_B=min(BLOCK_B, triton.next_power_of_2(B)),
                                   BLOCK_L=min(BLOCK_L, triton.next_power_of_2(L)), num_warps=16)
    return loss, labels


def halting_loss_bwd_triton(grad: torch.Tensor, q_hat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """grad q_hat [B, 1] (q_hat's dtype) for the loss's gradient `grad` (one element)."""
    B = q_hat.shape[0]
    grad_q = torch.empty(B, 1, device=q_hat.device, dtype=q_hat.dtype)
    _halting_loss_bwd_kernel[(1,)](grad, q_hat, labels, grad_q, B, q_hat.stride(0), float32_inverse(B),
                                   BLOCK_B=min(128, triton.next_power_of_2(B)))
    return grad_q


def _check(correct, attention_mask, q_hat):
    if not isinstance(correct, torch.Tensor) or correct.dim() != 2 or correct.dtype != torch.bool:
        raise ValueError(f"halting_loss: correct must be a bool [B, L] tensor, got "
                         f"{correct.dtype if isinstance(correct, torch.Tensor) else type(correct).__name__} "
                         f"{tuple(getattr(correct, 'shape', ()))}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != correct.shape or \
            attention_mask.device != correct.device or attention_mask.is_floating_point():
        raise ValueError(f"halting_loss: attention_mask must be an integer or bool {tuple(correct.shape)} tensor on "
                         f"{correct.device}, got {getattr(attention_mask, 'dtype', type(attention_mask).__name__)} "
                         f"{tuple(getattr(attention_mask, 'shape', ()))}")
    if not isinstance(q_hat, torch.Tensor) or q_hat.shape != (correct.shape[0], 1) or not q_hat.is_floating_point() \
            or q_hat.device != correct.device:
        raise ValueError(f"halting_loss: q_hat must be a float [{correct.shape[0]}, 1] tensor on {correct.device}, "
                         f"got {getattr(q_hat, 'dtype', type(q_hat).__name__)} {tuple(getattr(q_hat, 'shape', ()))}")


def halting_loss_forward(correct, attention_mask, q_hat, threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, labels [B] float32): Triton on CUDA, the seed's torch steps elsewhere."""
    _check(correct, attention_mask, q_hat)
    if correct.is_cuda:
        return halting_loss_fwd_triton(correct, attention_mask, q_hat, threshold)
    from trm_fast.reference import TRMModel, halting_bce
    labels = TRMModel._act_labels(correct, attention_mask, threshold)
    return halting_bce(q_hat, labels), labels.view(-1)


def halting_loss_backward(grad, q_hat, labels) -> torch.Tensor:
    if q_hat.is_cuda:
        return halting_loss_bwd_triton(grad, q_hat, labels)
    x = q_hat.detach().float()
    return torch.ops.aten.binary_cross_entropy_backward(grad, x, labels.view_as(x), None, 1).to(q_hat.dtype)


@torch.library.custom_op("trm_fast::halting_loss", mutates_args=())
def halting_loss_op(correct: torch.Tensor, attention_mask: torch.Tensor, q_hat: torch.Tensor,
                    threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, 0-dim float32; labels [B] float32)."""
    return halting_loss_forward(correct, attention_mask, q_hat, threshold)


@halting_loss_op.register_fake
def _(correct, attention_mask, q_hat, threshold):
    return q_hat.new_empty((), dtype=torch.float32), q_hat.new_empty(q_hat.shape[0], dtype=torch.float32)


@torch.library.custom_op("trm_fast::halting_loss_backward", mutates_args=())
def halting_loss_backward_op(grad: torch.Tensor, q_hat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return halting_loss_backward(grad, q_hat, labels)


@halting_loss_backward_op.register_fake
def _(grad, q_hat, labels):
    return torch.empty_like(q_hat)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _grad_labels):
    return None, None, halting_loss_backward_op(grad, *ctx.saved_tensors), None


halting_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _HaltingLoss(torch.autograd.Function):
    """The eager path (see kernels/concat_linear.py)."""

    @staticmethod
    def forward(ctx, correct, attention_mask, q_hat, threshold):
        loss, labels = halting_loss_forward(correct, attention_mask, q_hat, threshold)
        ctx.save_for_backward(q_hat, labels)
        return loss

    @staticmethod
    def backward(ctx, grad):
        return None, None, halting_loss_backward(grad, *ctx.saved_tensors), None


def halting_loss(correct: torch.Tensor, attention_mask: torch.Tensor, q_hat: torch.Tensor,
                 threshold: float) -> torch.Tensor:
    """The op table's ACT loss of a step (the signature of `torch_ops.halting_loss`): 0-dim float32."""
    if torch.compiler.is_compiling():
        return halting_loss_op(correct, attention_mask, q_hat, threshold)[0]
    return _HaltingLoss.apply(correct, attention_mask, q_hat, threshold)

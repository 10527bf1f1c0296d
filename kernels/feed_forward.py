"""`trm_fast::feed_forward`: `linear(gelu(linear(h, w1, b1)), w2, b2)` (exact GELU), forward and backward.

Forward: the first matmul adds the bias and applies GELU in its epilogue, keeping the pre-activation for
the backward; the second adds its bias (the residual add and dropout belong to `add_layer_norm`).
Backward: dGELU is fused into the epilogue of grad_out @ w2, then the weight gradients and grad h are
strided matmuls of the same kernel (kernels/matmul.py); bias gradients are row sums.
"""
from typing import Tuple

import torch

from trm_fast import torch_ops
from trm_fast.kernels.matmul import BIAS, BIAS_GELU, GELU_GRAD, autocast_cast, matmul_into


def feed_forward_fwd_triton(h, w1, b1, w2, b2) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [M, D], pre-activation [M, F]) for a contiguous [M, D] h."""
    M, F = h.shape[0], w1.shape[0]
    pre, act = (torch.empty(M, F, device=h.device, dtype=h.dtype) for _ in range(2))
    matmul_into(h, w1.t(), act, BIAS_GELU, bias=b1, aux=pre)
    out = torch.empty(M, w2.shape[0], device=h.device, dtype=h.dtype)
    matmul_into(act, w2.t(), out, BIAS, bias=b2)
    return out, pre


def feed_forward_bwd_triton(grad_out, h, pre, w1, w2):
    """(grad h, grad w1, grad b1, grad w2, grad b2)."""
    act = torch.nn.functional.gelu(pre)  # recomputed: one elementwise pass instead of storing it
    grad_pre = torch.empty_like(pre)
    matmul_into(grad_out, w2, grad_pre, GELU_GRAD, aux=pre)
    grad_w2, grad_w1, grad_h = torch.empty_like(w2), torch.empty_like(w1), torch.empty_like(h)
    matmul_into(grad_out.t(), act, grad_w2)
    matmul_into(grad_pre.t(), h, grad_w1)
    matmul_into(grad_pre, w1, grad_h)
    return (grad_h, grad_w1, grad_pre.float().sum(0).to(w1.dtype), grad_w2,
            grad_out.float().sum(0).to(w2.dtype))


def _check(h, w1, b1, w2, b2):
    D = h.shape[-1]
    F = w1.shape[0] if w1.dim() == 2 else -1
    if w1.shape != (F, D) or b1.shape != (F,) or w2.shape != (D, F) or b2.shape != (D,):
        raise ValueError(f"feed_forward: for h [..., {D}] expects w1 [F, {D}], b1 [F], w2 [{D}, F], b2 [{D}]; got "
                         f"{tuple(w1.shape)}, {tuple(b1.shape)}, {tuple(w2.shape)}, {tuple(b2.shape)}")
    if any(t.dtype != h.dtype or t.device != h.device for t in (w1, b1, w2, b2)):
        raise ValueError(f"feed_forward: weights must have h's dtype {h.dtype} and device {h.device}")


@torch.library.custom_op("trm_fast::feed_forward", mutates_args=())
def feed_forward_op(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                    b2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, pre-activation [rows, F]): Triton on CUDA, torch elsewhere."""
    _check(h, w1, b1, w2, b2)
    flat = h.reshape(-1, h.shape[-1]).contiguous()
    if h.is_cuda:
        out, pre = feed_forward_fwd_triton(flat, w1, b1, w2, b2)
    else:
        pre = torch.nn.functional.linear(flat, w1, b1)
        out = torch.nn.functional.linear(torch.nn.functional.gelu(pre), w2, b2)
    return out.view(h.shape), pre


@feed_forward_op.register_fake
def _(h, w1, b1, w2, b2):
    return torch.empty_like(h), h.new_empty(h.numel() // h.shape[-1], w1.shape[0])


@torch.library.custom_op("trm_fast::feed_forward_backward", mutates_args=())
def feed_forward_backward_op(grad_out: torch.Tensor, h: torch.Tensor, pre: torch.Tensor, w1: torch.Tensor,
                             w2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    D = h.shape[-1]
    grad_flat, flat = grad_out.reshape(-1, D).contiguous(), h.reshape(-1, D).contiguous()
    if h.is_cuda:
        grads = feed_forward_bwd_triton(grad_flat, flat, pre, w1, w2)
    else:
        act = torch.nn.functional.gelu(pre)
        grad_pre = (grad_flat @ w2) * torch.ops.aten.gelu_backward(torch.ones_like(pre), pre)
        grads = (grad_pre @ w1, grad_pre.t() @ flat, grad_pre.sum(0), grad_flat.t() @ act, grad_flat.sum(0))
    return (grads[0].view(h.shape),) + tuple(grads[1:])


@feed_forward_backward_op.register_fake
def _(grad_out, h, pre, w1, w2):
    return (torch.empty_like(h), torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(w2),
            w2.new_empty(w2.shape[0]))


def _setup_context(ctx, inputs, output):
    h, w1, _, w2, _ = inputs
    ctx.save_for_backward(h, output[1], w1, w2)


def _backward(ctx, grad_out, _grad_pre):
    h, pre, w1, w2 = ctx.saved_tensors
    return feed_forward_backward_op(grad_out, h, pre, w1, w2)


feed_forward_op.register_autograd(_backward, setup_context=_setup_context)


def feed_forward(h, w1, b1, w2, b2) -> torch.Tensor:
    """The TinyNet op (the signature of `torch_ops.feed_forward`); under autocast in its dtype, as F.linear."""
    return feed_forward_op(*autocast_cast(h, w1, b1, w2, b2))[0]

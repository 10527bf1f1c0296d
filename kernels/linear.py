"""`trm_fast::linear`: `x @ weight.T + bias` by cuBLAS, forward and backward, for the attention's QKV and
output projections and the output head. It differs from F.linear only in the backward: the bias gradient by
kernels/column_sum.py on CUDA instead of torch's reduction over the 8192 token rows (~0.8 TB/s on the H100,
NOTES.md), and gradients added into float32 sums where the weight or x has one (trm_fast.grad_sums).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from trm_fast.grad_sums import bias_grad, grad_product, grad_sum_of, grad_sums_of, joined_rows, written_into
from trm_fast.kernels.matmul import autocast_cast, product


def _check(x, weight, bias):
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"linear: for x [..., {x.shape[-1]}] expects weight [N, {x.shape[-1]}] and bias [N] or None, "
                         f"got {tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}")
    if weight.device != x.device or (bias is not None and (bias.dtype != weight.dtype or bias.device != x.device)):
        raise ValueError(f"linear: weight / bias ({weight.dtype}, {None if bias is None else bias.dtype}) must share a "
                         f"dtype and x's device ({x.device})")


def linear_forward(x, weight, bias, out=None):
    """In weight's dtype (x is cast to it), written into `out` (contiguous, rows x N) where given; bias may be
    None."""
    _check(x, weight, bias)
    x = x.to(weight.dtype)
    shape = (*x.shape[:-1], weight.shape[0])
    if not x.is_cuda:
        return written_into(F.linear(x, weight, bias), out).view(shape)
    # cuBLASLt's tuned algorithm, or torch's call where that is faster (scripts/lt_matmul_bench.py)
    return product(x.reshape(-1, x.shape[-1]), weight.t(), bias, out=out).view(shape)


def linear_backward(grad_out, x, weight, has_bias: bool, grad_sums=(None, None), x_grad_sum=None,
                    needs_x_grad: bool = True, weight_joined: bool = False):
    """(grad x in x's dtype, grad weight, grad bias or None); x's, the weight's or the bias's gradient is None when
    added into its grad sum (`x_grad_sum`, `grad_sums`: trm_fast.grad_sums), x's also when not needed, the
    weight's also when left to its JoinedRows (`weight_joined`)."""
    flat = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
    grad_x = grad_product(x_grad_sum, flat, weight) if needs_x_grad else None
    grad_x = grad_x.to(x.dtype).view(x.shape) if grad_x is not None else None
    grad_weight = None if weight_joined else grad_product(grad_sums[0], flat.t(),
                                                          x.reshape(-1, x.shape[-1]).to(weight.dtype))
    if not has_bias:
        return grad_x, grad_weight, None
    grad_bias = (bias_grad(grad_sums[1], flat, weight.dtype) if flat.is_cuda
                 else flat.sum(0, dtype=torch.float32).to(weight.dtype))
    return grad_x, grad_weight, grad_bias


@torch.library.custom_op("trm_fast::linear", mutates_args=())
def linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return linear_forward(x, weight, bias)


@linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=weight.dtype)


@torch.library.custom_op("trm_fast::linear_backward", mutates_args=())
def linear_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x, grad weight, grad bias or empty)."""
    grad_x, grad_weight, grad_bias = linear_backward(grad_out, x, weight, has_bias)
    return grad_x, grad_weight, grad_bias if has_bias else weight.new_empty(0)


@linear_backward_op.register_fake
def _(grad_out, x, weight, has_bias):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0] if has_bias else 0)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    grad_x, grad_weight, grad_bias = linear_backward_op(grad_out, *ctx.saved_tensors, ctx.has_bias)
    return grad_x, grad_weight, grad_bias if ctx.has_bias else None


linear_op.register_autograd(_backward, setup_context=_setup_context)


class _Linear(torch.autograd.Function):
    """The eager path (see kernels/concat_linear.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, joined):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.grad_sums, ctx.x_grad_sum = grad_sums_of(weight, bias), grad_sum_of(x)
        # a tracked call whose x its maker wrote into a slot of the weight's JoinedRows: the output goes to that
        # slot's gradient rows, where the next op's backward writes its gradient over it
        k, out_slot = joined.output_slot(x) if joined is not None else (None, None)
        out = linear_forward(x, weight, bias, out_slot)
        if k is not None and joined.shift == 0:
            out.grad_in_place = True
        ctx.joined = (joined, k)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        joined, k = ctx.joined
        weight_joined = k is not None and joined.joins(k, grad_out)
        return linear_backward(grad_out, *ctx.saved_tensors, ctx.has_bias, ctx.grad_sums, ctx.x_grad_sum,
                               ctx.needs_input_grad[0], weight_joined) + (None,)


def linear(x, weight, bias) -> torch.Tensor:
    """F.linear(x, weight, bias) with the fast bias gradient, in weight's dtype or the autocast dtype; bias may be
    None."""
    weight, bias = autocast_cast(weight, bias)
    if torch.compiler.is_compiling():
        return linear_op(x, weight, bias)
    return _Linear.apply(x, weight, bias, joined_rows(weight))

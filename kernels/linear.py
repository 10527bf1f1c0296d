"""`trm_fast::linear`: `x @ weight.T + bias` by cuBLAS, forward and backward, for the attention's QKV and
output projections. It differs from F.linear only in the backward's bias gradient: kernels/column_sum.py on
CUDA instead of torch's reduction over the 8192 token rows (~0.8 TB/s on the H100, NOTES.md).
"""
import torch
import torch.nn.functional as F

from trm_fast.kernels.column_sum import sum_rows
from trm_fast.kernels.matmul import autocast_cast


def _check(x, weight, bias):
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or bias.shape != (weight.shape[0],):
        raise ValueError(f"linear: for x [..., {x.shape[-1]}] expects weight [N, {x.shape[-1]}] and bias [N], got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    if bias.dtype != weight.dtype or weight.device != x.device or bias.device != x.device:
        raise ValueError(f"linear: weight / bias ({weight.dtype}, {bias.dtype}) must share a dtype and x's device "
                         f"({x.device})")


def linear_forward(x, weight, bias):
    """In weight's dtype (x is cast to it)."""
    _check(x, weight, bias)
    return F.linear(x.to(weight.dtype), weight, bias)


def linear_backward(grad_out, x, weight):
    """(grad x in x's dtype, grad weight, grad bias)."""
    flat = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
    grad_x = (flat @ weight).to(x.dtype).view(x.shape)
    grad_weight = flat.t() @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
    grad_bias = sum_rows(flat, weight.dtype) if flat.is_cuda else flat.sum(0, dtype=torch.float32).to(weight.dtype)
    return grad_x, grad_weight, grad_bias


@torch.library.custom_op("trm_fast::linear", mutates_args=())
def linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return linear_forward(x, weight, bias)


@linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=weight.dtype)


@torch.library.custom_op("trm_fast::linear_backward", mutates_args=())
def linear_backward_op(grad_out: torch.Tensor, x: torch.Tensor,
                       weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return linear_backward(grad_out, x, weight)


@linear_backward_op.register_fake
def _(grad_out, x, weight):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad_out):
    return linear_backward_op(grad_out, *ctx.saved_tensors)


linear_op.register_autograd(_backward, setup_context=_setup_context)


class _Linear(torch.autograd.Function):
    """The eager path (see kernels/concat_linear.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return linear_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        return linear_backward(grad_out, *ctx.saved_tensors)


def linear(x, weight, bias) -> torch.Tensor:
    """F.linear(x, weight, bias) with the fast bias gradient, in weight's dtype or the autocast dtype."""
    weight, bias = autocast_cast(weight, bias)
    if torch.compiler.is_compiling():
        return linear_op(x, weight, bias)
    return _Linear.apply(x, weight, bias)

"""`trm_fast::add_layer_norm_into`: `out = layer_norm(x + residual)` in one pass, inference only.

One program per row, float32 statistics; `out` may be a strided view (e.g. the y or z slot of a
decoder's [B, 3D] state buffer), which removes the concatenation before the next projection. The kernel
can also take x as the sum of `parts` float32 partial products plus a bias (a split reduction's
partial sums, see `decode_feed_forward`).
"""
import torch
import triton
import triton.language as tl

from trm_fast import torch_ops
from trm_fast.kernels.pdl import launch_options, wait_for_previous


@triton.jit
def _add_layer_norm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, out_ptr, x_bias_ptr, stride_x, stride_r, stride_out, N, eps,
                           parts, stride_part, HAS_X_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    wait_for_previous(PDL)
    x = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    for part in range(parts):
        x += tl.load(x_ptr + part * stride_part + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        x += tl.load(x_bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
    tl.store(out_ptr + row * stride_out + cols, (centered * rstd * w + b).to(out_ptr.dtype.element_ty), mask=mask)


def add_layer_norm_triton(x, residual, weight, bias, eps: float, out, x_bias=None) -> None:
    """out = layer_norm(x + residual) for x [rows, N]; for x [parts, rows, N] (contiguous float32 partial
    sums) out = layer_norm(x.sum(0) + x_bias + residual)."""
    parts = x.shape[0] if x.dim() == 3 else 1
    rows, n = x.shape[-2:]
    _add_layer_norm_kernel[(rows,)](x, residual, weight, bias, out, out if x_bias is None else x_bias, x.stride(-2),
                                    residual.stride(0), out.stride(0), n, eps, parts, rows * n,
                                    HAS_X_BIAS=x_bias is not None, BLOCK=triton.next_power_of_2(n),
                                    **launch_options(x))


def _check(x, residual, weight, bias, out):
    if x.dim() != 2 or residual.shape != x.shape or out.shape != x.shape:
        raise ValueError(f"add_layer_norm_into: x {tuple(x.shape)}, residual {tuple(residual.shape)} and out "
                         f"{tuple(out.shape)} must be the same [rows, N]")
    if weight.shape != (x.shape[1],) or bias.shape != (x.shape[1],):
        raise ValueError(f"add_layer_norm_into: weight and bias must be [{x.shape[1]}]")
    if any(t.stride(1) != 1 for t in (x, residual, out)):
        raise ValueError("add_layer_norm_into: rows must be contiguous (any row stride)")


@torch.library.custom_op("trm_fast::add_layer_norm_into", mutates_args=("out",))
def add_layer_norm_into(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float, out: torch.Tensor) -> None:
    _check(x, residual, weight, bias, out)
    if x.is_cuda:
        add_layer_norm_triton(x, residual, weight, bias, eps, out)
    else:
        torch_ops.add_layer_norm_into(x, residual, weight, bias, eps, out)


@add_layer_norm_into.register_fake
def _(x, residual, weight, bias, eps, out):
    return None

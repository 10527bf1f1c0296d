"""`trm_fast::feed_forward`: `linear(gelu(linear(h, w1, b1)), w2, b2)` (exact GELU), forward and backward.

Forward: cuBLAS computes the pre-activation with its bias (h cast to the weights' dtype first), one elementwise
kernel applies GELU (in place when the pre-activation is not kept), cuBLAS the second product with its bias (the
residual add and dropout belong to `add_layer_norm`, which may take that bias too: b2 None). (With GELU in the
Triton matmul's epilogue instead, the first matmul took ~82 us in the d512 train step, cuBLAS' product alone ~31:
benchmarks/NOTES.md, session 18.) The products go through kernels/matmul.py's `product` (cuBLASLt without a
workspace on CUDA); the second and grad h's ran 25-26 us there against the Triton matmul's 29 (session 30).
Backward: grad_out @ w2 by cuBLAS, then one elementwise kernel multiplies it by GELU'(pre-activation) in place,
writes gelu(pre-activation) for grad w2 and sums grad b1 per band of rows; grad h by cuBLAS, the weight gradients
by cuBLAS (long K), grad b2 (when there is one) by kernels/column_sum.py.
(With dGELU in a Triton matmul's epilogue instead, grad_out @ w2 took 0.095 ms at d512, cuBLAS alone 0.033:
benchmarks/NOTES.md, sessions 14 and 15.)
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from trm_fast.grad_sums import bias_grad, grad_product, grad_sums_of, joined_rows, written_into
from trm_fast.kernels.column_sum import BAND_ROWS
from trm_fast.kernels.matmul import autocast_cast, product

_BAND_ROWS = tl.constexpr(BAND_ROWS)
_GELU_BLOCK = 4096


@triton.jit
def gelu_parts(x):
    """(gelu(x), gelu'(x)) for the exact GELU."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return x * cdf, cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327


@triton.jit
def _gelu_kernel(pre_ptr, act_ptr, n, BLOCK: tl.constexpr):
    """act = gelu(pre) elementwise over n elements (act may be pre)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    act, _ = gelu_parts(tl.load(pre_ptr + offsets, mask=offsets < n, other=0.0).to(tl.float32))
    tl.store(act_ptr + offsets, act.to(act_ptr.dtype.element_ty), mask=offsets < n)


@triton.jit
def _gelu_backward_kernel(grad_ptr, pre_ptr, act_ptr, sums_ptr, out_ptr, M, N, WRITE_ACT: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """For one band of rows: out = grad * gelu'(pre) (out may be grad or pre), act = gelu(pre) (WRITE_ACT), and the
    band's column sums of the (rounded) out in sums[band]."""
    band = tl.program_id(0)
    rows = band * _BAND_ROWS + tl.arange(0, _BAND_ROWS)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = (rows[:, None] < M) & (cols[None, :] < N)
    offsets = rows[:, None] * N + cols[None, :]
    act, slope = gelu_parts(tl.load(pre_ptr + offsets, mask=in_range, other=0.0).to(tl.float32))
    grad = (tl.load(grad_ptr + offsets, mask=in_range, other=0.0).to(tl.float32) * slope).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, grad, mask=in_range)
    if WRITE_ACT:
        tl.store(act_ptr + offsets, act.to(act_ptr.dtype.element_ty), mask=in_range)
    tl.store(sums_ptr + band * N + cols, tl.sum(grad.to(tl.float32), axis=0), mask=cols < N)


def feed_forward_fwd_triton(h, w1, b1, w2, b2, keep_pre: bool = True, into=(None, None, None)):
    """(out [M, D], pre-activation [M, F] or None, gelu(pre-activation) [M, F] or None) for a contiguous [M, D] h,
    computed in w1's dtype; b2 may be None. `into`: contiguous tensors to write pre, act and out into, each or None
    (JoinedRows' slots, trm_fast.grad_sums)."""
    pre = product(h.to(w1.dtype), w1.t(), b1, out=into[0])
    act = into[1] if into[1] is not None else torch.empty_like(pre) if keep_pre else pre
    _gelu_kernel[(triton.cdiv(pre.numel(), _GELU_BLOCK),)](pre, act, pre.numel(), BLOCK=_GELU_BLOCK, num_warps=8)
    out = product(act, w2.t(), b2, out=into[2])
    return (out, pre, act) if keep_pre else (out, None, None)


def feed_forward_bwd_triton(grad_out, h, pre, w1, w2, has_b2: bool, grad_sums=(None,) * 4, act=None,
                            joined=(False, False)):
    """(grad h in h's dtype, grad w1, grad b1, grad w2, grad b2 or None) for contiguous [M, D] grad_out and h and
    [M, F] pre-activation (and its gelu when the forward kept it, else formed here); a parameter's gradient is None
    when added into its grad_sums entry (w1, b1, w2, b2; trm_fast.grad_sums) or, `joined` (w1, w2), left to the
    weight's JoinedRows: for w1 the pre-activation's gradient is then written over the pre-activation."""
    dtype = w1.dtype
    M, F = pre.shape
    grad_pre = product(grad_out.to(dtype), w2)
    write_act = act is None
    act = torch.empty_like(pre) if write_act else act
    bands = triton.cdiv(M, BAND_ROWS)
    b1_bands = (grad_sums[1].band_sums(bands, F, pre.device) if grad_sums[1] is not None else
                torch.empty(bands, F, device=pre.device, dtype=torch.float32))
    # the fastest tiles of scripts/gelu_bench.py on the H100 (gelu_bench_H100.txt, session 24)
    block_n, warps = (128, 8) if write_act else (64, 4)
    out = pre if joined[0] else grad_pre
    _gelu_backward_kernel[(bands, triton.cdiv(F, block_n))](
        grad_pre, pre, act, b1_bands, out, M, F, WRITE_ACT=write_act, BLOCK_N=block_n, num_warps=warps)
    grad_pre = out
    grad_h = product(grad_pre, w1).to(h.dtype)
    return (grad_h, None if joined[0] else grad_product(grad_sums[0], grad_pre.t(), h.to(dtype)),
            bias_grad(grad_sums[1], b1_bands, dtype),
            None if joined[1] else grad_product(grad_sums[2], grad_out.t().to(dtype), act),
            bias_grad(grad_sums[3], grad_out, dtype) if has_b2 else None)


def _check(h, w1, b1, w2, b2):
    D = h.shape[-1]
    F = w1.shape[0] if w1.dim() == 2 else -1
    if w1.shape != (F, D) or b1.shape != (F,) or w2.shape != (D, F) or (b2 is not None and b2.shape != (D,)):
        raise ValueError(f"feed_forward: for h [..., {D}] expects w1 [F, {D}], b1 [F], w2 [{D}, F], b2 [{D}] or None; "
                         f"got {tuple(w1.shape)}, {tuple(b1.shape)}, {tuple(w2.shape)}, "
                         f"{None if b2 is None else tuple(b2.shape)}")
    weights = (b1, w2) if b2 is None else (b1, w2, b2)
    if any(t.dtype != w1.dtype or t.device != h.device for t in weights) or w1.device != h.device:
        raise ValueError(f"feed_forward: weights must share w1's dtype {w1.dtype} and h's device {h.device}")


def feed_forward_forward(h, w1, b1, w2, b2, keep_pre: bool = True, into=(None, None, None)):
    """(out in w1's dtype, pre-activation [rows, F] and its gelu, or None and None): Triton on CUDA, torch
    elsewhere; `into` as `feed_forward_fwd_triton`'s (keep_pre then True)."""
    _check(h, w1, b1, w2, b2)
    flat = h.reshape(-1, h.shape[-1]).contiguous()
    if h.is_cuda:
        out, pre, act = feed_forward_fwd_triton(flat, w1, b1, w2, b2, keep_pre, into)
    else:
        pre = torch.nn.functional.linear(flat.to(w1.dtype), w1, b1)
        act = torch.nn.functional.gelu(pre)
        out = torch.nn.functional.linear(act, w2, b2)
        pre, act, out = (written_into(t, slot) for t, slot in zip((pre, act, out), into))
        pre, act = (pre, act) if keep_pre else (None, None)
    return out.view(*h.shape[:-1], w2.shape[0]), pre, act


def feed_forward_backward(grad_out, h, pre, w1, w2, has_b2: bool, grad_sums=(None,) * 4, act=None,
                          joined=(False, False)):
    """(grad h, grad w1, grad b1, grad w2, grad b2 or None), from gelu(pre) as the forward kept it or formed here; a
    parameter's gradient is None when added into its grad_sums entry or (`joined`) left to its JoinedRows, as
    `feed_forward_bwd_triton`'s."""
    D = h.shape[-1]
    grad_flat, flat = grad_out.reshape(-1, D).contiguous(), h.reshape(-1, D).contiguous()
    if h.is_cuda:
        grads = feed_forward_bwd_triton(grad_flat, flat, pre, w1, w2, has_b2, grad_sums, act, joined)
    else:
        act = torch.nn.functional.gelu(pre) if act is None else act
        grad_pre = (grad_flat @ w2) * torch.ops.aten.gelu_backward(torch.ones_like(pre), pre)
        grad_pre = written_into(grad_pre, pre if joined[0] else None)
        grads = ((grad_pre @ w1).to(h.dtype),
                 None if joined[0] else grad_product(grad_sums[0], grad_pre.t(), flat.to(w1.dtype)),
                 grad_pre.sum(0), None if joined[1] else grad_product(grad_sums[2], grad_flat.t(), act),
                 grad_flat.sum(0) if has_b2 else None)
    return (grads[0].view(h.shape),) + tuple(grads[1:])


@torch.library.custom_op("trm_fast::feed_forward", mutates_args=())
def feed_forward_op(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                    b2: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, pre-activation [rows, F]): Triton on CUDA, torch elsewhere (the backward forms gelu(pre) again)."""
    return feed_forward_forward(h, w1, b1, w2, b2)[:2]


@feed_forward_op.register_fake
def _(h, w1, b1, w2, b2):
    return h.new_empty(h.shape, dtype=w1.dtype), h.new_empty(h.numel() // h.shape[-1], w1.shape[0], dtype=w1.dtype)


@torch.library.custom_op("trm_fast::feed_forward_backward", mutates_args=())
def feed_forward_backward_op(grad_out: torch.Tensor, h: torch.Tensor, pre: torch.Tensor, w1: torch.Tensor,
                             w2: torch.Tensor, has_b2: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor, torch.Tensor]:
    """(grad h, grad w1, grad b1, grad w2, grad b2 or empty)."""
    grads = feed_forward_backward(grad_out, h, pre, w1, w2, has_b2)
    return grads[:4] + (grads[4] if has_b2 else w2.new_empty(0),)


@feed_forward_backward_op.register_fake
def _(grad_out, h, pre, w1, w2, has_b2):
    return (torch.empty_like(h), torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(w2),
            w2.new_empty(w2.shape[0] if has_b2 else 0))


def _setup_context(ctx, inputs, output):
    h, w1, _, w2, b2 = inputs
    ctx.save_for_backward(h, output[1], w1, w2)
    ctx.has_b2 = b2 is not None


def _backward(ctx, grad_out, _grad_pre):
    h, pre, w1, w2 = ctx.saved_tensors
    grads = feed_forward_backward_op(grad_out, h, pre, w1, w2, ctx.has_b2)
    return grads[:4] + (grads[4] if ctx.has_b2 else None,)


feed_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _FeedForward(torch.autograd.Function):
    """The eager path (see kernels/concat_linear.py); with gradients it keeps the pre-activation and its gelu (the
    backward then writes no gelu of its own: -12 us a call at d512 for 34 MB more of saved activations), without
    neither."""

    @staticmethod
    def forward(ctx, h, w1, b1, w2, b2, joined):
        j1, j2 = joined  # the weights' JoinedRows in a tracked call, else None
        rows = h.numel() // h.shape[-1]
        k1, pre_slot = j1.output_slot(h) if j1 is not None else (None, None)  # (h written there by the LayerNorm)
        k2 = j2.take(rows, w2) if j2 is not None else None
        into = (pre_slot,) + ((j2.slot(j2.inputs, k2), j2.slot(j2.grads, k2)) if k2 is not None else (None, None))
        out, pre, act = feed_forward_forward(h, w1, b1, w2, b2, keep_pre=any(ctx.needs_input_grad), into=into)
        if k2 is not None:
            out.grad_in_place = True  # the next op's backward writes out's gradient over it (JoinedRows)
        ctx.save_for_backward(h, pre, w1, w2, act)
        ctx.has_b2 = b2 is not None
        ctx.grad_sums = grad_sums_of(w1, b1, w2, b2)
        ctx.joined = (j1, k1, j2, k2)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, pre, w1, w2, act = ctx.saved_tensors
        j1, k1, j2, k2 = ctx.joined
        if k1 is not None:  # (the backward writes pre's gradient over pre, in slot k1)
            j1.fill(k1)
        joined = (k1 is not None, k2 is not None and j2.joins(k2, grad_out))
        return feed_forward_backward(grad_out, h, pre, w1, w2, ctx.has_b2, ctx.grad_sums, act, joined) + (None,)


def feed_forward(h, w1, b1, w2, b2) -> torch.Tensor:
    """The TinyNet op (the signature of `torch_ops.feed_forward`), in w1's dtype or the autocast dtype; h may be
    wider (cast as it is loaded); b2 may be None."""
    w1, b1, w2, b2 = autocast_cast(w1, b1, w2, b2)
    if torch.compiler.is_compiling():
        return feed_forward_op(h, w1, b1, w2, b2)[0]
    return _FeedForward.apply(h, w1, b1, w2, b2, (joined_rows(w1), joined_rows(w2)))

"""`trm_fast::add_layer_norm`: `layer_norm(h + dropout(residual + residual_bias))` with its backward, for training.

Forward: one program per row, float32 statistics; the dropout mask is never stored: it is drawn from
(seed, row, column) by kernels/dropout.py and drawn again in the backward. Saved for the backward: h,
residual, and per row the mean and 1/std. `add_layer_norm_and_cast` also writes the output cast to the dtype
its next matmul runs in (autocast's copy, made here instead of by a separate cast kernel), or only that copy where
nothing reads the output in its own dtype; the backward adds that copy's gradient to the output's.
`residual_bias` is the bias of the linear layer that made the residual (the attention's output projection, the
FFN's second layer), added here instead of in that layer's matmul so that its gradient, the residual's gradient
summed over rows, comes out of this backward's reduction instead of a column sum of its own. Backward: a program
walks a band of rows, writes the input gradients (the residual's through the same mask) and keeps float32 partial
sums of the weight, bias (and residual bias) gradients, reduced over bands afterwards (kernels/column_sum.py, all in
one reduction).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from trm_fast.grad_sums import GradSum, grad_sum_of, plus, shared_grad_sum, written_into
from trm_fast.kernels.column_sum import sum_rows
from trm_fast.kernels.dropout import check_seed, keep_mask, load_seed, row_key, torch_keep_mask
from trm_fast.seeds import new_seed

ROWS_PER_PROGRAM = 16  # rows of a backward program (one band of partial sums)


@triton.jit
def _dropout_scale(seed_ptr, row, cols, p, HAS_DROPOUT: tl.constexpr):
    """Per element of the row: 1 / (1 - p) where dropout keeps it, else 0 (1 without dropout)."""
    scale = tl.full(cols.shape, 1.0, tl.float32)
    if HAS_DROPOUT:
        scale = tl.where(keep_mask(row_key(load_seed(seed_ptr), row), cols, p), scale * (1.0 / (1.0 - p)), 0.0)
    return scale


@triton.jit
def _residual(r_ptr, rb_ptr, offsets, cols, mask, HAS_RESIDUAL_BIAS: tl.constexpr):
    """The row's residual (+ residual bias), float32."""
    r = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL_BIAS:
        r += tl.load(rb_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return r


@triton.jit
def _residual_layer_norm_fwd_kernel(h_ptr, r_ptr, rb_ptr, w_ptr, b_ptr, out_ptr, cast_ptr, mean_ptr, rstd_ptr, N, eps,
                                    p, seed_ptr, HAS_DROPOUT: tl.constexpr, HAS_CAST: tl.constexpr,
                                    HAS_RESIDUAL_BIAS: tl.constexpr, HAS_OUT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    offsets = row * N + cols
    h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    r = _residual(r_ptr, rb_ptr, offsets, cols, mask, HAS_RESIDUAL_BIAS)
    s = h + r * _dropout_scale(seed_ptr, row, cols, p, HAS_DROPOUT)
    mean = tl.sum(s, axis=0) / N
    centered = tl.where(mask, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = centered * rstd * w + b
    if HAS_OUT:
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_CAST:
        tl.store(cast_ptr + offsets, y.to(cast_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _residual_layer_norm_bwd_kernel(dy_ptr, dcast_ptr, h_ptr, r_ptr, rb_ptr, w_ptr, mean_ptr, rstd_ptr, dh_ptr,
                                    dr_ptr, sums_ptr, M, N, p, seed_ptr, HAS_DROPOUT: tl.constexpr,
                                    HAS_CAST: tl.constexpr, HAS_RESIDUAL_BIAS: tl.constexpr, ROWS: tl.constexpr,
                                    BLOCK: tl.constexpr):
    """Per band of ROWS rows, row by row: grad h, grad residual, and the band's sums of the gradients of weight,
    bias (and residual bias) in sums[band] (2 or 3 rows of N)."""
    band = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    drb = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(ROWS):
        row = band * ROWS + i
        if row < M:
            offsets = row * N + cols
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if HAS_CAST:
                dy += tl.load(dcast_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            r = _residual(r_ptr, rb_ptr, offsets, cols, mask, HAS_RESIDUAL_BIAS)
            scale = _dropout_scale(seed_ptr, row, cols, p, HAS_DROPOUT)
            s = h + r * scale
            rstd = tl.load(rstd_ptr + row)
            xhat = tl.where(mask, (s - tl.load(mean_ptr + row)) * rstd, 0.0)
            wdy = w * dy
            ds = (wdy - (xhat * (tl.sum(xhat * wdy, axis=0) / N) + tl.sum(wdy, axis=0) / N)) * rstd
            tl.store(dh_ptr + offsets, ds.to(dh_ptr.dtype.element_ty), mask=mask)
            dr = (ds * scale).to(dr_ptr.dtype.element_ty)
            tl.store(dr_ptr + offsets, dr, mask=mask)
            dw += dy * xhat
            db += dy
            drb += dr.to(tl.float32)
    sums = sums_ptr + band * (2 + HAS_RESIDUAL_BIAS) * N
    tl.store(sums + cols, dw, mask=mask)
    tl.store(sums + N + cols, db, mask=mask)
    if HAS_RESIDUAL_BIAS:
        tl.store(sums + 2 * N + cols, drb, mask=mask)


def residual_layer_norm_fwd_triton(h, residual, weight, bias, eps: float, p: float, seed: Optional[torch.Tensor],
                                   cast: Optional[torch.Tensor] = None, residual_bias: Optional[torch.Tensor] = None,
                                   cast_only: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out in weight's dtype, mean, rstd) for contiguous [M, N] h and residual (of any float dtypes), and the
    output again in `cast` (a contiguous [M, N] tensor) when given; with `cast_only` (and a cast) only the cast is
    written and out is empty. `seed` (kernels/dropout.py) is read only when p > 0."""
    M, N = h.shape
    cast_only = cast_only and cast is not None
    out = torch.empty((0,) if cast_only else (M, N), device=h.device, dtype=weight.dtype)
    mean = torch.empty(M, device=h.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _residual_layer_norm_fwd_kernel[(M,)](h, residual, residual_bias if residual_bias is not None else weight, weight,
                                          bias, out, cast if cast is not None else out, mean, rstd, N, eps, p,
                                          seed if p > 0 else mean, HAS_DROPOUT=p > 0, HAS_CAST=cast is not None,
                                          HAS_RESIDUAL_BIAS=residual_bias is not None, HAS_OUT=not cast_only,
                                          BLOCK=triton.next_power_of_2(N))
    return out, mean, rstd


def residual_layer_norm_bwd_triton(grad_out, h, residual, weight, mean, rstd, p: float,
                                   seed: Optional[torch.Tensor], grad_cast: Optional[torch.Tensor] = None,
                                   residual_bias: Optional[torch.Tensor] = None, grad_sum=None,
                                   residual_in_place: bool = False):
    """(grad h, grad residual, grad weight, grad bias, grad residual bias or None); the output's gradient is
    grad_out + grad_cast. With `grad_sum` (the parameters', trm_fast.grad_sums) the parameters' gradients are
    added into it and returned as None. With `residual_in_place` grad residual is written over residual (each row
    read before it is written)."""
    M, N = h.shape
    bands = triton.cdiv(M, ROWS_PER_PROGRAM)
    grad_h, grad_residual = torch.empty_like(h), residual if residual_in_place else torch.empty_like(residual)
    sums = 2 if residual_bias is None else 3
    # per band: grad w, b (, rb); a slot of the sum's buffer where it has one (summed once for all calls)
    partial_sums = (grad_sum.band_sums(bands, sums * N, h.device) if grad_sum is not None else
                    torch.empty(bands, sums * N, device=h.device, dtype=torch.float32))
    _residual_layer_norm_bwd_kernel[(bands,)](grad_out, grad_cast if grad_cast is not None else grad_out, h, residual,
                                              residual_bias if residual_bias is not None else weight, weight, mean,
                                              rstd, grad_h, grad_residual, partial_sums, M, N, p,
                                              seed if p > 0 else mean, HAS_DROPOUT=p > 0,
                                              HAS_CAST=grad_cast is not None,
                                              HAS_RESIDUAL_BIAS=residual_bias is not None, ROWS=ROWS_PER_PROGRAM,
                                              BLOCK=triton.next_power_of_2(N))
    if grad_sum is not None:
        grad_sum.add_column_sums(partial_sums)
        return grad_h, grad_residual, None, None, None
    grad_sums = sum_rows(partial_sums, weight.dtype).view(sums, N)
    return (grad_h, grad_residual, grad_sums[0], grad_sums[1],
            grad_sums[2].to(residual_bias.dtype) if residual_bias is not None else None)


def _check(h, residual, weight, bias, p, seed, residual_bias):
    if residual.shape != h.shape or residual.device != h.device or not (h.is_floating_point()
                                                                        and residual.is_floating_point()):
        raise ValueError(f"add_layer_norm: h {tuple(h.shape)} {h.dtype} and residual {tuple(residual.shape)} "
                         f"{residual.dtype} must be float tensors of one shape and device")
    if weight is None or bias is None:
        raise ValueError("add_layer_norm: weight and bias must be tensors (the LayerNorm's), got None")
    for name, t in (("weight", weight), ("bias", bias), ("residual_bias", residual_bias)):
        if t is not None and (t.shape != (h.shape[-1],) or t.device != h.device):
            raise ValueError(f"add_layer_norm: {name} must be [{h.shape[-1]}] on {h.device}, got {tuple(t.shape)} "
                             f"on {t.device}")
    check_seed("add_layer_norm", seed, p, h.device)


def _dropped_torch(residual: torch.Tensor, p: float, seed: Optional[torch.Tensor]) -> torch.Tensor:
    """The CPU path's dropout, on `torch_keep_mask`'s mask."""
    if p == 0:
        return residual
    return residual * torch_keep_mask(residual.shape, p, seed).to(residual.device) / (1.0 - p)


def _summed_torch(h, residual, p, seed, residual_bias) -> torch.Tensor:
    """h + dropout(residual + residual_bias) in float32, [rows, N]."""
    r = residual.float() if residual_bias is None else residual.float() + residual_bias.float()
    return (h.float() + _dropped_torch(r, p, seed)).reshape(-1, h.shape[-1])


def _cast_wanted(dtype: Optional[torch.dtype], weight: torch.Tensor) -> bool:
    return dtype is not None and dtype != weight.dtype


def add_layer_norm_forward(h, residual, weight, bias, eps: float, p: float, seed: Optional[torch.Tensor],
                           cast_dtype: Optional[torch.dtype] = None, residual_bias: Optional[torch.Tensor] = None,
                           cast_only: bool = False, cast_into: Optional[torch.Tensor] = None):
    """(out in weight's dtype, out in cast_dtype (empty unless cast_dtype is given and differs), per-row mean,
    per-row 1/std): Triton on CUDA, the same math in torch elsewhere; float32 statistics and sum whatever the
    dtypes of h, residual and residual_bias. With `cast_only` and a cast, out is empty (not written). The cast is
    written into `cast_into` (contiguous, h's shape) where given."""
    _check(h, residual, weight, bias, p, seed, residual_bias)
    N = h.shape[-1]
    cast_wanted = _cast_wanted(cast_dtype, weight)
    cast_only = cast_only and cast_wanted
    if not h.is_cuda:
        s = _summed_torch(h, residual, p, seed, residual_bias)
        mean = s.mean(dim=1)
        rstd = torch.rsqrt(s.var(dim=1, unbiased=False) + eps)
        out = (((s - mean[:, None]) * rstd[:, None]) * weight.float() + bias.float()).to(weight.dtype).view(h.shape)
        cast = out.to(cast_dtype) if cast_wanted else h.new_empty(0)
        cast = written_into(cast, cast_into) if cast_wanted else cast
        return out.new_empty(0) if cast_only else out, cast, mean, rstd
    cast = None if not cast_wanted else cast_into if cast_into is not None else torch.empty(
        h.shape, device=h.device, dtype=cast_dtype)
    out, mean, rstd = residual_layer_norm_fwd_triton(h.reshape(-1, N).contiguous(),
                                                     residual.reshape(-1, N).contiguous(), weight, bias, eps, p, seed,
                                                     cast.view(-1, N) if cast is not None else None, residual_bias,
                                                     cast_only)
    return out if cast_only else out.view(h.shape), cast if cast is not None else h.new_empty(0), mean, rstd


def add_layer_norm_backward(grad_out, grad_cast, h, residual, weight, mean, rstd, p: float,
                            seed: Optional[torch.Tensor], residual_bias: Optional[torch.Tensor] = None, grad_sum=None,
                            residual_in_place: bool = False):
    """(grad h, grad residual, grad weight, grad bias, grad residual bias or None), each in its input's dtype; the
    output's gradient is grad_out plus grad_cast (the cast copy's, None or empty when there was none). With
    `grad_sum` the parameters' gradients are added into it (concatenated) and returned as None. With
    `residual_in_place` (a contiguous residual) grad residual is written over residual."""
    N = h.shape[-1]
    if grad_cast is not None and grad_cast.numel() == 0:
        grad_cast = None
    if h.is_cuda:
        grads = residual_layer_norm_bwd_triton(grad_out.reshape(-1, N).contiguous(), h.reshape(-1, N).contiguous(),
                                               residual.reshape(-1, N).contiguous(), weight, mean, rstd, p, seed,
                                               grad_cast.reshape(-1, N).contiguous() if grad_cast is not None else None,
                                               residual_bias, grad_sum, residual_in_place)
        return (grads[0].view(h.shape), grads[1].view(h.shape)) + grads[2:]
    xhat = (_summed_torch(h, residual, p, seed, residual_bias) - mean[:, None]) * rstd[:, None]
    dy = (grad_out.float() + (grad_cast.float() if grad_cast is not None else 0.0)).reshape(-1, N)
    wdy = dy * weight.float()
    ds = (wdy - xhat * (xhat * wdy).mean(dim=1, keepdim=True) - wdy.mean(dim=1, keepdim=True)) * rstd[:, None]
    grad_h = ds.to(h.dtype).view(h.shape)
    grad_residual = _dropped_torch(ds.view(h.shape), p, seed).to(residual.dtype, copy=True)  # never grad_h's alias
    grad_residual = written_into(grad_residual, residual if residual_in_place else None)
    param_grads = [(dy * xhat).sum(0), dy.sum(0)]
    if residual_bias is not None:
        param_grads.append(grad_residual.reshape(-1, N).sum(0, dtype=torch.float32))
    if grad_sum is not None:
        grad_sum.add_column_sums(torch.cat(param_grads)[None])
        return grad_h, grad_residual, None, None, None
    return (grad_h, grad_residual, param_grads[0].to(weight.dtype), param_grads[1].to(weight.dtype),
            param_grads[2].to(residual_bias.dtype) if residual_bias is not None else None)


@torch.library.custom_op("trm_fast::add_layer_norm", mutates_args=())
def add_layer_norm_op(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      p: float, seed: Optional[torch.Tensor], cast_dtype: Optional[torch.dtype],
                      residual_bias: Optional[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, out in cast_dtype or empty, per-row mean, per-row 1/std): Triton on CUDA, the same math in torch
    elsewhere."""
    return add_layer_norm_forward(h, residual, weight, bias, eps, p, seed, cast_dtype, residual_bias)


@add_layer_norm_op.register_fake
def _(h, residual, weight, bias, eps, p, seed, cast_dtype, residual_bias):
    rows = h.numel() // h.shape[-1]
    cast = h.new_empty(h.shape, dtype=cast_dtype) if _cast_wanted(cast_dtype, weight) else h.new_empty(0)
    return (h.new_empty(h.shape, dtype=weight.dtype), cast, h.new_empty(rows, dtype=torch.float32),
            h.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("trm_fast::add_layer_norm_backward", mutates_args=())
def add_layer_norm_backward_op(grad_out: torch.Tensor, grad_cast: Optional[torch.Tensor], h: torch.Tensor,
                               residual: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                               p: float, seed: Optional[torch.Tensor], residual_bias: Optional[torch.Tensor]
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad h, grad residual, grad weight, grad bias, grad residual bias or empty)."""
    grad_h, grad_residual, grad_weight, grad_bias, grad_rb = add_layer_norm_backward(
        grad_out, grad_cast, h, residual, weight, mean, rstd, p, seed, residual_bias)
    # on CUDA the bias gradients are rows of one tensor: outputs must not alias
    return (grad_h, grad_residual, grad_weight, grad_bias.clone(),
            grad_rb.clone() if grad_rb is not None else weight.new_empty(0))


@add_layer_norm_backward_op.register_fake
def _(grad_out, grad_cast, h, residual, weight, mean, rstd, p, seed, residual_bias):
    return (torch.empty_like(h), torch.empty_like(residual), torch.empty_like(weight), torch.empty_like(weight),
            torch.empty_like(residual_bias) if residual_bias is not None else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    h, residual, weight, _, _, p, seed, _, residual_bias = inputs
    _, _, mean, rstd = output
    ctx.save_for_backward(h, residual, weight, mean, rstd, seed, residual_bias)
    ctx.p = p


def _backward(ctx, grad_out, grad_cast, _grad_mean, _grad_rstd):
    h, residual, weight, mean, rstd, seed, residual_bias = ctx.saved_tensors
    grad_h, grad_residual, grad_weight, grad_bias, grad_rb = add_layer_norm_backward_op(
        grad_out, grad_cast, h, residual, weight, mean, rstd, ctx.p, seed, residual_bias)
    return (grad_h, grad_residual, grad_weight, grad_bias, None, None, None, None,
            grad_rb if residual_bias is not None else None)


add_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


class _AddLayerNorm(torch.autograd.Function):
    """The eager path (see kernels/concat_linear.py). With `cast_sums_grads` the cast copy gets a GradSum
    (trm_fast.grad_sums) that its uses may add their gradients into, read here as the copy's gradient; with
    `cast_only` the output in its own dtype is empty. Where h has a GradSum (`summing_grads`), h's gradient is
    handed to it."""

    @staticmethod
    def forward(ctx, h, residual, weight, bias, eps, p, seed, cast_dtype, residual_bias, cast_sums_grads, cast_only,
                cast_into):
        ctx.set_materialize_grads(False)
        out, cast, mean, rstd = add_layer_norm_forward(h, residual, weight, bias, eps, p, seed, cast_dtype,
                                                       residual_bias, cast_only, cast_into[0])
        # residual's maker laid it out for its gradient to be written over it (JoinedRows, trm_fast.grad_sums)
        ctx.residual_in_place = getattr(residual, "grad_in_place", False)
        ctx.save_for_backward(h, residual, weight, mean, rstd, seed, residual_bias)
        ctx.p = p
        ctx.grad_sum = shared_grad_sum(weight, bias, *(() if residual_bias is None else (residual_bias,)))
        ctx.h_grad_sum = grad_sum_of(h)
        ctx.cast_grad_sum = None
        if cast_sums_grads and cast.numel():
            cast.grad_sum = ctx.cast_grad_sum = GradSum(shape=cast.shape)
        return out, cast

    @staticmethod
    def backward(ctx, grad_out, grad_cast):
        total = ctx.cast_grad_sum.take() if ctx.cast_grad_sum is not None else None
        if total is not None:  # (a use that returned its gradient instead, the head's: read in its own dtype)
            grad_cast = plus(total, grad_cast)
        if grad_out is None:
            grad_out, grad_cast = grad_cast, None
        if grad_out is None:
            return (None,) * 12
        h, residual, weight, mean, rstd, seed, residual_bias = ctx.saved_tensors
        grad_h, grad_residual, grad_weight, grad_bias, grad_rb = add_layer_norm_backward(
            grad_out.reshape(h.shape), grad_cast, h, residual, weight, mean, rstd, ctx.p, seed, residual_bias,
            ctx.grad_sum, ctx.residual_in_place)
        if ctx.h_grad_sum is not None:  # handed over: h's other uses add theirs into it
            ctx.h_grad_sum.add(grad_h)
            grad_h = None
        return grad_h, grad_residual, grad_weight, grad_bias, None, None, None, None, grad_rb, None, None, None


def _add_layer_norm(h, residual, weight, bias, eps: float, dropout_p: float, cast_dtype: Optional[torch.dtype],
                    residual_bias: Optional[torch.Tensor], cast_sums_grads: bool = False, cast_only: bool = False,
                    cast_into: Optional[torch.Tensor] = None):
    seed = new_seed(h.device) if dropout_p > 0 else None
    if torch.compiler.is_compiling():
        return add_layer_norm_op(h, residual, weight, bias, eps, dropout_p, seed, cast_dtype, residual_bias)[:2]
    return _AddLayerNorm.apply(h, residual, weight, bias, eps, dropout_p, seed, cast_dtype, residual_bias,
                               cast_sums_grads, cast_only, (cast_into,))  # (cast_into not an input of the graph)


def add_layer_norm(h, residual, weight, bias, eps: float, dropout_p: float,
                   residual_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The TinyNet op: `layer_norm(h + dropout(residual + residual_bias))`, a fresh dropout seed per call; h,
    residual and residual_bias may differ in dtype (summed in float32); the output has the LayerNorm weight's
    dtype (float32 under autocast, as autocast runs layer_norm)."""
    return _add_layer_norm(h, residual, weight, bias, eps, dropout_p, None, residual_bias)[0]


def add_layer_norm_and_cast(h, residual, weight, bias, eps: float, dropout_p: float, dtype: Optional[torch.dtype],
                            residual_bias: Optional[torch.Tensor] = None, cast_sums_grads: bool = False,
                            cast_only: bool = False, cast_into: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(add_layer_norm's output, the output in `dtype`), the copy written by the same kernel (the output itself
    when `dtype` is None or its own dtype). With `cast_sums_grads` (eager calls) the copy's uses may add their
    gradients into its float32 `grad_sum` (trm_fast.grad_sums) instead of returning them: a copy read by several
    ops (a TinyNet state) then needs no gradient adds. With `cast_only`, for an output that only ever gets read in
    `dtype`, only the copy is written: (copy, copy). The copy is written into `cast_into` (contiguous, h's shape)
    where given."""
    out, cast = _add_layer_norm(h, residual, weight, bias, eps, dropout_p, dtype, residual_bias, cast_sums_grads,
                                cast_only, cast_into)
    if not _cast_wanted(dtype, weight):
        return out, out
    return (cast, cast) if cast_only else (out, cast)

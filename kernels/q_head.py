"""`trm_fast::q_head`: the seed's halting head on a supervision step's pooled y, `sigmoid(linear(layer_norm(pooled)))`
with the LayerNorm in float32 and the linear and sigmoid in `dtype` (autocast's: its input, weight and bias rounded to
it, the output rounded to it), forward and backward.

The seed's modules take 7 kernels forward and 10 backward a supervision step on [16, 512] (the LayerNorm, autocast's
three casts, the GEMM, the sigmoid; their backwards and copies): ~16 + ~26 us of launches and gaps on the H100 for
nothing a GPU notices. Here a program forms q_hat for a tile of rows (all of them at the seed's config); the backward
is one program over tiles of rows, which also sums the parameters' gradients (the linear's in `dtype`, as the seed's
bf16 GEMMs round them).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _normed(x_ptr, ln_w, ln_b, rows, cols, B, D, eps):
    """(layer_norm of the rows `rows` of x [B, D], float32; their normalized input; 1 / std per row)."""
    inside = (rows[:, None] < B) & (cols[None, :] < D)
    x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    centered = tl.where(inside, x - (tl.sum(x, axis=1) / D)[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
    xhat = centered * rstd[:, None]
    return xhat * ln_w[None, :] + ln_b[None, :], xhat, rstd


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x rounded to `dtype` (the linear's), back in float32."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _load_params(ln_w_ptr, ln_b_ptr, w_ptr, cols, D, dtype: tl.constexpr):
    inside = cols < D
    ln_w = tl.load(ln_w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    w = _rounded(tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32), dtype)
    return ln_w, ln_b, w


@triton.jit
def _q_head_fwd_kernel(x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, q_ptr, B, D, eps, ROWS: tl.constexpr,
                       BLOCK: tl.constexpr):
    dtype: tl.constexpr = q_ptr.dtype.element_ty
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    ln_w, ln_b, w = _load_params(ln_w_ptr, ln_b_ptr, w_ptr, cols, D, dtype)
    normed, _, _ = _normed(x_ptr, ln_w, ln_b, rows, cols, B, D, eps)
    z = tl.sum(_rounded(normed, dtype) * w[None, :], axis=1) + _rounded(tl.load(b_ptr).to(tl.float32), dtype)
    z = _rounded(z, dtype)
    tl.store(q_ptr + rows, (1.0 / (1.0 + tl.exp(-z))).to(dtype), mask=rows < B)


@triton.jit
def _q_head_bwd_kernel(x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, q_ptr, grad_q_ptr, grad_x_ptr, grad_ln_w_ptr, grad_ln_b_ptr,
                       grad_w_ptr, grad_b_ptr, B, D, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """One program: every row's input gradient (ROWS rows at a time), and the parameters' gradients summed over the
    rows."""
    dtype: tl.constexpr = q_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    ln_w, ln_b, w = _load_params(ln_w_ptr, ln_b_ptr, w_ptr, cols, D, dtype)
    sum_ln_w = tl.zeros((BLOCK,), tl.float32)
    sum_ln_b = tl.zeros((BLOCK,), tl.float32)
    sum_w = tl.zeros((BLOCK,), tl.float32)
    sum_b = tl.zeros([], tl.float32)
    for start in range(0, B, ROWS):
        rows = start + tl.arange(0, ROWS)
        normed, xhat, rstd = _normed(x_ptr, ln_w, ln_b, rows, cols, B, D, eps)
        q = tl.load(q_ptr + rows, mask=rows < B, other=0.0).to(tl.float32)
        grad_q = tl.load(grad_q_ptr + rows, mask=rows < B, other=0.0).to(tl.float32)
        grad_z = _rounded(grad_q * (1.0 - q) * q, dtype)  # the sigmoid's backward
        grad_normed = _rounded(grad_z[:, None] * w[None, :], dtype)  # the linear's input gradient, in its dtype
        sum_w += tl.sum(grad_z[:, None] * _rounded(normed, dtype), axis=0)
        sum_b += tl.sum(grad_z, axis=0)
        sum_ln_w += tl.sum(grad_normed * xhat, axis=0)
        sum_ln_b += tl.sum(grad_normed, axis=0)
        wg = grad_normed * ln_w[None, :]
        grad_x = (wg - (xhat * (tl.sum(wg * xhat, axis=1) / D)[:, None] + (tl.sum(wg, axis=1) / D)[:, None])) * \
            rstd[:, None]
        tl.store(grad_x_ptr + rows[:, None] * D + cols[None, :], grad_x.to(grad_x_ptr.dtype.element_ty),
                 mask=(rows[:, None] < B) & (cols[None, :] < D))
    inside = cols < D
    tl.store(grad_ln_w_ptr + cols, sum_ln_w.to(grad_ln_w_ptr.dtype.element_ty), mask=inside)
    tl.store(grad_ln_b_ptr + cols, sum_ln_b.to(grad_ln_b_ptr.dtype.element_ty), mask=inside)
    tl.store(grad_w_ptr + cols, _rounded(sum_w, dtype).to(grad_w_ptr.dtype.element_ty), mask=inside)
    tl.store(grad_b_ptr, _rounded(sum_b, dtype).to(grad_b_ptr.dtype.element_ty))


def _tiles(B: int, D: int) -> dict:
    """Rows a tile (a [ROWS, BLOCK] tile of at most 16384 elements: every row of the seed's B16 d512 at once)."""
    block = triton.next_power_of_2(D)
    return dict(ROWS=max(1, min(triton.next_power_of_2(B), 16384 // block)), BLOCK=block, num_warps=8)


def q_head_fwd_triton(pooled, ln_weight, ln_bias, eps: float, weight, bias, dtype: torch.dtype) -> torch.Tensor:
    """q_hat [B, 1] in `dtype` of contiguous pooled [B, D]."""
    B, D = pooled.shape
    q = torch.empty(B, 1, device=pooled.device, dtype=dtype)
    tiles = _tiles(B, D)
    _q_head_fwd_kernel[(triton.cdiv(B, tiles["ROWS"]),)](pooled, ln_weight, ln_bias, weight, bias, q, B, D, eps,
                                                          **tiles)
    return q


def q_head_bwd_triton(grad_q, pooled, ln_weight, ln_bias, eps: float, weight, q) -> Tuple[torch.Tensor, ...]:
    """(grad pooled, grad ln_weight, grad ln_bias, grad weight, grad bias), each in its input's dtype."""
    B, D = pooled.shape
    grads = (torch.empty_like(pooled), torch.empty_like(ln_weight), torch.empty_like(ln_bias),
             torch.empty(weight.shape, device=weight.device, dtype=weight.dtype),
             torch.empty(1, device=weight.device, dtype=weight.dtype))
    _q_head_bwd_kernel[(1,)](pooled, ln_weight, ln_bias, weight, q, grad_q.contiguous(), *grads, B, D, eps,
                             **_tiles(B, D))
    return grads


def _check(pooled, ln_weight, ln_bias, weight, bias, dtype):
    if not isinstance(pooled, torch.Tensor) or pooled.dim() != 2 or not pooled.is_floating_point():
        raise ValueError(f"q_head: pooled must be a float [B, D] tensor, got "
                         f"{tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__}")
    D = pooled.shape[1]
    for name, t, shape in (("ln_weight", ln_weight, (D,)), ("ln_bias", ln_bias, (D,)), ("weight", weight, (1, D)),
                           ("bias", bias, (1,))):
        if not isinstance(t, torch.Tensor) or t.shape != shape or t.device != pooled.device:
            got = f"{tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"q_head: {name} must be {list(shape)} on {pooled.device}, got {got}")
    if not dtype.is_floating_point:
        raise ValueError(f"q_head: dtype must be a float dtype, got {dtype}")


def _torch_q_head(pooled, ln_weight, ln_bias, eps: float, weight, bias, dtype: torch.dtype) -> torch.Tensor:
    """The seed's modules' math with autocast's casts made explicit (autocast off)."""
    with torch.autocast(pooled.device.type, enabled=False):
        normed = torch.nn.functional.layer_norm(pooled.to(ln_weight.dtype), (pooled.shape[1],), ln_weight, ln_bias,
                                                eps)
        return torch.sigmoid(torch.nn.functional.linear(normed.to(dtype), weight.to(dtype), bias.to(dtype)))


def q_head_forward(pooled, ln_weight, ln_bias, eps: float, weight, bias, dtype: torch.dtype) -> torch.Tensor:
    """q_hat [B, 1] in `dtype`: Triton on CUDA, torch elsewhere."""
    _check(pooled, ln_weight, ln_bias, weight, bias, dtype)
    if pooled.is_cuda:
        return q_head_fwd_triton(pooled.contiguous(), ln_weight, ln_bias, eps, weight, bias, dtype)
    return _torch_q_head(pooled, ln_weight, ln_bias, eps, weight, bias, dtype)


def q_head_backward(grad_q, pooled, ln_weight, ln_bias, eps: float, weight, bias, q) -> Tuple[torch.Tensor, ...]:
    """(grad pooled, grad ln_weight, grad ln_bias, grad weight, grad bias)."""
    if pooled.is_cuda:
        return q_head_bwd_triton(grad_q, pooled.contiguous(), ln_weight, ln_bias, eps, weight, q)
    math = ln_weight.dtype  # the kernel's formulas in torch, in the LayerNorm's dtype, rounded where it rounds

    def rounded(t):
        return t.to(q.dtype).to(math)

    x = pooled.to(math)
    centered = x - x.mean(1, keepdim=True)
    rstd = torch.rsqrt(centered.pow(2).mean(1, keepdim=True) + eps)
    xhat = centered * rstd
    q32 = q.to(math)
    grad_z = rounded(grad_q.to(math) * (1.0 - q32) * q32)
    grad_normed = rounded(grad_z * rounded(weight.to(math)))
    wg = grad_normed * ln_weight
    grad_x = (wg - xhat * (wg * xhat).mean(1, keepdim=True) - wg.mean(1, keepdim=True)) * rstd
    grad_weight = rounded((grad_z * rounded(xhat * ln_weight + ln_bias)).sum(0, keepdim=True))
    return (grad_x.to(pooled.dtype), (grad_normed * xhat).sum(0).to(ln_weight.dtype),
            grad_normed.sum(0).to(ln_bias.dtype), grad_weight.to(weight.dtype),
            rounded(grad_z.sum(0)).to(bias.dtype))


@torch.library.custom_op("trm_fast::q_head", mutates_args=())
def q_head_op(pooled: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, weight: torch.Tensor,
              bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q_head_forward(pooled, ln_weight, ln_bias, eps, weight, bias, dtype)


@q_head_op.register_fake
def _(pooled, ln_weight, ln_bias, eps, weight, bias, dtype):
    return pooled.new_empty(pooled.shape[0], 1, dtype=dtype)


@torch.library.custom_op("trm_fast::q_head_backward", mutates_args=())
def q_head_backward_op(grad_q: torch.Tensor, pooled: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                       eps: float, weight: torch.Tensor, bias: torch.Tensor,
                       q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(q_head_backward(grad_q, pooled, ln_weight, ln_bias, eps, weight, bias, q))


@q_head_backward_op.register_fake
def _(grad_q, pooled, ln_weight, ln_bias, eps, weight, bias, q):
    return (torch.empty_like(pooled), torch.empty_like(ln_weight), torch.empty_like(ln_bias), torch.empty_like(weight),
            torch.empty_like(bias))


def _setup_context(ctx, inputs, output):
    pooled, ln_weight, ln_bias, eps, weight, bias, _ = inputs
    ctx.save_for_backward(pooled, ln_weight, ln_bias, weight, bias, output)
    ctx.eps = eps


def _backward(ctx, grad_q):
    pooled, ln_weight, ln_bias, weight, bias, q = ctx.saved_tensors
    grads = q_head_backward_op(grad_q, pooled, ln_weight, ln_bias, ctx.eps, weight, bias, q)
    return grads[0], grads[1], grads[2], None, grads[3], grads[4], None


q_head_op.register_autograd(_backward, setup_context=_setup_context)


class _QHead(torch.autograd.Function):
    """The eager path (see kernels/concat_linear.py)."""

    @staticmethod
    def forward(ctx, pooled, ln_weight, ln_bias, eps, weight, bias, dtype):
        q = q_head_forward(pooled, ln_weight, ln_bias, eps, weight, bias, dtype)
        ctx.save_for_backward(pooled, ln_weight, ln_bias, weight, bias, q)
        ctx.eps = eps
        return q

    @staticmethod
    def backward(ctx, grad_q):
        pooled, ln_weight, ln_bias, weight, bias, q = ctx.saved_tensors
        grads = q_head_backward(grad_q, pooled, ln_weight, ln_bias, ctx.eps, weight, bias, q)
        return grads[0], grads[1], grads[2], None, grads[3], grads[4], None


def q_head(pooled: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, weight: torch.Tensor,
           bias: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """The op table's halting head (the signature of `torch_ops.q_head`): q_hat [B, 1] of pooled [B, D], the linear
    and sigmoid in `dtype` (autocast's; None: the parameters' own)."""
    dtype = dtype or weight.dtype
    if torch.compiler.is_compiling():
        return q_head_op(pooled, ln_weight, ln_bias, eps, weight, bias, dtype)
    return _QHead.apply(pooled, ln_weight, ln_bias, eps, weight, bias, dtype)

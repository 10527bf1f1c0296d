"""`trm_fast::decode_linear`: `linear(x, weight, bias)`, optionally followed by the exact GELU, for the
few rows of a decode step (inference only).

At one to a few rows a linear layer is a matrix-vector product whose time on the GPU is mostly fixed cost
(cuBLAS: ~3.5 us each on the H100 for a d512 TinyNet's projections, 80 of them per decode step). Here
each program owns `BLOCK_N` output columns over the whole reduction dimension: it loads that weight tile
once, into registers, and applies it to every row, so N / BLOCK_N (about 128) programs each make one
round trip to memory. Bias and GELU are applied in float32 before the single rounding to the output dtype.
`trm_fast::decode_add_norm_linear` also takes the residual add + LayerNorm before the product into the
kernel (each program normalizes the few rows itself), which saves the LayerNorm's launch.

    x       [M, K]  rows contiguous (any row stride: a view of the decoder's [B, 3D] state works)
    weight  [N, K]  contiguous;  bias [N] or None
    returns [M, N]

From 5 to 64 rows, `_tile_linear_kernel` takes the product on tensor cores instead: programs own
BLOCK_M x BLOCK_N output tiles and loop over K, with bias and GELU in the epilogue. At these rows cuBLAS's
time is mostly fixed cost too (3.1-4.5 us per TinyNet linear on the H100, benchmarks/NOTES.md).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from trm_fast import torch_ops
from trm_fast.kernels import add_layer_norm
from trm_fast.kernels.matmul import dot_as, dot_config
from trm_fast.kernels.pdl import launch_options, wait_for_previous

# Where this kernel beats cuBLAS on the H100 (results/issue5/decode_profile_H100.json, "kernels"): each
# program applies its weight tile to the rows one after another, so its time grows with the rows. At 1
# row it wins everywhere, at 4 rows on the TinyNet shapes but not on a 16000-wide head, at 8 rows nowhere.
MAX_ROWS = 4
MAX_OUTPUTS = 16384  # rows x N
MAX_TILE = 8192  # weight elements per program (BLOCK_N x BLOCK_K), held in registers as float32
TARGET_PROGRAMS = 128  # about one program per SM of an H100
MAX_TILE_ROWS = 64  # the tile kernel's range: 5-64 rows (measured at 16 and 64, results/issue5/decode_tiles_*)
MAX_TILE_OUTPUTS = 8192  # a 16000-wide head stays on cuBLAS, which was faster there


@triton.jit
def _decode_linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, r_ptr, ln_w_ptr, ln_b_ptr, normed_ptr, M, N, K, eps,
                          stride_x, stride_out, stride_r, stride_normed, HAS_BIAS: tl.constexpr,
                          GELU: tl.constexpr, ADD_NORM: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    col_in, k_in = cols < N, k < K
    w = tl.load(w_ptr + cols[:, None] * K + k[None, :], mask=col_in[:, None] & k_in[None, :], other=0.0)
    w = w.to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
    if ADD_NORM:
        ln_w = tl.load(ln_w_ptr + k, mask=k_in, other=0.0).to(tl.float32)
        ln_b = tl.load(ln_b_ptr + k, mask=k_in, other=0.0).to(tl.float32)
    wait_for_previous(PDL)  # the weights above are loaded while the previous kernel finishes
    for row in range(M):
        x = tl.load(x_ptr + row * stride_x + k, mask=k_in, other=0.0).to(tl.float32)
        if ADD_NORM:  # every program normalizes the row itself; the first one stores it
            x += tl.load(r_ptr + row * stride_r + k, mask=k_in, other=0.0).to(tl.float32)
            centered = tl.where(k_in, x - tl.sum(x, axis=0) / K, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / K + eps)
            normed = (centered * rstd * ln_w + ln_b).to(normed_ptr.dtype.element_ty)
            if tl.program_id(0) == 0:
                tl.store(normed_ptr + row * stride_normed + k, normed, mask=k_in)
            x = normed.to(tl.float32)
        acc = tl.sum(w * x[None, :], axis=1)
        if HAS_BIAS:
            acc += bias
        if GELU:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        tl.store(out_ptr + row * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_in)


@triton.jit
def _tile_linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, k_split, stride_x, stride_out, stride_split,
                        HAS_BIAS: tl.constexpr, GELU: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Output tile (program_id 0: columns, 1: rows) of the product over K[pid2 * k_split, + k_split)."""
    wait_for_previous(PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_in, row_in = cols < N, rows < M
    k_start = tl.program_id(2) * k_split
    k_end = tl.minimum(K, k_start + k_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_in = k < k_end
        x = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * K + k[:, None], mask=k_in[:, None] & col_in[None, :], other=0.0)
        acc = dot_as(x, w, acc, DOT_DTYPE, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    out_ptr += tl.program_id(2) * stride_split
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_in[:, None] & col_in[None, :])


def block_n(n: int, k: int) -> int:
    """Output columns per program: about TARGET_PROGRAMS programs, a tile of at most MAX_TILE weights."""
    cap = max(1, MAX_TILE // triton.next_power_of_2(k))
    wanted = max(1, n // TARGET_PROGRAMS)
    return min(cap, 1 << (wanted.bit_length() - 1))


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the matrix-vector kernel takes this product (few rows and outputs, a reduction in one tile)."""
    rows, (n, k) = x.shape[0], weight.shape
    return rows <= MAX_ROWS and rows * n <= MAX_OUTPUTS and triton.next_power_of_2(k) <= MAX_TILE


def fits_tiles(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the tile kernel takes it (more rows than the matrix-vector kernel, up to MAX_TILE_ROWS)."""
    return MAX_ROWS < x.shape[0] <= MAX_TILE_ROWS and weight.shape[0] <= MAX_TILE_OUTPUTS


def tile_config(M: int, N: int, K: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the tile kernel: the best or within 0.1 us of
    the best on the H100 at 16 and 64 rows for every TinyNet linear (results/issue5/decode_tiles_linear_H100.json)."""
    return min(64, max(16, triton.next_power_of_2(M))), 16, min(128, max(16, triton.next_power_of_2(K))), 4, 3


def _launch_tiles(x, weight, bias, gelu: bool, out, k_split: int, config) -> None:
    """The tile kernel over K in slices of `k_split`: one product into `out` [M, N] when k_split >= K, else
    one partial product per slice into `out` [parts, M, N]. `config`: the resolved tiles."""
    M, K = x.shape
    N = weight.shape[0]
    block_m, block_n_, block_k, warps, stages = config
    dtype, precision = dot_config(x.dtype)
    _tile_linear_kernel[(triton.cdiv(N, block_n_), triton.cdiv(M, block_m), triton.cdiv(K, k_split))](
        x, weight, weight if bias is None else bias, out, M, N, K, k_split, x.stride(0), out.stride(-2),
        out.stride(0) if out.dim() == 3 else 0, HAS_BIAS=bias is not None, GELU=gelu, DOT_DTYPE=dtype,
        PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n_, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        **launch_options(x))


def decode_linear_triton(x, weight, bias, gelu: bool, add_norm=None, config=None) -> torch.Tensor:
    """`add_norm` = (residual, ln_weight, ln_bias, eps, normed) (matrix-vector kernel only): the input rows
    are layer_norm(x + residual), also written to `normed`. `config`: the tile kernel's tiles (default
    `tile_config`)."""
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M > MAX_ROWS:
        if add_norm is not None:
            raise ValueError(f"decode_linear_triton: add_norm is fused for at most {MAX_ROWS} rows, got {M}")
        _launch_tiles(x, weight, bias, gelu, out, K, config or tile_config(M, N, K))
        return out
    cols = block_n(N, K)
    residual, ln_w, ln_b, eps, normed = add_norm or (x, weight, weight, 0.0, x)
    _decode_linear_kernel[(triton.cdiv(N, cols),)](
        x, weight, weight if bias is None else bias, out, residual, ln_w, ln_b, normed, M, N, K, eps, x.stride(0),
        out.stride(0), residual.stride(0), normed.stride(0), HAS_BIAS=bias is not None, GELU=gelu,
        ADD_NORM=add_norm is not None, BLOCK_N=cols, BLOCK_K=triton.next_power_of_2(K), num_warps=4,
        **launch_options(x))
    return out


def split_k_partials(x, weight, splits: int, config=None) -> torch.Tensor:
    """x @ weight.T as [parts, M, N] float32 partial products over `splits` slices of K (the tile kernel;
    fewer parts where K has fewer BLOCK_K blocks). Whoever sums them adds the bias."""
    (M, K), N = x.shape, weight.shape[0]
    config = config or tile_config(M, N, K)
    k_split = triton.cdiv(triton.cdiv(K, splits), config[2]) * config[2]  # whole BLOCK_K blocks per slice
    out = torch.empty(triton.cdiv(K, k_split), M, N, dtype=torch.float32, device=x.device)
    _launch_tiles(x, weight, None, False, out, k_split, config)
    return out


def _check(x, weight, bias):
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"decode_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} must be [M, K] and "
                         f"[N, K]")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"decode_linear: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError("decode_linear: x rows and weight must be contiguous")
    if any(t is not None and t.dtype != x.dtype for t in (weight, bias)):
        raise ValueError(f"decode_linear: weight and bias must be of x's dtype {x.dtype}")


@torch.library.custom_op("trm_fast::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool) -> torch.Tensor:
    _check(x, weight, bias)
    if x.is_cuda and (fits(x, weight) or fits_tiles(x, weight)):
        return decode_linear_triton(x, weight, bias, gelu)
    return torch_ops.decode_linear(x, weight, bias, gelu)


@decode_linear.register_fake
def _(x, weight, bias, gelu):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("trm_fast::decode_add_norm_linear", mutates_args=("normed",))
def decode_add_norm_linear(x: torch.Tensor, residual: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                           eps: float, normed: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           gelu: bool) -> torch.Tensor:
    """`normed[:] = layer_norm(x + residual)`, then `decode_linear(normed, ...)`: in one kernel where
    `decode_linear` takes the product (the normalization recomputed by each program), else in two."""
    _check(x, weight, bias)
    if residual.shape != x.shape or normed.shape != x.shape or ln_weight.shape != (x.shape[1],) \
            or ln_bias.shape != (x.shape[1],) or residual.stride(1) != 1 or normed.stride(1) != 1:
        raise ValueError(f"decode_add_norm_linear: residual and normed must be [{x.shape[0]}, {x.shape[1]}] with "
                         f"contiguous rows, ln_weight and ln_bias [{x.shape[1]}]")
    if x.is_cuda and fits(x, weight):
        return decode_linear_triton(x, weight, bias, gelu, (residual, ln_weight, ln_bias, eps, normed))
    if x.is_cuda:
        add_layer_norm.add_layer_norm_triton(x, residual, ln_weight, ln_bias, eps, normed)
        return decode_linear(normed, weight, bias, gelu)
    return torch_ops.decode_add_norm_linear(x, residual, ln_weight, ln_bias, eps, normed, weight, bias, gelu)


@decode_add_norm_linear.register_fake
def _(x, residual, ln_weight, ln_bias, eps, normed, weight, bias, gelu):
    return x.new_empty(x.shape[0], weight.shape[0])

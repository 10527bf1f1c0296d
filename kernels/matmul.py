"""One strided Triton matmul, its tile placement (shared with kernels/concat_linear.py's forward), the cuBLAS
product the other kernels call, and the dtype rules they share.

`matmul_into(a, b, out, dot_dtype)`: out = a @ b for 2-D tensors of any strides and dtypes (transposes and column
blocks are views; a and b are cast to the dot dtype as they are loaded, so an fp32 state meets a bf16 weight
without a copy), float32 accumulation. (A bias + erf-GELU epilogue for the FFN's first matmul was slower in the
train step than cuBLAS then a GELU pass: benchmarks/NOTES.md, session 18; the FFN's other products left it for
cuBLAS in session 30.) The concatenation's input gradients use it (column blocks of its weight).
Weight gradients (a [N, K] output summed over all tokens: few output tiles, long K) go to cuBLAS, which
splits K; a tiled kernel without split-K left most of the GPU idle there (measured, benchmarks/NOTES.md).

Dots follow PyTorch's float32 matmul precision: with fp32 operands they are IEEE float32 unless
`torch.set_float32_matmul_precision("high")` allows TF32, as cuBLAS would.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from trm_fast.ops import lt_matmul, lt_matmul_into, lt_matmul_into_torch, lt_matmul_torch
from trm_fast.torch_ops import autocast_dtype

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("TRM_FAST_AUTOTUNE", "1") != "0"
TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tile_configs(names, tiles, interpreted):
    """Autotuning configs from tuples (*block sizes named by `names`, num_warps, num_stages): all of `tiles`, the
    first alone with TRM_FAST_AUTOTUNE=0, `interpreted` alone under Triton's interpreter (which would time
    every config on the CPU)."""
    chosen = [interpreted] if INTERPRET else tiles if AUTOTUNE else tiles[:1]
    return [triton.Config(dict(zip(names, t)), num_warps=t[-2], num_stages=t[-1]) for t in chosen]


def dot_config(dtype: torch.dtype):
    """(Triton dot dtype, input precision) for operands computed in `dtype`."""
    if dtype == torch.float32:
        return tl.float32, "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return TRITON_DTYPES[dtype], "tf32"  # Triton's default; it only matters for fp32 operands


_INTERPRETED = tl.constexpr(INTERPRET)


@triton.jit
def dot_as(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with both operands rounded to DOT_DTYPE. (Triton's interpreter multiplies bf16 operands
    wrongly, so there the rounded values are multiplied in float32, which gives the same products.)"""
    a, b = a.to(DOT_DTYPE), b.to(DOT_DTYPE)
    if _INTERPRETED:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def grouped_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of the `tile`-th output tile, walked in column strips GROUP_M tile rows high so
    that tiles running together share their operand tiles in L2."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = tile // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    height = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    within = tile % (GROUP_M * tiles_n)
    return first_m + within % height, within // height


# from scripts/kernel_tiles.py on the H100 (benchmarks/NOTES.md, session 14); a persistent variant (one program
# per SM walking the tiles) was no faster there
@triton.autotune(configs=tile_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), [
    (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 3), (128, 256, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4), (128, 128, 64, 1, 8, 3)], (32, 32, 32, 2, 4, 1)), key=["M", "N", "K"])
@triton.heuristics({"EVEN": lambda args: all(args[d] % args["BLOCK_" + d] == 0 for d in "MNK")})
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN: tl.constexpr):
    """One output tile per program: the K loop (unmasked when EVEN: M, N, K multiples of the blocks), then the
    store."""
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_tile = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN:
            a, b = tl.load(a_tile), tl.load(b_tile)
        else:
            a = tl.load(a_tile, mask=(rows[:, None] < M) & (ks[None, :] < K - k0), other=0.0)
            b = tl.load(b_tile, mask=(ks[:, None] < K - k0) & (cols[None, :] < N), other=0.0)
        acc = dot_as(a, b, acc, DOT_DTYPE, PRECISION)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def autocast_cast(*tensors: Optional[torch.Tensor]):
    """The tensors in the autocast dtype when autocast is on for their device (what F.linear would run in); None
    stays None."""
    dtype = autocast_dtype(tensors[0].device.type)
    if dtype is None:
        return tensors
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


def matmul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, dot_dtype: torch.dtype) -> None:
    """out[:] = a @ b, the dot in `dot_dtype`."""
    (M, K), N = a.shape, b.shape[1]
    dtype, precision = dot_config(dot_dtype)
    _matmul_kernel[matmul_grid(M, N)](a, b, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                       out.stride(0), out.stride(1), DOT_DTYPE=dtype, PRECISION=precision)


def product(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b (+ bias) for 2-D operands of one dtype by cuBLAS, into `out` where given: for CUDA bf16 / fp16 through
    cuBLASLt without a workspace, each shape's fastest algorithm (trm_fast.ops.lt_matmul: none of the memsets, and
    the GPU's idle after them, that torch.addmm's kernels for the TinyNet's K = 512 products bring), else torch."""
    if out is None:
        if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
            return lt_matmul(a, b, bias)
        return lt_matmul_torch(a, b, bias)
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        lt_matmul_into(out, a, b, bias=bias)
    else:
        lt_matmul_into_torch(out, a, b, False, bias=bias)
    return out


def matmul_grid(M: int, N: int):
    """One program per output tile (a 1-D grid: grouped_tile places them)."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

"""Column sums of a [rows, N] matrix with float32 accumulation (bias gradients, and the per-band partial sums
that other kernels' epilogues write), in two passes: bands of rows summed in parallel, then the band sums.
torch's `x.sum(0)` over 8192 rows ran at ~0.8 TB/s on the H100 for the TinyNet's bias gradients
(benchmarks/NOTES.md, session 14)."""
from typing import Optional

import torch
import triton
import triton.language as tl

BAND_ROWS = 64  # rows per band of the partial sums that other kernels write (kernels/feed_forward.py)
ONE_PASS_ROWS = 512  # at most this many rows (partial sums, mostly) are summed in one pass
# the first pass: bands of 256 rows walked in 32 x 64 tiles (H100, scripts/column_sum_bench.py: 3.4 TB/s over
# [8192, 1536] bf16 from L2, where one 64 x 128 tile per program ran at 1.3; its warps and the second pass's as
# sum_rows sets them, session 28)
FIRST_PASS_ROWS, FIRST_PASS_TILE = 256, (32, 64)


@triton.jit
def _column_sum_kernel(x_ptr, out_ptr, R, N, stride_r, band_rows, ACCUMULATE: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """out[band, cols] = sum of x[rows of the band, cols] (float32), in out's dtype; with ACCUMULATE (one band, a
    float32 out) added to what out holds."""
    band = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = band * band_rows
    end = tl.minimum(first + band_rows, R)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for start in range(first, end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        acc += tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :], mask=(rows[:, None] < end) &
                       (cols[None, :] < N), other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0)
    if ACCUMULATE:
        total += tl.load(out_ptr + cols, mask=cols < N, other=0.0)
    tl.store(out_ptr + band * N + cols, total.to(out_ptr.dtype.element_ty), mask=cols < N)


def _sum_bands(x: torch.Tensor, out: torch.Tensor, band_rows: int, block_r: int, block_n: int, warps: int,
               accumulate: bool = False) -> None:
    R, N = x.shape
    grid = (triton.cdiv(N, block_n), triton.cdiv(R, band_rows))
    _column_sum_kernel[grid](x, out, R, N, x.stride(0), band_rows, ACCUMULATE=accumulate, BLOCK_R=block_r,
                             BLOCK_N=block_n, num_warps=warps)


def band_count(rows: int) -> int:
    """The bands of `sum_rows`' first pass over `rows` rows (1: it sums them in one pass)."""
    return triton.cdiv(rows, FIRST_PASS_ROWS) if rows > ONE_PASS_ROWS else 1


def sum_bands(x: torch.Tensor, bands: torch.Tensor) -> torch.Tensor:
    """`sum_rows`' first pass over x [R, N]: bands[i] (a [band_count(R), N] float32 tensor with unit column stride,
    returned) = the float32 column sums of x's rows i * FIRST_PASS_ROWS up to (i + 1) * FIRST_PASS_ROWS."""
    # where the columns give few programs (fewer than ~4 an SM), 8 warps each: -2.7 us at [8192, 512] from DRAM
    programs = triton.cdiv(x.shape[1], FIRST_PASS_TILE[1]) * bands.shape[0]
    _sum_bands(x, bands, FIRST_PASS_ROWS, *FIRST_PASS_TILE, warps=8 if programs < 512 else 4)
    return bands


def sum_rows(x: torch.Tensor, dtype: torch.dtype, into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x.sum(0) in `dtype`, accumulated in float32, for a CUDA (or, under TRITON_INTERPRET=1, CPU) [R, N] tensor
    with unit column stride: over more than ONE_PASS_ROWS rows, bands of FIRST_PASS_ROWS first (a loop of tiles per
    program), then the band sums in narrow column strips, all rows of a strip in one tile (many programs, one load
    each).
    With `into` (a contiguous float32 [N] tensor) the sums are added to it, which is returned."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"sum_rows: expects a 2-D tensor with unit column stride, got {tuple(x.shape)} strides "
                         f"{x.stride()}")
    R, N = x.shape
    if into is not None and (into.shape != (N,) or into.dtype != torch.float32 or not into.is_contiguous()
                             or into.device != x.device):
        raise ValueError(f"sum_rows: into must be a contiguous float32 [{N}] tensor on {x.device}, got {into.dtype} "
                         f"{tuple(into.shape)} on {into.device}")
    out = into if into is not None else torch.empty(N, device=x.device, dtype=dtype)
    if band_count(R) > 1:
        x = sum_bands(x, torch.empty(band_count(R), N, device=x.device, dtype=torch.float32))
        R = x.shape[0]
    block_r = min(max(triton.next_power_of_2(R), 16), ONE_PASS_ROWS)
    block_n = min(32, 8192 // block_r)
    # half the warps of a tile's elements / 1024 (at least 2): [128, 2048] float32 2.7 -> 1.8 us from L2
    _sum_bands(x, out, R, block_r, block_n, warps=4 if block_r * block_n > 4096 else 2, accumulate=into is not None)
    return out

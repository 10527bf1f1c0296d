"""Plans of kernels/column_sum.py's sum_rows for the step's column sums on the GPU: the bias gradients' [8192, N]
bf16 (two passes: bands of rows, then the band sums) and the partial sums other kernels write ([bands, N] float32,
one pass), each plan checked against torch. Microseconds per call replayed from a CUDA graph, with the input in L2
(hot: the same tensor every call) and not (cold: calls rotate over copies that together exceed the L2); in the
step a bias gradient's input was written a few kernels earlier.
    device run: cd scripts && python3 column_sum_bench.py
"""
import itertools

import torch
import triton

from profiling import graph_us
from trm_fast.kernels import column_sum

# (rows, N, dtype): the QKV bias's and the projections' gradients, the FFN's b1 bands, a LayerNorm's partial sums
SHAPES = [(8192, 1536, torch.bfloat16), (8192, 512, torch.bfloat16), (128, 2048, torch.float32),
          (512, 1536, torch.float32)]
COLD_BYTES = 160 << 20


def plan_us(x_copies, first, second, hot: bool) -> float:
    """us per sum_rows-like call: `first` (band_rows, block_r, block_n, warps) or None for one pass, then `second`
    (block_n, warps) over all remaining rows."""
    R, N = x_copies[0].shape
    bands = torch.empty(triton.cdiv(R, first[0]) if first else 1, N, device="cuda", dtype=torch.float32)
    out = torch.empty(N, device="cuda", dtype=torch.float32)
    calls = iter(itertools.cycle(x_copies[:1] if hot else x_copies))

    def run():
        x = next(calls)
        rows = x
        if first:
            band_rows, block_r, block_n, warps = first
            column_sum._column_sum_kernel[(triton.cdiv(N, block_n), bands.shape[0])](
                x, bands, R, N, x.stride(0), band_rows, ACCUMULATE=False, BLOCK_R=block_r, BLOCK_N=block_n,
                num_warps=warps)
            rows = bands
        block_r = max(triton.next_power_of_2(rows.shape[0]), 16)
        column_sum._column_sum_kernel[(triton.cdiv(N, second[0]), 1)](
            rows, out, rows.shape[0], N, rows.stride(0), rows.shape[0], ACCUMULATE=False, BLOCK_R=block_r,
            BLOCK_N=second[0], num_warps=second[1])
    run()
    torch.testing.assert_close(out, x_copies[0].float().sum(0), rtol=1e-4, atol=1e-3)
    return graph_us(run, calls=len(x_copies) * 8)


def main():
    print(torch.cuda.get_device_name())
    for R, N, dtype in SHAPES:
        nbytes = R * N * dtype.itemsize
        x_copies = [torch.randn(R, N, device="cuda").to(dtype) for _ in range(max(1, COLD_BYTES // nbytes))]
        firsts = [None] if R <= column_sum.ONE_PASS_ROWS else []
        firsts += [(band, block_r, block_n, warps) for band, block_r, block_n, warps in
                   itertools.product((64, 128, 256), (32, 64), (64, 128), (4, 8))
                   if block_r <= band and block_r * block_n <= 8192 and R // band <= column_sum.ONE_PASS_ROWS]
        seconds = list(itertools.product((8, 16, 32), (2, 4)))
        print(f"[{R}, {N}] {dtype}")
        for hot in (False, True):
            results = []
            for first in firsts:  # the first pass with one second-pass tiling, then the best first with every second
                results.append((plan_us(x_copies, first, (16, 4), hot), first, (16, 4)))
            best_first = min(results)[1]
            results += [(plan_us(x_copies, best_first, second, hot), best_first, second) for second in seconds]
            current = plan_us(x_copies, *current_plan(R, N), hot)
            print(f"  {'hot' if hot else 'cold'}: current plan {current:6.1f} us {current_plan(R, N)}")
            for us, first, second in sorted(results)[:6]:
                print(f"    {us:6.1f} us  first pass (band_rows, block_r, block_n, warps) {first}, second (block_n, "
                      f"warps) {second}  ({nbytes / us / 1e6:.2f} TB/s)")


def current_plan(R: int, N: int):
    """(first, second) as sum_rows runs them."""
    first = None
    if R > column_sum.ONE_PASS_ROWS:
        band_rows, (block_r, block_n) = column_sum.FIRST_PASS_ROWS, column_sum.FIRST_PASS_TILE
        R = triton.cdiv(R, band_rows)
        first = (band_rows, block_r, block_n, 8 if triton.cdiv(N, block_n) * R < 512 else 4)
    block_r = min(max(triton.next_power_of_2(R), 16), column_sum.ONE_PASS_ROWS)
    block_n = min(32, 8192 // block_r)
    return first, (block_n, 4 if block_r * block_n > 4096 else 2)


if __name__ == "__main__":
    main()

"""Tilings of kernels/column_sum.py's first pass (bands of rows summed per program) for the step's bias
gradients on the GPU (session 22): profiler means of 20 calls per tiling, each checked against torch.
    device run: python3 scripts/column_sum_bench.py
"""
import itertools

import torch
import triton

from profiling import kernel_times
from trm_fast.kernels import column_sum

SHAPES = [(8192, 1536), (8192, 512)]  # the QKV bias's and the projections' gradients, bf16


def first_pass_us(x, band_rows: int, block_r: int, block_n: int, warps: int, calls: int = 20) -> float:
    R, N = x.shape
    bands = torch.empty(triton.cdiv(R, band_rows), N, device=x.device, dtype=torch.float32)

    def run():
        column_sum._column_sum_kernel[(triton.cdiv(N, block_n), triton.cdiv(R, band_rows))](
            x, bands, R, N, x.stride(0), band_rows, ACCUMULATE=False, BLOCK_R=block_r, BLOCK_N=block_n,
            num_warps=warps)
    run()
    torch.testing.assert_close(bands.sum(0), x.float().sum(0), rtol=1e-3, atol=1e-2)
    return kernel_times(lambda: [run() for _ in range(calls)])[1] / calls


def main():
    print(torch.cuda.get_device_name())
    for R, N in SHAPES:
        x = torch.randn(R, N, device="cuda").bfloat16()
        print(f"[{R}, {N}] bf16: sum_rows {kernel_times(lambda: column_sum.sum_rows(x, torch.float32))[1]:.1f} us "
              f"(both passes, one call)")
        results = []
        for band_rows, block_r, block_n, warps in itertools.product((64, 128, 256), (32, 64), (64, 128, 256), (4, 8)):
            if block_r <= band_rows and block_r * block_n <= 16384:
                results.append((first_pass_us(x, band_rows, block_r, block_n, warps), band_rows, block_r, block_n,
                                warps))
        for us, *tiling in sorted(results)[:8]:
            print(f"  {us:6.1f} us  band_rows {tiling[0]}, block_r {tiling[1]}, block_n {tiling[2]}, warps {tiling[3]}"
                  f"  ({R * N * 2 / us / 1e6:.2f} TB/s)")


if __name__ == "__main__":
    main()

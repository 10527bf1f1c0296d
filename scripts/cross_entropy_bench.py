"""The loss kernel's pass that reads the logits for their statistics and writes the gradient (kernels/cross_entropy.py,
session 23) on the step's [8192, 16000] bf16 logits: block widths and warps, beside the statistics pass alone and the
gradient pass alone; profiler means of 10 calls each, the fused pass checked against the two.
    device run: python3 scripts/cross_entropy_bench.py
"""
import itertools

import torch

from profiling import kernel_times
from trm_fast.kernels import cross_entropy as ce

N, V = 8192, 16000


def mean_us(fn, calls: int = 10) -> float:
    fn()
    return kernel_times(lambda: [fn() for _ in range(calls)])[1] / calls


def main():
    print(torch.cuda.get_device_name())
    logits = (torch.randn(N, V, device="cuda") * 3).bfloat16()
    targets = torch.randint(0, V, (N,), device="cuda")
    scale = torch.full((1,), 1.0 / N, device="cuda")
    grad = torch.empty_like(logits)
    read_us = N * V * 2 / 3.35e6  # one read of the logits at the H100's 3.35 TB/s
    stats = mean_us(lambda: ce.cross_entropy_rows_triton(logits, targets, -100))
    lse = ce.cross_entropy_rows_triton(logits, targets, -100)[1]
    grad_only = mean_us(lambda: ce.cross_entropy_grad_triton(logits, targets, lse, -100, scale))
    print(f"statistics alone {stats:.1f} us, gradient alone {grad_only:.1f} us (one read of the logits: {read_us:.0f} "
          f"us)")
    expected = ce.cross_entropy_grad_triton(logits, targets, lse, -100, scale)
    results = []
    for block_v, warps in itertools.product((2048, 4096, 8192, 16384), (4, 8, 16)):
        ce.GRAD_BLOCK_V, ce.GRAD_WARPS = block_v, warps
        us = mean_us(lambda: ce.cross_entropy_rows_triton(logits, targets, -100, scale, grad))
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
        results.append((us, block_v, warps))
    for us, block_v, warps in sorted(results):
        print(f"  {us:6.1f} us  block {block_v}, warps {warps}")
    print(f"(the read and write floor: {2 * read_us:.0f} us)")


if __name__ == "__main__":
    main()

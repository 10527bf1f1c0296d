"""The FFN's GELU passes alone on the GPU (session 24): the forward pass (kernels/feed_forward.py `_gelu_kernel`) over
[8192, 2048] bf16 in blocks of 1024-16384 elements and 4-16 warps, and the backward pass with and without writing
gelu(pre), in column blocks of 64-256. Profiler means of 20 calls; the byte floors at 3.35 TB/s are 20 us (forward:
read + write) and 30 / 40 us (backward without / with the gelu written).
    device run: python3 scripts/gelu_bench.py
"""
import torch
import triton

from profiling import kernel_times
from trm_fast.kernels import feed_forward as ffn
from trm_fast.kernels.column_sum import BAND_ROWS

M, F = 8192, 2048


def per_call_us(fn, calls: int = 20) -> float:
    fn()
    _, busy, _, _ = kernel_times(lambda: [fn() for _ in range(calls)])
    return busy / calls


def main():
    print(torch.cuda.get_device_name())
    g = torch.Generator(device="cuda").manual_seed(0)
    pre = torch.randn(M, F, device="cuda", generator=g).bfloat16()
    act = torch.empty_like(pre)
    for block in (1024, 2048, 4096, 8192, 16384):
        for warps in (4, 8, 16):
            us = per_call_us(lambda: ffn._gelu_kernel[(triton.cdiv(pre.numel(), block),)](
                pre, act, pre.numel(), BLOCK=block, num_warps=warps))
            print(f"forward  BLOCK {block:5d} warps {warps:2d}: {us:6.1f} us")
    grad = torch.randn(M, F, device="cuda", generator=g).bfloat16()
    sums = torch.empty(triton.cdiv(M, BAND_ROWS), F, device="cuda")
    for write_act in (False, True):
        for block_n in (64, 128, 256):
            for warps in (4, 8):
                grid = (triton.cdiv(M, BAND_ROWS), triton.cdiv(F, block_n))
                us = per_call_us(lambda: ffn._gelu_backward_kernel[grid](
                    grad, pre, act, sums, M, F, WRITE_ACT=write_act, BLOCK_N=block_n, num_warps=warps))
                print(f"backward write_act {write_act!s:5} BLOCK_N {block_n:3d} warps {warps}: {us:6.1f} us")


if __name__ == "__main__":
    main()

"""The FFN's GELU passes alone on the GPU (session 24): the forward pass (kernels/feed_forward.py `_gelu_kernel`) over
[8192, 2048] bf16 in blocks of 1024-16384 elements and 4-16 warps, and the backward pass with and without writing
gelu(pre), in column blocks of 64-256; first, how many of their outputs differ from torch's (session 32). Profiler
means of 20 calls; the byte floors at 3.35 TB/s are 20 us (forward: read + write) and 30 / 40 us (backward without /
with the gelu written).
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


def print_differences(pre, grad):
    """How many outputs of the passes differ from torch's F.gelu and gelu_backward (bf16, the seed's ops)."""
    act = torch.empty_like(pre)
    ffn._gelu_kernel[(triton.cdiv(pre.numel(), 4096),)](pre, act, pre.numel(), BLOCK=4096, num_warps=8)
    grad_pre, sums = grad.clone(), torch.empty(triton.cdiv(M, BAND_ROWS), F, device="cuda")
    ffn._gelu_backward_kernel[(triton.cdiv(M, BAND_ROWS), F // 64)](grad_pre, pre, act, sums, grad_pre, M, F,
                                                                    WRITE_ACT=True, BLOCK_N=64)
    want_pre = torch.ops.aten.gelu_backward(grad, pre)
    print(f"outputs differing from torch's: gelu {int((act != torch.nn.functional.gelu(pre)).sum())}, gelu "
          f"backward {int((grad_pre != want_pre).sum())} (largest {float((grad_pre - want_pre).abs().max()):.3g}) of "
          f"{pre.numel()}")


def main():
    print(torch.cuda.get_device_name())
    g = torch.Generator(device="cuda").manual_seed(0)
    pre = (torch.randn(M, F, device="cuda", generator=g) * 3).bfloat16()
    act = torch.empty_like(pre)
    print_differences(pre, torch.randn(M, F, device="cuda", generator=g).bfloat16())
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
                    grad, pre, act, sums, grad, M, F, WRITE_ACT=write_act, BLOCK_N=block_n, num_warps=warps))
                print(f"backward write_act {write_act!s:5} BLOCK_N {block_n:3d} warps {warps}: {us:6.1f} us")


if __name__ == "__main__":
    main()

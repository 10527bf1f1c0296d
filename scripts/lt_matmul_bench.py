"""trm_fast.ops.lt_matmul (cuBLASLt without a workspace) against torch's call for the products the TinyNet
kernels give it (kernels/matmul.py `product`), at the d512 and d256 configs' shapes: microseconds per call replayed
from a CUDA graph (torch's memsets and the idle after them included), whether the outputs are bit-identical, and
the kernels each runs.
    device run: python3 scripts/lt_matmul_bench.py
"""
import torch

from profiling import graph_us, kernel_times
from trm_fast.kernels.matmul import matmul_into
from trm_fast.ops import lt_matmul

# name: (rows, K, N, bias, b as a transposed weight [N, K])
SHAPES = {"QKV + bias": (8192, 512, 1536, True, True), "FFN up + bias": (8192, 512, 2048, True, True),
          "output projection": (8192, 512, 512, False, True), "FFN backward grad @ w2": (8192, 512, 2048, False, False),
          "head (eval logits)": (8192, 512, 16000, False, True), "FFN down": (8192, 2048, 512, False, True),
          "FFN backward grad @ w1": (8192, 2048, 512, False, False),
          "d256 QKV + bias": (8192, 256, 768, True, True), "d256 FFN up + bias": (8192, 256, 1024, True, True),
          "d256 grad @ w2": (8192, 256, 1024, False, False)}

TRITON_SHAPES = ("FFN down", "FFN backward grad @ w1")  # on the Triton matmul before session 30


def torch_product(a, b, bias):
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def kernel_names(fn) -> str:
    return ", ".join(sorted(name[:48] for name in kernel_times(fn)[2]))


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (R, K, N, has_bias, transposed) in SHAPES.items():
        a = torch.randn(R, K, device="cuda", generator=g).bfloat16()
        w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).bfloat16()
        b = w.t() if transposed else w.t().contiguous()
        bias = torch.randn(N, device="cuda", generator=g).bfloat16() if has_bias else None
        same = torch.equal(lt_matmul(a, b, bias), torch_product(a, b, bias))
        ours, theirs = graph_us(lambda: lt_matmul(a, b, bias)), graph_us(lambda: torch_product(a, b, bias))
        print(f"{name:24s} [{R}, {K}] @ [{K}, {N}]: torch {theirs:6.1f} us | lt_matmul {ours:6.1f} us "
              f"({ours - theirs:+.1f}; bit-identical: {same})")
        if name in TRITON_SHAPES:
            out = torch.empty(R, N, device="cuda", dtype=torch.bfloat16)
            print(f"    Triton matmul {graph_us(lambda: matmul_into(a, b, out, torch.bfloat16)):6.1f} us")
        print(f"    torch: {kernel_names(lambda: torch_product(a, b, bias))}")
        print(f"    lt:    {kernel_names(lambda: lt_matmul(a, b, bias))}")


if __name__ == "__main__":
    main()

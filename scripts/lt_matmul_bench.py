"""trm_fast.ops.lt_matmul / lt_matmul_into (cuBLASLt without a workspace, each shape's algorithm timed at its first
call) against torch's call for the products of the TinyNet's train step at the d512 and d256 configs' shapes:
microseconds per call replayed from a CUDA graph (torch's memsets and the idle after them included), the largest
difference from torch's output in units of the output dtype's last place (at the output's largest magnitude), and
the paths as lt_matmul_timings times them alone (torch's call; cuBLASLt's heuristic's first, fastest, how many).
    device run: python3 scripts/lt_matmul_bench.py
"""
import torch

from profiling import graph_us
from trm_fast.ops import lt_matmul, lt_matmul_into, lt_matmul_timings

# name: (rows, K, N, kind) with kind "bias" (a @ w.T + bias), "wT" (a @ w.T), "w" (a @ w, w [K, N] row-major),
# "grad" (float32 total += g.T @ x: a weight's gradient, a column-major)
SHAPES = {"QKV + bias": (8192, 512, 1536, "bias"), "FFN up + bias": (8192, 512, 2048, "bias"),
          "output projection": (8192, 512, 512, "wT"), "head logits": (8192, 512, 16000, "wT"),
          "FFN down": (8192, 2048, 512, "wT"), "FFN grad @ w2": (8192, 512, 2048, "w"),
          "FFN grad @ w1": (8192, 2048, 512, "w"), "QKV grad @ w": (8192, 1536, 512, "w"),
          "head grad @ w": (8192, 16000, 512, "w"),
          "dW QKV": (1536, 8192, 512, "grad"), "dW output projection": (512, 8192, 512, "grad"),
          "dW FFN w1": (2048, 8192, 512, "grad"), "dW FFN w2": (512, 8192, 2048, "grad"),
          "dW concat xyz": (512, 8192, 1536, "grad"), "dW head": (16000, 8192, 512, "grad"),
          "d256 QKV + bias": (8192, 256, 768, "bias"), "d256 FFN up + bias": (8192, 256, 1024, "bias"),
          "d256 dW FFN w1": (1024, 8192, 256, "grad")}


def operands(R, K, N, kind, g):
    """(a, b, bias, total): the product's operands as the step has them, total the float32 sum for "grad"."""
    if kind == "grad":
        a = torch.randn(K, R, device="cuda", generator=g).bfloat16().t()
        b = torch.randn(K, N, device="cuda", generator=g).bfloat16()
        return a, b, None, torch.zeros(R, N, device="cuda")
    a = torch.randn(R, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).bfloat16()
    bias = torch.randn(N, device="cuda", generator=g).bfloat16() if kind == "bias" else None
    return a, (w.t().contiguous() if kind == "w" else w.t()), bias, None


def ulps(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """The largest |ours - theirs| in units of the last place of theirs' dtype at theirs' largest magnitude."""
    largest = theirs.float().abs().max()
    return float((ours.float() - theirs.float()).abs().max() / (largest * torch.finfo(theirs.dtype).eps))


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (R, K, N, kind) in SHAPES.items():
        a, b, bias, total = operands(R, K, N, kind, g)
        if kind == "grad":
            theirs = lambda: torch.addmm(total, a, b, out_dtype=torch.float32, out=total)  # noqa: E731
            ours = lambda: lt_matmul_into(total, a, b, accumulate=True)  # noqa: E731
            reference = torch.mm(a, b, out_dtype=torch.float32)
            mine = torch.empty_like(total)
            lt_matmul_into(mine, a, b)
            timings = lt_matmul_timings(a, b, out_dtype=torch.float32, accumulate=True)
        else:
            theirs = lambda: torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)  # noqa: E731
            ours = lambda: lt_matmul(a, b, bias)  # noqa: E731
            reference, mine, timings = theirs(), ours(), lt_matmul_timings(a, b, bias)
        torch_us, lt_us = graph_us(theirs), graph_us(ours)
        candidates, torch_alone = timings[:-1], timings[-1]
        finite = [t for t in candidates if t != float("inf")]
        print(f"{name:22s} [{R}, {K}] @ [{K}, {N}]: torch {torch_us:6.1f} us | lt_matmul {lt_us:6.1f} us "
              f"({lt_us - torch_us:+.1f}; {ulps(mine, reference):.2f} ulp from torch) | alone: torch "
              f"{torch_alone:6.1f}, heuristic's first {candidates[0] if candidates else float('nan'):6.1f}, fastest "
              f"{min(finite, default=float('nan')):6.1f} (#{candidates.index(min(finite)) if finite else -1} of "
              f"{len(candidates)})")


if __name__ == "__main__":
    main()

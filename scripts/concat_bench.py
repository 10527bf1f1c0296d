"""The concat projection's kernels alone on the GPU (session 22): the forward on bf16 and float32 inputs against
cuBLAS on the joined inputs, and the weight gradient added into a float32 sum two ways: the inputs joined
(`cast_join`) then one GEMM, or one GEMM per input into the sum's column block. Profiler means of 20 calls.
    device run: python3 scripts/concat_bench.py
"""
import torch

from profiling import kernel_times
from trm_fast.kernels import concat_linear as cl

M, K = 8192, 512


def per_call_us(fn, calls: int = 20) -> str:
    fn()
    _, busy, by_name, counts = kernel_times(lambda: [fn() for _ in range(calls)], name_width=40)
    parts = ", ".join(f"{name.strip()} {us / calls:.1f}" for name, us in by_name.most_common())
    return f"{busy / calls:7.1f} us  ({parts})"


def main():
    print(torch.cuda.get_device_name())
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (2, 3):
        xs = [torch.randn(M, K, device="cuda", generator=g) for _ in range(n)]
        weight = torch.randn(K, n * K, device="cuda", generator=g).bfloat16() * 0.05
        bias = torch.zeros(K, device="cuda").bfloat16()
        xs_bf16 = [x.bfloat16() for x in xs]
        joined = torch.cat(xs_bf16, 1)
        for name, inputs in (("float32", xs), ("bf16", xs_bf16)):
            forward = lambda: cl.concat_linear_fwd_triton(inputs, weight, bias)  # noqa: E731
            print(f"{n} inputs, forward: {name} inputs {per_call_us(forward)}")
        print(f"{n} inputs, forward: cuBLAS joined  {per_call_us(lambda: torch.addmm(bias, joined, weight.t()))}")
        torch.testing.assert_close(cl.concat_linear_fwd_triton(xs_bf16, weight, bias).float(),
                                   torch.addmm(bias, joined, weight.t()).float(), rtol=2e-2, atol=2e-2)
        grad_out = torch.randn(M, K, device="cuda", generator=g).bfloat16()
        total = torch.zeros(K, n * K, device="cuda")

        def joined_gemm():
            torch.addmm(total, grad_out.t(), cl.cast_join(xs_bf16, torch.bfloat16), out_dtype=torch.float32, out=total)

        def per_input():
            for i, x in enumerate(xs_bf16):
                block = total[:, i * K:(i + 1) * K]
                torch.addmm(block, grad_out.t(), x, out_dtype=torch.float32, out=block)
        print(f"{n} inputs, weight grad: joined     {per_call_us(joined_gemm)}")
        print(f"{n} inputs, weight grad: per input  {per_call_us(per_input)}")
        total.zero_()
        per_input()
        torch.testing.assert_close(total, grad_out.t().float() @ joined.float(), rtol=1e-3, atol=1e-2)


if __name__ == "__main__":
    main()

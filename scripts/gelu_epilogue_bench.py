"""What cuBLASLt's GELU epilogue would save the FFN's no-grad forward (session 26, a measurement for the issue-3
notes, not a path of the package): FFN up [8192, 512] @ [512, 2048] + bias as cuBLAS addmm then the erf-GELU pass
(kernels/feed_forward.py, what the model runs), against `torch._addmm_activation(..., use_gelu=True)`, whose
cuBLASLt epilogue is GELU's tanh approximation, not the seed's erf GELU; and how often the two round to different
bf16 outputs. Microseconds per call replayed from a CUDA graph.
    device run: python3 scripts/gelu_epilogue_bench.py
"""
import torch
import torch.nn.functional as F
import triton

from profiling import graph_us
from trm_fast.kernels import feed_forward as ffn

M, D, F_DIM = 8192, 512, 2048


def main():
    print(torch.cuda.get_device_name())
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, D, device="cuda", generator=g).bfloat16()
    w = (torch.randn(F_DIM, D, device="cuda", generator=g) / D ** 0.5).bfloat16()
    b = (torch.randn(F_DIM, device="cuda", generator=g) * 0.1).bfloat16()
    pre, act = torch.empty(M, F_DIM, device="cuda", dtype=torch.bfloat16), torch.empty(M, F_DIM, device="cuda",
                                                                                         dtype=torch.bfloat16)

    def erf_path():
        torch.addmm(b, x, w.t(), out=pre)
        ffn._gelu_kernel[(triton.cdiv(pre.numel(), ffn._GELU_BLOCK),)](pre, act, pre.numel(), BLOCK=ffn._GELU_BLOCK,
                                                                        num_warps=8)
    times = {"addmm alone": lambda: torch.addmm(b, x, w.t(), out=pre), "addmm + erf-GELU pass": erf_path,
             "cuBLASLt GELU epilogue (tanh)": lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)}
    for name, fn in times.items():
        print(f"  {name:32s} {graph_us(fn):6.1f} us")
    erf_path()
    tanh = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    exact = F.gelu(pre.float()).bfloat16()
    print(f"  erf pass vs F.gelu: {int((act != exact).sum())} of {act.numel()} bf16 outputs differ")
    differ = tanh != act
    print(f"  tanh epilogue vs erf: {int(differ.sum())} of {act.numel()} bf16 outputs differ "
          f"({100 * float(differ.float().mean()):.2f}%), max abs difference "
          f"{float((tanh.float() - act.float()).abs().max()):.2e}")


if __name__ == "__main__":
    main()

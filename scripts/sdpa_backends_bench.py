"""The attention kernels beside each of PyTorch's SDPA backends (FlashAttention, cuDNN, memory-efficient) at the
train step's two shapes (B16 L512 Dh64, B8 L1024 Dh32; 8 heads, bf16, causal): the profiler's mean kernel
microseconds per call over 20 back-to-back calls (no L2 flush, as in a step), forward alone and forward +
backward, with attention dropout 0.1 and without. SDPA gets `is_causal=True` and no padding mask (ours keeps its
key test on an all-valid mask), so its numbers are a lower bound for what the model's masked call would take.

    python3 scripts/sdpa_backends_bench.py [--json out.json]
"""
import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention_bench import CASES  # the train step's attention shapes
from profiling import kernel_times
from trm_fast.kernels import attention
from trm_fast.seeds import new_seed

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
CALLS = 20


def us_per_call(fn) -> float:
    """Mean kernel microseconds of one call of `fn`, over CALLS calls after two warm-up calls."""
    fn(), fn()
    torch.cuda.synchronize()
    _, busy, _, _ = kernel_times(lambda: [fn() for _ in range(CALLS)])
    return round(busy / CALLS, 1)


def ours(qkv, do, p):
    key_valid = torch.ones(qkv.shape[:2], dtype=torch.bool, device="cuda")
    seed = new_seed("cuda") if p else None
    forward = lambda: attention.attention_fwd_triton(qkv, key_valid, p, seed)  # noqa: E731
    o, lse = forward()

    def forward_backward():
        forward()
        attention.attention_bwd_triton(do, qkv, o, lse, key_valid, p, seed)
    return forward, forward_backward


def sdpa(qkv, do, p, backend):
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in qkv.detach().unbind(2))
    do = do.transpose(1, 2)

    def forward():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)

    def forward_backward():
        torch.autograd.grad(forward(), (q, k, v), do)
    return forward, forward_backward


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "calls": CALLS}
    for B, L, H, Dh in CASES:
        qkv = torch.randn(B, L, 3, H, Dh, device="cuda", dtype=torch.bfloat16)
        do = torch.randn(B, L, H, Dh, device="cuda", dtype=torch.bfloat16)
        flops = 4 * B * H * L * L * Dh / 2
        case = {}
        for p in (0.1, 0.0):
            impls = {"triton": ours(qkv, do, p)}
            impls.update({name: sdpa(qkv, do, p, backend) for name, backend in BACKENDS.items()})
            for name, (forward, forward_backward) in impls.items():
                try:
                    fwd, fwd_bwd = us_per_call(forward), us_per_call(forward_backward)
                except RuntimeError as e:
                    case[f"{name} p{p}"] = f"unavailable: {str(e).splitlines()[0][:120]}"
                    continue
                case[f"{name} p{p}"] = {"fwd us": fwd, "fwd+bwd us": fwd_bwd,
                                        "fwd TFLOP/s": round(flops / fwd / 1e6, 1),
                                        "fwd+bwd TFLOP/s": round(3.5 * flops / fwd_bwd / 1e6, 1)}
        name = f"B{B} L{L} H{H} Dh{Dh}"
        results[name] = case
        print(name, json.dumps(case, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""The attention kernels alone at the train step's two shapes (B16 L512 Dh64, B8 L1024 Dh32; 8 heads, bf16), beside
PyTorch's SDPA (causal, FlashAttention backend, no padding mask) on the same sizes: medians of
triton.testing.do_bench, forward with and without dropout and forward + backward with it; then each Triton kernel's
mean microseconds over 30 back-to-back forward + backward calls (the profiler's device times: do_bench flushes the
L2 between calls, which a step does not). For A/B runs, put the old tree first on PYTHONPATH.

    python3 scripts/attention_bench.py [--json out.json]
"""
import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from profiling import kernel_times
from trm_fast.kernels import attention
from trm_fast.seeds import new_seed

CASES = ((16, 512, 8, 64), (8, 1024, 8, 32))
P = 0.1


def median_ms(fn) -> float:
    return round(do_bench(fn, warmup=25, rep=100, return_mode="median"), 4)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "p": P}
    for B, L, H, Dh in CASES:
        qkv = torch.randn(B, L, 3, H, Dh, device="cuda", dtype=torch.bfloat16)
        key_valid = torch.ones(B, L, dtype=torch.bool, device="cuda")
        seed = new_seed("cuda")
        o, lse = attention.attention_fwd_triton(qkv, key_valid, P, seed)
        do = torch.randn_like(o)
        q, k, v = (t.transpose(1, 2).contiguous().requires_grad_() for t in qkv.unbind(2))
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=P, is_causal=True)  # noqa: E731
        sdpa_out = sdpa()
        case = {
            "triton fwd": median_ms(lambda: attention.attention_fwd_triton(qkv, key_valid, P, seed)),
            "triton fwd p0": median_ms(lambda: attention.attention_fwd_triton(qkv, key_valid, 0.0, None)),
            "triton bwd": median_ms(lambda: attention.attention_bwd_triton(do, qkv, o, lse, key_valid, P, seed)),
            "sdpa fwd": median_ms(sdpa),
            "sdpa bwd": median_ms(lambda: torch.autograd.grad(sdpa_out, (q, k, v), do.transpose(1, 2),
                                                               retain_graph=True)),
        }
        def forward_backward_calls():
            for _ in range(30):
                attention.attention_fwd_triton(qkv, key_valid, P, seed)
                attention.attention_bwd_triton(do, qkv, o, lse, key_valid, P, seed)
        _, _, by_name, calls = kernel_times(forward_backward_calls, name_width=40)
        case["kernel us"] = {name: round(t / calls[name], 1) for name, t in by_name.items()}
        key_valid[:, -L // 4:] = False  # right padding: the key test where it is needed
        case["triton fwd padded"] = median_ms(lambda: attention.attention_fwd_triton(qkv, key_valid, P, seed))
        name = f"B{B} L{L} H{H} Dh{Dh}"
        results[name] = case
        print(name, case, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

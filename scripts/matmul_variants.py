"""The FFN's first product, gelu(h @ w1.T + b1) at M 8192 (issue 3): `matmul.linear_gelu_into`'s persistent TMA
kernel under each candidate tile, beside the tiled `matmul_into` (float32 and bf16 h) and cuBLAS (+ a GELU pass),
each timed as a replayed CUDA graph of 10 calls (no host launch cost: the TMA path builds descriptors per call).

    python3 scripts/matmul_variants.py [--json out.json]
"""
import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from trm_fast.kernels import matmul

M = 8192
TMA_TILES = [(128, 128, 64, 8, 8, 3, 2), (128, 128, 64, 8, 8, 2, 2), (128, 128, 64, 8, 8, 4, 1),
             (128, 256, 64, 8, 8, 4, 1), (128, 128, 128, 8, 8, 3, 1), (128, 64, 64, 8, 4, 3, 2)]


def bench(fn, calls=10):
    """Median ms of one call, timed as a CUDA graph of `calls` calls."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return round(do_bench(graph.replay, warmup=20, rep=100, return_mode="median") / calls, 4)


def ffn_up_times(D: int, F_: int) -> dict:
    bf = torch.bfloat16
    w1, b1 = (torch.randn(F_, D, device="cuda", dtype=bf) * 0.05, torch.randn(F_, device="cuda", dtype=bf))
    h32 = torch.randn(M, D, device="cuda")
    h16 = h32.to(bf)
    act, pre = torch.empty(M, F_, device="cuda", dtype=bf), torch.empty(M, F_, device="cuda", dtype=bf)
    expected = F.gelu(F.linear(h16, w1, b1).float())
    found = {}
    for name, h in (("h float32", h32), ("h bf16", h16)):
        found[f"tiled, {name}"] = bench(lambda: matmul.matmul_into(h, w1.t(), act, bf, matmul.BIAS_GELU, b1))
        found[f"tiled, {name}, keep pre"] = bench(
            lambda: matmul.matmul_into(h, w1.t(), act, bf, matmul.BIAS_GELU, b1, aux=pre))
        for tile in TMA_TILES:
            matmul.TMA_TILE = tile
            try:
                found[f"TMA {tile}, {name}"] = bench(lambda: matmul.linear_gelu_into(h, w1, b1, act))
                found[f"TMA {tile}, {name}, max error"] = (act.float() - expected).abs().max().item()
                found[f"TMA {tile}, {name}, keep pre"] = bench(lambda: matmul.linear_gelu_into(h, w1, b1, act, pre))
            except Exception as e:  # a tile that does not fit is reported, not fatal
                found[f"TMA {tile}, {name}"] = str(e).splitlines()[0][:120]
    found["cuBLAS addmm, h bf16"] = bench(lambda: torch.addmm(b1, h16, w1.t(), out=pre))
    found["cuBLAS addmm + torch GELU, h bf16"] = bench(lambda: F.gelu(torch.addmm(b1, h16, w1.t(), out=pre)))
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name()}
    chosen = matmul.TMA_TILE
    for D, F_ in ((512, 2048), (256, 1024)):
        results[f"ffn_up d{D}"] = found = ffn_up_times(D, F_)
        print(f"ffn_up M{M} N{F_} K{D} ({2 * M * F_ * D / 1e12:.4f} TFLOP)")
        for name, value in found.items():
            print(f"   {name:55s} {value}")
    matmul.TMA_TILE = chosen
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

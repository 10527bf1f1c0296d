"""Tile sweep of the TinyNet training kernels at the train step's shapes (issue 3): each candidate config of
the Triton matmul, the concat projection and the attention kernels timed alone (the autotuner's config list
replaced by it), beside cuBLAS on the same matmul shapes, and the fused against the foreach AdamW.

    python3 scripts/kernel_tiles.py [--json out.json]
"""
import argparse
import json

import torch
import triton
from triton.testing import do_bench

from trm_fast.kernels import attention, concat_linear, matmul
from trm_fast.kernels.dropout import new_seed

M = 8192  # tokens of both cases (B16 L512, B8 L1024)
MATMUL_TILES = [  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages
    (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 3), (128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3),
    (256, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (128, 128, 128, 8, 8, 3),
    (128, 128, 64, 1, 8, 3)]
CONCAT_TILES = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
                (128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)]
ATTENTION_TILES = {  # BLOCK_M, BLOCK_N, warps, stages
    "fwd": (attention._attention_fwd_kernel, [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3),
                                              (64, 32, 4, 3), (128, 128, 8, 3), (64, 64, 4, 2), (128, 64, 4, 2)]),
    "dq": (attention._attention_bwd_dq_kernel, [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2),
                                                (64, 64, 4, 3), (128, 64, 4, 2), (64, 16, 4, 2), (128, 128, 8, 2)]),
    "dkdv": (attention._attention_bwd_dkdv_kernel, [(64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 2),
                                                    (32, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2),
                                                    (16, 64, 4, 2), (128, 128, 8, 2)]),
}


def only(kernel, config):
    """Make the autotuned `kernel` run `config` alone (no autotuning); returns the old config list."""
    old = kernel.configs
    kernel.configs = [config]
    kernel.cache.clear()
    return old


def config(names, tile):
    return triton.Config(dict(zip(names, tile)), num_warps=tile[-2], num_stages=tile[-1])


def sweep(kernel, names, tiles, run, flop):
    """{tile: (median ms, TFLOP/s)} of `run` with each tile."""
    results = {}
    old = kernel.configs
    for tile in tiles:
        only(kernel, config(names, tile))
        try:
            ms = do_bench(run, warmup=10, rep=50, return_mode="median")
            results[str(tile)] = (round(ms, 4), round(flop / ms / 1e9, 1))
        except Exception as e:  # a tile that does not fit (shared memory, registers) is reported, not fatal
            results[str(tile)] = str(e).splitlines()[0][:120]
    kernel.configs = old
    kernel.cache.clear()
    return results


def matmul_shapes(D: int, F: int):
    """(name, a, b, out, epilogue kwargs) of the train step's Triton matmuls at d_model D, FFN width F; the
    dtypes as in the step (LayerNorm outputs and the recursion state are float32 under autocast)."""
    bf, f32 = torch.bfloat16, torch.float32
    w1, w2, wcat = (torch.randn(*s, device="cuda", dtype=bf) * 0.05 for s in ((F, D), (D, F), (D, 3 * D)))
    b1, b2 = torch.randn(F, device="cuda", dtype=bf), torch.randn(D, device="cuda", dtype=bf)
    h = torch.randn(M, D, device="cuda", dtype=f32)
    pre, act = torch.randn(M, F, device="cuda", dtype=bf), torch.randn(M, F, device="cuda", dtype=bf)
    grad = torch.randn(M, D, device="cuda", dtype=bf)
    sums = torch.empty(M // matmul.SUM_BAND, F, device="cuda", dtype=f32)
    return [
        ("ffn_up_keep_pre", h, w1.t(), torch.empty(M, F, device="cuda", dtype=bf),
         dict(epilogue=matmul.BIAS_GELU, bias=b1, aux=pre)),
        ("ffn_up_nograd", h, w1.t(), torch.empty(M, F, device="cuda", dtype=bf),
         dict(epilogue=matmul.BIAS_GELU, bias=b1)),
        ("ffn_down", act, w2.t(), torch.empty(M, D, device="cuda", dtype=bf), dict(epilogue=matmul.BIAS, bias=b2)),
        ("ffn_grad_pre", grad, w2, torch.empty(M, F, device="cuda", dtype=bf),
         dict(epilogue=matmul.GELU_GRAD, aux=pre, column_sums=sums)),
        ("ffn_grad_h", act, w1, torch.empty(M, D, device="cuda", dtype=f32), {}),
        ("concat_grad_x", grad, wcat[:, :D], torch.empty(M, D, device="cuda", dtype=f32), {}),
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name()}
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
    for D, F in ((512, 2048), (256, 1024)):
        for name, a, b, out, kwargs in matmul_shapes(D, F):
            K, N = a.shape[1], b.shape[1]
            flop = 2 * M * N * K
            tiles = MATMUL_TILES if D == 512 else MATMUL_TILES[:4]
            found = sweep(matmul._matmul_kernel, names, tiles,
                          lambda: matmul.matmul_into(a, b, out, torch.bfloat16, **kwargs), flop)
            a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16).contiguous()
            ms = do_bench(lambda: torch.mm(a16, b16), warmup=10, rep=50, return_mode="median")
            found["cuBLAS mm (bf16 in and out, no epilogue)"] = (round(ms, 4), round(flop / ms / 1e9, 1))
            results[f"matmul d{D} {name} M{M} N{N} K{K}"] = found
            print(f"matmul d{D} {name} M{M} N{N} K{K}", flush=True)
            for tile, r in sorted(found.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], tuple) else 1e9):
                print(f"   {tile:45s} {r}")
        xs = [torch.randn(M, D, device="cuda") for _ in range(3)]
        w = torch.randn(D, 3 * D, device="cuda", dtype=torch.bfloat16) * 0.05
        bias = torch.zeros(D, device="cuda", dtype=torch.bfloat16)
        found = sweep(concat_linear._concat_linear_fwd_kernel, ("BLOCK_M", "BLOCK_N", "BLOCK_K"), CONCAT_TILES,
                      lambda: concat_linear.concat_linear_fwd_triton(xs, w, bias), 2 * M * D * 3 * D)
        results[f"concat_linear fwd d{D}"] = found
        print(f"concat_linear fwd d{D}: {sorted(found.items(), key=lambda kv: str(kv[1]))}", flush=True)
    for B, L, H, Dh in ((16, 512, 8, 64), (8, 1024, 8, 32)):
        qkv = torch.randn(B, L, 3, H, Dh, device="cuda", dtype=torch.bfloat16)
        key_valid = torch.ones(B, L, dtype=torch.bool, device="cuda")
        seed = new_seed("cuda")
        o, lse = attention.attention_fwd_triton(qkv, key_valid, 0.1, seed)
        do = torch.randn_like(o)
        flop = 4 * B * H * L * L * Dh / 2  # causal
        for part, (kernel, tiles) in ATTENTION_TILES.items():
            if part == "fwd":
                run = lambda: attention.attention_fwd_triton(qkv, key_valid, 0.1, seed)  # noqa: E731
            else:  # the whole backward, the other kernel on its first config
                run = lambda: attention.attention_bwd_triton(do, qkv, o, lse, key_valid, 0.1, seed)  # noqa: E731
            other = ATTENTION_TILES["dq" if part == "dkdv" else "dkdv"][0]
            old = only(other, config(("BLOCK_M", "BLOCK_N"), ATTENTION_TILES["dq" if part == "dkdv" else
                                                                           "dkdv"][1][0])) if part != "fwd" else None
            found = sweep(kernel, ("BLOCK_M", "BLOCK_N"), tiles, run, flop * (1 if part == "fwd" else 2.5))
            if old is not None:
                other.configs = old
                other.cache.clear()
            results[f"attention {part} B{B} L{L} H{H} Dh{Dh} p0.1"] = found
            print(f"attention {part} B{B} L{L} Dh{Dh}: {sorted(found.items(), key=lambda kv: str(kv[1]))}",
                  flush=True)
    results["adamw"] = adamw_times()
    print("adamw", results["adamw"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def adamw_times():
    """ms per step of AdamW over the d512 model's parameter sizes (capturable, tensor lr), foreach vs fused, and
    whether the fused one replays in a CUDA graph."""
    from trm_fast import TRMConfig, TRMModel
    model = TRMModel(TRMConfig(vocab_size=16000)).cuda()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out = {}
    for name, kwargs in (("foreach", dict(foreach=True)), ("fused", dict(fused=True))):
        opt = torch.optim.AdamW(params, lr=torch.tensor(3e-4, device="cuda"), capturable=True, **kwargs)
        opt.step()
        out[name] = round(do_bench(opt.step, warmup=5, rep=50, return_mode="median"), 4)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                opt.step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            graph.replay()
            torch.cuda.synchronize()
            out[name + " graph replay"] = round(do_bench(graph.replay, warmup=5, rep=50, return_mode="median"), 4)
        except Exception as e:
            out[name + " graph replay"] = str(e).splitlines()[0][:120]
    return out


if __name__ == "__main__":
    main()

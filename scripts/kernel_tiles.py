"""Tile sweep of the TinyNet training kernels at the train step's shapes (issue 3): each candidate config of
the Triton matmul, the concat projection and the attention kernels timed alone (the autotuner's config list
replaced by it), beside cuBLAS on the same matmul shapes, and the fused against the foreach AdamW.

    python3 scripts/kernel_tiles.py [--json out.json]
"""
import argparse
import contextlib
import json

import torch
from triton.testing import do_bench

from trm_fast import cuda_graphs
from trm_fast.kernels import attention, concat_linear, matmul
from trm_fast.seeds import new_seed

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


@contextlib.contextmanager
def pinned(kernel, names, tile):
    """Within, the autotuned `kernel` runs `tile` alone (no autotuning)."""
    old = kernel.configs
    kernel.configs = matmul.tile_configs(names, [tile], tile)
    kernel.cache.clear()
    try:
        yield
    finally:
        kernel.configs = old
        kernel.cache.clear()


def sweep(kernel, names, tiles, run, flop):
    """{tile: (median ms, TFLOP/s)} of `run` with each tile."""
    results = {}
    for tile in tiles:
        with pinned(kernel, names, tile):
            try:
                ms = do_bench(run, warmup=10, rep=50, return_mode="median")
                results[str(tile)] = (round(ms, 4), round(flop / ms / 1e9, 1))
            except Exception as e:  # a tile that does not fit (shared memory, registers) is reported, not fatal
                results[str(tile)] = str(e).splitlines()[0][:120]
    return results


def report(results: dict, title: str, found: dict) -> None:
    """Keep `found` under `title` and print it, fastest first."""
    results[title] = found
    print(title, flush=True)
    for tile, r in sorted(found.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], tuple) else 1e9):
        print(f"   {tile:45s} {r}")


def matmul_shapes(D: int):
    """(name, a, b, out) of the train step's Triton matmuls at d_model D, in its dtypes (the concatenation's input
    gradients; the FFN's products are cuBLAS' since session 30)."""
    wcat = torch.randn(D, 3 * D, device="cuda", dtype=torch.bfloat16) * 0.05
    grad = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    return [("concat_grad_x", grad, wcat[:, :D], torch.empty(M, D, device="cuda", dtype=torch.float32))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name()}
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
    for D in (512, 256):
        for name, a, b, out in matmul_shapes(D):
            K, N = a.shape[1], b.shape[1]
            flop = 2 * M * N * K
            tiles = MATMUL_TILES if D == 512 else MATMUL_TILES[:4]
            found = sweep(matmul._matmul_kernel, names, tiles,
                          lambda: matmul.matmul_into(a, b, out, torch.bfloat16), flop)
            a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16).contiguous()
            ms = do_bench(lambda: torch.mm(a16, b16), warmup=10, rep=50, return_mode="median")
            found["cuBLAS mm (bf16 in and out, no epilogue)"] = (round(ms, 4), round(flop / ms / 1e9, 1))
            report(results, f"matmul d{D} {name} M{M} N{N} K{K}", found)
        xs = [torch.randn(M, D, device="cuda") for _ in range(3)]
        w = torch.randn(D, 3 * D, device="cuda", dtype=torch.bfloat16) * 0.05
        bias = torch.zeros(D, device="cuda", dtype=torch.bfloat16)
        found = sweep(concat_linear._concat_linear_fwd_kernel, ("BLOCK_M", "BLOCK_N", "BLOCK_K"), CONCAT_TILES,
                      lambda: concat_linear.concat_linear_fwd_triton(xs, w, bias), 2 * M * D * 3 * D)
        report(results, f"concat_linear fwd d{D}", found)
    for B, L, H, Dh in ((16, 512, 8, 64), (8, 1024, 8, 32)):
        qkv = torch.randn(B, L, 3, H, Dh, device="cuda", dtype=torch.bfloat16)
        key_valid = torch.ones(B, L, dtype=torch.bool, device="cuda")
        seed = new_seed("cuda")
        o, lse = attention.attention_fwd_triton(qkv, key_valid, 0.1, seed)
        do = torch.randn_like(o)
        flop = 4 * B * H * L * L * Dh / 2  # causal
        fwd = lambda: attention.attention_fwd_triton(qkv, key_valid, 0.1, seed)  # noqa: E731
        bwd = lambda: attention.attention_bwd_triton(do, qkv, o, lse, key_valid, 0.1, seed)  # noqa: E731
        blocks = ("BLOCK_M", "BLOCK_N")
        kernel, tiles = ATTENTION_TILES["fwd"]
        report(results, f"attention fwd B{B} L{L} H{H} Dh{Dh} p0.1", sweep(kernel, blocks, tiles, fwd, flop))
        for part, other in (("dq", "dkdv"), ("dkdv", "dq")):  # the whole backward, the other kernel on its first tile
            kernel, tiles = ATTENTION_TILES[part]
            with pinned(ATTENTION_TILES[other][0], blocks, ATTENTION_TILES[other][1][0]):
                found = sweep(kernel, blocks, tiles, bwd, 2.5 * flop)
            report(results, f"attention {part} B{B} L{L} H{H} Dh{Dh} p0.1", found)
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
            graph = cuda_graphs.capture(opt.step)
            graph.replay()
            torch.cuda.synchronize()
            out[name + " graph replay"] = round(do_bench(graph.replay, warmup=5, rep=50, return_mode="median"), 4)
        except Exception as e:
            out[name + " graph replay"] = str(e).splitlines()[0][:120]
    return out


if __name__ == "__main__":
    main()

"""Tiles of the batched decode step's kernels, at its shapes (d512 / 8 heads TinyNet, bf16), against the
baseline each replaces: the tile-linear kernel (`kernels/decode_linear.py`) on each linear and the
16000-wide head against cuBLAS; the FFN half (`kernels/decode_feed_forward.py`) against cuBLAS linears +
GELU + add & LayerNorm; decode attention (`kernels/decode_attention.py`) against the torch version, with
16 caches in turn (as the 16 TinyNet calls of a step: more than L2 holds, so keys come from HBM). For
each: every config of a small grid, the best one and the one the code picks, each timed inside a CUDA
graph (no host launch cost).

    python3 scripts/decode_tiles.py [--rows 16 64] [--kernels linear ffn attention] [--out tiles.json]
"""
import argparse
import itertools
import json

import torch

from trm_fast import torch_ops
from trm_fast.kernels import add_layer_norm, decode_attention, decode_feed_forward, decode_linear

from profiling import graph_us

SHAPES = {"xyz_proj": (512, 1536), "yz_proj": (512, 1024), "qkv": (1536, 512), "out_proj": (512, 512),
          "ffn1+gelu": (2048, 512), "ffn2": (512, 2048), "head": (16000, 512)}


def randn(g, *shape):
    return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)


def linear_case(rows, name, n, k):
    """(cuBLAS-path callable, tile-kernel callable taking a config) for one linear."""
    g = torch.Generator(device="cuda").manual_seed(n + k)
    x, w = randn(g, rows, k), randn(g, n, k) / k ** 0.5
    b = None if name == "head" else randn(g, n)
    gelu = name == "ffn1+gelu"
    return (lambda: torch_ops.decode_linear(x, w, b, gelu),
            lambda config: decode_linear.decode_linear_triton(x, w, b, gelu, config=config))


def ffn_case(rows, d=512, hidden=2048):
    """(unfused callable: cuBLAS linears, GELU, add + LayerNorm kernel; fused callable taking a config)."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    h, w1, b1, w2, b2, ln_w, ln_b = (randn(g, rows, d), randn(g, hidden, d) / d ** 0.5, randn(g, hidden),
                                     randn(g, d, hidden) / hidden ** 0.5, randn(g, d), randn(g, d), randn(g, d))
    out = torch.empty_like(h)

    def unfused():
        f = torch_ops.decode_linear(torch_ops.decode_linear(h, w1, b1, True), w2, b2, False)
        add_layer_norm.add_layer_norm_triton(f, h, ln_w, ln_b, 1e-5, out)

    def fused(config):  # config: (splits, *tiles of the second linear) or None for the defaults
        splits, tiles = (decode_feed_forward.SPLITS, None) if config is None else (config[0], config[1:])
        decode_feed_forward.decode_ffn_add_norm_triton(h, w1, b1, w2, b2, ln_w, ln_b, 1e-5, out, splits, tiles)

    return unfused, fused


def attention_case(rows, keys, calls=16, capacity=320):
    """(torch-version callable, kernel callable taking a config), each call on the next of `calls` caches."""
    g = torch.Generator(device="cuda").manual_seed(keys)
    caches = [randn(g, rows, capacity, 2, 8, 64) for _ in range(calls)]
    qkv, turn = randn(g, rows, 1536), itertools.cycle(caches)
    valid = torch.ones(rows, capacity, dtype=torch.bool, device="cuda")
    pos = torch.full((rows,), keys - 1, dtype=torch.long, device="cuda")
    return (lambda: torch_ops.decode_attention(qkv, next(turn), valid, pos, 8),
            lambda config: decode_attention.decode_attention_triton(qkv, next(turn), valid, pos, 8, config))


def time_config(tiles, config) -> float:
    """Microseconds per call, or infinity where the config does not compile (shared memory, registers)."""
    try:
        return graph_us(lambda: tiles(config))
    except Exception as error:  # noqa: BLE001 - Triton's resource errors have no common type
        print(f"    {config}: {type(error).__name__}", flush=True)
        torch.cuda.synchronize()
        return float("inf")


def sweep(label, reference, fused, configs, chosen, result, warps_at=-2):
    """`warps_at`: where configs hold the warp count (the best one is also timed with 2 and 8 warps)."""
    timed = {config: time_config(fused, config) for config in configs}
    best = min(timed, key=timed.get)
    at = warps_at % len(best)
    for warps in (2, 8):
        config = best[:at] + (warps,) + best[at + 1:]
        timed[config] = time_config(fused, config)
    best = min(timed, key=timed.get)
    row = {"baseline_us": graph_us(reference), "best": str(best), "best_us": timed[best], "chosen": str(chosen),
           "chosen_us": graph_us(lambda: fused(None)), "all_us": {str(c): t for c, t in timed.items()}}
    result[label] = row
    print(f"{label:>20}  baseline {row['baseline_us']:5.2f} us | chosen {chosen} {row['chosen_us']:5.2f}"
          f" | best {best} {row['best_us']:5.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--kernels", nargs="+", default=["linear", "ffn", "attention"])
    parser.add_argument("--out")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "shapes": {}}
    for rows in args.rows:
        block_m = min(64, max(16, 1 << (rows - 1).bit_length()))
        for name, (n, k) in SHAPES.items() if "linear" in args.kernels else ():
            configs = [(bm, bn, bk, 4, stages) for bm, bn, bk, stages in itertools.product(
                sorted({16, max(16, block_m // 2), block_m}), (16, 32), (128, 256), (3, 4))]
            sweep(f"{name} B{rows}", *linear_case(rows, name, n, k), configs, decode_linear.tile_config(rows, n, k),
                  result["shapes"])
        configs = [(splits, block_m, 16, bk, 4, stages) for splits, bk, stages in itertools.product(
            (2, 4, 8), (128, 256), (3, 4))]
        if "ffn" in args.kernels:
            sweep(f"ffn B{rows}", *ffn_case(rows), configs, (decode_feed_forward.SPLITS,)
                  + decode_linear.tile_config(rows, 512, 2048), result["shapes"])
        configs = [(32, 2), (64, 2), (64, 4), (128, 4)]
        for keys in (32, 150, 272) if "attention" in args.kernels else ():
            sweep(f"attention B{rows} keys {keys}", *attention_case(rows, keys), configs,
                  decode_attention.attention_config(rows, 8), result["shapes"], warps_at=-1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

"""Where an early-exit forward's time goes on CUDA: each launched piece (steps, exits) timed by CUDA events
inside one call, the idle GPU time between pieces (host reads and launches), the host time before the first
and after the last launch, and the kernels of each step graph. For the run without exit and with exit at the
threshold calibrated to `hard_ratio`, on the torch and on the Triton TinyNet ops; the speed-up as in
scripts/early_exit_bench.py (the faster no-exit run over the faster exit run).

    python scripts/early_exit_profile.py --checkpoint runs/ee/checkpoint.pt --data tinyshakespeare.txt
"""
import argparse
import json
import time

import torch

from trm_fast.checkpoint import load_checkpoint
from trm_fast.data import ByteTokenizer, TokenDataset, dataset_batches, read_texts
from trm_fast.early_exit import GRAPH_ROWS, EarlyExit, _run_for, calibrate_threshold, compacted_early_exit

from profiling import graph_us, kernel_times


def timed_pieces(model, ids, mask, config):
    """(wall ms, [(piece key, GPU ms, idle ms before it, host ms of its launch)], host ms before the first
    launch, host ms after the last one until the call returned) of one call, pieces timed by events."""
    run = _run_for(model, *ids.shape)
    launch, marks = run.launch, []

    def timed_launch(key, piece):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        host = time.perf_counter()
        launch(key, piece)
        marks.append((key, start, end, host, time.perf_counter()))
        end.record()
    run.launch = timed_launch
    torch.cuda.synchronize()
    begin = time.perf_counter()
    compacted_early_exit(model, ids, config, mask)
    returned = time.perf_counter()
    torch.cuda.synchronize()
    wall = 1e3 * (time.perf_counter() - begin)
    del run.launch
    pieces, previous = [], None
    for key, start, end, host_start, host_end in marks:
        idle = previous.elapsed_time(start) if previous is not None else 0.0
        pieces.append((str(key), start.elapsed_time(end), idle, 1e3 * (host_end - host_start)))
        previous = end
    return wall, pieces, 1e3 * (marks[0][3] - begin), 1e3 * (returned - marks[-1][4])


def sweep_attention_tiles(B, L, H, Dh, repeats=20):
    """Time every candidate tile of the compact attention at each share of listed rows as a step runs it: a
    CUDA graph of `repeats` calls (host launches would dominate a ~25 us kernel timed call by call; they did
    in session 11's first sweep), keep the fastest in TILES_BY_QUARTERS; returns the times (us) by share."""
    from trm_fast.kernels import compact_attention as kernel
    generator = torch.Generator(device="cuda").manual_seed(0)
    kv = torch.randn(B * L, 2 * H * Dh, device="cuda", dtype=torch.bfloat16, generator=generator)
    key_valid = torch.ones(B, L, dtype=torch.bool, device="cuda")
    times = {}
    for quarters in (1, 2, 3, 4):  # random tokens, as many as the share holds once padded as a run pads them
        count = B * L * quarters // 4 - (GRAPH_ROWS if quarters < 4 else 0)
        listed = torch.randperm(B * L, device="cuda", generator=generator)[:count].sort().values
        rows = torch.cat([listed, listed.new_full((-(-count // GRAPH_ROWS) * GRAPH_ROWS - count,), -1)])
        assert kernel.quarters_of(rows.numel(), B * L) == quarters
        starts = torch.searchsorted(torch.where(rows >= 0, rows, B * L), torch.arange(B + 1, device="cuda") * L)
        q = torch.randn(rows.numel(), 3 * H * Dh, device="cuda", dtype=torch.bfloat16, generator=generator)[:, :H * Dh]
        times[quarters] = {}
        for tiles in kernel.CANDIDATE_TILES:
            kernel.TILES_BY_QUARTERS[quarters] = tiles
            times[quarters][str(tiles)] = round(graph_us(
                lambda: kernel.compact_attention_triton(q, kv, rows, starts, key_valid, H), repeats), 2)
        best = min(kernel.CANDIDATE_TILES, key=lambda t: times[quarters][str(t)])
        kernel.TILES_BY_QUARTERS[quarters] = best
        print(f"compact attention, {quarters}/4 of rows: fastest {best}; us by tiles {times[quarters]}", flush=True)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--hard-ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="early_exit_profile.json")
    parser.add_argument("--sweep-attention-tiles", action="store_true",
                        help="first time the compact attention's candidate tiles and use the fastest")
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint, map_location="cuda", use_ema=True, kernels="triton").eval()
    model.to(torch.bfloat16)
    _, val = TokenDataset(read_texts(args.data), ByteTokenizer(), args.seq_len, pack=True).split(0.05)
    batches = [(b["input_ids"].cuda(), b["attention_mask"].cuda()) for b in dataset_batches(val, args.batch_size)]
    threshold = calibrate_threshold(model, batches, args.hard_ratio)
    ids, mask = batches[0]
    steps = model.config.supervision_steps
    result = {"device": torch.cuda.get_device_name(), "threshold": threshold}
    if args.sweep_attention_tiles:
        config = model.config
        head_dim = config.d_model // config.n_heads
        result["attention_tiles_us"] = sweep_attention_tiles(*ids.shape, config.n_heads, head_dim)
    from trm_fast.kernels.compact_attention import TILES_BY_QUARTERS
    result["attention_tiles"] = {str(k): v for k, v in TILES_BY_QUARTERS.items()}
    for kernels in ("torch", "triton"):  # the compacted run's TinyNet ops (the model's `kernels` choice)
        model.tiny_net.kernels = kernels
        result[kernels] = by_ops = {}
        for name, config in (("no_exit", EarlyExit(1.0, min_steps=steps)), ("exit", EarlyExit(threshold))):
            for _ in range(3):
                compacted_early_exit(model, ids, config, mask)
            calls = [timed_pieces(model, ids, mask, config) for _ in range(args.repeats)]
            median = sorted(calls, key=lambda c: c[0])[len(calls) // 2]
            count, busy_us, _, _ = kernel_times(lambda: compacted_early_exit(model, ids, config, mask))
            by_ops[name] = {
                "wall_ms": median[0], "pieces_gpu_ms": sum(p[1] for p in median[1]),
                "idle_between_ms": sum(p[2] for p in median[1]), "host_ms_before_first_launch": median[2],
                "host_ms_after_last_launch": median[3], "kernels": count, "kernel_busy_ms": busy_us / 1e3,
                "pieces": [{"key": k, "gpu_ms": round(t, 4), "idle_before_ms": round(i, 4),
                            "host_launch_ms": round(h, 4)} for k, t, i, h in median[1]]}
            print(kernels, name, json.dumps(by_ops[name], indent=1), flush=True)
        out = compacted_early_exit(model, ids, EarlyExit(threshold), mask)
        by_ops["exit_counts"], by_ops["compute_cost"] = out["exit_counts"], out["compute_cost"]
        by_ops["step_kernels"] = {}
        for key, graph in _run_for(model, *ids.shape).graphs.items():
            if key[0] == "step":
                count, busy_us, by_name, calls = kernel_times(graph.replay)
                by_ops["step_kernels"][str(key)] = {
                    "kernels": count, "busy_us": busy_us,
                    "by_name_us": {f"{n} ({calls[n]}x)": round(t, 1) for n, t in by_name.most_common(40)}}
    no_exit = min(result[k]["no_exit"]["wall_ms"] for k in ("torch", "triton"))
    fastest = min(("torch", "triton"), key=lambda k: result[k]["exit"]["wall_ms"])
    result["speedup"] = no_exit / result[fastest]["exit"]["wall_ms"]
    result["ideal_speedup"] = 1 / result[fastest]["compute_cost"]
    result["realized_fraction_of_ideal"] = result["speedup"] / result["ideal_speedup"]
    print({k: result[k] for k in ("speedup", "ideal_speedup", "realized_fraction_of_ideal")}, "exit on", fastest)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

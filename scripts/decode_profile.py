"""Where a CUDA-graph decode step's time goes (d512 / 8 heads / vocab 16000, bf16, greedy, prompt 16,
256 new tokens), for the decode kernels now in use and for the previous ones (session 8: the same kernels
launched without programmatic dependent launch, `kernels/pdl.py`), in one process: generation tokens/s,
GPU time per replayed step, kernels per step, the heaviest ones and the parts of a generation outside the
replays; then each decode kernel alone (time per call inside a CUDA graph, so launch cost on the host does
not count) against what it replaces.

    python3 scripts/decode_profile.py [--out results.json]
"""
import argparse
import json
import statistics
import time

import torch

import trm_fast
from trm_fast import decoding, torch_ops
from trm_fast.kernels import decode_linear, pdl

from profiling import graph_us, kernel_times


def host_phases(model, prompts):
    """Milliseconds of one greedy generation's parts outside the replays, each ended by a device sync."""
    def sync_ms(start):
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    phases, replay_limit = {}, decoding.REPLAY_PREFILL_MAX
    for prefill in ("eager", "replays"):  # the one generate uses last
        decoding.REPLAY_PREFILL_MAX = replay_limit if prefill == "replays" else 0
        start = time.perf_counter()
        decoder = decoding.decoder_for(model, len(prompts), len(prompts[0]) + 255, 2, False, True)
        decoder.start(prompts, 0.7, False, [0], greedy=True)
        phases["decoder_for+start"] = sync_ms(start)
        start = time.perf_counter()
        decoder.token.copy_(decoder.next_logits().argmax(dim=-1))
        phases[f"prefill by {prefill}"] = sync_ms(start)
    decoding.REPLAY_PREFILL_MAX = replay_limit
    start = time.perf_counter()
    for _ in range(255):
        decoder.replay()
    phases["255 replays"] = sync_ms(start)
    start = time.perf_counter()
    decoder.out.tolist()
    phases["tokens to the host"] = sync_ms(start)
    return phases


def measure(model, prompts, label):
    rows = {}
    for batch in (1, 64):
        p = prompts[:batch]
        model.generate_batch(p, 256, top_k=1)  # capture
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate_batch(p, 256, top_k=1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        decoder = next(d for d in decoding._DECODERS[model].values() if d.batch == batch)
        decoder.start(p, 0.7, False, [0], greedy=True)  # back to the prompt: 101 replays fit the cache
        decoder.token.copy_(decoder.next_logits().argmax(dim=-1))
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(100):
            decoder.graph.replay()
        end.record()
        torch.cuda.synchronize()
        kernels, busy_us, by_name, _ = kernel_times(decoder.graph.replay)
        step_us = begin.elapsed_time(end) * 10
        phases = host_phases(model, p)
        rows[f"B{batch}"] = {"generate_ms": median * 1e3, "tokens_per_s": batch * 256 / median,
                             "replay_us_per_step": step_us, "kernels_per_step": kernels,
                             "busy_us": busy_us,
                             "outside_replays_ms": median * 1e3 - 255 * step_us / 1e3, "phases_ms": phases,
                             "heaviest_us": dict(by_name.most_common(8))}
        print(f"{label} B{batch}: generate {median * 1e3:.1f} ms = {batch * 256 / median:.0f} tokens/s; "
              f"replay {step_us:.1f} us/step; {kernels} kernels/step, {rows[f'B{batch}']['busy_us']:.1f} us busy",
              flush=True)
        print("    phases: " + ", ".join(f"{k} {v:.1f} ms" for k, v in phases.items()))
        for name, t in by_name.most_common(8):
            print(f"    {t:8.1f} us  {name}")
    model.reset_state()
    return rows


def kernel_table():
    """Each decode linear alone against cuBLAS, at the d512 decode step's shapes (attention and the tile
    configs: scripts/decode_tiles.py)."""
    dtype, rows = torch.bfloat16, {}
    shapes = {"xyz_proj": (512, 1536), "qkv": (1536, 512), "out_proj": (512, 512), "ffn1+gelu": (2048, 512),
              "ffn2": (512, 2048), "head": (16000, 512)}
    for batch in (1, 4, 8, 16, 64):
        for name, (n, k) in shapes.items():
            x = torch.randn(batch, k, device="cuda", dtype=dtype)
            w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
            b = None if name == "head" else torch.randn(n, device="cuda", dtype=dtype)
            gelu = name == "ffn1+gelu"
            rows[f"linear {name} B{batch}"] = {
                "cublas_us": graph_us(lambda: torch_ops.decode_linear(x, w, b, gelu)),
                "triton_us": graph_us(lambda: decode_linear.decode_linear_triton(x, w, b, gelu))}
    for name, row in rows.items():
        print(f"{name:<28} " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="write the numbers here (JSON)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = trm_fast.TRMConfig(vocab_size=16000, d_model=512, n_heads=8, dropout=0.0)
    model = trm_fast.TRMModel(config).cuda().to(torch.bfloat16).eval()
    prompts = torch.randint(3, 16000, (64, 16), generator=torch.Generator().manual_seed(1)).tolist()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "pdl": pdl.ENABLED,
              "now": measure(model, prompts, "now")}
    pdl.ENABLED, enabled = False, pdl.ENABLED
    try:
        result["previous_kernels"] = measure(model, prompts, "previous kernels")
    finally:
        pdl.ENABLED = enabled
    result["kernels"] = kernel_table()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

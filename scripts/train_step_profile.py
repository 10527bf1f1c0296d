"""Where a train step's GPU time goes (issue 3): median step time and peak memory of each implementation,
then the heaviest kernels of one step of the ones named in --profile.

    python3 scripts/train_step_profile.py [--case B16-L512-d512] [--impls ...] [--profile triton compiled]
        [--modes train forward] [--json out.json]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from bench_cases import CASES  # noqa: E402
from test_bench_model import build, make_forward_step, make_train_step  # noqa: E402

from profiling import kernel_times  # noqa: E402

IMPLS = {"eager": "eager", "compiled": "compiled", "compiled-graphs": "compiled-graphs", "torch": "trm_fast",
         "torch-graph": "trm_fast-graph", "triton": "trm_fast-triton", "triton-graph": "trm_fast-triton-graph",
         "triton-nologits": "trm_fast-triton-nologits", "triton-nologits-graph": "trm_fast-triton-nologits-graph"}


def make_step(impl: str, case: dict, train: bool):
    model, runner, ids, targets = build(IMPLS[impl], case)
    return (make_train_step if train else make_forward_step)(IMPLS[impl], model, runner, ids, targets)


def time_step(step, rounds: int = 20):
    """(median ms, peak GB over the timed steps, peak GB over warm-up and timed steps: a CUDA graph's memory is
    allocated when it is captured, in the warm-up; ms a step of `rounds` steps run back to back, where the host
    launches a step while the GPU runs the one before)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    warm_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated()
    start = time.perf_counter()
    for _ in range(rounds):
        step()
    torch.cuda.synchronize()
    back_to_back = (time.perf_counter() - start) / rounds
    return statistics.median(times) * 1e3, peak / 1e9, max(peak, warm_peak) / 1e9, back_to_back * 1e3


def top_kernels(step, count: int = 25, sequence_path: str = None):
    kernels, busy_us, by_name, calls = kernel_times(step, name_width=90, sequence_path=sequence_path)
    print(f"  {kernels} kernels, {busy_us / 1e3:.2f} ms busy")
    for name, t in by_name.most_common(count):
        print(f"  {t / 1e3:7.3f} ms {calls[name]:4d}x  {name}")


def host_costs(calls: int = 2000):
    """Microseconds per call of tiny ops, where the host alone sets the time: a torch add, F.linear, the
    Triton matmul through its autotuner (warm) and straight to its JIT function with a fixed tiling."""
    import triton
    from trm_fast.kernels import matmul
    a = torch.randn(16, 16, device="cuda")
    out = torch.empty_like(a)
    dtype, precision = matmul.dot_config(a.dtype)

    def plain_matmul():
        matmul._matmul_kernel.fn.fn[(1,)](a, a, out, 16, 16, 16, 16, 1, 16, 1, 16, 1, DOT_DTYPE=dtype,
                                          PRECISION=precision, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1,
                                          EVEN=True)

    for name, fn in (("torch add", lambda: torch.add(a, a)), ("F.linear", lambda: torch.nn.functional.linear(a, a)),
                     ("Triton matmul, autotuned", lambda: matmul.matmul_into(a, a, out, a.dtype)),
                     ("Triton matmul, plain JIT", plain_matmul),
                     ("triton.cdiv x10", lambda: [triton.cdiv(100, 7) for _ in range(10)])):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        print(f"host cost {name}: {(time.perf_counter() - start) / calls * 1e6:.1f} us/call")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default="B16-L512-d512", choices=list(CASES))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--profile", nargs="*", default=["triton"], choices=list(IMPLS))
    parser.add_argument("--modes", nargs="+", default=["train", "forward"], choices=["train", "forward"])
    parser.add_argument("--host-costs", action="store_true", help="also time tiny launches (the host's speed)")
    parser.add_argument("--sequences", help="write each profiled step's kernels in order to DIR/<mode>_<impl>.txt")
    parser.add_argument("--json", help="write {mode: {impl: {ms, peak_gb, peak_with_warmup_gb}}} here")
    args = parser.parse_args()
    case = CASES[args.case]
    device = torch.cuda.get_device_name()
    workspace = os.environ.get("CUBLASLT_WORKSPACE_SIZE")  # KiB; PyTorch's default when unset
    print(f"{device} {args.case}, bf16 autocast, CUBLASLT_WORKSPACE_SIZE={workspace or 'default'}")
    if args.host_costs:
        host_costs()
    results = {"device": device, "case": args.case, "case_spec": case, "medians_of": 20,
               "cublaslt_workspace_kib": workspace}
    for mode in args.modes:
        for impl in args.impls:
            step = make_step(impl, case, mode == "train")
            ms, peak, warm_peak, back_to_back_ms = time_step(step)
            results.setdefault(mode, {})[impl] = {"ms": round(ms, 3), "peak_gb": round(peak, 3),
                                                  "peak_with_warmup_gb": round(warm_peak, 3),
                                                  "back_to_back_ms": round(back_to_back_ms, 3)}
            print(f"{'train step' if mode == 'train' else 'forward'} {impl:22s} {ms:7.2f} ms  peak {peak:5.2f} GB "
                  f"({warm_peak:5.2f} GB with warm-up), back to back {back_to_back_ms:7.2f} ms", flush=True)
            if impl in args.profile:
                top_kernels(step, sequence_path=args.sequences and os.path.join(args.sequences, f"{mode}_{impl}.txt"))
            del step
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

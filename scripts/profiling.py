"""Timings and the GPU kernels of one call, for the profiling scripts (importable as `profiling` from
scripts/)."""
import statistics
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from trm_fast import cuda_graphs


def kernel_times(fn, name_width: int = 70, sequence_path: str = None):
    """(number of kernels, busy microseconds, microseconds by kernel name, launches by kernel name) of one
    call of `fn`; with `sequence_path`, each kernel in start order (gap since the previous one ended, duration,
    name) is written there."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if sequence_path:
        write_sequence(kernels, sequence_path)
    by_name, calls = Counter(), Counter()
    for e in kernels:
        by_name[e.name[:name_width]] += e.device_time
        calls[e.name[:name_width]] += 1
    return len(kernels), sum(e.device_time for e in kernels), by_name, calls


def write_sequence(kernels, path: str) -> None:
    """One line per kernel in start order: microseconds idle before it, its microseconds, its name."""
    kernels = sorted(kernels, key=lambda e: e.time_range.start)
    with open(path, "w") as f:
        end = kernels[0].time_range.start if kernels else 0
        for e in kernels:
            f.write(f"{e.time_range.start - end:8.1f} {e.device_time:8.1f}  {e.name[:100]}\n")
            end = max(end, e.time_range.end)


def median_ms(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of `fn` in ms (synchronized on CUDA), after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def events_ms(fn, repeats: int, device: torch.device) -> float:
    """GPU time per call of `fn` (a graph replay) over `repeats` back-to-back calls, after a warm-up call
    (on the CPU: median_ms)."""
    if device.type != "cuda":
        return median_ms(fn, repeats, device)
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def graph_us(fn, calls: int = 50) -> float:
    """Microseconds per call of `fn` replayed from a CUDA graph of `calls` calls (launch cost on the host out
    of the timing)."""
    graph = cuda_graphs.capture(lambda: [fn() for _ in range(calls)])
    return 1e3 * events_ms(graph.replay, 10, torch.device("cuda")) / calls

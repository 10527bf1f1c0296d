"""What the train step's graph loses at its start (H100, benchmarks/NOTES.md, session 25): the replayed step's
profile shows ~160 us of idle around its first kernels, the ids' range check (aminmax, a copy of the bounds to
pinned host memory, an external event, the clamp). This replays a stand-in, the same first nodes then 400 kernels of
~5 us, in variants, and prints each one's median replay time and the idle before its kernels (torch.profiler):
  plain: no check at all; check: the check as GraphedTrainStep captures it; forked: the copy and its event on a
  forked branch that the graph joins at its end; no-event: the copy without the external event.
  device run: python3 scripts/graph_start_bench.py
"""
import statistics

import torch

N_KERNELS = 400


def make_step(variant: str, ids: torch.Tensor, work: torch.Tensor, host: torch.Tensor, event: torch.cuda.Event):
    def step():
        if variant != "plain":
            bounds = torch.stack(torch.aminmax(ids)).long()
            if variant == "forked":
                main, side = torch.cuda.current_stream(), torch.cuda.Stream()
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    host.copy_(bounds, non_blocking=True)
                    event.record()
            else:
                host.copy_(bounds, non_blocking=True)
                if variant == "check":
                    event.record()
            ids.clamp_(0, 15999)
        for _ in range(N_KERNELS):
            work.mul_(1.0001)
        if variant == "forked":
            main.wait_stream(side)
    return step


def timed(graph: torch.cuda.CUDAGraph, ids: torch.Tensor, source: torch.Tensor, reps: int = 50) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        ids.copy_(source)
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def idle_before_kernels(graph: torch.cuda.CUDAGraph, ids: torch.Tensor, source: torch.Tensor, count: int = 12):
    """The idle (us) before each of the replay's first `count` kernels (after the input copy)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):  # each replay from an idle GPU, as the step times measure it
            torch.cuda.synchronize()
            ids.copy_(source)
            graph.replay()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    last = events[-(N_KERNELS + 10):]  # the last replay's input copy, first nodes and work
    gaps, previous_end = [], None
    for e in last[:count]:
        if previous_end is not None:
            gaps.append((round(e.time_range.start - previous_end, 1), e.name[:40]))
        previous_end = e.time_range.end
    return gaps


def main() -> None:
    source = torch.randint(0, 16000, (16, 513), device="cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for variant in ("plain", "check", "forked", "no-event") * 2:
        ids, work = source.clone(), torch.ones(1 << 21, device="cuda")
        host = torch.empty(2, dtype=torch.long, pin_memory=True)
        event = torch.cuda.Event(external=True)
        step = make_step(variant, ids, work, host, event)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        us = timed(graph, ids, source)
        idle = idle_before_kernels(graph, ids, source)
        print(f"{variant:9s} replay {us:8.1f} us   idle before the first kernels: {idle}")


if __name__ == "__main__":
    main()

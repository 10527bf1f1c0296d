"""The host's timeline of one replayed call (issue 3): how long each stage of a GraphedForward / GraphedTrainStep
call keeps the host before, during and after the replay (medians of 30 calls, B16 L512 d512, bf16 autocast).
The GPU waits for everything before the first replay; what follows it overlaps the graph.

    python3 scripts/graphed_call_timeline.py
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from bench_cases import CASES  # noqa: E402
from test_bench_model import autocast, build, make_forward_step, make_train_step  # noqa: E402

from trm_fast import cuda_graphs  # noqa: E402
from trm_fast.graphed_forward import autocast_state  # noqa: E402


def timeline(stages: dict, calls: int = 30) -> str:
    rows = []
    for i in range(calls + 3):
        torch.cuda.synchronize()
        marks = [time.perf_counter()]
        for stage in stages.values():
            stage()
            marks.append(time.perf_counter())
        if i >= 3:
            rows.append([(b - a) * 1e6 for a, b in zip(marks, marks[1:])])
    medians = [statistics.median(column) for column in zip(*rows)]
    total = statistics.median(sum(row) for row in rows)
    return "  ".join(f"{name} {us:.0f}" for name, us in zip(stages, medians)) + f"  | total {total:.0f} us"


def show(mode: str, case: dict) -> None:
    model, runner, ids, targets = build("trm_fast-triton-graph", case)
    make = make_forward_step if mode == "forward" else make_train_step
    step = make("trm_fast-triton-graph", model, runner, ids, targets)
    for _ in range(3):
        step()
    graphed = runner if mode == "forward" else next(
        c.cell_contents for c in step.__closure__ if type(c.cell_contents).__name__ == "GraphedTrainStep")
    entry, = graphed.graphs.values()
    if mode == "train":
        replayed, update_graph, static_inputs, _, _, id_range, _ = entry
    else:
        replayed, static_inputs, _, id_range, _ = entry
    inputs = (ids, None, targets)
    with autocast():
        stages = {"checks": lambda: model._check_inputs(ids, None, targets, None, check_ranges=False),
                  "weights key": lambda: cuda_graphs.weights_key(model),
                  "key": lambda: (cuda_graphs.inputs_key(inputs), autocast_state()),
                  "copy": lambda: cuda_graphs.copy_into(static_inputs, inputs),
                  "replay": replayed.replay, "range check": id_range.check}
        if mode == "train":
            stages.update({"state key": graphed._state_key, "update replay": update_graph.replay})
        stages["sync"] = torch.cuda.synchronize
        print(mode, timeline(stages), flush=True)
        print(mode, "whole call", timeline({"call": step, "sync": torch.cuda.synchronize}), flush=True)
        given = [(b, t) for b, t in zip(static_inputs, inputs) if t is not None]
        print(mode, "input copies", timeline({"foreach": lambda: cuda_graphs.copy_into(static_inputs, inputs),
                                              "one by one": lambda: [b.copy_(t) for b, t in given],
                                              "sync": torch.cuda.synchronize}), flush=True)


def main():
    print(torch.cuda.get_device_name())
    for mode in ("forward", "train"):
        show(mode, CASES["B16-L512-d512"])
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

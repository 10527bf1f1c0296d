"""What a synchronous replayed train step loses to the host (issue 3, session 25), without a profiler (which slows
graph launches ~10x): for GraphedTrainStep's forward-backward and update graphs, the host time of `replay()` (the
launch), the time from an idle GPU to the end of its work, and the time per replay back to back; then the same,
five times interleaved, for the whole step call and for its device work without its Python (the input copy, both
graphs, with and without the range check, the loss copies); last, the host time of each Python piece of the call.
  device run: python3 scripts/step_host_timeline.py [--case B16-L512-d512]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import trm_fast  # noqa: E402
from bench_cases import CASES  # noqa: E402
from test_bench_model import build  # noqa: E402


def timings(call, rounds: int = 20) -> str:
    """'host launch / synchronous / back to back' medians in us of `call`."""
    launch, synchronous = [], []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        launched = time.perf_counter()
        torch.cuda.synchronize()
        launch.append(launched - start)
        synchronous.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        call()
    torch.cuda.synchronize()
    back_to_back = (time.perf_counter() - start) / rounds
    return (f"host {statistics.median(launch) * 1e6:7.1f} us, synchronous {statistics.median(synchronous) * 1e6:8.1f}"
            f" us, back to back {back_to_back * 1e6:8.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default="B16-L512-d512", choices=list(CASES))
    args = parser.parse_args()
    model, _, ids, targets = build("trm_fast-triton-graph", CASES[args.case])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(3e-4, device="cuda"), weight_decay=0.01,
                                  capturable=True, fused=True)
    graphed = trm_fast.GraphedTrainStep(model, optimizer)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return graphed(ids, target_ids=targets)
    for _ in range(3):
        step()
    forward_backward, update, static_inputs, static_losses, _, id_range, _ = next(iter(graphed.graphs.values()))
    inputs = (ids, None, targets)

    def clone_losses():
        return {name: t.clone() for name, t in static_losses.items()}
    print(f"{torch.cuda.get_device_name()} {args.case} train step, medians of 20")
    print(f"  forward-backward graph replay: {timings(forward_backward.replay)}")
    print(f"  update graph replay:           {timings(update.replay)}")
    def replayed(check: bool):
        """The step's device work without its Python around it: inputs copied, both graphs, the loss copies."""
        def call():
            trm_fast.cuda_graphs.copy_into(static_inputs, inputs)
            forward_backward.replay()
            if check:
                id_range.check()
            update.replay()
            return clone_losses()
        return call
    variants = {"step call": step, "replays + range check": replayed(True), "replays": replayed(False)}
    results = {name: [] for name in variants}
    for _ in range(5):  # interleaved: the GPU's drift falls on each alike
        for name, call in variants.items():
            results[name].append(timings(call))
    for name, rows in results.items():
        print(f"  {name}:")
        for row in rows:
            print(f"    {row}")
    pieces = {"_check_inputs": lambda: model._check_inputs(ids, None, targets, None, check_ranges=False),
              "autocast_state": trm_fast.graphed_train_step.autocast_state,
              "weights_key": lambda: trm_fast.cuda_graphs.weights_key(model),
              "inputs_key": lambda: trm_fast.cuda_graphs.inputs_key(inputs),
              "_float_lrs": graphed._float_lrs, "_state_key": graphed._state_key,
              "copy_into": lambda: trm_fast.cuda_graphs.copy_into(static_inputs, inputs),
              "loss clones": clone_losses}
    for name, call in pieces.items():
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            call()
        print(f"  host {name:16s} {(time.perf_counter() - start) / 200 * 1e6:7.1f} us")
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()

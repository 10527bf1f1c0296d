"""A replayed call's host time and its synchronous time (issue 3): medians of 40 calls of the Triton graph step,
train and forward, B16 L512 d512 under bf16 autocast; the host's time is the call's return, the synchronous time
that plus the wait for the GPU.

    python3 scripts/whole_call_host.py
"""
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from bench_cases import CASES  # noqa: E402
from test_bench_model import build, make_forward_step, make_train_step  # noqa: E402


def main():
    for mode, make in (("train", make_train_step), ("forward", make_forward_step)):
        model, runner, ids, targets = build("trm_fast-triton-graph", CASES["B16-L512-d512"])
        step = make("trm_fast-triton-graph", model, runner, ids, targets)
        for _ in range(3):
            step()
        calls, totals = [], []
        for _ in range(40):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            returned = time.perf_counter()
            torch.cuda.synchronize()
            calls.append((returned - start) * 1e6)
            totals.append((time.perf_counter() - start) * 1e6)
        print(mode, "host call", round(statistics.median(calls)), "us, synchronous", round(statistics.median(totals)),
              "us", flush=True)
        del step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

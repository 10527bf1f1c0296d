"""Wall time of the first steps of a fresh process (what a user waits for before training runs at speed): the
Triton path's train step as CUDA graphs, the first call a plain step (Triton's autotuning, lt_matmul's timing of
each product's algorithms), the second its capture. Run it with and without TRM_FAST_LT_TUNE=0 to see what the
algorithms' timing adds.
    device run: python3 scripts/first_steps_time.py [--case B16-L512-d512] [--steps 4]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from bench_cases import CASES  # noqa: E402
from test_bench_model import build, make_train_step  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default="B16-L512-d512", choices=list(CASES))
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    model, runner, ids, targets = build("trm_fast-triton-graph", CASES[args.case])
    step = make_train_step("trm_fast-triton-graph", model, runner, ids, targets)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    print(f"{args.case} TRM_FAST_LT_TUNE={os.environ.get('TRM_FAST_LT_TUNE', 'unset')}: first steps "
          + ", ".join(f"{t:.3f}" for t in times) + " s")


if __name__ == "__main__":
    main()

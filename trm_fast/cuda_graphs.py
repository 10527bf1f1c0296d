"""CUDA-graph capture after a warm-up, the pattern every graph of the package follows."""
from __future__ import annotations

from typing import Callable, Optional

import torch


def capture(fn: Callable[[], object], warmups: int = 1, pool: Optional[tuple] = None) -> torch.cuda.CUDAGraph:
    """Run `fn` `warmups` times on a side stream (lazy initialization, Triton autotuning: nothing of that may
    happen during capture), then capture one call of it; the graph's memory comes from `pool` when given.
    The warm-up calls really run, so `fn` must be safe to run them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph

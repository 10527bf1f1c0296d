"""Dropout seeds of the Triton training kernels: int64 [1] tensors on the device, drawn from torch's generator
there (a CUDA graph replays the draw, so every replay gets fresh masks).

A training forward takes three seeds per TinyNet call (48 at the default config); within `drawn_together()`
(`DispatchTinyNet.memoized` enters it) they are views of one draw of SEEDS_PER_DRAW, one kernel launch instead of
one per seed.
"""
import contextlib
import threading

import torch

SEEDS_PER_DRAW = 64
_local = threading.local()


def _draw(device, count: int) -> torch.Tensor:
    return torch.randint(0, 2**31 - 1, (count,), device=device)


def new_seed(device) -> torch.Tensor:
    """A fresh int64 [1] dropout seed on `device`."""
    pool = getattr(_local, "pool", None)
    if pool is None or torch.compiler.is_compiling():
        return _draw(device, 1)
    device = torch.device(device)
    seeds, used = pool.get(device, (None, SEEDS_PER_DRAW))
    if used == SEEDS_PER_DRAW:
        seeds, used = _draw(device, SEEDS_PER_DRAW), 0
    pool[device] = (seeds, used + 1)
    return seeds[used:used + 1]


@contextlib.contextmanager
def drawn_together():
    """Within, `new_seed` hands out views of draws of SEEDS_PER_DRAW seeds (nested uses share the outer one's)."""
    if getattr(_local, "pool", None) is not None:
        yield
        return
    _local.pool = {}
    try:
        yield
    finally:
        _local.pool = None

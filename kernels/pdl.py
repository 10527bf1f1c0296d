"""Programmatic dependent launch (PDL, Hopper and newer) for the decode step's kernels.

A decode step is a chain of ~120-130 small dependent kernels, each 2-5 us, and the gap between two of them
(launch, then filling the SMs) is a good part of each. Launched with PDL, a kernel may start while the one
before it is still running: its programs load the step's constants (weights, LayerNorm parameters), then
`wait_for_previous` blocks until the previous kernel has finished and its writes are visible, and lets the
next kernel start in turn. Every store, and every load of anything else, comes after that wait, so the
results are those of plain launches; inside a CUDA graph the launches become programmatic edges.

Loading weights before the wait is only safe where no kernel just before wrote them. So the kernels launch
with PDL only inside `programmatic_launches()`, which the decoder wraps around the warm-up and capture of
its step; called as ops elsewhere they launch plainly. `launch_options(tensor)` gives a kernel's launch
keywords: PDL on inside that block for CUDA tensors of compute capability 9+; off under Triton's
interpreter, with TRM_FAST_PDL=0, or where Triton lacks it (`ENABLED`, read at each launch, so a benchmark
can switch it in one process).
"""
import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from trm_fast.kernels.matmul import INTERPRET

ENABLED = (os.environ.get("TRM_FAST_PDL", "1") != "0" and not INTERPRET
           and hasattr(getattr(tl.extra, "cuda", None), "gdc_wait"))
_in_decode_step = False  # set by `programmatic_launches`


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def active(device: torch.device) -> bool:
    """Whether the decode step's kernels on `device` launch with PDL."""
    return (ENABLED and device.type == "cuda"
            and _hopper_or_newer(torch.cuda.current_device() if device.index is None else device.index))


@contextlib.contextmanager
def programmatic_launches():
    """Launch with PDL inside this block (where `active`): for a chain of decode kernels in which no kernel
    writes a weight or LayerNorm parameter that a later one reads."""
    global _in_decode_step
    outer, _in_decode_step = _in_decode_step, True
    try:
        yield
    finally:
        _in_decode_step = outer


def launch_options(tensor: torch.Tensor) -> dict:
    """{"PDL": flag} plus `launch_pdl` when on: keywords for a kernel that calls `wait_for_previous(PDL)`."""
    return {"PDL": True, "launch_pdl": True} if _in_decode_step and active(tensor.device) else {"PDL": False}


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel's writes are visible, then let the next kernel launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

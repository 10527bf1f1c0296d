"""CUDA-graph capture after a warm-up, the pattern every graph of the package follows, its input buffers, and
the key that tells when graphs over a model's weights went stale."""
from __future__ import annotations

from typing import Callable, Optional

import torch


def capture(fn: Callable[[], object], warmups: int = 1, pool: Optional[tuple] = None) -> torch.cuda.CUDAGraph:
    """Run `fn` `warmups` times on a side stream (lazy initialization, Triton autotuning: nothing of that may
    happen during capture), then capture one call of it; the graph's memory comes from `pool` when given.
    The warm-up calls really run, so `fn` must be safe to run them."""
    for _ in range(warmups):
        on_side_stream(fn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


def on_side_stream(fn: Callable[[], object]) -> object:
    """fn() on a fresh stream, ordered after the current stream's work and before its later work: how work that
    precedes a capture runs (lazy initializations then belong to no stream that the capture uses)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        result = fn()
    torch.cuda.current_stream().wait_stream(side)
    return result


def inputs_key(inputs) -> Optional[tuple]:
    """The shape, dtype and device of each of a graph's inputs (None where one is absent): what a graph is captured
    for; None where an input is neither a tensor nor None (no graph has that key: the caller's checks raise)."""
    if not all(t is None or isinstance(t, torch.Tensor) for t in inputs):
        return None
    return tuple((t.shape, t.dtype, t.device) if t is not None else None for t in inputs)


def typed(value) -> tuple:
    """`value` with its type, for a key (True and 1 are equal keys; a check passed by one need not pass the other)."""
    return type(value), value


def static_copies(inputs, device: torch.device) -> tuple:
    """Contiguous copies of the inputs on `device` (None kept): a graph's input buffers, captured reading them."""
    return tuple(t.to(device, copy=True, memory_format=torch.contiguous_format) if t is not None else None
                 for t in inputs)


def copy_into(buffers, inputs) -> None:
    """Each given input into its graph buffer (None inputs have none), before a replay: one launch."""
    given = [(buffer, t) for buffer, t in zip(buffers, inputs) if t is not None]
    torch._foreach_copy_([buffer for buffer, _ in given], [t for _, t in given])


def weights_key(model: torch.nn.Module) -> tuple:
    """The addresses of `model`'s parameters: graphs that read them stay valid while this is unchanged (a
    move or reallocation, e.g. `model.to`, changes it; in-place updates do not). It walks the modules' own tables (a
    third of `model.parameters()`' time on the host)."""
    return tuple(_parameter_addresses(model))


def held_weights(model: torch.nn.Module) -> list:
    """`model`'s parameters as a graph captured over them reads them: kept with the graph, their memory outlives a
    move, so that a replay launched before the host compares `weights_key` reads stale values, never freed memory."""
    return [p.detach() for p in model.parameters()]


def _parameter_addresses(module: torch.nn.Module) -> list:
    addresses = [p.data_ptr() for p in module._parameters.values() if p is not None]
    for child in module._modules.values():
        if child is not None:
            addresses += _parameter_addresses(child)
    return addresses

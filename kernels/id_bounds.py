"""`id_bounds_then_clamp`: a replayed call's id check in one kernel (trm_fast.graphed_forward.IdRangeCheck): the
[min, max] of each id tensor, then the ids clamped into [0, vocab_size) in place, so that the rest of the graph reads
nothing outside the embeddings whatever the ids. torch's steps (aminmax, stack, cat, clamp) take ten kernels."""
from typing import Sequence

import torch
import triton
import triton.language as tl

# ids a load, on 16 warps, one program a tensor (H100, both tensors in one program: 7 us, 9 with 1024 on 4 warps)
BLOCK = 8192


@triton.jit
def _bounds_then_clamp(ids_ptr, n, bounds_ptr, high, BLOCK: tl.constexpr):
    """bounds[0:2] = [min, max] of ids[:n] (int64), then ids clamped into [0, high]."""
    low_seen = tl.full([BLOCK], 9223372036854775807, tl.int64)
    high_seen = tl.full([BLOCK], -9223372036854775807 - 1, tl.int64)
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        in_range = offsets < n
        ids = tl.load(ids_ptr + offsets, mask=in_range, other=0)
        wide = ids.to(tl.int64)
        low_seen = tl.minimum(low_seen, tl.where(in_range, wide, low_seen))
        high_seen = tl.maximum(high_seen, tl.where(in_range, wide, high_seen))
        clamped = tl.minimum(tl.maximum(wide, 0), high)
        tl.store(ids_ptr + offsets, clamped.to(ids.dtype), mask=in_range)
    tl.store(bounds_ptr, tl.min(low_seen, axis=0))
    tl.store(bounds_ptr + 1, tl.max(high_seen, axis=0))


@triton.jit
def _id_bounds_kernel(first_ptr, second_ptr, n, bounds_ptr, high, BLOCK: tl.constexpr):
    """Program i: the bounds of id tensor i (of n elements) in bounds[2i:2i + 2], then its ids clamped."""
    if tl.program_id(0) == 0:
        _bounds_then_clamp(first_ptr, n, bounds_ptr, high, BLOCK)
    else:
        _bounds_then_clamp(second_ptr, n, bounds_ptr + 2, high, BLOCK)


def id_bounds_then_clamp(ids: Sequence[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """int64 [2 * len(ids)]: [min, max] of each of one or two contiguous integer tensors of one size (read before the
    clamp), each then clamped into [0, vocab_size) in place."""
    if len(ids) not in (1, 2) or any(t.shape != ids[0].shape or not t.is_contiguous() or t.is_floating_point()
                                     or t.device != ids[0].device for t in ids):
        raise ValueError("id_bounds_then_clamp: expects one or two contiguous integer tensors of one shape and device, "
                         f"got {[(tuple(t.shape), t.dtype, t.device) for t in ids]}")
    bounds = torch.empty(2 * len(ids), device=ids[0].device, dtype=torch.int64)
    _id_bounds_kernel[(len(ids),)](ids[0], ids[-1], ids[0].numel(), bounds, vocab_size - 1,
                                   BLOCK=min(BLOCK, triton.next_power_of_2(ids[0].numel())), num_warps=16)
    return bounds

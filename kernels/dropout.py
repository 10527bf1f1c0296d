"""The dropout masks of the training kernels: drawn from (seed, row, column) by an integer hash, never stored.

`keep_mask(row_key(seed, rows), cols, p)` hashes each row once (the `lowbias32` mixer, two multiplies and three
shifts) and each element once more (two multiplies and one shift: the row key is already mixed), so a backward
draws the forward's mask again at a small cost; `tl.rand` (Philox, 10 rounds per element) cost attention's
training forward 4x its time without dropout, the full mixer per element ~17 us of its 46 (NOTES.md).
Seeds are int64 device tensors drawn from torch's CUDA generator (`trm_fast.seeds.new_seed`): a CUDA graph
replays them as fresh draws, where a seed passed as a Python int would freeze one mask into the graph.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _mix_column(x):
    """The per-element hash: a multiply, a shift, a multiply (its top bits are the mixed ones); the core of
    `_mix`."""
    x *= 0x7FEB352D
    x ^= x >> 15
    return x * 0x846CA68B


@triton.jit
def _mix(x):
    """A bijective 32-bit hash with full avalanche (Chris Wellons' lowbias32)."""
    x = _mix_column(x ^ (x >> 16))
    return x ^ (x >> 16)


@triton.jit
def load_seed(seed_ptr):
    """The seed tensor's value as a uint32."""
    return tl.load(seed_ptr).to(tl.uint32)


@triton.jit
def row_key(seed, rows):
    """The hash of each row index (int tensor or scalar) under `seed` (load_seed)."""
    return _mix(rows.to(tl.uint32) * 0x9E3779B9 + seed)


@triton.jit
def keep_mask(key, cols, p):
    """Dropout's keep-mask, each element True with probability 1 - p, at row keys `key` (row_key) and column
    indices `cols` (broadcast against each other: [M, 1] keys and [1, N] columns give an [M, N] tile): the top 24
    bits u of `_mix_column(key ^ column)` keep the element when u / 2**24 >= p, compared as integers (the hash
    >= ceil(p * 2**24) * 2**8) so that no element is shifted or converted to float."""
    threshold = tl.minimum(tl.math.ceil(p * 16777216.0).to(tl.uint32), 16777215) << 8
    return _mix_column(key ^ cols.to(tl.uint32)) >= threshold


def torch_keep_mask(shape, p: float, seed: torch.Tensor) -> torch.Tensor:
    """The torch paths' keep-mask (a CPU bool tensor): drawn from a CPU generator seeded with `seed`'s value,
    so drawn again alike in the backward."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(int(seed.reshape(-1)[0]))) >= p


def check_seed(name: str, seed, p: float, device: torch.device) -> None:
    """A dropout probability in [0, 1), and with p > 0 a one-element integer seed tensor on `device`."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name}: dropout probability must be in [0, 1), got {p}")
    if p > 0 and not (isinstance(seed, torch.Tensor) and seed.numel() == 1 and not seed.is_floating_point()
                      and seed.device == device):
        got = (seed.dtype, tuple(seed.shape), str(seed.device)) if isinstance(seed, torch.Tensor) else seed
        raise ValueError(f"{name}: dropout needs a one-element integer seed tensor on {device} (new_seed), got {got}")

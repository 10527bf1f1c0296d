"""`trm_fast::compact_attention`: causal attention of a compacted list of query rows over every key of their
sequences (early exit: the active tokens attend to all tokens, the frozen ones included), inference only.

The operands are those of `torch_ops.compact_attention`: q [M, D] (row stride free), kv [B * L, 2D] (key |
value of every token), rows [M] (b * L + position, ascending, -1 padding at the end), starts [B + 1] (where
each sequence's queries begin in rows), key_valid [B, L]. A program takes up to BLOCK_M consecutive queries of
one sequence and one head; its keys run from 0 to the last query's position, the tiles at or after the first
query's tile with the causal test (the flash forward's `_attend`). The grid is fixed by B and L and nothing is
read back by the host, so the op runs inside a CUDA graph. Tiles are fixed per share of listed rows
(TILES_BY_QUARTERS). One more program per head writes the zeros of the padding rows (no separate fill).
Triton on CUDA for the head dims of the attention kernels; the torch path elsewhere.
"""
import math

import torch
import triton
import triton.language as tl

from trm_fast import torch_ops
from trm_fast.kernels.attention import LOG2E, TRITON_HEAD_DIMS, _attend
from trm_fast.kernels.matmul import INTERPRET, dot_config


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by the share of listed rows, in quarters (1: up to a quarter of the
# batch's tokens, ..., 4: more than three quarters). Fixed, not autotuned: Triton's autotuner times each tile alone
# with the L2 cache flushed before every call, unlike a step, where the keys / values were just written and sit
# in L2; its picks changed from process to process (session 11). Picked by `scripts/early_exit_profile.py
# --sweep-attention-tiles` (each candidate timed as a CUDA graph of 20 calls over random rows of each share, B16
# L512 H8 Dh64, bf16, H100, session 12, programs in order of falling work): (64, 32, 4, 3) took 23 / 28 / 31 us at
# 2-4 quarters ((128, 64, 4, 3) tied at 4), (64, 64, 4, 3) 19 us at one quarter; session 11's (128, 64, 8, 3) took
# 37 / 44 / 47 us at 2-4 quarters before that order.
CANDIDATE_TILES = ((128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3),
                   (64, 32, 4, 4), (128, 128, 8, 2), (32, 64, 4, 3), (32, 32, 4, 3), (16, 64, 4, 3))
TILES_BY_QUARTERS = {1: (64, 64, 4, 3), 2: (64, 32, 4, 3), 3: (64, 32, 4, 3), 4: (64, 32, 4, 3)}
INTERPRETED_TILES = (32, 16, 4, 1)


@triton.jit
def _compact_attention_kernel(q_ptr, kv_ptr, rows_ptr, starts_ptr, key_valid_ptr, o_ptr, stride_q, stride_kv,
                              stride_o, M, B, H, L, qk_scale, PRECISION: tl.constexpr,
                              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Programs in order of falling work: the last query tiles of every sequence and head (the longest key ranges)
    # first, so the short ones fill in behind them; then one program per head for the padding rows.
    pid, tiles = tl.program_id(0), tl.cdiv(L, BLOCK_M)
    first = (tiles - 1 - pid // (B * H)) * BLOCK_M
    b, h = (pid // H) % B, pid % H
    dims = tl.arange(0, HEAD_DIM)
    if pid >= tiles * B * H:  # zeros into this head's columns of the padding rows
        for r in range(tl.load(starts_ptr + B), M, BLOCK_M):
            i = r + tl.arange(0, BLOCK_M)
            tl.store(o_ptr + i[:, None] * stride_o + h * HEAD_DIM + dims[None, :],
                     tl.zeros((BLOCK_M, HEAD_DIM), dtype=o_ptr.dtype.element_ty), mask=(i < M)[:, None])
    else:
        start, end = tl.load(starts_ptr + b), tl.load(starts_ptr + b + 1)
        if start + first < end:
            i = start + first + tl.arange(0, BLOCK_M)
            listed = i < end
            pos = tl.where(listed, tl.load(rows_ptr + i, mask=listed, other=0) - b * L, -1)
            q = tl.load(q_ptr + i[:, None] * stride_q + h * HEAD_DIM + dims[None, :], mask=listed[:, None],
                        other=0.0)
            k_ptr = kv_ptr + b * L * stride_kv + h * HEAD_DIM
            v_ptr = k_ptr + H * HEAD_DIM
            # keys before the tile holding the first query precede every query of the program: no causal test
            split = (tl.min(tl.where(listed, pos, L), axis=0) // BLOCK_N) * BLOCK_N
            m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptr, v_ptr, key_valid_ptr + b * L, pos, dims, 0, split,
                                    stride_kv, L, qk_scale, 0.0, 0, 0, False, True, False, PRECISION, BLOCK_N)
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptr, v_ptr, key_valid_ptr + b * L, pos, dims, split,
                                    tl.max(pos, axis=0) + 1, stride_kv, L, qk_scale, 0.0, 0, 0, True, True, False,
                                    PRECISION, BLOCK_N)
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(o_ptr + i[:, None] * stride_o + h * HEAD_DIM + dims[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=listed[:, None])


def quarters_of(rows: int, tokens: int) -> int:
    """The key of TILES_BY_QUARTERS for `rows` listed rows of `tokens`: 1 up to a quarter, ..., 4."""
    return max(1, min(-(-4 * rows // tokens), 4))


def compact_attention_triton(q, kv, rows, starts, key_valid, n_heads: int) -> torch.Tensor:
    B, L = key_valid.shape
    M, D = q.shape
    out = torch.empty(M, D, device=q.device, dtype=q.dtype)
    Dh = D // n_heads
    if M == 0:
        return out
    block_m, block_n, warps, stages = INTERPRETED_TILES if INTERPRET else TILES_BY_QUARTERS[quarters_of(M, B * L)]
    _compact_attention_kernel[((B * triton.cdiv(L, block_m) + 1) * n_heads,)](
        q, kv, rows, starts, key_valid, out, q.stride(0), kv.stride(0), out.stride(0), M, B, n_heads, L,
        LOG2E / math.sqrt(Dh), PRECISION=dot_config(q.dtype)[1], HEAD_DIM=Dh, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages)
    return out


def _check(q, kv, rows, starts, key_valid, n_heads):
    if key_valid.dim() != 2 or key_valid.dtype != torch.bool:
        raise ValueError(f"compact_attention: key_valid must be a bool [B, L], got {key_valid.dtype} "
                         f"{tuple(key_valid.shape)}")
    B, L = key_valid.shape
    if q.dim() != 2 or q.stride(1) != 1 or q.size(1) % n_heads:
        raise ValueError(f"compact_attention: q must be [M, D] with unit column stride and D divisible by n_heads "
                         f"= {n_heads}, got {tuple(q.shape)}")
    if kv.shape != (B * L, 2 * q.size(1)) or not kv.is_contiguous() or kv.dtype != q.dtype:
        raise ValueError(f"compact_attention: kv must be a contiguous [B * L, 2D] = {(B * L, 2 * q.size(1))} of q's "
                         f"dtype, got {kv.dtype} {tuple(kv.shape)}")
    for name, t, n in (("rows", rows, q.size(0)), ("starts", starts, B + 1)):
        if t.dtype != torch.long or t.shape != (n,):
            raise ValueError(f"compact_attention: {name} must be int64 [{n}], got {t.dtype} {tuple(t.shape)}")
    if len({t.device for t in (q, kv, rows, starts, key_valid)}) != 1:
        raise ValueError("compact_attention: all operands must be on one device")


@torch.library.custom_op("trm_fast::compact_attention", mutates_args=())
def compact_attention(q: torch.Tensor, kv: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor,
                      key_valid: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Out [M, D]; see the module docstring and `torch_ops.compact_attention`."""
    _check(q, kv, rows, starts, key_valid, n_heads)
    if q.is_cuda and q.size(1) // n_heads in TRITON_HEAD_DIMS:
        return compact_attention_triton(q, kv, rows, starts, key_valid, n_heads)
    return torch_ops.compact_attention(q, kv, rows, starts, key_valid, n_heads)


@compact_attention.register_fake
def _(q, kv, rows, starts, key_valid, n_heads):
    return q.new_empty(q.shape)


def syncs_on(device: torch.device, head_dim: int) -> bool:
    """Whether the op reads back from the device (the torch path does; the Triton one never)."""
    return not (device.type == "cuda" and head_dim in TRITON_HEAD_DIMS)

"""`trm_fast::attention`: causal self-attention with a key-padding mask and attention-probability dropout,
flash-style (online softmax, no L x L matrix in memory), forward and backward.

The op takes the QKV projection's output as it is, qkv [B, L, 3, H, Dh], and its backward writes dQ, dK and dV
into one tensor of that layout, the gradient of the projection's output (no stacking of three gradients). Dh
16, 32 or 64 on CUDA (other head dims take the torch path; any size on the CPU path). Query i attends to keys
j <= i with key_valid[b, j]; a query with no such key outputs zero and gets no gradient (its log-sum-exp is
stored as +inf). The dropout mask is drawn from (seed tensor, row, column) by kernels/dropout.py and drawn
again in the backward, never stored. Backward: the FlashAttention-2 split, one kernel for dQ (a program per query
block), which first forms its rows' delta = rowsum(dO * O), then one for dK / dV (a program per key block). Per score
the kernels do as little as they can (benchmarks/NOTES.md, session 20): the softmax scale and log2(e) are folded
into exp2's multiply-add, only the tiles on the diagonal apply the causal test, only key tiles from the first
padded key on (or, in dK / dV, key blocks holding padding) apply the key test, and dropout's 1 / (1 - p) is
applied once to O, dQ, dK and dV. Tile sizes are autotuned on CUDA.
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from trm_fast import torch_ops
from trm_fast.grad_sums import JoinedRows, joined_input, joined_rows, written_into
from trm_fast.kernels.dropout import check_seed, keep_mask, load_seed, row_key, torch_keep_mask
from trm_fast.kernels.linear import linear
from trm_fast.kernels.matmul import dot_config, tile_configs
from trm_fast.seeds import new_seed

TRITON_HEAD_DIMS = (16, 32, 64)  # on CUDA; 128 passes the interpreter but its GPU run did not finish (NOTES.md)
LOG2E = 1.4426950408889634


# forward and dQ: BLOCK_M queries per program, key tiles of BLOCK_N (BLOCK_M a multiple of BLOCK_N);
# dK/dV: BLOCK_N keys per program, query tiles of BLOCK_M (BLOCK_N a multiple of BLOCK_M)
_BLOCKS = ("BLOCK_M", "BLOCK_N")
# the first of each list (the only one with TRM_FAST_AUTOTUNE=0) fits every head dim up to 128; the others are the
# fastest of scripts/kernel_tiles.py's sweep on the H100 (session 14)
_FWD_TILES = tile_configs(_BLOCKS, [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 2)], (32, 16, 4, 1))
_DQ_TILES = tile_configs(_BLOCKS, [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 8, 2)], (32, 16, 4, 1))
_DKDV_TILES = tile_configs(_BLOCKS, [(64, 64, 4, 2), (64, 64, 4, 3), (16, 64, 4, 2), (32, 64, 4, 2)], (16, 32, 4, 1))


@triton.jit
def _load_tile(ptr, idx, dims, stride_l, L):
    """The [len(idx), HEAD_DIM] tile of sequence positions idx (zeros past L); ptr at this (b, h)."""
    return tl.load(ptr + idx[:, None] * stride_l + dims[None, :], mask=idx[:, None] < L, other=0.0)


@triton.jit
def _heaviest_first(BLOCK_M: tl.constexpr):
    """The first query row of this program. Programs launch with the (batch, head) index varying fastest and the
    last query blocks, which attend to the most keys, first: the short causal blocks fill the last wave."""
    return (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M


@triton.jit
def _key_ok(key_valid_ptr, cols, L):
    """Whether each key of `cols` may be attended: a valid (non-padding) position before L."""
    return tl.load(key_valid_ptr + cols, mask=cols < L, other=0) != 0


@triton.jit
def _scores(q, k, key_valid_ptr, rows, cols, L, CAUSAL: tl.constexpr, KEY_MASK: tl.constexpr,
            PRECISION: tl.constexpr):
    """q @ k.T (unscaled: the callers fold log2(e) / sqrt(Dh) into their exp2's multiply-add), -inf where a key is
    padding or past L (KEY_MASK) and, on the diagonal tiles (CAUSAL), where it lies after the query."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if KEY_MASK:
        allowed = _key_ok(key_valid_ptr, cols, L)[None, :]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= rows[:, None])
        s = tl.where(allowed, s, float("-inf"))
    elif CAUSAL:
        s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
    return s


@triton.jit
def _unpadded_end(key_valid_ptr, end, BLOCK_N: tl.constexpr):
    """The start of the first key tile (of BLOCK_N) before `end` that holds padding, or `end` (a multiple of
    BLOCK_N): the key tiles before it are run without the key test. Sequential loops, not the branches of an if,
    since Triton gives each branch's pipelined loop its own shared memory."""
    first_invalid = end
    for start in range(0, end, 1024):
        cols = start + tl.arange(0, 1024)
        valid = tl.load(key_valid_ptr + cols, mask=cols < end, other=1) != 0
        first_invalid = tl.minimum(first_invalid, tl.min(tl.where(valid, end, cols), axis=0))
    return first_invalid // BLOCK_N * BLOCK_N


@triton.jit
def _keep(seed_ptr, bh, rows, cols, L, p):
    """The dropout keep-mask of the [rows, cols] tile of head bh (drawn alike in forward and backward)."""
    return keep_mask(row_key(load_seed(seed_ptr), bh * L + rows)[:, None], cols[None, :], p)


@triton.jit
def _unfolded_zero(finite_rows):
    """Zeros that the compiler cannot see as a constant: the backward's `tl.where(keep, probs, 0.0).to(bf16)` is
    compiled as a select of the bf16 halves after the conversion (byte permutes around each select); against a
    computed zero it stays a float32 select before it (dK / dV loop on sm90: 633 -> 591 instructions; the
    forward's loop grew with it, so it keeps the constant)."""
    return finite_rows * 0.0


@triton.jit
def _attend(acc, m_i, l_i, q, k_ptr, v_ptr, key_valid_ptr, rows, dims, start, end, stride_l, L, qk_scale, p, seed_ptr,
            bh, CAUSAL: tl.constexpr, KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """The online-softmax update of one query tile over the key tiles start..end (m_i in log2 units)."""
    for kstart in range(start, end, BLOCK_N):
        cols = kstart + tl.arange(0, BLOCK_N)
        s = _scores(q, _load_tile(k_ptr, cols, dims, stride_l, L), key_valid_ptr, rows, cols, L, CAUSAL, KEY_MASK,
                    PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no allowed key yet stay at zero
        probs = tl.math.exp2(s * qk_scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        if HAS_DROPOUT:  # kept probabilities; the output is scaled by 1 / (1 - p) once, at the end
            probs = tl.where(_keep(seed_ptr, bh, rows, cols, L, p), probs, 0.0)
        v = _load_tile(v_ptr, cols, dims, stride_l, L)
        acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_FWD_TILES, key=["L", "HEAD_DIM", "HAS_DROPOUT"])
@triton.jit
def _attention_fwd_kernel(qkv_ptr, key_valid_ptr, o_ptr, lse_ptr, stride_b, stride_l, stride_t, stride_h,
                          stride_ob, stride_ol, stride_oh, H, L, qk_scale, p, seed_ptr, HAS_DROPOUT: tl.constexpr,
                          PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    q_ptr, k_ptr, v_ptr = qkv_ptr, qkv_ptr + stride_t, qkv_ptr + 2 * stride_t
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    first_row = _heaviest_first(BLOCK_M)
    rows = first_row + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    base = b * stride_b + h * stride_h
    q = _load_tile(q_ptr + base, rows, dims, stride_l, L)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    # keys before the tile's first query need no causal test (and no key test without padding); the diagonal
    # tiles do
    k_ptr, v_ptr, key_valid_ptr = k_ptr + base, v_ptr + base, key_valid_ptr + b * L
    unpadded = _unpadded_end(key_valid_ptr, first_row, BLOCK_N)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptr, v_ptr, key_valid_ptr, rows, dims, 0, unpadded, stride_l, L,
                            qk_scale, p, seed_ptr, bh, False, False, HAS_DROPOUT, PRECISION, BLOCK_N)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptr, v_ptr, key_valid_ptr, rows, dims, unpadded, first_row, stride_l,
                            L, qk_scale, p, seed_ptr, bh, False, True, HAS_DROPOUT, PRECISION, BLOCK_N)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptr, v_ptr, key_valid_ptr, rows, dims, first_row,
                            tl.minimum(L, first_row + BLOCK_M), stride_l, L, qk_scale, p, seed_ptr, bh, True, True,
                            HAS_DROPOUT, PRECISION, BLOCK_N)
    has_key = l_i > 0
    out = acc * ((1.0 / (1.0 - p)) / tl.where(has_key, l_i, 1.0))[:, None]
    o_base = b * stride_ob + h * stride_oh
    tl.store(o_ptr + o_base + rows[:, None] * stride_ol + dims[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rows[:, None] < L)
    lse = m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))  # log2 units
    tl.store(lse_ptr + bh * L + rows, tl.where(has_key, lse, float("inf")), mask=rows < L)


@triton.jit
def _load_query_rows(q_ptr, do_ptr, lse_ptr, bh, rows, dims, stride_l, stride_gl, L):
    """What the backward needs of query rows: q, dO and the log-sum-exp (+inf past L)."""
    lse = tl.load(lse_ptr + bh * L + rows, mask=rows < L, other=float("inf"))
    return _load_tile(q_ptr, rows, dims, stride_l, L), _load_tile(do_ptr, rows, dims, stride_gl, L), lse


@triton.jit
def _probs_and_dscores(q, do, lse, delta, k, v, key_valid_ptr, seed_ptr, bh, rows, cols, L, qk_scale, p,
                       CAUSAL: tl.constexpr, KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       PRECISION: tl.constexpr):
    """For one [rows, cols] tile: the kept probabilities and (1 - p) dS = P * (kept dP - delta), both short of
    dropout's 1 / (1 - p), which dV, dK and dQ take once, at the end."""
    s = _scores(q, k, key_valid_ptr, rows, cols, L, CAUSAL, KEY_MASK, PRECISION)
    probs = tl.math.exp2(s * qk_scale - lse[:, None])  # 0 where masked (-inf) and on rows with no key (lse = +inf)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    kept = probs
    if HAS_DROPOUT:
        keep = _keep(seed_ptr, bh, rows, cols, L, p)
        kept = tl.where(keep, probs, _unfolded_zero(delta)[:, None])
        dp = tl.where(keep, dp, 0.0)
    return kept, probs * (dp - delta[:, None])


@triton.jit
def _dkdv_step(dk, dv, k, v, key_valid_ptr, q_ptr, do_ptr, lse_ptr, delta_ptr, bh, cols, dims, start, end, stride_l,
               stride_gl, L, qk_scale, p, seed_ptr, CAUSAL: tl.constexpr, KEY_MASK: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    for qstart in range(start, end, BLOCK_M):
        rows = qstart + tl.arange(0, BLOCK_M)
        q, do, lse = _load_query_rows(q_ptr, do_ptr, lse_ptr, bh, rows, dims, stride_l, stride_gl, L)
        delta = tl.load(delta_ptr + bh * L + rows, mask=rows < L, other=0.0)
        kept, ds = _probs_and_dscores(q, do, lse, delta, k, v, key_valid_ptr, seed_ptr, bh, rows, cols, L, qk_scale,
                                      p, CAUSAL, KEY_MASK, HAS_DROPOUT, PRECISION)
        dv += tl.dot(tl.trans(kept).to(do.dtype), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_tiles(dk, dv, k, v, key_valid_ptr, q_ptr, do_ptr, lse_ptr, delta_ptr, bh, cols, dims, first_col, stride_l,
                stride_gl, L, qk_scale, p, seed_ptr, KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of the key block at first_col: queries before it see none of it; the diagonal tiles need the causal
    test, later ones not."""
    diagonal_end = tl.minimum(L, first_col + BLOCK_N)
    dk, dv = _dkdv_step(dk, dv, k, v, key_valid_ptr, q_ptr, do_ptr, lse_ptr, delta_ptr, bh, cols, dims, first_col,
                        diagonal_end, stride_l, stride_gl, L, qk_scale, p, seed_ptr, True, KEY_MASK, HAS_DROPOUT,
                        PRECISION, BLOCK_M)
    return _dkdv_step(dk, dv, k, v, key_valid_ptr, q_ptr, do_ptr, lse_ptr, delta_ptr, bh, cols, dims, diagonal_end, L,
                      stride_l, stride_gl, L, qk_scale, p, seed_ptr, False, KEY_MASK, HAS_DROPOUT, PRECISION, BLOCK_M)


@triton.autotune(configs=_DKDV_TILES, key=["L", "HEAD_DIM", "HAS_DROPOUT"])
@triton.jit
def _attention_bwd_dkdv_kernel(qkv_ptr, key_valid_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, stride_b, stride_l,
                               stride_t, stride_h, stride_gb, stride_gl, stride_gh, H, L, qk_scale, ds_scale, p,
                               seed_ptr, HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    q_ptr, k_ptr, v_ptr = qkv_ptr, qkv_ptr + stride_t, qkv_ptr + 2 * stride_t
    dk_ptr, dv_ptr = dqkv_ptr + stride_t, dqkv_ptr + 2 * stride_t
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    first_col = tl.program_id(1) * BLOCK_N  # the first key blocks meet the most queries: launched first
    cols = first_col + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    base, g_base = b * stride_b + h * stride_h, b * stride_gb + h * stride_gh
    k = _load_tile(k_ptr + base, cols, dims, stride_l, L)  # this program's keys / values, loaded once
    v = _load_tile(v_ptr + base, cols, dims, stride_l, L)
    key_valid_ptr += b * L
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    # no padding in the block: no key test. The two branches' loops get shared memory each (91 KB at Dh64, was 58);
    # at 255 registers a thread two programs fit an SM either way
    if tl.min(_key_ok(key_valid_ptr, cols, L).to(tl.int32), axis=0) == 1:
        dk, dv = _dkdv_tiles(dk, dv, k, v, key_valid_ptr, q_ptr + base, do_ptr + g_base, lse_ptr, delta_ptr, bh, cols,
                             dims, first_col, stride_l, stride_gl, L, qk_scale, p, seed_ptr, False, HAS_DROPOUT,
                             PRECISION, BLOCK_M, BLOCK_N)
    else:
        dk, dv = _dkdv_tiles(dk, dv, k, v, key_valid_ptr, q_ptr + base, do_ptr + g_base, lse_ptr, delta_ptr, bh, cols,
                             dims, first_col, stride_l, stride_gl, L, qk_scale, p, seed_ptr, True, HAS_DROPOUT,
                             PRECISION, BLOCK_M, BLOCK_N)
    out = base + cols[:, None] * stride_l + dims[None, :]  # dK, dV laid out as K, V
    tl.store(dk_ptr + out, (dk * ds_scale).to(dk_ptr.dtype.element_ty), mask=cols[:, None] < L)
    tl.store(dv_ptr + out, (dv * (1.0 / (1.0 - p))).to(dv_ptr.dtype.element_ty), mask=cols[:, None] < L)


@triton.jit
def _dq_step(dq, q, do, lse, delta, k_ptr, v_ptr, key_valid_ptr, bh, rows, dims, start, end, stride_l, L, qk_scale,
             p, seed_ptr, CAUSAL: tl.constexpr, KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    for kstart in range(start, end, BLOCK_N):
        cols = kstart + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, cols, dims, stride_l, L)
        _, ds = _probs_and_dscores(q, do, lse, delta, k, _load_tile(v_ptr, cols, dims, stride_l, L), key_valid_ptr,
                                   seed_ptr, bh, rows, cols, L, qk_scale, p, CAUSAL, KEY_MASK, HAS_DROPOUT, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_DQ_TILES, key=["L", "HEAD_DIM", "HAS_DROPOUT"])
@triton.jit
def _attention_bwd_dq_kernel(qkv_ptr, key_valid_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, dqkv_ptr, stride_b, stride_l,
                             stride_t, stride_h, stride_gb, stride_gl, stride_gh, H, L, qk_scale, ds_scale, p,
                             seed_ptr, HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of a block of query rows, and first their delta = (1 - p) * the sum over the head dim of dO * O (float32:
    dS's delta in the units of the unscaled kept dP; dropout's 1 / (1 - p) is applied to dQ and dK at the end),
    stored for the dK / dV kernel, which runs after this one. O is laid out as dO."""
    q_ptr, k_ptr, v_ptr, dq_ptr = qkv_ptr, qkv_ptr + stride_t, qkv_ptr + 2 * stride_t, dqkv_ptr
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    first_row = _heaviest_first(BLOCK_M)
    rows = first_row + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    base, g_base = b * stride_b + h * stride_h, b * stride_gb + h * stride_gh
    q, do, lse = _load_query_rows(q_ptr + base, do_ptr + g_base, lse_ptr, bh, rows, dims, stride_l, stride_gl, L)
    o = _load_tile(o_ptr + g_base, rows, dims, stride_gl, L)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1) * (1.0 - p)
    tl.store(delta_ptr + bh * L + rows, delta, mask=rows < L)
    k_ptr, v_ptr, key_valid_ptr = k_ptr + base, v_ptr + base, key_valid_ptr + b * L
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    unpadded = _unpadded_end(key_valid_ptr, first_row, BLOCK_N)
    dq = _dq_step(dq, q, do, lse, delta, k_ptr, v_ptr, key_valid_ptr, bh, rows, dims, 0, unpadded, stride_l, L,
                  qk_scale, p, seed_ptr, False, False, HAS_DROPOUT, PRECISION, BLOCK_N)
    dq = _dq_step(dq, q, do, lse, delta, k_ptr, v_ptr, key_valid_ptr, bh, rows, dims, unpadded, first_row, stride_l, L,
                  qk_scale, p, seed_ptr, False, True, HAS_DROPOUT, PRECISION, BLOCK_N)
    dq = _dq_step(dq, q, do, lse, delta, k_ptr, v_ptr, key_valid_ptr, bh, rows, dims, first_row,
                  tl.minimum(L, first_row + BLOCK_M), stride_l, L, qk_scale, p, seed_ptr, True, True, HAS_DROPOUT,
                  PRECISION, BLOCK_N)
    tl.store(dq_ptr + base + rows[:, None] * stride_l + dims[None, :], (dq * ds_scale).to(dq_ptr.dtype.element_ty),
             mask=rows[:, None] < L)


@triton.jit
def _keep_mask_kernel(out_ptr, L, p, seed_ptr, BLOCK: tl.constexpr):
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    for start in range(0, L, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        keep = _keep(seed_ptr, bh, rows, cols, L, p)
        tl.store(out_ptr + (bh * L + rows[:, None]) * L + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < L) & (cols[None, :] < L))


def dropout_keep_mask(B: int, H: int, L: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """The bool [B, H, L, L] keep-mask that the attention kernels draw for (p, seed), on seed's device: for
    tests."""
    out = torch.empty(B, H, L, L, device=seed.device, dtype=torch.int8)
    _keep_mask_kernel[(triton.cdiv(L, 16), B * H)](out, L, p, seed, BLOCK=16)
    return out.bool()


def _check(qkv, key_valid, p, seed):
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention: qkv must be [B, L, 3, H, Dh], got {tuple(qkv.shape)}")
    B, L, _, H, Dh = qkv.shape
    if qkv.is_cuda and Dh not in TRITON_HEAD_DIMS:
        raise ValueError(f"attention: head dim must be one of {TRITON_HEAD_DIMS} on CUDA, got {Dh}")
    if key_valid.shape != (B, L) or key_valid.dtype != torch.bool or key_valid.device != qkv.device:
        raise ValueError(f"attention: key_valid must be a bool [B, L] = {(B, L)} on {qkv.device}, got "
                         f"{key_valid.dtype} {tuple(key_valid.shape)} on {key_valid.device}")
    check_seed("attention", seed, p, qkv.device)


def attention_fwd_triton(qkv, key_valid, p: float, seed: Optional[torch.Tensor], out: Optional[torch.Tensor] = None):
    """(o [B, L, H, Dh] contiguous, lse [B, H, L] float32 in log2 units, +inf for a query without keys) for qkv
    [B, L, 3, H, Dh] with unit stride over Dh, o written into `out` where given; `seed` is read when p > 0."""
    B, L, _, H, Dh = qkv.shape
    o = out if out is not None else torch.empty(B, L, H, Dh, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(B, H, L, device=qkv.device, dtype=torch.float32)
    grid = lambda meta: (B * H, triton.cdiv(L, meta["BLOCK_M"]))  # noqa: E731
    _attention_fwd_kernel[grid](qkv, key_valid, o, lse, *qkv.stride()[:4], o.stride(0), o.stride(1), o.stride(2), H,
                                L, LOG2E / math.sqrt(Dh), p, seed if p > 0 else lse, HAS_DROPOUT=p > 0, HEAD_DIM=Dh,
                                PRECISION=dot_config(qkv.dtype)[1])
    return o, lse


def attention_bwd_triton(do, qkv, o, lse, key_valid, p: float, seed: Optional[torch.Tensor],
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dqkv, laid out as qkv (contiguous), written into `out` (contiguous, qkv's size) where given; `do` and `o`
    contiguous [B, L, H, Dh]."""
    B, L, _, H, Dh = qkv.shape
    dqkv = torch.empty_like(qkv) if out is None else out.view(qkv.shape)
    delta = torch.empty(B, H, L, device=qkv.device, dtype=torch.float32)  # written by the dQ kernel
    common = (*qkv.stride()[:4], do.stride(0), do.stride(1), do.stride(2), H, L, LOG2E / math.sqrt(Dh),
              1.0 / (math.sqrt(Dh) * (1.0 - p)), p, seed if p > 0 else lse)
    meta = dict(HAS_DROPOUT=p > 0, HEAD_DIM=Dh, PRECISION=dot_config(qkv.dtype)[1])
    _attention_bwd_dq_kernel[lambda m: (B * H, triton.cdiv(L, m["BLOCK_M"]))](
        qkv, key_valid, do, o, lse, delta, dqkv, *common, **meta)
    _attention_bwd_dkdv_kernel[lambda m: (B * H, triton.cdiv(L, m["BLOCK_N"]))](
        qkv, key_valid, do, lse, delta, dqkv, *common, **meta)
    return dqkv


def _probs_torch(qkv, key_valid, p: float, seed: Optional[torch.Tensor]):
    """(softmax probabilities [B, H, L, L] in float32, dropout keep-scale or None): the op's path off CUDA.
    Its dropout mask is `torch_keep_mask`'s, which the backward draws again alike."""
    q, k = qkv[:, :, 0].float(), qkv[:, :, 1].float()
    L, Dh = q.shape[1], q.shape[-1]
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(Dh)
    allowed = torch.ones(L, L, dtype=torch.bool, device=q.device).tril() & key_valid[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    if p == 0:
        return probs, None
    return probs, torch_keep_mask(probs.shape, p, seed).to(probs.device) / (1.0 - p)


def attention_forward(qkv, key_valid, p: float, seed: Optional[torch.Tensor],
                      out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o [B, L, H, Dh], lse [B, H, L]; lse is empty off CUDA): Triton on CUDA, torch elsewhere; o written into
    `out` (contiguous [B, L, H, Dh]) where given."""
    _check(qkv, key_valid, p, seed)
    if qkv.is_cuda:
        return attention_fwd_triton(qkv.contiguous(), key_valid, p, seed, out)
    probs, keep_scale = _probs_torch(qkv, key_valid, p, seed)
    dropped = probs if keep_scale is None else probs * keep_scale
    o = torch.einsum("bhlm,bmhd->blhd", dropped, qkv[:, :, 2].float()).to(qkv.dtype).contiguous()
    return written_into(o, out), qkv.new_empty(0, dtype=torch.float32)


def attention_backward(do, qkv, o, lse, key_valid, p: float, seed: Optional[torch.Tensor],
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dqkv [B, L, 3, H, Dh], written into `out` (contiguous, qkv's size) where given."""
    if qkv.is_cuda:
        return attention_bwd_triton(do.contiguous(), qkv.contiguous(), o.contiguous(), lse, key_valid, p, seed, out)
    probs, keep_scale = _probs_torch(qkv, key_valid, p, seed)
    dropped = probs if keep_scale is None else probs * keep_scale
    q, k, v = qkv.float().unbind(2)
    do32 = do.float()
    dv = torch.einsum("bhlm,blhd->bmhd", dropped, do32)
    dprobs = torch.einsum("blhd,bmhd->bhlm", do32, v)
    if keep_scale is not None:
        dprobs = dprobs * keep_scale
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True)) / math.sqrt(q.shape[-1])
    dq = torch.einsum("bhlm,bmhd->blhd", dscores, k)
    dk = torch.einsum("bhlm,blhd->bmhd", dscores, q)
    return written_into(torch.stack((dq, dk, dv), dim=2).to(qkv.dtype), out).view(qkv.shape)


@torch.library.custom_op("trm_fast::attention", mutates_args=())
def attention_op(qkv: torch.Tensor, key_valid: torch.Tensor, p: float,
                 seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o [B, L, H, Dh], lse [B, H, L]; lse is empty off CUDA) of qkv [B, L, 3, H, Dh]."""
    return attention_forward(qkv, key_valid, p, seed)


@attention_op.register_fake
def _(qkv, key_valid, p, seed):
    B, L, _, H, Dh = qkv.shape
    lse_shape = (B, H, L) if qkv.is_cuda else (0,)
    return qkv.new_empty(B, L, H, Dh), qkv.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("trm_fast::attention_backward", mutates_args=())
def attention_backward_op(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                          key_valid: torch.Tensor, p: float, seed: Optional[torch.Tensor]) -> torch.Tensor:
    return attention_backward(do, qkv, o, lse, key_valid, p, seed)


@attention_backward_op.register_fake
def _(do, qkv, o, lse, key_valid, p, seed):
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output):
    qkv, key_valid, p, seed = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse, key_valid, seed)
    ctx.p = p


def _backward(ctx, do, _grad_lse):
    qkv, o, lse, key_valid, seed = ctx.saved_tensors
    return attention_backward_op(do, qkv, o, lse, key_valid, ctx.p, seed), None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


class _Attention(torch.autograd.Function):
    """The eager path (see kernels/concat_linear.py)."""

    @staticmethod
    def forward(ctx, qkv, key_valid, p, seed, into):
        o, lse = attention_forward(qkv, key_valid, p, seed, into[0])
        ctx.save_for_backward(qkv, o, lse, key_valid, seed)
        ctx.p, ctx.qkv_joined = p, into[1]
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse, key_valid, seed = ctx.saved_tensors
        # where qkv lies in a slot of the QKV weight's JoinedRows, dqkv goes to the rows that it names
        into = ctx.qkv_joined.gradient_rows(qkv) if ctx.qkv_joined is not None else None
        return attention_backward(do, qkv, o, lse, key_valid, ctx.p, seed, into), None, None, None, None


def attention(qkv, key_valid, p: float, seed: Optional[torch.Tensor], out: Optional[torch.Tensor] = None,
              qkv_joined: Optional[JoinedRows] = None) -> torch.Tensor:
    """o [B, L, H, Dh] of the attention op on qkv [B, L, 3, H, Dh], differentiable in qkv; written into `out`
    (contiguous [B, L, H, Dh]) where given; `qkv_joined`: the QKV weight's JoinedRows, whose slot may hold qkv."""
    if torch.compiler.is_compiling():
        return attention_op(qkv, key_valid, p, seed)[0]
    return _Attention.apply(qkv, key_valid, p, seed, (out, qkv_joined))  # (not inputs of the autograd graph)


def causal_attention(h, key_valid, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, n_heads: int,
                     dropout_p: float) -> torch.Tensor:
    """The TinyNet op (the signature of `torch_ops.causal_attention`): QKV projection, this attention, output
    projection (both cuBLAS, kernels/linear.py, in the autocast dtype under autocast as in the seed); a query
    with no valid key outputs zero before the output projection. On CUDA, a head dim that the kernels do not
    take runs `torch_ops.causal_attention` instead."""
    B, L, D = h.shape
    if h.is_cuda and D // n_heads not in TRITON_HEAD_DIMS:
        return torch_ops.causal_attention(h, key_valid, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                                          n_heads, dropout_p)
    qkv = linear(h, in_proj_weight, in_proj_bias).view(B, L, 3, n_heads, D // n_heads)
    # in a tracked call o goes to a slot of the output projection's JoinedRows (trm_fast.grad_sums), if it has them
    o = attention(qkv, key_valid, dropout_p, new_seed(h.device) if dropout_p > 0 else None,
                  joined_input(out_proj_weight, (B, L, n_heads, D // n_heads)), joined_rows(in_proj_weight))
    return linear(o.reshape(B, L, D), out_proj_weight, out_proj_bias)

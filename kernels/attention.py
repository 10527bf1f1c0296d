"""`trm_fast::attention`: causal self-attention with a key-padding mask and attention-probability dropout,
flash-style (online softmax, no L x L matrix in memory), forward and backward.

q, k, v are [B, L, H, Dh] views with unit stride over Dh (e.g. slices of the QKV projection's output),
Dh a power of two from 16 to 128 on CUDA (any size on the CPU path). Query i attends to keys j <= i with key_valid[b, j]; a query with no
such key outputs zero and gets no gradient (its log-sum-exp is stored as +inf). The dropout mask is drawn
from (seed, element index) with `tl.rand` and drawn again in the backward, never stored. Backward: the
FlashAttention-2 split, one kernel for dK / dV (a program per key block) and one for dQ (a program per
query block), with delta = rowsum(dO * O) computed first.
"""
import math
from typing import Tuple

import torch
import triton
import triton.language as tl

from trm_fast import torch_ops

BLOCK_M, BLOCK_N = 64, 64
TRITON_HEAD_DIMS = (16, 32, 64, 128)


@triton.jit
def _load_tile(ptr, idx, dims, stride_l, L):
    """The [len(idx), HEAD_DIM] tile of sequence positions idx (zeros past L); ptr at this (b, h)."""
    return tl.load(ptr + idx[:, None] * stride_l + dims[None, :], mask=idx[:, None] < L, other=0.0)


@triton.jit
def _scores(q, k, key_valid_ptr, rows, cols, L, scale):
    """q @ k.T * scale with the causal and key-padding mask applied (-inf where not allowed)."""
    s = tl.dot(q, tl.trans(k)) * scale
    key_ok = tl.load(key_valid_ptr + cols, mask=cols < L, other=0) != 0
    allowed = (cols[None, :] <= rows[:, None]) & key_ok[None, :] & (cols[None, :] < L)
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _keep(seed, bh, rows, cols, L, p):
    """The dropout keep-mask of the [rows, cols] tile of head bh (drawn alike in forward and backward)."""
    return tl.rand(seed, (bh * L + rows[:, None]) * L + cols[None, :]) >= p


@triton.jit
def _attention_fwd_kernel(q_ptr, k_ptr, v_ptr, key_valid_ptr, o_ptr, lse_ptr, stride_b, stride_l, stride_h,
                          stride_ob, stride_ol, stride_oh, H, L, scale, p, seed, HAS_DROPOUT: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    base = b * stride_b + h * stride_h
    q = _load_tile(q_ptr + base, rows, dims, stride_l, L)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    end = tl.minimum(L, (tl.program_id(0) + 1) * BLOCK_M)  # causal: no key beyond the block's last query
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = _scores(q, _load_tile(k_ptr + base, cols, dims, stride_l, L), key_valid_ptr + b * L, rows, cols, L, scale)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no allowed key yet stay at zero
        probs = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        if HAS_DROPOUT:
            probs = tl.where(_keep(seed, bh, rows, cols, L, p), probs / (1.0 - p), 0.0)
        v = _load_tile(v_ptr + base, cols, dims, stride_l, L)
        acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v)
        m_i = m_new
    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    o_base = b * stride_ob + h * stride_oh
    tl.store(o_ptr + o_base + rows[:, None] * stride_ol + dims[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rows[:, None] < L)
    tl.store(lse_ptr + bh * L + rows, tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("inf")),
             mask=rows < L)


@triton.jit
def _load_query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, bh, rows, dims, stride_l, stride_gl, L):
    """What the backward needs of query rows: q, dO, log-sum-exp (+inf past L) and delta."""
    lse = tl.load(lse_ptr + bh * L + rows, mask=rows < L, other=float("inf"))
    delta = tl.load(delta_ptr + bh * L + rows, mask=rows < L, other=0.0)
    return (_load_tile(q_ptr, rows, dims, stride_l, L), _load_tile(do_ptr, rows, dims, stride_gl, L), lse, delta)


@triton.jit
def _probs_and_dscores(q, do, lse, delta, k, v, key_valid_ptr, seed, bh, rows, cols, L, scale, p,
                       HAS_DROPOUT: tl.constexpr):
    """For one [rows, cols] tile: the (dropped) probabilities and dS = P * (dP - delta)."""
    s = _scores(q, k, key_valid_ptr, rows, cols, L, scale)
    probs = tl.exp(s - lse[:, None])  # 0 where masked (-inf) and on rows with no key (lse = +inf)
    dp = tl.dot(do, tl.trans(v))
    dropped = probs
    if HAS_DROPOUT:
        keep = _keep(seed, bh, rows, cols, L, p)
        dropped = tl.where(keep, probs / (1.0 - p), 0.0)
        dp = tl.where(keep, dp / (1.0 - p), 0.0)
    return dropped, probs * (dp - delta[:, None])


@triton.jit
def _attention_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, key_valid_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                               stride_b, stride_l, stride_h, stride_gb, stride_gl, stride_gh, H, L, scale, p, seed,
                               HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    base, g_base = b * stride_b + h * stride_h, b * stride_gb + h * stride_gh
    k = _load_tile(k_ptr + base, cols, dims, stride_l, L)  # this program's keys / values, loaded once
    v = _load_tile(v_ptr + base, cols, dims, stride_l, L)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    first = (tl.program_id(0) * BLOCK_N) // BLOCK_M * BLOCK_M  # causal: no query before the block's first key
    for start in range(first, L, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q, do, lse, delta = _load_query_rows(q_ptr + base, do_ptr + g_base, lse_ptr, delta_ptr, bh, rows, dims,
                                             stride_l, stride_gl, L)
        dropped, ds = _probs_and_dscores(q, do, lse, delta, k, v, key_valid_ptr + b * L, seed, bh, rows, cols, L,
                                         scale, p, HAS_DROPOUT)
        dv += tl.dot(tl.trans(dropped).to(do.dtype), do)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q) * scale
    out = g_base + cols[:, None] * stride_gl + dims[None, :]
    tl.store(dk_ptr + out, dk.to(dk_ptr.dtype.element_ty), mask=cols[:, None] < L)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=cols[:, None] < L)


@triton.jit
def _attention_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, key_valid_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                             stride_b, stride_l, stride_h, stride_gb, stride_gl, stride_gh, H, L, scale, p, seed,
                             HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    base, g_base = b * stride_b + h * stride_h, b * stride_gb + h * stride_gh
    q, do, lse, delta = _load_query_rows(q_ptr + base, do_ptr + g_base, lse_ptr, delta_ptr, bh, rows, dims,
                                         stride_l, stride_gl, L)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    end = tl.minimum(L, (tl.program_id(0) + 1) * BLOCK_M)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr + base, cols, dims, stride_l, L)
        _, ds = _probs_and_dscores(q, do, lse, delta, k, _load_tile(v_ptr + base, cols, dims, stride_l, L),
                                   key_valid_ptr + b * L, seed, bh, rows, cols, L, scale, p, HAS_DROPOUT)
        dq += tl.dot(ds.to(k.dtype), k) * scale
    tl.store(dq_ptr + g_base + rows[:, None] * stride_gl + dims[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=rows[:, None] < L)


@triton.jit
def _keep_mask_kernel(out_ptr, L, p, seed, BLOCK_N: tl.constexpr):
    row, bh = tl.program_id(0), tl.program_id(1)
    for start in range(0, L, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        keep = tl.rand(seed, (bh * L + row) * L + cols) >= p
        tl.store(out_ptr + (bh * L + row) * L + cols, keep.to(tl.int8), mask=cols < L)


def dropout_keep_mask(B: int, H: int, L: int, p: float, seed: int, device) -> torch.Tensor:
    """The bool [B, H, L, L] keep-mask that the attention kernels draw for (p, seed): for tests."""
    out = torch.empty(B, H, L, L, device=device, dtype=torch.int8)
    _keep_mask_kernel[(L, B * H)](out, L, p, seed, BLOCK_N=BLOCK_N)
    return out.bool()


def _check(q, k, v, key_valid, p):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention: q, k, v must be the same [B, L, H, Dh], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, L, H, Dh = q.shape
    if q.is_cuda and Dh not in TRITON_HEAD_DIMS:
        raise ValueError(f"attention: head dim must be one of {TRITON_HEAD_DIMS} on CUDA, got {Dh}")
    if any(t.stride(-1) != 1 for t in (q, k, v)) or k.stride() != q.stride() or v.stride() != q.stride():
        raise ValueError("attention: q, k, v must share strides, with unit stride over the head dim")
    if key_valid.shape != (B, L) or key_valid.dtype != torch.bool:
        raise ValueError(f"attention: key_valid must be a bool [B, L] = {(B, L)}, got {key_valid.dtype} "
                         f"{tuple(key_valid.shape)}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"attention: dropout probability must be in [0, 1), got {p}")
    if p > 0 and B * H * L * L >= 2**31:
        raise ValueError(f"attention: dropout offsets overflow int32 at B*H*L*L = {B * H * L * L}")


def attention_fwd_triton(q, k, v, key_valid, p: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o [B, L, H, Dh] contiguous, lse [B, H, L] float32)."""
    B, L, H, Dh = q.shape
    o = torch.empty(B, L, H, Dh, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(L, BLOCK_M), B * H)
    _attention_fwd_kernel[grid](q, k, v, key_valid, o, lse, q.stride(0), q.stride(1), q.stride(2),
                                o.stride(0), o.stride(1), o.stride(2), H, L, 1.0 / math.sqrt(Dh), p, seed,
                                HAS_DROPOUT=p > 0, HEAD_DIM=Dh, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return o, lse


def attention_bwd_triton(do, q, k, v, o, lse, key_valid, p: float, seed: int):
    """(dq, dk, dv), each [B, L, H, Dh] contiguous; `do` and `o` contiguous [B, L, H, Dh]."""
    B, L, H, Dh = q.shape
    delta = (do.float() * o.float()).sum(-1).permute(0, 2, 1).contiguous()  # [B, H, L]
    dq, dk, dv = (torch.empty(B, L, H, Dh, device=q.device, dtype=q.dtype) for _ in range(3))
    common = (q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2), H, L,
              1.0 / math.sqrt(Dh), p, seed)
    meta = dict(HAS_DROPOUT=p > 0, HEAD_DIM=Dh, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    _attention_bwd_dkdv_kernel[(triton.cdiv(L, BLOCK_N), B * H)](q, k, v, key_valid, do, lse, delta, dk, dv,
                                                                 *common, **meta)
    _attention_bwd_dq_kernel[(triton.cdiv(L, BLOCK_M), B * H)](q, k, v, key_valid, do, lse, delta, dq, *common, **meta)
    return dq, dk, dv


def _probs_torch(q, k, key_valid, p: float, seed: int):
    """(softmax probabilities [B, H, L, L] in float32, dropout keep-scale or None): the op's path off CUDA.
    Its dropout mask comes from a CPU generator seeded with `seed`, so the backward draws it again alike."""
    B, L, H, Dh = q.shape
    scores = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) / math.sqrt(Dh)
    allowed = torch.ones(L, L, dtype=torch.bool, device=q.device).tril() & key_valid[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    if p == 0:
        return probs, None
    keep = torch.rand(probs.shape, generator=torch.Generator().manual_seed(seed)) >= p
    return probs, keep.to(probs.device) / (1.0 - p)


@torch.library.custom_op("trm_fast::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor, p: float,
                 seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o [B, L, H, Dh], lse [B, H, L]; lse is empty off CUDA)."""
    _check(q, k, v, key_valid, p)
    if q.is_cuda:
        return attention_fwd_triton(q, k, v, key_valid, p, seed)
    probs, keep_scale = _probs_torch(q, k, key_valid, p, seed)
    dropped = probs if keep_scale is None else probs * keep_scale
    o = torch.einsum("bhlm,bmhd->blhd", dropped, v.float()).to(q.dtype).contiguous()
    return o, q.new_empty(0, dtype=torch.float32)


@attention_op.register_fake
def _(q, k, v, key_valid, p, seed):
    B, L, H, Dh = q.shape
    lse_shape = (B, H, L) if q.is_cuda else (0,)
    return q.new_empty(B, L, H, Dh), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("trm_fast::attention_backward", mutates_args=())
def attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, key_valid: torch.Tensor, p: float,
                          seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.is_cuda:
        return attention_bwd_triton(do.contiguous(), q, k, v, o.contiguous(), lse, key_valid, p, seed)
    probs, keep_scale = _probs_torch(q, k, key_valid, p, seed)
    dropped = probs if keep_scale is None else probs * keep_scale
    do32 = do.float()
    dv = torch.einsum("bhlm,blhd->bmhd", dropped, do32)
    dprobs = torch.einsum("blhd,bmhd->bhlm", do32, v.float())
    if keep_scale is not None:
        dprobs = dprobs * keep_scale
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True)) / math.sqrt(q.shape[-1])
    dq = torch.einsum("bhlm,bmhd->blhd", dscores, k.float())
    dk = torch.einsum("bhlm,blhd->bmhd", dscores, q.float())
    return tuple(g.to(q.dtype).contiguous() for g in (dq, dk, dv))


@attention_backward_op.register_fake
def _(do, q, k, v, o, lse, key_valid, p, seed):
    return tuple(q.new_empty(q.shape) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, key_valid, p, seed = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_valid)
    ctx.p, ctx.seed = p, seed


def _backward(ctx, do, _grad_lse):
    q, k, v, o, lse, key_valid = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(do, q, k, v, o, lse, key_valid, ctx.p, ctx.seed)
    return dq, dk, dv, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def causal_attention(h, key_valid, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, n_heads: int,
                     dropout_p: float) -> torch.Tensor:
    """The TinyNet op (the signature of `torch_ops.causal_attention`): QKV projection, this attention, output
    projection; a query with no valid key outputs zero before the output projection. On CUDA, a head dim
    that the kernels do not take runs `torch_ops.causal_attention` instead."""
    B, L, D = h.shape
    if h.is_cuda and D // n_heads not in TRITON_HEAD_DIMS:
        return torch_ops.causal_attention(h, key_valid, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                                          n_heads, dropout_p)
    qkv = torch.nn.functional.linear(h, in_proj_weight, in_proj_bias).view(B, L, 3, n_heads, D // n_heads)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0 else 0
    o, _ = attention_op(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], key_valid, dropout_p, seed)
    return torch.nn.functional.linear(o.reshape(B, L, D), out_proj_weight, out_proj_bias)

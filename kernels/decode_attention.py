"""`trm_fast::decode_attention`: attention of one new query per sequence over its key/value cache, for
incremental decoding (inference only).

It writes the new token's key and value (from the fused QKV projection) into the cache at `pos`, then
attends over the cached keys 0..pos that are valid (key padding), flash-decoding style: one program per
(sequence, head), online softmax over blocks of keys, only up to `pos` (not the cache's capacity).
A query with no valid key outputs zero, as the drop-in's attention does.

    qkv        [B, 3D]        in_proj output of the new token (q | k | v, heads contiguous within each)
    kv_cache   [B, T, 2, H, Dh]  mutated: row pos of each sequence receives (k, v)
    token_valid [B, T] bool   key padding (True = a real token); row pos must already be set
    pos        [B] int64      position of the new token in each sequence
    returns    [B, D]         attention output before the output projection
"""
import math

import torch
import triton
import triton.language as tl

from trm_fast import torch_ops
from trm_fast.kernels.pdl import launch_options, wait_for_previous

MANY_PROGRAMS = 256  # (sequence, head) programs from which shorter key blocks and fewer warps pay


@triton.jit
def _decode_attention_kernel(qkv_ptr, cache_ptr, valid_ptr, pos_ptr, out_ptr,
                             stride_qkv, stride_cache_b, stride_cache_t, stride_valid, stride_out,
                             D, scale, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, PDL: tl.constexpr):
    """Program (h, b): head h of sequence b (the heads of one sequence are launched next to each other)."""
    wait_for_previous(PDL)
    h = tl.program_id(0)
    b = tl.program_id(1)
    pos = tl.load(pos_ptr + b)
    d = tl.arange(0, HEAD_DIM)
    row = qkv_ptr + b * stride_qkv + h * HEAD_DIM + d
    q = tl.load(row).to(tl.float32) * scale
    k_new = tl.load(row + D)
    v_new = tl.load(row + 2 * D)
    cache = cache_ptr + b * stride_cache_b + h * HEAD_DIM
    tl.store(cache + pos * stride_cache_t + d, k_new)
    tl.store(cache + pos * stride_cache_t + D + d, v_new)

    # The new key first (from registers), then the cached keys 0..pos-1 block by block.
    new_valid = tl.load(valid_ptr + b * stride_valid + pos) != 0
    s_new = tl.sum(q * k_new.to(tl.float32), axis=0)
    m = tl.where(new_valid, s_new, -1.0e30)
    l = tl.where(new_valid, 1.0, 0.0)
    acc = v_new.to(tl.float32) * l
    for start in range(0, pos, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        in_range = t < pos
        valid = (tl.load(valid_ptr + b * stride_valid + t, mask=in_range, other=0) != 0) & in_range
        k = tl.load(cache + t[:, None] * stride_cache_t + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(cache + t[:, None] * stride_cache_t + D + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.where(valid, tl.sum(k.to(tl.float32) * q[None, :], axis=1), -1.0e30)
        m_next = tl.maximum(m, tl.max(s, axis=0))
        p = tl.where(valid, tl.exp(s - m_next), 0.0)
        alpha = tl.exp(m - m_next)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_next
    out = tl.where(l > 0, acc / tl.where(l > 0, l, 1.0), 0.0)
    tl.store(out_ptr + b * stride_out + h * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def attention_config(batch: int, n_heads: int):
    """(keys per block, warps). Up to MANY_PROGRAMS (b, h) programs a program's load round trips bound it:
    128 keys, 4 warps. With more, 64 keys and 2 warps (measured on the H100 with caches larger than L2,
    scripts/decode_tiles.py; several heads per program were slower there)."""
    return (128, 4) if batch * n_heads <= MANY_PROGRAMS else (64, 2)


def decode_attention_triton(qkv, kv_cache, token_valid, pos, n_heads: int, config=None) -> torch.Tensor:
    """`config`: (keys per block, warps), default `attention_config`."""
    B, three_d = qkv.shape
    D = three_d // 3
    head_dim = D // n_heads
    block_t, num_warps = config or attention_config(B, n_heads)
    out = torch.empty(B, D, dtype=qkv.dtype, device=qkv.device)
    _decode_attention_kernel[(n_heads, B)](
        qkv, kv_cache, token_valid.view(torch.uint8), pos, out,
        qkv.stride(0), kv_cache.stride(0), kv_cache.stride(1), token_valid.stride(0), out.stride(0),
        D, 1.0 / math.sqrt(head_dim), HEAD_DIM=head_dim, BLOCK_T=block_t, num_warps=num_warps, **launch_options(qkv))
    return out


def _check(qkv, kv_cache, token_valid, pos, n_heads):
    B, three_d = qkv.shape
    if (kv_cache.dim() != 5 or kv_cache.shape[0] != B or kv_cache.shape[2:] != (2, n_heads, three_d // 3 // n_heads)
            or kv_cache.stride(-1) != 1 or kv_cache.stride(-2) != kv_cache.shape[-1]):
        raise ValueError(f"decode_attention: kv_cache {tuple(kv_cache.shape)} does not fit qkv {tuple(qkv.shape)} "
                         f"with {n_heads} heads (expected [B, T, 2, H, Dh], inner dims contiguous)")
    if token_valid.dtype != torch.bool or token_valid.shape != kv_cache.shape[:2]:
        raise ValueError(f"decode_attention: token_valid must be bool {tuple(kv_cache.shape[:2])}")
    if pos.dtype != torch.long or pos.shape != (B,):
        raise ValueError(f"decode_attention: pos must be int64 [{B}]")
    if qkv.stride(1) != 1 or kv_cache.dtype != qkv.dtype:
        raise ValueError("decode_attention: qkv rows must be contiguous and kv_cache of qkv's dtype")


@torch.library.custom_op("trm_fast::decode_attention", mutates_args=("kv_cache",))
def decode_attention(qkv: torch.Tensor, kv_cache: torch.Tensor, token_valid: torch.Tensor, pos: torch.Tensor,
                     n_heads: int) -> torch.Tensor:
    _check(qkv, kv_cache, token_valid, pos, n_heads)
    head_dim = qkv.shape[1] // 3 // n_heads
    if qkv.is_cuda and head_dim & (head_dim - 1) == 0:
        return decode_attention_triton(qkv, kv_cache, token_valid, pos, n_heads)
    return torch_ops.decode_attention(qkv, kv_cache, token_valid, pos, n_heads)


@decode_attention.register_fake
def _(qkv, kv_cache, token_valid, pos, n_heads):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1] // 3)

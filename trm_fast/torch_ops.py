"""The torch path of the TinyNet ops: plain PyTorch, any device. Triton kernels replace these one by one."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs matmuls in on `device_type` while it is on there, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def concat_linear(inputs: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`cat(inputs, -1) @ weight.T + bias`."""
    return F.linear(torch.cat(list(inputs), dim=-1), weight, bias)


def causal_attention(h, key_valid, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                     n_heads: int, dropout_p: float) -> torch.Tensor:
    """Self-attention of `nn.MultiheadAttention` with a causal mask and key padding (`key_valid` [B, L]).

    A query with no valid key (the start of a left-padded row) outputs zero before the output projection
    and carries no gradient, where the seed's attention gives NaN.
    """
    B, L, D = h.shape
    q, k, v = F.linear(h, in_proj_weight, in_proj_bias).view(B, L, 3, n_heads, D // n_heads).permute(2, 0, 3, 1, 4)
    no_key = key_valid.cumsum(dim=1) == 0
    eye = torch.eye(L, dtype=torch.bool, device=h.device)
    mask = torch.ones_like(eye).tril() & key_valid[:, None, :]
    mask = (mask | (eye & no_key[:, :, None])).unsqueeze(1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    o = o.transpose(1, 2).reshape(B, L, D).masked_fill(no_key.unsqueeze(-1), 0.0)
    return F.linear(o, out_proj_weight, out_proj_bias)


def add_layer_norm(h, residual, weight, bias, eps: float, dropout_p: float) -> torch.Tensor:
    """`layer_norm(h + dropout(residual))`."""
    return F.layer_norm(h + F.dropout(residual, dropout_p), (h.size(-1),), weight, bias, eps)


def feed_forward(h, w1, b1, w2, b2) -> torch.Tensor:
    """`linear(gelu(linear(h)))` with exact (erf) GELU; its dropout is `add_layer_norm`'s."""
    return F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)


def decode_attention(qkv, kv_cache, token_valid, pos, n_heads: int) -> torch.Tensor:
    """One new query per row (`qkv` [B, 3D]) over its cache [B, T, 2, H, Dh]: writes the new key and value
    at `pos` [B], attends over valid keys 0..pos (`token_valid` [B, T]); a row with none gives zero."""
    B, three_d = qkv.shape
    D = three_d // 3
    kv_cache[torch.arange(B, device=qkv.device), pos] = qkv[:, D:].view(B, 2, n_heads, D // n_heads)
    allowed = token_valid & (torch.arange(kv_cache.size(1), device=qkv.device) <= pos[:, None])
    bias = torch.zeros(allowed.shape, dtype=qkv.dtype, device=qkv.device).masked_fill(~allowed, float("-inf"))
    q = qkv[:, :D].view(B, 1, n_heads, D // n_heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, kv_cache[:, :, 0].transpose(1, 2), kv_cache[:, :, 1].transpose(1, 2),
                                       attn_mask=bias[:, None, None, :])
    return o.reshape(B, D).masked_fill(~allowed.any(dim=1, keepdim=True), 0.0)


def add_layer_norm_into(x, residual, weight, bias, eps: float, out) -> None:
    """`out[:] = layer_norm(x + residual)` (`out` may be a strided view)."""
    out.copy_(F.layer_norm(x + residual, (x.size(-1),), weight, bias, eps))

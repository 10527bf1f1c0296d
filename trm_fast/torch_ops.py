"""The torch path of the TinyNet ops: plain PyTorch, any device. Triton kernels replace these one by one."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .grad_sums import written_into

# whether TinyNet leaves the biases of the layers before its residual LayerNorms to `add_layer_norm`: not here
# (F.linear adds them in cuBLAS' epilogue, at no cost)
RESIDUAL_BIAS_IN_NORM = False
# whether the ops add their weight gradients into trm_fast.grad_sums' float32 sums: not here (autograd sums them)
SUMS_WEIGHT_GRADS = False
# whether TinyNet's output state carries a copy in the autocast dtype (written by its last LayerNorm) for the next
# calls' projections: not here (autocast casts per use)
STATES_CARRY_COPIES = False


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs matmuls in on `device_type` while it is on there, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def concat_linear(inputs: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`cat(inputs, -1) @ weight.T + bias`, written into `out` where given (the op table's signature)."""
    return written_into(F.linear(torch.cat(list(inputs), dim=-1), weight, bias), out)


def causal_attention(h, key_valid, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                     n_heads: int, dropout_p: float) -> torch.Tensor:
    """Self-attention of `nn.MultiheadAttention` with a causal mask and key padding (`key_valid` [B, L]);
    `out_proj_bias` may be None (left to `add_layer_norm`'s residual_bias).

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


def add_layer_norm(h, residual, weight, bias, eps: float, dropout_p: float,
                   residual_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`layer_norm(h + dropout(residual + residual_bias))` (residual_bias: the bias of the layer that made the
    residual, or None)."""
    if residual_bias is not None:
        residual = residual + residual_bias
    return F.layer_norm(h + F.dropout(residual, dropout_p), (h.size(-1),), weight, bias, eps)


def add_layer_norm_and_cast(h, residual, weight, bias, eps: float, dropout_p: float, dtype: Optional[torch.dtype],
                            residual_bias: Optional[torch.Tensor] = None, cast_into: Optional[torch.Tensor] = None):
    """(add_layer_norm's output, that output in `dtype`: the copy its next matmul reads, written into `cast_into`
    where given; the output itself when `dtype` is None)."""
    out = add_layer_norm(h, residual, weight, bias, eps, dropout_p, residual_bias)
    if dtype is None:
        return out, out
    return out, out.to(dtype) if cast_into is None else cast_into.copy_(out)


def feed_forward(h, w1, b1, w2, b2) -> torch.Tensor:
    """`linear(gelu(linear(h)))` with exact (erf) GELU; its dropout is `add_layer_norm`'s; b2 may be None (left to
    `add_layer_norm`'s residual_bias)."""
    return F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)


def linear(x, weight, bias) -> torch.Tensor:
    """`F.linear(x, weight, bias)` (the output head)."""
    return F.linear(x, weight, bias)


def cross_entropy(logits, targets, ignore_index: int):
    """(`F.cross_entropy(logits, targets, ignore_index=ignore_index)`, bool argmax == target) of logits [N, vocab]:
    the seed's loss and ACT-label inputs of a supervision step."""
    return F.cross_entropy(logits, targets, ignore_index=ignore_index), logits.argmax(dim=-1) == targets


def embed(input_ids, token_weight, pos_weight, padding_idx: Optional[int], p: float,
          token_copy: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The seed's input embedding, dropout(token_weight[ids] + pos_weight[:L]) (`token_copy`, the tied output head's
    cast copy, is for the kernels' gradient sums: unused here)."""
    positions = torch.arange(input_ids.size(1), device=input_ids.device)
    x = F.embedding(input_ids, token_weight, padding_idx) + F.embedding(positions, pos_weight).unsqueeze(0)
    return F.dropout(x, p, training=p > 0)


def masked_mean(y, attention_mask) -> torch.Tensor:
    """The seed's q-head pooling of y [B, L, D] over the tokens of attention_mask [B, L] (trm_fast.reference)."""
    from .reference import TRMModel
    return TRMModel._pool_for_q(y, attention_mask)


def q_head(pooled, ln_weight, ln_bias, eps: float, weight, bias, dtype) -> torch.Tensor:
    """The seed's halting head on pooled [B, D]: sigmoid(linear(layer_norm(pooled))), q_hat [B, 1], under the running
    autocast (`dtype`, the autocast dtype, is the kernels' to read)."""
    normed = F.layer_norm(pooled, (pooled.shape[-1],), ln_weight, ln_bias, eps)
    return torch.sigmoid(F.linear(normed, weight, bias))


def halting_loss(correct, attention_mask, q_hat, threshold: float) -> torch.Tensor:
    """The seed's ACT loss of a step: the binary cross-entropy of q_hat [B, 1] against the ACT labels of bool [B, L]
    argmax == target (trm_fast.reference)."""
    from .reference import TRMModel, halting_bce
    return halting_bce(q_hat, TRMModel._act_labels(correct, attention_mask, threshold))


def mean_losses(ce_losses, act_losses, act_weight: float):
    """The seed's (loss, ce_loss, act_loss) from the supervision steps' losses (trm_fast.reference)."""
    from .reference import mean_losses
    return mean_losses(ce_losses, act_losses, act_weight)


def head_cross_entropy(h, weight, targets, ignore_index: int):
    """(logits `F.linear(h, weight)` [N, vocab], then `cross_entropy` of them): a supervision step's output head and
    loss with the logits kept."""
    logits = F.linear(h, weight)
    return (logits, *cross_entropy(logits, targets, ignore_index))


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


def decode_linear(x, weight, bias, gelu: bool):
    """`linear(x, weight, bias)`, then the exact GELU when `gelu`."""
    out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out


def add_layer_norm_into(x, residual, weight, bias, eps: float, out) -> None:
    """`out[:] = layer_norm(x + residual)` (`out` may be a strided view)."""
    out.copy_(F.layer_norm(x + residual, (x.size(-1),), weight, bias, eps))


def decode_add_norm_linear(x, residual, ln_weight, ln_bias, eps: float, normed, weight, bias, gelu: bool):
    """`normed[:] = layer_norm(x + residual)`, then `decode_linear(normed, weight, bias, gelu)`."""
    add_layer_norm_into(x, residual, ln_weight, ln_bias, eps, normed)
    return decode_linear(normed, weight, bias, gelu)


def decode_ffn_add_norm(h, w1, b1, w2, b2, ln_weight, ln_bias, eps: float, out) -> None:
    """`out[:] = layer_norm(h + linear(gelu(linear(h, w1, b1)), w2, b2))`: a TinyBlock's FFN half."""
    add_layer_norm_into(h, decode_linear(decode_linear(h, w1, b1, True), w2, b2, False), ln_weight, ln_bias, eps, out)


# -- the decode step's bookkeeping (trm_fast/decoding.py `Decoder._graph_step`) ---------------------------
def append_tokens(token, pos, embed_weight, pos_table, pad_id: int, x_cache, token_valid, count) -> torch.Tensor:
    """Embed `token` [B] at `pos` [B] into `x_cache` [B, T, D] and mark it valid unless it is the pad id
    (`token_valid` [B, T], `count` [B] float32); returns the embeddings [B, D]."""
    rows = torch.arange(token.size(0), device=token.device)
    x = F.embedding(token, embed_weight) + pos_table[pos]
    x_cache[rows, pos] = x
    valid = token != pad_id
    token_valid[rows, pos] = valid
    count.add_(valid)
    return x


def decode_append(token, pos, embed_weight, pos_table, pad_id: int, x_cache, token_valid, count, xyz) -> None:
    """`append_tokens`, then start the state row `xyz` [B, 3D] as x | x | 0."""
    x = append_tokens(token, pos, embed_weight, pos_table, pad_id, x_cache, token_valid, count)
    D = x.size(-1)
    xyz[:, : 2 * D].view(-1, 2, D).copy_(x[:, None].expand(-1, 2, D))
    xyz[:, 2 * D:].zero_()


def decode_pool(y, token_valid, pos, count, ln_weight, ln_bias, eps: float, q_weight, q_bias, ys, pooled, q) -> None:
    """After a supervision step: keep its y [B, D] in `ys`, add it to the pooled float32 sum when the new
    token is valid, and write the step's q_hat = sigmoid(linear(layer_norm(pooled / count))) (the seed's
    q_head) into `q` [B] (float32)."""
    ys.copy_(y)
    valid = token_valid[torch.arange(y.size(0), device=y.device), pos]
    pooled += y.float() * valid[:, None]
    q.copy_(q_hat(pooled, count, ln_weight, ln_bias, eps, q_weight, q_bias, y.dtype))


def q_hat(pooled, count, ln_weight, ln_bias, eps: float, q_weight, q_bias, dtype: torch.dtype) -> torch.Tensor:
    """The seed's q_head (LayerNorm, Linear, sigmoid) on the mean pooled y (`pooled` [B, D] float32 sums over
    `count` [B] tokens), in `dtype`; returns q_hat [B] in float32."""
    mean = (pooled / count.clamp(min=1.0)[:, None]).to(dtype)
    normed = F.layer_norm(mean, (mean.size(1),), ln_weight, ln_bias, eps)
    return torch.sigmoid(F.linear(normed, q_weight, q_bias)).squeeze(-1).float()


def halted(q, threshold, per_sequence, active) -> torch.Tensor:
    """Whether each row halts at a step with q_hat `q` [B]: per sequence, or batch-wide over the `active`
    rows (the seed's all-or-nothing rule), as the scalar tensor `per_sequence` says."""
    over = q > threshold
    return torch.where(per_sequence, over, (over | ~active).all())


def decode_select(ys, q, active, threshold, per_sequence) -> torch.Tensor:
    """The y [B, D] of the first supervision step whose halting rule fires (`ys` [S, B, D], `q` [S, B]),
    else the last step's."""
    y = ys[-1]
    for step in reversed(range(ys.size(0) - 1)):
        y = torch.where(halted(q[step], threshold, per_sequence, active)[:, None], ys[step], y)
    return y


def decode_emit(logits, stop_ids, greedy, first_pos, token, out, active, pos, logits_out) -> None:
    """Greedy token of each row (`logits` [B, V], copied to `logits_out`): into `token`, and `out`
    [T, B] at row pos - first_pos; a row that emits one of `stop_ids` stops being `active` when `greedy`;
    `pos` advances."""
    logits_out.copy_(logits)
    token.copy_(logits.argmax(dim=-1))
    active &= ~(greedy & torch.isin(token, stop_ids))
    out[pos - first_pos, torch.arange(token.size(0), device=token.device)] = token
    pos.add_(1)


def compact_attention(q, kv, rows, starts, key_valid, n_heads: int) -> torch.Tensor:
    """Causal attention of compacted queries over every key of their sequences (early exit's active tokens
    attending to all tokens, frozen ones included). q [M, D]: the query of token rows[i] = b * L + position;
    rows ascending, -1 padding at the end; starts [B + 1]: where each sequence's queries begin in rows; kv
    [B * L, 2D]: every token's key | value; key_valid [B, L]. Out [M, D], zero at padding. Lays the queries
    out per sequence for SDPA, which reads back from the device (the listed rows, the widest sequence)."""
    B, L = key_valid.shape
    M, D = q.shape
    H, Dh = n_heads, D // n_heads
    listed = (rows >= 0).nonzero().flatten()
    batch, pos = rows[listed] // L, rows[listed] % L
    slot = listed - starts[batch]
    width = max(int((starts[1:] - starts[:-1]).max()), 1)
    queries = q.new_zeros(B, width, H, Dh)
    queries[batch, slot] = q[listed].view(-1, H, Dh)
    query_pos = torch.full((B, width), -1, dtype=torch.long, device=q.device)
    query_pos[batch, slot] = pos
    mask = (torch.arange(L, device=q.device) <= query_pos.unsqueeze(-1)) & key_valid.unsqueeze(1)
    mask[query_pos < 0] = True  # padding slots: any finite row, dropped below
    keys, values = kv.view(B, L, 2, H, Dh).unbind(2)
    a = F.scaled_dot_product_attention(queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                       attn_mask=mask.unsqueeze(1))
    out = q.new_zeros(M, D)
    out[listed] = a.transpose(1, 2)[batch, slot].reshape(-1, D)
    return out

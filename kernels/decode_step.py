"""The decode step's bookkeeping around the TinyNet calls, one kernel each, inference only (the torch
versions in `trm_fast.torch_ops` say what each computes):

- `trm_fast::decode_append`: embed the appended token, mark it valid, start the state row as x | x | 0;
- `trm_fast::decode_pool`: keep a supervision step's y, add it to the pooled sum, compute its q_hat
  (the seed's q_head: LayerNorm, Linear, sigmoid);
- `trm_fast::decode_select`: the y of the first step whose halting rule fires (batch-wide or per row);
- `trm_fast::decode_emit`: argmax token, stop marking, the token into the output ring, position + 1.

They replace ~40 small ATen launches per decode step with 5 (one program per row each), which at batch 1
is about a sixth of the step. Roundings follow the torch versions: sums in float32, each op's result
rounded to the model dtype where the torch version rounds it.
"""
import torch
import triton
import triton.language as tl

from trm_fast import torch_ops
from trm_fast.kernels.pdl import launch_options, wait_for_previous


@triton.jit
def _append_kernel(token_ptr, pos_ptr, embed_ptr, table_ptr, x_ptr, valid_ptr, count_ptr, xyz_ptr, pad_id, D,
                   stride_x_b, stride_x_t, stride_valid, stride_xyz, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    b = tl.program_id(0)
    token = tl.load(token_ptr + b)
    pos = tl.load(pos_ptr + b)
    d = tl.arange(0, BLOCK_D)
    in_d = d < D
    x = (tl.load(embed_ptr + token * D + d, mask=in_d, other=0.0).to(tl.float32)
         + tl.load(table_ptr + pos * D + d, mask=in_d, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + b * stride_x_b + pos * stride_x_t + d, x, mask=in_d)
    row = xyz_ptr + b * stride_xyz
    tl.store(row + d, x, mask=in_d)
    tl.store(row + D + d, x, mask=in_d)
    tl.store(row + 2 * D + d, tl.zeros_like(x), mask=in_d)
    valid = token != pad_id
    tl.store(valid_ptr + b * stride_valid + pos, valid.to(tl.uint8))
    tl.store(count_ptr + b, tl.load(count_ptr + b) + valid.to(tl.float32))


@triton.jit
def _pool_kernel(y_ptr, valid_ptr, pos_ptr, count_ptr, ln_w_ptr, ln_b_ptr, w_ptr, bias_ptr, ys_ptr, pooled_ptr,
                 q_ptr, D, eps, stride_y, stride_valid, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    b = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    in_d = d < D
    y = tl.load(y_ptr + b * stride_y + d, mask=in_d, other=0.0)
    tl.store(ys_ptr + b * D + d, y, mask=in_d)
    valid = tl.load(valid_ptr + b * stride_valid + tl.load(pos_ptr + b)) != 0
    pooled = tl.load(pooled_ptr + b * D + d, mask=in_d, other=0.0) + y.to(tl.float32) * valid.to(tl.float32)
    tl.store(pooled_ptr + b * D + d, pooled, mask=in_d)
    dtype = y_ptr.dtype.element_ty
    mean = (pooled / tl.maximum(tl.load(count_ptr + b), 1.0)).to(dtype).to(tl.float32)
    centered = tl.where(in_d, mean - tl.sum(mean, axis=0) / D, 0.0)
    normed = centered / tl.sqrt(tl.sum(centered * centered, axis=0) / D + eps)
    normed = (normed * tl.load(ln_w_ptr + d, mask=in_d, other=0.0).to(tl.float32)
              + tl.load(ln_b_ptr + d, mask=in_d, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + d, mask=in_d, other=0.0).to(tl.float32)
    logit = (tl.sum(normed * w, axis=0) + tl.load(bias_ptr).to(tl.float32)).to(dtype).to(tl.float32)
    tl.store(q_ptr + b, (1.0 / (1.0 + tl.exp(-logit))).to(dtype).to(tl.float32))


@triton.jit
def _select_kernel(ys_ptr, q_ptr, active_ptr, threshold_ptr, per_sequence_ptr, out_ptr, B, D,
                   STEPS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    b = tl.program_id(0)
    rows = tl.arange(0, BLOCK_B)
    in_rows = rows < B
    inactive = tl.load(active_ptr + rows, mask=in_rows, other=0) == 0
    threshold = tl.load(threshold_ptr)
    per_sequence = tl.load(per_sequence_ptr) != 0
    chosen = STEPS - 1
    for i in tl.static_range(STEPS - 1):  # from the second-to-last step down: the first that fires wins
        step = STEPS - 2 - i
        over = tl.load(q_ptr + step * B + rows, mask=in_rows, other=0.0) > threshold
        everyone = tl.min(tl.where(in_rows, (over | inactive).to(tl.int32), 1), axis=0) != 0
        own = tl.load(q_ptr + step * B + b) > threshold
        chosen = tl.where(tl.where(per_sequence, own, everyone), step, chosen)
    d = tl.arange(0, BLOCK_D)
    in_d = d < D
    y = tl.load(ys_ptr + (chosen * B + b) * D + d, mask=in_d, other=0.0)
    tl.store(out_ptr + b * D + d, y, mask=in_d)


@triton.jit
def _emit_kernel(logits_ptr, stop_ptr, greedy_ptr, first_pos_ptr, token_ptr, out_ptr, active_ptr, pos_ptr,
                 logits_out_ptr, V, stride_logits, stride_out, BLOCK_V: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    b = tl.program_id(0)
    best = -float("inf")
    best_index = 0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        values = tl.load(logits_ptr + b * stride_logits + cols, mask=cols < V, other=-float("inf"))
        tl.store(logits_out_ptr + b * V + cols, values, mask=cols < V)
        values = values.to(tl.float32)
        block_best = tl.max(values, axis=0)
        index = start + tl.argmax(values, axis=0, tie_break_left=True)
        best_index = tl.where(block_best > best, index, best_index)  # ties keep the earlier block
        best = tl.maximum(block_best, best)
    token = best_index.to(tl.int64)
    tl.store(token_ptr + b, token)
    stops = (token == tl.load(stop_ptr)) | (token == tl.load(stop_ptr + 1))
    ended = stops & (tl.load(greedy_ptr) != 0)
    tl.store(active_ptr + b, ((tl.load(active_ptr + b) != 0) & ~ended).to(tl.uint8))
    pos = tl.load(pos_ptr + b)
    tl.store(out_ptr + (pos - tl.load(first_pos_ptr + b)) * stride_out + b, token)
    tl.store(pos_ptr + b, pos + 1)


def _uint8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def append_triton(token, pos, embed_weight, pos_table, pad_id, x_cache, token_valid, count, xyz) -> None:
    D = embed_weight.shape[1]
    _append_kernel[(token.shape[0],)](token, pos, embed_weight, pos_table, x_cache, _uint8(token_valid), count, xyz,
                                      pad_id, D, x_cache.stride(0), x_cache.stride(1), token_valid.stride(0),
                                      xyz.stride(0), BLOCK_D=triton.next_power_of_2(D), **launch_options(token))


def pool_triton(y, token_valid, pos, count, ln_weight, ln_bias, eps, q_weight, q_bias, ys, pooled, q) -> None:
    B, D = y.shape
    _pool_kernel[(B,)](y, _uint8(token_valid), pos, count, ln_weight, ln_bias, q_weight, q_bias, ys, pooled, q, D,
                       eps, y.stride(0), token_valid.stride(0), BLOCK_D=triton.next_power_of_2(D),
                       **launch_options(y))


def select_triton(ys, q, active, threshold, per_sequence) -> torch.Tensor:
    steps, B, D = ys.shape
    out = torch.empty(B, D, dtype=ys.dtype, device=ys.device)
    _select_kernel[(B,)](ys, q, _uint8(active), threshold, _uint8(per_sequence), out, B, D, STEPS=steps,
                         BLOCK_B=triton.next_power_of_2(B), BLOCK_D=triton.next_power_of_2(D), **launch_options(ys))
    return out


def emit_triton(logits, stop_ids, greedy, first_pos, token, out, active, pos, logits_out) -> None:
    B, V = logits.shape
    _emit_kernel[(B,)](logits, stop_ids, _uint8(greedy), first_pos, token, out, _uint8(active), pos, logits_out, V,
                       logits.stride(0), out.stride(0), BLOCK_V=min(triton.next_power_of_2(V), 16384),
                       num_warps=8, **launch_options(logits))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_rows(name: str, B: int, **tensors) -> None:
    for arg, (t, dtype) in tensors.items():
        _require(t.dtype == dtype and t.shape[:1] == (B,) and t.is_contiguous(),
                 f"{name}: {arg} must be contiguous {dtype} with {B} rows, got {t.dtype} {tuple(t.shape)}")


@torch.library.custom_op("trm_fast::decode_append", mutates_args=("x_cache", "token_valid", "count", "xyz"))
def decode_append(token: torch.Tensor, pos: torch.Tensor, embed_weight: torch.Tensor, pos_table: torch.Tensor,
                  pad_id: int, x_cache: torch.Tensor, token_valid: torch.Tensor, count: torch.Tensor,
                  xyz: torch.Tensor) -> None:
    B, D = token.shape[0], embed_weight.shape[1]
    _check_rows("decode_append", B, token=(token, torch.long), pos=(pos, torch.long), count=(count, torch.float32),
                token_valid=(token_valid, torch.bool), x_cache=(x_cache, embed_weight.dtype))
    _require(pos_table.shape[1:] == (D,) and x_cache.shape[2:] == (D,) and xyz.shape == (B, 3 * D)
             and xyz.stride(1) == 1, f"decode_append: pos_table [T, {D}], x_cache [{B}, T, {D}] and xyz "
                                     f"[{B}, {3 * D}] expected")
    if token.is_cuda:
        append_triton(token, pos, embed_weight, pos_table, pad_id, x_cache, token_valid, count, xyz)
    else:
        torch_ops.decode_append(token, pos, embed_weight, pos_table, pad_id, x_cache, token_valid, count, xyz)


@torch.library.custom_op("trm_fast::decode_pool", mutates_args=("ys", "pooled", "q"))
def decode_pool(y: torch.Tensor, token_valid: torch.Tensor, pos: torch.Tensor, count: torch.Tensor,
                ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, q_weight: torch.Tensor,
                q_bias: torch.Tensor, ys: torch.Tensor, pooled: torch.Tensor, q: torch.Tensor) -> None:
    B, D = y.shape
    _check_rows("decode_pool", B, pos=(pos, torch.long), count=(count, torch.float32), q=(q, torch.float32),
                ys=(ys, y.dtype), pooled=(pooled, torch.float32), token_valid=(token_valid, torch.bool))
    _require(y.stride(1) == 1 and ys.shape == y.shape and pooled.shape == y.shape and ln_weight.shape == (D,)
             and ln_bias.shape == (D,) and q_weight.shape == (1, D) and q_bias.shape == (1,),
             f"decode_pool: y, ys and pooled [{B}, {D}], ln_weight and ln_bias [{D}], q_weight [1, {D}], q_bias [1]")
    if y.is_cuda:
        pool_triton(y, token_valid, pos, count, ln_weight, ln_bias, eps, q_weight, q_bias, ys, pooled, q)
    else:
        torch_ops.decode_pool(y, token_valid, pos, count, ln_weight, ln_bias, eps, q_weight, q_bias, ys, pooled, q)


@torch.library.custom_op("trm_fast::decode_select", mutates_args=())
def decode_select(ys: torch.Tensor, q: torch.Tensor, active: torch.Tensor, threshold: torch.Tensor,
                  per_sequence: torch.Tensor) -> torch.Tensor:
    _require(ys.dim() == 3 and ys.is_contiguous() and q.shape == ys.shape[:2] and q.dtype == torch.float32
             and q.is_contiguous(), f"decode_select: ys [S, B, D] and float32 q [S, B] expected, got "
                                    f"{tuple(ys.shape)} and {q.dtype} {tuple(q.shape)}")
    _require(active.shape == ys.shape[1:2] and active.dtype == torch.bool and threshold.dim() == 0
             and per_sequence.dim() == 0, "decode_select: active [B] bool, threshold and per_sequence scalars")
    if ys.is_cuda:
        return select_triton(ys, q, active, threshold, per_sequence)
    return torch_ops.decode_select(ys, q, active, threshold, per_sequence).clone()


@decode_select.register_fake
def _(ys, q, active, threshold, per_sequence):
    return ys.new_empty(ys.shape[1:])


@torch.library.custom_op("trm_fast::decode_emit", mutates_args=("token", "out", "active", "pos", "logits_out"))
def decode_emit(logits: torch.Tensor, stop_ids: torch.Tensor, greedy: torch.Tensor, first_pos: torch.Tensor,
                token: torch.Tensor, out: torch.Tensor, active: torch.Tensor, pos: torch.Tensor,
                logits_out: torch.Tensor) -> None:
    B = logits.shape[0]
    _check_rows("decode_emit", B, token=(token, torch.long), pos=(pos, torch.long), first_pos=(first_pos, torch.long),
                active=(active, torch.bool), logits_out=(logits_out, logits.dtype))
    _require(logits.dim() == 2 and logits.stride(1) == 1 and logits_out.shape == logits.shape
             and out.dim() == 2 and out.shape[1] == B and out.dtype == torch.long and out.stride(1) == 1
             and stop_ids.shape == (2,) and greedy.dim() == 0,
             f"decode_emit: logits [{B}, V], out [T, {B}] int64, stop_ids [2], greedy a scalar expected")
    if logits.is_cuda:
        emit_triton(logits, stop_ids, greedy, first_pos, token, out, active, pos, logits_out)
    else:
        torch_ops.decode_emit(logits, stop_ids, greedy, first_pos, token, out, active, pos, logits_out)

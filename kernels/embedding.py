"""`trm_fast::embed`: the seed's input embedding `dropout(token_weight[ids] + pos_weight[:L])`, forward and backward.

Forward: one kernel gathers each token's row, adds its position's and applies dropout (the hash mask of
kernels/dropout.py, drawn again in the backward), where torch took a gather, a second gather, an add and a dropout
that stores its mask.
Backward: one kernel scales each row of the gradient by the mask and adds it into its token's and its position's
row of float32 gradients with atomic adds (~10 us at B16 L512 d512 where torch's sort-based embedding backward took
~0.15 ms), so their sums' order varies between runs, as torch's `index_add_` on CUDA; under
`torch.use_deterministic_algorithms(True)` the kernel writes the scaled gradient and torch's deterministic embedding
backward sums it. The token gradient may go into a GradSum instead (the tied output head's cast copy:
trm_fast.grad_sums), which then needs no [vocab, D] tensor of its own and no add.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from trm_fast.grad_sums import grad_sum_of
from trm_fast.kernels.dropout import check_seed, keep_mask, load_seed, row_key, torch_keep_mask
from trm_fast.seeds import new_seed

_ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _dropped(seed_ptr, rows, cols, p, scale, x, DROPOUT: tl.constexpr):
    """x with dropout applied (each row's mask from its index in the flattened [B * L] tokens)."""
    if DROPOUT:
        x = tl.where(keep_mask(row_key(load_seed(seed_ptr), rows)[:, None], cols[None, :], p), x * scale, 0.0)
    return x


@triton.jit
def _embed_fwd_kernel(ids_ptr, token_ptr, pos_ptr, out_ptr, seed_ptr, n_rows, L, D, p, scale,
                      DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    inside = (rows < n_rows)[:, None] & (cols < D)[None, :]
    ids = tl.load(ids_ptr + rows, mask=rows < n_rows, other=0).to(tl.int64)
    x = tl.load(token_ptr + ids[:, None] * D + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    x += tl.load(pos_ptr + (rows % L)[:, None] * D + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    x = _dropped(seed_ptr, rows, cols, p, scale, x, DROPOUT)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], x.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _embed_bwd_kernel(grad_ptr, ids_ptr, token_grad_ptr, pos_grad_ptr, seed_ptr, n_rows, L, D, padding_idx, p,
                      scale, DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """ATOMIC: the masked gradient added into token_grad[ids] (pad tokens skipped) and pos_grad[positions];
    else written to token_grad as [n_rows, D]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    inside = (rows < n_rows)[:, None] & (cols < D)[None, :]
    offsets = rows[:, None].to(tl.int64) * D + cols[None, :]
    g = _dropped(seed_ptr, rows, cols, p, scale, tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32),
                 DROPOUT)
    if ATOMIC:
        ids = tl.load(ids_ptr + rows, mask=rows < n_rows, other=padding_idx).to(tl.int64)
        tl.atomic_add(token_grad_ptr + ids[:, None] * D + cols[None, :], g,
                      mask=inside & (ids != padding_idx)[:, None], sem="relaxed")
        tl.atomic_add(pos_grad_ptr + (rows % L)[:, None] * D + cols[None, :], g, mask=inside, sem="relaxed")
    else:
        tl.store(token_grad_ptr + offsets, g, mask=inside)


def _blocks(D: int) -> Tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    return max(1, _ELEMENTS_PER_PROGRAM // block_d), block_d


def embed_fwd_triton(ids, token_weight, pos_weight, p: float, seed) -> torch.Tensor:
    """[B, L, D] in the token weight's dtype for contiguous int64 ids [B, L] and weights [V, D], [>= L, D]."""
    (B, L), D = ids.shape, token_weight.shape[1]
    out = torch.empty(B, L, D, device=ids.device, dtype=token_weight.dtype)
    block_r, block_d = _blocks(D)
    _embed_fwd_kernel[(triton.cdiv(B * L, block_r),)](
        ids, token_weight, pos_weight, out, seed if p > 0 else ids, B * L, L, D, p, 1.0 / (1.0 - p),
        DROPOUT=p > 0, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return out


def embed_bwd_triton(grad, ids, token_grad, pos_grad, padding_idx: int, p: float, seed,
                     atomic: bool = True) -> Optional[torch.Tensor]:
    """atomic: adds the masked gradient into float32 token_grad [V, D] and pos_grad [>= L, D] (None returned);
    else returns it [B * L, D] float32 (the grads untouched)."""
    (B, L), D = ids.shape, grad.shape[-1]
    scaled = None if atomic else torch.empty(B * L, D, device=grad.device, dtype=torch.float32)
    block_r, block_d = _blocks(D)
    _embed_bwd_kernel[(triton.cdiv(B * L, block_r),)](
        grad, ids, token_grad if atomic else scaled, pos_grad, seed if p > 0 else ids, B * L, L, D,
        -1 if padding_idx is None else padding_idx, p, 1.0 / (1.0 - p), DROPOUT=p > 0, ATOMIC=atomic,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return scaled


def _check(ids, token_weight, pos_weight, p, seed):
    if ids.dim() != 2 or ids.dtype != torch.int64 or ids.device != token_weight.device:
        raise ValueError(f"embed: ids must be an int64 [B, L] tensor on {token_weight.device}, got {ids.dtype} "
                         f"{tuple(ids.shape)} on {ids.device}")
    if token_weight.dim() != 2 or pos_weight.dim() != 2 or pos_weight.shape[1] != token_weight.shape[1] or \
            pos_weight.shape[0] < ids.shape[1] or pos_weight.dtype != token_weight.dtype or \
            pos_weight.device != token_weight.device:
        raise ValueError(f"embed: expects token_weight [V, D] and pos_weight [>= {ids.shape[1]}, D] of one dtype and "
                         f"device, got {tuple(token_weight.shape)} {token_weight.dtype} and {tuple(pos_weight.shape)} "
                         f"{pos_weight.dtype} on {pos_weight.device}")
    check_seed("embed", seed, p, ids.device)


def _torch_mask(shape, p: float, seed, device) -> Optional[torch.Tensor]:
    """The CPU path's keep mask scaled by 1 / (1 - p), or None without dropout."""
    return torch_keep_mask(shape, p, seed).to(device) / (1.0 - p) if p > 0 else None


def embed_forward(ids, token_weight, pos_weight, p: float, seed) -> torch.Tensor:
    """Triton on CUDA, the same math (dropout's mask drawn by `torch_keep_mask`) in torch elsewhere."""
    _check(ids, token_weight, pos_weight, p, seed)
    if ids.is_cuda:
        return embed_fwd_triton(ids.contiguous(), token_weight.contiguous(), pos_weight.contiguous(), p, seed)
    x = token_weight[ids] + pos_weight[:ids.shape[1]]
    mask = _torch_mask(x.shape, p, seed, x.device)
    return x if mask is None else (x * mask).to(x.dtype)


def embed_backward(grad, ids, vocab: int, pos_rows: int, padding_idx: Optional[int], p: float, seed,
                   token_grad: Optional[torch.Tensor] = None) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """(grad token_weight [vocab, D] float32, or None when added into the given float32 `token_grad`; grad pos_weight
    [pos_rows, D] float32)."""
    (B, L), D = ids.shape, grad.shape[-1]
    pos_grad = torch.zeros(pos_rows, D, device=grad.device, dtype=torch.float32)
    into = token_grad if token_grad is not None else torch.zeros(vocab, D, device=grad.device, dtype=torch.float32)
    flat_ids = ids.reshape(-1)
    if grad.is_cuda and not torch.are_deterministic_algorithms_enabled():
        embed_bwd_triton(grad.contiguous(), ids.contiguous(), into, pos_grad, padding_idx, p, seed)
    else:
        if grad.is_cuda:
            scaled = embed_bwd_triton(grad.contiguous(), ids.contiguous(), into, pos_grad, padding_idx, p, seed,
                                      atomic=False)
        else:
            mask = _torch_mask(grad.shape, p, seed, grad.device)
            scaled = (grad.float() if mask is None else grad.float() * mask).reshape(-1, D)
        pos_grad[:L] += scaled.view(B, L, D).sum(0)
        into += torch.ops.aten.embedding_dense_backward(scaled, flat_ids, vocab, -1 if padding_idx is None
                                                        else padding_idx, False)
    return (None if token_grad is not None else into), pos_grad


@torch.library.custom_op("trm_fast::embed", mutates_args=())
def embed_op(ids: torch.Tensor, token_weight: torch.Tensor, pos_weight: torch.Tensor, padding_idx: Optional[int],
             p: float, seed: Optional[torch.Tensor]) -> torch.Tensor:
    """The embedding [B, L, D]; padding_idx names the token row that gets no gradient."""
    return embed_forward(ids, token_weight, pos_weight, p, seed)


@embed_op.register_fake
def _(ids, token_weight, pos_weight, padding_idx, p, seed):
    return token_weight.new_empty(*ids.shape, token_weight.shape[1])


@torch.library.custom_op("trm_fast::embed_backward", mutates_args=())
def embed_backward_op(grad: torch.Tensor, ids: torch.Tensor, vocab: int, pos_rows: int, padding_idx: Optional[int],
                      p: float, seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad token_weight, grad pos_weight), float32."""
    return embed_backward(grad, ids, vocab, pos_rows, padding_idx, p, seed)


@embed_backward_op.register_fake
def _(grad, ids, vocab, pos_rows, padding_idx, p, seed):
    return grad.new_empty(vocab, grad.shape[-1], dtype=torch.float32), grad.new_empty(pos_rows, grad.shape[-1],
                                                                                      dtype=torch.float32)


def _save_context(ctx, ids, token_weight, pos_weight, padding_idx, p, seed) -> None:
    """What both backwards read: the ids and seed, the rates, the tables' row counts and dtype."""
    ctx.save_for_backward(ids, seed)
    ctx.p, ctx.padding_idx = p, padding_idx
    ctx.shapes, ctx.dtype = (token_weight.shape[0], pos_weight.shape[0]), token_weight.dtype


def _setup_context(ctx, inputs, output):
    _save_context(ctx, *inputs)


def _backward(ctx, grad):
    ids, seed = ctx.saved_tensors
    token_grad, pos_grad = embed_backward_op(grad, ids, *ctx.shapes, ctx.padding_idx, ctx.p, seed)
    return None, token_grad.to(ctx.dtype), pos_grad.to(ctx.dtype), None, None, None


embed_op.register_autograd(_backward, setup_context=_setup_context)


class _Embed(torch.autograd.Function):
    """The eager path: it knows the padding row (kept out of the token gradient, as nn.Embedding's padding_idx)
    and may add the token gradient into the GradSum of `token_copy`, the tied output head's cast copy; taking the
    copy as an input makes autograd run this backward before the cast's, which returns the sum."""

    @staticmethod
    def forward(ctx, ids, token_weight, pos_weight, padding_idx, p, seed, token_copy):
        _save_context(ctx, ids, token_weight, pos_weight, padding_idx, p, seed)
        ctx.grad_sum = grad_sum_of(token_copy)
        return embed_forward(ids, token_weight, pos_weight, p, seed)

    @staticmethod
    def backward(ctx, grad):
        ids, seed = ctx.saved_tensors
        into = ctx.grad_sum.into(ctx.shapes[0], grad.shape[-1], grad.device) if ctx.grad_sum is not None else None
        token_grad, pos_grad = embed_backward(grad, ids, *ctx.shapes, ctx.padding_idx, ctx.p, seed, into)
        return (None, None if token_grad is None else token_grad.to(ctx.dtype), pos_grad.to(ctx.dtype), None, None,
                None, None)


def embed(ids, token_weight, pos_weight, padding_idx: Optional[int], p: float,
          token_copy: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The op table's embedding (the signature of `torch_ops.embed`), a fresh dropout seed per call."""
    seed = new_seed(ids.device) if p > 0 else None
    if torch.compiler.is_compiling():
        return embed_op(ids, token_weight, pos_weight, padding_idx, p, seed)
    return _Embed.apply(ids, token_weight, pos_weight, padding_idx, p, seed, token_copy)

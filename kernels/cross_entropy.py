"""`trm_fast::cross_entropy`: the seed's per-step loss on its logits, `F.cross_entropy(logits, targets,
ignore_index)` (mean over counted rows) together with whether each row's argmax is its target (the ACT
labels), forward and backward.

The seed (under autocast) copies the bf16 logits [N, vocab] to float32, takes log_softmax, gathers, and
reads the logits once more for the argmax; its backward writes a float32 softmax and casts it back. Here
one program per row reads the logits once in their own dtype (float32 math): online max and sum of exp,
the argmax (first index of the maximum, as torch's: the least column equal to a block's maximum), the target's
logit. The backward reads them once more and writes (softmax - one-hot) * grad / count in the logits' dtype. The
same kernel with both `STATS` and `WRITE_GRAD` forms the gradient in the pass that takes the statistics (reading each
row twice), apart (kernels/head_cross_entropy.py) or in place over a chunk of logits (`trm_fast.linear_cross_entropy`).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from trm_fast.linear_cross_entropy import check_targets

BLOCK_V = 2048
GRAD_BLOCK_V, GRAD_WARPS = 8192, 8  # the pass that also writes the gradient (`_launch`)


@triton.jit
def _cross_entropy_kernel(logits_ptr, stride_row, targets_ptr, lse_ptr, loss_ptr, correct_ptr, grad_ptr,
                          stride_grad, scale_ptr, V, ignore_index, STATS: tl.constexpr, WRITE_GRAD: tl.constexpr,
                          BLOCK_V: tl.constexpr):
    """One program per row. STATS: lse, loss ((lse - target logit) on a counted row, else 0) and argmax == target.
    WRITE_GRAD: grad[row] = (softmax - one-hot) * scale (0 on a row that is not counted), with lse from STATS or from
    lse_ptr; grad may be the logits themselves."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    counted = target != ignore_index
    x_row = logits_ptr + row * stride_row
    if STATS:
        m = tl.full([], -float("inf"), tl.float32)
        total = tl.full([], 0.0, tl.float32)
        best = tl.full([], -float("inf"), tl.float32)
        best_col = tl.full([], 0, tl.int32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(x_row + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            block_max = tl.max(x, axis=0)
            block_col = tl.min(tl.where(x == block_max, cols, V), axis=0)  # the block's first maximum
            best_col = tl.where(block_max > best, block_col, best_col)  # a tie keeps the earlier column
            best = tl.maximum(best, block_max)
            m_new = tl.maximum(m, block_max)
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(total)
        target_logit = tl.load(x_row + tl.where(counted, target, 0)).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, tl.where(counted, lse - target_logit, 0.0))
        tl.store(correct_ptr + row, (best_col == target).to(tl.int8))
    else:
        lse = tl.load(lse_ptr + row)
    if WRITE_GRAD:
        scale = tl.where(counted, tl.load(scale_ptr), 0.0)
        g_row = grad_ptr + row * stride_grad
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(x_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - (cols == target).to(tl.float32)) * scale
            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _target_count_kernel(targets_ptr, N, ignore_index, count_ptr, scale_ptr, BLOCK: tl.constexpr):
    """One program: the count of targets that are not ignore_index (float32) and 1 / max(count, 1)."""
    total = tl.zeros([], tl.int32)
    for start in range(0, N, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        targets = tl.load(targets_ptr + idx, mask=idx < N, other=ignore_index)
        total += tl.sum((targets != ignore_index).to(tl.int32), axis=0)
    count = total.to(tl.float32)
    tl.store(count_ptr, count)
    tl.store(scale_ptr, tl.math.div_rn(1.0, tl.maximum(count, 1.0)))


def target_count_triton(targets: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """`target_count` in one kernel."""
    count = torch.empty((), device=targets.device, dtype=torch.float32)
    scale = torch.empty(1, device=targets.device, dtype=torch.float32)
    _target_count_kernel[(1,)](targets, targets.numel(), ignore_index, count, scale,
                               BLOCK=min(4096, triton.next_power_of_2(max(targets.numel(), 1))))
    return count, scale


def target_count(targets: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(count of the targets [N] that are not `ignore_index`, float32 0-dim; 1 / max(count, 1), float32 [1]): the
    mean loss's divisor and the gradient's scale, one kernel on CUDA (the torch steps take six), torch elsewhere."""
    if targets.is_cuda:
        return target_count_triton(targets, ignore_index)
    count = (targets != ignore_index).sum().float()
    return count, (1.0 / count.clamp(min=1)).reshape(1)


def _launch(logits, targets, lse, loss, correct, grad, scale, ignore_index, stats: bool, write_grad: bool):
    """One program per row, in blocks of BLOCK_V columns; the pass that both reads a row for its statistics and
    writes its gradient reads it twice in wider blocks (GRAD_BLOCK_V, GRAD_WARPS: scripts/cross_entropy_bench.py)."""
    N, V = logits.shape
    block_v, warps = (GRAD_BLOCK_V, GRAD_WARPS) if stats and write_grad else (BLOCK_V, 4)
    _cross_entropy_kernel[(N,)](logits, logits.stride(0), targets, lse, loss, correct, grad, grad.stride(0), scale, V,
                                ignore_index, STATS=stats, WRITE_GRAD=write_grad,
                                BLOCK_V=min(block_v, triton.next_power_of_2(V)), num_warps=warps)


def cross_entropy_rows_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                              grad_scale: Optional[torch.Tensor] = None, grad: Optional[torch.Tensor] = None):
    """(per-row loss float32 [N] (0 where not counted), lse [N], bool [N] argmax == target) of logits [N, V] with
    unit column stride; with `grad_scale` (a float32 [1] tensor) also writes (softmax - one-hot) * grad_scale
    into `grad` (default: the logits, in place)."""
    N, V = logits.shape
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    loss = torch.empty_like(lse)
    correct = torch.empty(N, device=logits.device, dtype=torch.int8)
    write_grad = grad_scale is not None
    _launch(logits, targets, lse, loss, correct, logits if grad is None else grad, grad_scale if write_grad else lse,
            ignore_index, stats=True, write_grad=write_grad)
    return loss, lse, correct.view(torch.bool)


def cross_entropy_grad_triton(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, ignore_index: int,
                              grad_scale: torch.Tensor) -> torch.Tensor:
    """(softmax - one-hot) * grad_scale in the logits' dtype (0 on rows whose target is `ignore_index`)."""
    grad = torch.empty_like(logits)
    _launch(logits, targets, lse, lse, lse, grad, grad_scale, ignore_index, stats=False, write_grad=True)
    return grad


def _check(logits, targets):
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"cross_entropy: logits must be a float [N, vocab] tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    check_targets("cross_entropy", targets, logits)


def cross_entropy_forward(logits, targets, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss float32, bool argmax == target, lse [N] or empty off CUDA): Triton on CUDA, torch elsewhere."""
    _check(logits, targets)
    if logits.is_cuda:
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        rows, lse, correct = cross_entropy_rows_triton(logits, targets, ignore_index)
        return rows.sum() / target_count(targets, ignore_index)[0], correct, lse
    loss = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
    return loss, logits.argmax(-1) == targets, logits.new_empty(0, dtype=torch.float32)


def cross_entropy_backward(grad_loss, logits, targets, lse, ignore_index: int) -> torch.Tensor:
    if logits.is_cuda:
        scale = (grad_loss.float() / target_count(targets, ignore_index)[0]).reshape(1)
        return cross_entropy_grad_triton(logits if logits.stride(-1) == 1 else logits.contiguous(), targets, lse,
                                         ignore_index, scale)
    counted = targets != ignore_index
    probs = torch.softmax(logits.float(), dim=-1)
    probs[torch.arange(len(targets), device=targets.device), torch.where(counted, targets, 0)] -= 1.0
    return (probs * (counted[:, None] * grad_loss.float() / counted.sum())).to(logits.dtype)


@torch.library.custom_op("trm_fast::cross_entropy", mutates_args=())
def cross_entropy_op(logits: torch.Tensor, targets: torch.Tensor,
                     ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, bool [N] argmax == target, lse [N] (empty off CUDA))."""
    return cross_entropy_forward(logits, targets, ignore_index)


@cross_entropy_op.register_fake
def _(logits, targets, ignore_index):
    N = logits.shape[0]
    return (logits.new_empty((), dtype=torch.float32), logits.new_empty(N, dtype=torch.bool),
            logits.new_empty(N if logits.is_cuda else 0, dtype=torch.float32))


@torch.library.custom_op("trm_fast::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                              lse: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return cross_entropy_backward(grad_loss, logits, targets, lse, ignore_index)


@cross_entropy_backward_op.register_fake
def _(grad_loss, logits, targets, lse, ignore_index):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    ctx.save_for_backward(logits, targets, output[2])
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, _grad_correct, _grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return cross_entropy_backward_op(grad_loss, logits, targets, lse, ctx.ignore_index), None, None


cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


class _CrossEntropy(torch.autograd.Function):
    """The eager path (see kernels/concat_linear.py)."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        loss, correct, lse = cross_entropy_forward(logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        logits, targets, lse = ctx.saved_tensors
        return cross_entropy_backward(grad_loss, logits, targets, lse, ctx.ignore_index), None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The op table's loss (the signature of `torch_ops.cross_entropy`): (mean cross-entropy over rows whose
    target is not `ignore_index`, float32; bool [N] argmax == target) of logits [N, vocab]."""
    if torch.compiler.is_compiling():
        loss, correct, _ = cross_entropy_op(logits, targets, ignore_index)
        return loss, correct
    return _CrossEntropy.apply(logits, targets, ignore_index)

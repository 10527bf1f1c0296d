"""`trm_fast::head_cross_entropy`: the output head and its cross-entropy with the logits kept (the drop-in training
forward): logits = h @ weight.T, the mean loss over rows whose target is not `ignore_index` and whether each row's
argmax is its target, forward and backward.

Apart (`linear`, then `cross_entropy`), the loss reads the [N, vocab] logits twice: once in the forward for its
statistics, once in the backward to form (softmax - one-hot) * grad_loss / count. Here the forward's one pass
(kernels/cross_entropy.py) writes (softmax - one-hot) / count into a buffer kept for the backward, which reads no
logits: the two GEMMs, grad h = grad_loss * g @ weight and grad weight = grad_loss * g.T @ h, read grad_loss
themselves (`lt_matmul`'s scale; added into their float32 sums where h or the weight has one, trm_fast.grad_sums).
The cost is the buffer's memory, held from the forward to the backward. A gradient that reaches the returned logits
as well is added to g's share first.
"""
from typing import Optional, Tuple

import torch

from trm_fast.grad_sums import grad_product, grad_sum_of
from trm_fast.kernels.cross_entropy import target_count
from trm_fast.kernels.matmul import product
from trm_fast.linear_cross_entropy import check_targets, cross_entropy_and_grad


def _check(h, weight, targets):
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"head_cross_entropy: h [N, D] and weight [V, D] must agree, got {tuple(h.shape)} and "
                         f"{tuple(weight.shape)}")
    if h.dtype != weight.dtype or h.device != weight.device:
        raise ValueError(f"head_cross_entropy: h and weight must share a dtype and device, got {h.dtype} on "
                         f"{h.device} and {weight.dtype} on {weight.device}")
    check_targets("head_cross_entropy", targets, h)


def head_cross_entropy_forward(h, weight, targets, ignore_index: int, with_grad: bool):
    """(logits [N, V], mean loss float32, bool [N] argmax == target, (softmax - one-hot) / count [N, V] or an empty
    tensor without `with_grad`)."""
    _check(h, weight, targets)
    logits = product(h, weight.t())
    count, scale = target_count(targets, ignore_index)
    loss, correct, grad = cross_entropy_and_grad(logits, targets, ignore_index, scale if with_grad else None)
    return logits, loss / count, correct, grad if grad is not None else logits.new_empty(0)


def head_cross_entropy_backward(grad_logits: Optional[torch.Tensor], grad_loss: Optional[torch.Tensor], h, weight,
                                grad, needs_input_grads=(True, True), grad_sums=(None, None)):
    """(grad h, grad weight), each None where not needed or added into its sum (`grad_sums`: h's, the weight's)."""
    if grad_logits is None and grad_loss is None:
        return None, None
    scale = None
    if grad_logits is None:  # the usual case: the GEMMs scale their products by grad_loss (no pass over [N, V])
        g, scale = grad, grad_loss.float().reshape(1)
    else:
        g = grad_logits if grad_loss is None else grad_logits + grad * grad_loss.float()
    grad_h = grad_product(grad_sums[0], g, weight, scale) if needs_input_grads[0] else None
    grad_weight = grad_product(grad_sums[1], g.t(), h, scale) if needs_input_grads[1] else None
    return grad_h, grad_weight


@torch.library.custom_op("trm_fast::head_cross_entropy", mutates_args=())
def head_cross_entropy_op(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, mean loss, bool [N] argmax == target, the loss's gradient for a unit grad_loss)."""
    return head_cross_entropy_forward(h, weight, targets, ignore_index, with_grad=True)


@head_cross_entropy_op.register_fake
def _(h, weight, targets, ignore_index):
    logits = h.new_empty(h.shape[0], weight.shape[0])
    return logits, h.new_empty((), dtype=torch.float32), h.new_empty(h.shape[0], dtype=torch.bool), \
        torch.empty_like(logits)


@torch.library.custom_op("trm_fast::head_cross_entropy_backward", mutates_args=())
def head_cross_entropy_backward_op(grad_logits: torch.Tensor, grad_loss: torch.Tensor, h: torch.Tensor,
                                   weight: torch.Tensor, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return head_cross_entropy_backward(grad_logits, grad_loss, h, weight, grad)


@head_cross_entropy_backward_op.register_fake
def _(grad_logits, grad_loss, h, weight, grad):
    return torch.empty_like(h), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    h, weight, _, _ = inputs
    ctx.save_for_backward(h, weight, output[3])
    ctx.mark_non_differentiable(output[2], output[3])


def _backward(ctx, grad_logits, grad_loss, _grad_correct, _grad_grad):
    return (*head_cross_entropy_backward_op(grad_logits, grad_loss, *ctx.saved_tensors), None, None)


head_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


class _HeadCrossEntropy(torch.autograd.Function):
    """The eager path (see kernels/concat_linear.py); gradients that reach neither output are not formed."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index):
        logits, loss, correct, grad = head_cross_entropy_forward(h, weight, targets, ignore_index, with_grad=True)
        ctx.save_for_backward(h, weight, grad)
        ctx.grad_sums = grad_sum_of(h), grad_sum_of(weight)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(correct)
        return logits, loss, correct

    @staticmethod
    def backward(ctx, grad_logits, grad_loss, _grad_correct):
        grads = head_cross_entropy_backward(grad_logits, grad_loss, *ctx.saved_tensors, ctx.needs_input_grad[:2],
                                            ctx.grad_sums)
        return (*grads, None, None)


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op table's output head + loss (the signature of `torch_ops.head_cross_entropy`): (logits h @ weight.T
    [N, V], mean cross-entropy over rows whose target is not `ignore_index` (float32), bool [N] argmax == target)
    for h [N, D] and weight [V, D] of one dtype. Without gradient (no_grad, or neither input needing one) it is
    `linear` then `cross_entropy` and keeps no buffer."""
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        logits, loss, correct, _ = head_cross_entropy_forward(h, weight, targets, ignore_index, with_grad=False)
        return logits, loss, correct
    if torch.compiler.is_compiling():
        logits, loss, correct, _ = head_cross_entropy_op(h, weight, targets, ignore_index)
        return logits, loss, correct
    return _HeadCrossEntropy.apply(h, weight, targets, ignore_index)

"""`trm_fast::mean_losses`: the forward's losses from its supervision steps' ones, the seed's
`ce_loss = stack(ce_losses).mean()`, `act_loss = stack(act_losses).mean()`, `loss = ce_loss + act_weight * act_loss`
(float32), forward and backward. The seed's torch steps take six kernels forward and ~six backward; here the steps'
losses are stacked (one kernel) and one program each way forms the three means or the steps' gradients (a mean a sum
times 1 / S, as torch's CUDA reduction and `div_` form it; `loss` within a float32 unit of torch's: its product and
sum may be one fused multiply-add).
"""
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from trm_fast import torch_ops
from trm_fast.kernels.halting_loss import float32_inverse


@triton.jit
def _mean_losses_fwd_kernel(losses_ptr, loss_ptr, ce_ptr, act_ptr, S, inv_s, act_weight, BLOCK: tl.constexpr):
    """losses [2S] (the S ce losses, then the S act losses) -> loss, ce_loss, act_loss."""
    steps = tl.arange(0, BLOCK)
    ce = tl.sum(tl.load(losses_ptr + steps, mask=steps < S, other=0.0), axis=0) * inv_s
    act = tl.sum(tl.load(losses_ptr + S + steps, mask=steps < S, other=0.0), axis=0) * inv_s
    tl.store(ce_ptr, ce)
    tl.store(act_ptr, act)
    tl.store(loss_ptr, ce + act * act_weight)


@triton.jit
def _mean_losses_bwd_kernel(grad_loss_ptr, grad_ce_ptr, grad_act_ptr, out_ptr, S, inv_s, act_weight,
                            HAS_LOSS: tl.constexpr, HAS_CE: tl.constexpr, HAS_ACT: tl.constexpr, BLOCK: tl.constexpr):
    """out [2S]: each step's ce loss's gradient, then each act loss's, from the three outputs' (absent ones zero)."""
    ce = tl.zeros([], tl.float32)
    act = tl.zeros([], tl.float32)
    if HAS_LOSS:
        ce = tl.load(grad_loss_ptr).to(tl.float32)
        act = ce * act_weight
    if HAS_CE:
        ce += tl.load(grad_ce_ptr).to(tl.float32)
    if HAS_ACT:
        act += tl.load(grad_act_ptr).to(tl.float32)
    steps = tl.arange(0, BLOCK)
    tl.store(out_ptr + steps, tl.full([BLOCK], 0.0, tl.float32) + ce * inv_s, mask=steps < S)
    tl.store(out_ptr + S + steps, tl.full([BLOCK], 0.0, tl.float32) + act * inv_s, mask=steps < S)


def _block(S: int) -> int:
    return triton.next_power_of_2(S)


def mean_losses_fwd_triton(losses: torch.Tensor, act_weight: float) -> Tuple[torch.Tensor, ...]:
    """(loss, ce_loss, act_loss), 0-dim float32, of losses [2S] float32."""
    S = losses.shape[0] // 2
    loss, ce, act = (torch.empty((), device=losses.device, dtype=torch.float32) for _ in range(3))
    _mean_losses_fwd_kernel[(1,)](losses, loss, ce, act, S, float32_inverse(S), float(act_weight), BLOCK=_block(S))
    return loss, ce, act


def mean_losses_bwd_triton(grads: Sequence[Optional[torch.Tensor]], S: int, act_weight: float) -> torch.Tensor:
    """The gradient [2S] of the stacked losses from those of (loss, ce_loss, act_loss), each None where absent."""
    present = [g for g in grads if g is not None]
    out = torch.empty(2 * S, device=present[0].device, dtype=torch.float32)
    _mean_losses_bwd_kernel[(1,)](*(g if g is not None else out for g in grads), out, S, float32_inverse(S),
                                  float(act_weight), *(g is not None for g in grads), BLOCK=_block(S))
    return out


def _check(ce_losses, act_losses):
    tensors = list(ce_losses) + list(act_losses)
    if not ce_losses or len(ce_losses) != len(act_losses) or any(
            not isinstance(t, torch.Tensor) or t.shape != () or t.dtype != torch.float32
            or t.device != tensors[0].device for t in tensors):
        raise ValueError("mean_losses: expects as many ce as act losses (at least one), each a 0-dim float32 tensor "
                         "on one device")


def mean_losses_forward(losses: torch.Tensor, act_weight: float) -> Tuple[torch.Tensor, ...]:
    """Triton on CUDA, the seed's torch steps elsewhere."""
    if losses.is_cuda:
        return mean_losses_fwd_triton(losses, act_weight)
    S = losses.shape[0] // 2
    return torch_ops.mean_losses(list(losses[:S]), list(losses[S:]), act_weight)


def mean_losses_backward(grads, S: int, act_weight: float) -> torch.Tensor:
    if any(g is not None and g.is_cuda for g in grads):
        return mean_losses_bwd_triton(grads, S, act_weight)
    grad_loss, grad_ce, grad_act = (g if g is not None else torch.zeros(()) for g in grads)
    return torch.cat([(grad_loss + grad_ce).div(S).expand(S), (grad_loss * act_weight + grad_act).div(S).expand(S)])


@torch.library.custom_op("trm_fast::mean_losses", mutates_args=())
def mean_losses_op(losses: torch.Tensor, act_weight: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce_loss, act_loss) of the stacked step losses [2S] (ce, then act)."""
    return mean_losses_forward(losses, act_weight)


@mean_losses_op.register_fake
def _(losses, act_weight):
    return tuple(losses.new_empty(()) for _ in range(3))


@torch.library.custom_op("trm_fast::mean_losses_backward", mutates_args=())
def mean_losses_backward_op(grad_loss: torch.Tensor, grad_ce: torch.Tensor, grad_act: torch.Tensor, S: int,
                            act_weight: float) -> torch.Tensor:
    return mean_losses_backward((grad_loss, grad_ce, grad_act), S, act_weight)


@mean_losses_backward_op.register_fake
def _(grad_loss, grad_ce, grad_act, S, act_weight):
    return grad_loss.new_empty(2 * S)


def _setup_context(ctx, inputs, output):
    ctx.S, ctx.act_weight = inputs[0].shape[0] // 2, inputs[1]


def _backward(ctx, grad_loss, grad_ce, grad_act):
    return mean_losses_backward_op(grad_loss, grad_ce, grad_act, ctx.S, ctx.act_weight), None


mean_losses_op.register_autograd(_backward, setup_context=_setup_context)


class _MeanLosses(torch.autograd.Function):
    """The eager path (see kernels/concat_linear.py); gradients of outputs that got none stay None (no zeros made)."""

    @staticmethod
    def forward(ctx, losses, act_weight):
        ctx.set_materialize_grads(False)
        ctx.S, ctx.act_weight = losses.shape[0] // 2, act_weight
        return mean_losses_forward(losses, act_weight)

    @staticmethod
    def backward(ctx, *grads):
        if all(g is None for g in grads):
            return None, None
        return mean_losses_backward(grads, ctx.S, ctx.act_weight), None


def mean_losses(ce_losses: Sequence[torch.Tensor], act_losses: Sequence[torch.Tensor],
                act_weight: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op table's (loss, ce_loss, act_loss) (the signature of `torch_ops.mean_losses`)."""
    _check(ce_losses, act_losses)
    losses = torch.stack(list(ce_losses) + list(act_losses))
    if torch.compiler.is_compiling():
        return mean_losses_op(losses, act_weight)
    return _MeanLosses.apply(losses, act_weight)

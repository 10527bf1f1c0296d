"""Weight gradients summed in float32 by the GEMMs that form them (Megatron-LM's gradient-accumulation fusion).

A TinyNet weight is cast to the autocast dtype once per forward and its copy is used by every TinyNet call (8 with
gradient at the seed's config). Autograd would sum the calls' bf16 weight gradients with one add kernel per call
and convert the sum to float32 at the cast. `cast_summing_grads` instead hands the copy a `GradSum`: the kernels'
backwards add each call's gradient into its float32 total with a beta = 1 GEMM (`GradSum.addmm`) and return no
gradient for the copy; the cast's backward, which autograd runs after every use's, returns the total. A total is
kept per backward pass (autograd's graph task), so a pass that did not reach the cast leaves nothing behind.
"""
from typing import Optional

import torch


class GradSum:
    """The float32 sum of one parameter's gradient over the uses of its cast copy in the running backward."""

    def __init__(self):
        self.total: Optional[torch.Tensor] = None
        self.task = None

    def _in_this_pass(self) -> None:
        task = torch._C._current_graph_task_id()
        if task != self.task:
            self.total, self.task = None, task

    def addmm(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """total += a @ b, computed from a and b as they are (bf16 on the GPU) into float32."""
        self._in_this_pass()
        with torch.autocast(a.device.type, enabled=False):  # a backward run inside an autocast region
            if not a.is_cuda:  # CPU GEMMs have no float32 output for bf16 operands
                product = a.float() @ b.float()
                self.total = product if self.total is None else self.total.add_(product)
            elif self.total is None:
                self.total = torch.mm(a, b, out_dtype=torch.float32)
            else:
                torch.addmm(self.total, a, b, out_dtype=torch.float32, out=self.total)

    def take(self) -> Optional[torch.Tensor]:
        self._in_this_pass()
        total, self.total = self.total, None
        return total


class _CastSummingGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, param, dtype):
        ctx.set_materialize_grads(False)
        copy = param.to(dtype)
        copy.grad_sum = ctx.grad_sum = GradSum()
        return copy

    @staticmethod
    def backward(ctx, grad):
        total = ctx.grad_sum.take()
        if grad is not None:  # uses that returned their gradient (a torch fallback) add it here
            total = grad.float() if total is None else total + grad
        return total, None


def cast_summing_grads(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """param.to(dtype) whose gradient the kernels may sum into its `grad_sum` (float32) instead of returning it."""
    return _CastSummingGrads.apply(param, dtype)


def grad_sum_of(weight: torch.Tensor) -> Optional[GradSum]:
    """The GradSum of a weight made by `cast_summing_grads`, else None (the ops' autograd Functions keep it)."""
    return getattr(weight, "grad_sum", None)


def weight_grad(grad_sum: Optional[GradSum], a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
    """A weight's gradient a @ b: added into `grad_sum` (then None) when the weight has one, else returned."""
    if grad_sum is None:
        return a @ b
    grad_sum.addmm(a, b)
    return None

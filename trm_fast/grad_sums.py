"""Weight gradients summed in float32 by the GEMMs that form them (Megatron-LM's gradient-accumulation fusion).

A TinyNet weight is cast to the autocast dtype once per forward and its copy is used by every TinyNet call (8 with
gradient at the seed's config). Autograd would sum the calls' bf16 weight gradients with one add kernel per call
and convert the sum to float32 at the cast. `cast_summing_grads` instead hands the copy a `GradSum`: the kernels'
backwards add each call's gradient into its float32 total with a beta = 1 GEMM (`GradSum.addmm`) and return no
gradient for the copy; the cast's backward, which autograd runs after every use's, returns the total. A total is
kept per backward pass (autograd's graph task), so a pass that did not reach the cast leaves nothing behind.
Float32 parameters that are not cast (a LayerNorm's) get the same through `params_summing_grads`: aliases whose
op adds their column sums into one total (kernels/column_sum.py adding into it), instead of autograd's adds.
Activations that several ops read in the autocast dtype get it too: a TinyNet state carries a bf16 copy (written
by the LayerNorm that makes it, whose backward reads the total) and x is cast once per forward; the projections and
the output head add their input gradients into the copy's total (cuBLAS, beta = 1) instead of returning them.
An activation read by two ops in its own dtype (a TinyNet block's input: by the QKV projection and by the first
LayerNorm) gets a sum in that dtype (`summing_grads`): the LayerNorm's backward hands it its gradient, into which the
projection's input-gradient GEMM adds its own (beta = 1) instead of autograd's add of the two.
A cast copy made with `joined_uses` (a training step that runs one backward: trm_fast.graphed_train_step) also has
`JoinedRows`: ops that support it lay their tracked uses' inputs and output gradients out as slots of two row
buffers, and the weight's gradient is one GEMM over all of them when the sum is taken (K = uses x rows); its sums
of biases' and LayerNorm parameters' gradients keep the uses' band sums in one buffer, reduced once at the end.
"""
import math
from typing import Optional

import torch

from trm_fast.ops import lt_matmul, lt_matmul_into


class GradSum:
    """The float32 sum of the gradients of `count` parameters (concatenated) over the uses of their cast copy or
    aliases in the running backward (or, `summing_grads`, an activation's sum in its own dtype)."""

    def __init__(self, count: int = 1, shape: Optional[torch.Size] = None, dtype: torch.dtype = torch.float32,
                 joined: Optional["JoinedRows"] = None, band_slots: int = 0):
        self.total: Optional[torch.Tensor] = None
        self.joined = joined
        self.task = None
        self.count = count  # parameters whose gradients it sums, concatenated
        self.shape = shape  # of the total that `take` returns (the GEMMs form it in 2-D)
        self.dtype = dtype  # of the total: float32, or (`summing_grads`) the activation's own
        self.band_slots = band_slots  # uses whose band sums `band_sums` defers to `take`
        self.bands: Optional[torch.Tensor] = None  # [band_slots x band_rows, columns] float32, made at first use
        self.band_rows = self.bands_used = 0

    def _in_this_pass(self) -> None:
        task = torch._C._current_graph_task_id()
        if task != self.task:
            self.total, self.task, self.bands_used = None, task, 0

    def addmm(self, a: torch.Tensor, b: torch.Tensor, scale: Optional[torch.Tensor] = None) -> None:
        """total += a @ b (times `scale`, a float32 tensor of one element, where given), computed from a and b as
        they are (bf16 on the GPU) into the total's dtype (float32 accumulation; cuBLASLt's tuned algorithm on CUDA:
        trm_fast.ops.lt_matmul_into)."""
        self._in_this_pass()
        first = self.total is None
        if first:
            self.total = a.new_empty(a.shape[0], b.shape[1], dtype=self.dtype)
        with torch.autocast(a.device.type, enabled=False):  # a backward run inside an autocast region
            lt_matmul_into(self.total, a, b, accumulate=not first, scale=scale)

    def add(self, x: torch.Tensor) -> None:
        """total += x (rows of its last dimension, as the GEMMs form the total), x itself becoming the total when
        there is none yet (its owner hands it over)."""
        self._in_this_pass()
        x = x.reshape(-1, x.shape[-1])
        self.total = x if self.total is None else self.total.add_(x)

    def band_sums(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """A float32 [rows, cols] tensor for a kernel to write per-band column sums into, then handed to
        `add_column_sums`: with `band_slots`, the next slot of one buffer that `take` sums for all uses at once (one
        reduction where each use would launch its own: the LayerNorms' and b1's band sums, the second pass of a bias
        gradient's column sums); a new tensor where no slot is left or the shape differs."""
        self._in_this_pass()
        if self.band_slots and self.bands is None:
            self.band_rows = rows
            self.bands = torch.empty(self.band_slots * rows, cols, device=device, dtype=torch.float32)
        if self.bands is not None and self.bands_used < self.band_slots and (rows, cols) == (
                self.band_rows, self.bands.shape[1]) and self.bands.device == device:
            self.bands_used += 1
            return self.bands[(self.bands_used - 1) * rows:self.bands_used * rows]
        return torch.empty(rows, cols, device=device, dtype=torch.float32)

    def add_column_sums(self, x: torch.Tensor) -> None:
        """total += x.sum(0) in float32 (on CUDA kernels/column_sum.py, adding into the total); deferred to `take`
        when x is a slot of `band_sums`' buffer, and the second pass of a long x's sums when it gets one."""
        self._in_this_pass()
        if self.bands is not None and x._base is self.bands:  # a slot (of any rows): summed at `take`
            return
        if x.is_cuda and self.band_slots:
            from trm_fast.kernels.column_sum import band_count, sum_bands  # (Triton: CUDA only)
            if band_count(x.shape[0]) > 1:  # the first pass, into a slot where one is left
                x = sum_bands(x, self.band_sums(band_count(x.shape[0]), x.shape[1], x.device))
                if x._base is self.bands:
                    return
        self._add_sums_now(x)

    def _add_sums_now(self, x: torch.Tensor) -> None:
        if not x.is_cuda:
            sums = x.float().sum(0)
            self.total = sums if self.total is None else self.total.add_(sums)
            return
        from trm_fast.kernels.column_sum import sum_rows  # (Triton: CUDA only)
        self.total = sum_rows(x, torch.float32, into=self.total)

    def into(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """The float32 [rows, cols] total for a kernel to add into in place (zeros when there is none yet)."""
        self._in_this_pass()
        if self.total is None:
            self.total = torch.zeros(rows, cols, device=device, dtype=torch.float32)
        return self.total

    def take(self) -> Optional[torch.Tensor]:
        self._in_this_pass()
        if self.joined is not None:
            self.joined.add_product_into(self)
        if self.bands_used:
            self._add_sums_now(self.bands[:self.bands_used * self.band_rows])
            self.bands_used = 0
        total, self.total = self.total, None
        return total.view(self.shape) if total is not None and self.shape is not None else total


class JoinedRows:
    """A 2-D weight's tracked uses in one forward, as slots of two row buffers: slot k's `inputs` rows hold use k's
    input (written by the op that made it), its `grads` rows first the use's output (written by its forward) and then,
    overwritten in place by the backward of the op that reads that output, the output's gradient. The weight's
    gradient is then one GEMM, grads.T @ inputs over the filled slots, formed when its GradSum is taken: K = uses x
    rows, where cuBLAS runs at 560-760 TFLOP/s on the H100 against 300-550 for one GEMM per use of 8192 rows
    (scripts/weight_grad_k_bench.py). The buffers are made at the first slot taken; a use that gets no slot (all
    taken, other rows) or whose output gradient is elsewhere adds its product into the sum itself.
    With `shift` 1 (an output that its reader's backward reads while it forms the gradient: the QKV projection's,
    read by the attention backward's two kernels), use k's output gradient goes to the `grads` rows of slot k + 1
    instead, once no backward reads the output there any more (`released`; the backward runs the uses last to
    first), and `grads` has one slot more for the last use's."""

    def __init__(self, uses: int, shift: int = 0):
        self.uses, self.shift, self.rows, self.taken = uses, shift, 0, 0
        self.inputs: Optional[torch.Tensor] = None
        self.grads: Optional[torch.Tensor] = None
        self.filled: list = []
        self.released: set = set()  # slots whose output no backward reads any more

    def take(self, rows: int, weight: torch.Tensor) -> Optional[int]:
        """The next slot for a use of `rows` rows of the weight (its copy), or None."""
        if self.inputs is None:
            self.rows = rows
            self.inputs = weight.new_empty(self.uses * rows, weight.shape[1])
            self.grads = weight.new_empty((self.uses + self.shift) * rows, weight.shape[0])
        if rows != self.rows or self.taken == self.uses:
            return None
        self.taken += 1
        return self.taken - 1

    def slot(self, buffer: torch.Tensor, k: int) -> torch.Tensor:
        """Slot k of `buffer` as a tensor of its own, not a view: the ops write slots in place, which autograd would
        otherwise count as writes to the other slots (one version counter per base) and refuse."""
        cols = buffer.shape[1]
        return buffer.new_empty(0).set_(buffer.untyped_storage(), buffer.storage_offset() + k * self.rows * cols,
                                        (self.rows, cols), (cols, 1))

    def slot_of(self, x: torch.Tensor, buffer: Optional[torch.Tensor]) -> Optional[int]:
        """k where x (any shape, contiguous) is slot k of `buffer` (`inputs` or `grads`), else None."""
        if buffer is None or x.dtype != buffer.dtype or x.device != buffer.device or not x.is_contiguous() \
                or x.numel() != self.rows * buffer.shape[1]:
            return None
        k, rest = divmod(x.data_ptr() - buffer.data_ptr(), x.numel() * x.element_size())
        return k if rest == 0 and 0 <= k < self.taken + (self.shift if buffer is self.grads else 0) else None

    def output_slot(self, x: torch.Tensor):
        """(k, slot k's gradient rows) where a use's input x is slot k's input rows, else (None, None): the use's
        output goes there, for the next op's backward to write its gradient over it."""
        k = self.slot_of(x, self.inputs)
        return (k, self.slot(self.grads, k)) if k is not None else (None, None)

    def fill(self, k: int) -> None:
        """Slot k's gradient rows are final: its product joins the weight's GEMM."""
        self.filled.append(k)

    def joins(self, k: Optional[int], grad: torch.Tensor) -> bool:
        """Whether use k's output gradient `grad` lies in its slot's rows (k + shift: written over the output there);
        then slot k is filled."""
        if k is None or self.slot_of(grad, self.grads) != k + self.shift:
            return False
        self.fill(k)
        return True

    def gradient_rows(self, output: torch.Tensor) -> Optional[torch.Tensor]:
        """With shift 1, where the backward of the op that reads `output` (use k's output rows) writes its gradient:
        slot k + 1's rows, when no backward reads the output there any more; else None. Slot k is released then."""
        k = self.slot_of(output, self.grads)
        if self.shift != 1 or k is None or k >= self.taken:
            return None
        self.released.add(k)  # (its reader's kernels run before any later kernel writes there)
        return self.slot(self.grads, k + 1) if k + 1 >= self.taken or k + 1 in self.released else None

    def add_product_into(self, grad_sum: "GradSum") -> None:
        """grad_sum += grads.T @ inputs over the filled slots, one GEMM per run of adjacent ones; then the buffers go
        (the weight's last use in this backward)."""
        filled, shift = sorted(self.filled), self.shift * self.rows
        while filled:
            run = 1
            while run < len(filled) and filled[run] == filled[0] + run:
                run += 1
            first, end = filled[0] * self.rows, (filled[0] + run) * self.rows
            grad_sum.addmm(self.grads[first + shift:end + shift].t(), self.inputs[first:end])
            filled = filled[run:]
        if self.filled:
            self.inputs = self.grads = None
            self.filled, self.released = [], set()


def joined_rows(weight: Optional[torch.Tensor]) -> Optional[JoinedRows]:
    """The JoinedRows of a cast copy made with `joined_uses` (`cast_summing_grads`) in grad mode (a tracked use),
    else None."""
    grad_sum = grad_sum_of(weight)
    return grad_sum.joined if grad_sum is not None and torch.is_grad_enabled() else None


def written_into(t: torch.Tensor, into: Optional[torch.Tensor]) -> torch.Tensor:
    """t, or t copied into `into` (a slot, where an op's torch path writes what its kernels write there), which then
    stands for it."""
    return t if into is None else into.copy_(t.view(into.shape))


def joined_input(weight: torch.Tensor, shape) -> Optional[torch.Tensor]:
    """Where a tracked use of `weight` (a cast copy with JoinedRows) is to have its input of `shape` (any rows x the
    weight's in features) written: the next slot's input rows, viewed as `shape`; None outside grad mode, for a copy
    without JoinedRows, or when no slot is left."""
    joined = joined_rows(weight)
    if joined is None:
        return None
    k = joined.take(math.prod(shape) // weight.shape[1], weight)
    return joined.slot(joined.inputs, k).view(shape) if k is not None else None


class _CastSummingGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, param, dtype, joined_uses, joined_shift):
        ctx.set_materialize_grads(False)
        copy = param.to(dtype)
        joined = JoinedRows(joined_uses, joined_shift) if joined_uses and param.dim() == 2 else None
        copy.grad_sum = ctx.grad_sum = GradSum(shape=param.shape, joined=joined, band_slots=joined_uses)
        return copy

    @staticmethod
    def backward(ctx, grad):
        return plus(ctx.grad_sum.take(), grad), None, None, None  # (uses that returned their gradient: torch paths)


class _ParamsSummingGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, band_slots, *params):
        ctx.set_materialize_grads(False)
        ctx.grad_sum, ctx.shapes = GradSum(len(params), band_slots=band_slots), [p.shape for p in params]
        aliases = tuple(p.view_as(p) for p in params)
        for alias in aliases:
            alias.grad_sum = ctx.grad_sum
        return aliases

    @staticmethod
    def backward(ctx, *grads):
        total = ctx.grad_sum.take()
        parts = total.split([shape.numel() for shape in ctx.shapes]) if total is not None else [None] * len(grads)
        return (None,) + tuple(plus(part.view(shape) if part is not None else None, grad)
                               for part, shape, grad in zip(parts, ctx.shapes, grads))


class _SummingGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        alias = x.view_as(x)
        alias.grad_sum = ctx.grad_sum = GradSum(shape=x.shape, dtype=x.dtype)
        return alias

    @staticmethod
    def backward(ctx, grad):
        return plus(ctx.grad_sum.take(), grad, ctx.grad_sum.dtype)


def summing_grads(x: torch.Tensor) -> torch.Tensor:
    """An alias of the activation x whose uses may add their gradients into its `grad_sum`, a sum in x's dtype,
    instead of returning them (the first may hand over its gradient as the sum: `GradSum.add`)."""
    return _SummingGrads.apply(x)


def plus(total: Optional[torch.Tensor], grad: Optional[torch.Tensor],
         dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """A summed gradient (in `dtype`) plus one that a use returned (a torch fallback), either possibly None."""
    if grad is None:
        return total
    return grad.to(dtype) if total is None else total + grad


def params_summing_grads(*params: torch.Tensor, band_slots: int = 0) -> tuple:
    """Aliases of float32 parameters (one op's, e.g. a LayerNorm's weight and bias) that share one `grad_sum`:
    the op adds their gradients, concatenated in this order, into its float32 total (with `band_slots`, the band
    sums of that many uses summed once: `GradSum.band_sums`)."""
    return _ParamsSummingGrads.apply(band_slots, *params)


def shared_grad_sum(*params: torch.Tensor) -> Optional[GradSum]:
    """The GradSum that `params` share, in this order, from one `params_summing_grads` call, else None."""
    grad_sum = grad_sum_of(params[0])
    if grad_sum is None or len(params) != grad_sum.count or any(grad_sum_of(p) is not grad_sum for p in params):
        return None
    return grad_sum


def cast_summing_grads(param: torch.Tensor, dtype: torch.dtype, joined_uses: int = 0,
                       joined_shift: int = 0) -> torch.Tensor:
    """param.to(dtype) whose gradient the kernels may sum into its `grad_sum` (float32) instead of returning it
    (a weight, or an activation read by several ops: TinyNet's input x); with `joined_uses` its sum has band slots
    (`GradSum.band_sums`) and, for a 2-D weight, `JoinedRows` for that many tracked uses (with `joined_shift`)."""
    return _CastSummingGrads.apply(param, dtype, joined_uses, joined_shift)


def grad_sum_of(weight: Optional[torch.Tensor]) -> Optional[GradSum]:
    """The GradSum of a parameter made by `cast_summing_grads` or `params_summing_grads`, else None (the ops'
    autograd Functions keep it)."""
    return getattr(weight, "grad_sum", None)


def grad_sums_of(*params: Optional[torch.Tensor]) -> tuple:
    """grad_sum_of each parameter (None for None): what an op's backward takes as `grad_sums`."""
    return tuple(grad_sum_of(p) for p in params)


def grad_product(grad_sum: Optional[GradSum], a: torch.Tensor, b: torch.Tensor,
                 scale: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """A gradient a @ b (a weight's, or an input copy's; times `scale`, a float32 tensor of one element, where given):
    added into `grad_sum` (then None) when the tensor has one, else returned."""
    if grad_sum is None:
        return lt_matmul(a, b, scale=scale)
    grad_sum.addmm(a, b, scale)
    return None


def bias_grad(grad_sum: Optional[GradSum], x: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A bias's gradient, the column sums of a CUDA [R, N] x (float32 accumulation, kernels/column_sum.py): added
    into `grad_sum` (then None) when the bias has one, else returned in `dtype`."""
    if grad_sum is not None:
        grad_sum.add_column_sums(x)
        return None
    from trm_fast.kernels.column_sum import sum_rows
    return sum_rows(x, dtype)

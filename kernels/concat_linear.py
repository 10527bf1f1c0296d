"""`trm_fast::concat_linear`: `cat(inputs, -1) @ weight.T + bias` for two or three [M, K] inputs, without
materializing the concatenation, forward and backward.

Forward: one kernel; each output tile accumulates (float32) the dot products of every input with its
column block of `weight` [N, len(inputs) * K] (at kernels/matmul.py's speed when the inputs are in the weight's
dtype: TinyNet's states carry such a copy). Backward: grad of input i = grad_out @ weight[:, i*K:(i+1)*K] (the
shared strided matmul, kernels/matmul.py; cuBLAS adding it into a float32 sum where the input is a copy that
several ops read, trm_fast.grad_sums; none where the input needs none), grad of weight = grad_out.T @
cat(inputs) (cuBLAS: a long-K matmul; the inputs cast-copied into one buffer in the weight's dtype by one
kernel, `cast_join`), grad of bias = grad_out summed over rows (kernels/column_sum.py).

Every op of kernels/ comes in two forms over the same forward and backward functions: a `torch.library`
custom op (fake kernel, autograd), which `torch.compile` and `opcheck` use, and a `torch.autograd.Function`
that eager calls take, which skips the custom-op dispatch (about 15 us a call, paid 100+ times a step).
"""
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from trm_fast import torch_ops
from trm_fast.grad_sums import bias_grad, grad_product, grad_sums_of
from trm_fast.kernels.matmul import (autocast_cast, dot_as, dot_config, grouped_tile, matmul_grid, matmul_into,
                                     tile_configs)


@triton.jit
def _accumulate(acc, x_ptr, stride_xm, w_ptr, stride_wn, rows, cols, M, N, K, DOT_DTYPE: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += x[rows, :K] @ w[cols, :K].T (w already offset to this input's column block), x cast to the dot
    dtype as it is loaded."""
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < K),
                    other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None], mask=(cols[None, :] < N) & (k[:, None] < K),
                    other=0.0)
        acc = dot_as(x, w, acc, DOT_DTYPE, PRECISION)
    return acc


@triton.autotune(configs=tile_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), [
    (128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 4, 3), (64, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4), (128, 256, 32, 8, 8, 4)], (32, 32, 32, 2, 4, 1)),
    key=["M", "N", "K", "NUM_INPUTS"])
@triton.heuristics({"EVEN": lambda args: all(args[d] % args["BLOCK_" + d] == 0 for d in "MNK")})
@triton.jit
def _concat_linear_fwd_kernel(x0_ptr, x1_ptr, x2_ptr, stride_x0, stride_x1, stride_x2, w_ptr, stride_wn, b_ptr,
                              out_ptr, stride_om, M, N, K, NUM_INPUTS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN: tl.constexpr):
    """One output tile per program (placed as kernels/matmul.py places them). When EVEN (blocks dividing M, N, K)
    one K loop walks the inputs in turn (one software pipeline; the inputs share a row stride then), else a
    masked loop per input; then the bias."""
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if EVEN:
        ks = tl.arange(0, BLOCK_K)
        x_offsets = rows[:, None] * stride_x0 + ks[None, :]
        w_tile = w_ptr + cols[None, :] * stride_wn + ks[:, None]
        for k0 in range(0, NUM_INPUTS * K, BLOCK_K):
            x_ptr = tl.where(k0 < K, x0_ptr + k0, x1_ptr + (k0 - K))
            if NUM_INPUTS == 3:
                x_ptr = tl.where(k0 < 2 * K, x_ptr, x2_ptr + (k0 - 2 * K))
            acc = dot_as(tl.load(x_ptr + x_offsets), tl.load(w_tile), acc, DOT_DTYPE, PRECISION)
            w_tile += BLOCK_K
    else:
        acc = _accumulate(acc, x0_ptr, stride_x0, w_ptr, stride_wn, rows, cols, M, N, K, DOT_DTYPE, PRECISION,
                          BLOCK_K)
        acc = _accumulate(acc, x1_ptr, stride_x1, w_ptr + K, stride_wn, rows, cols, M, N, K, DOT_DTYPE, PRECISION,
                          BLOCK_K)
        if NUM_INPUTS == 3:
            acc = _accumulate(acc, x2_ptr, stride_x2, w_ptr + 2 * K, stride_wn, rows, cols, M, N, K, DOT_DTYPE,
                              PRECISION, BLOCK_K)
    acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _copy_block(x_ptr, stride_x, out_ptr, stride_out, rows, cols, M, K):
    in_range = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=in_range)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], x.to(out_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _cast_join_kernel(x0_ptr, x1_ptr, x2_ptr, stride_x0, stride_x1, stride_x2, out_ptr, stride_out, M, K,
                      NUM_INPUTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[:, i*K:(i+1)*K] = inputs[i], cast to out's dtype (a [BLOCK_M, BLOCK_K] block of each input)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    _copy_block(x0_ptr, stride_x0, out_ptr, stride_out, rows, cols, M, K)
    _copy_block(x1_ptr, stride_x1, out_ptr + K, stride_out, rows, cols, M, K)
    if NUM_INPUTS == 3:
        _copy_block(x2_ptr, stride_x2, out_ptr + 2 * K, stride_out, rows, cols, M, K)


def cast_join(inputs: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """cat(inputs, -1).to(dtype) for two or three 2-D [M, K] inputs with unit column stride, in one pass."""
    (M, K), x0, x1, x2 = inputs[0].shape, inputs[0], inputs[1], inputs[-1]
    out = torch.empty(M, len(inputs) * K, device=x0.device, dtype=dtype)
    block_m, block_k = 32, min(triton.next_power_of_2(K), 128)
    _cast_join_kernel[(triton.cdiv(M, block_m), triton.cdiv(K, block_k))](
        x0, x1, x2, x0.stride(0), x1.stride(0), x2.stride(0), out, out.stride(0), M, K, NUM_INPUTS=len(inputs),
        BLOCK_M=block_m, BLOCK_K=block_k)
    return out


def concat_linear_fwd_triton(inputs: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[M, N] = cat(inputs, -1) @ weight.T + bias for 2-D [M, K] inputs with unit column stride, computed and
    returned in weight's dtype (the inputs may be wider: they are cast as they are loaded); written into `out` (a
    contiguous [M, N] tensor in weight's dtype) where given."""
    M, K = inputs[0].shape
    N = weight.shape[0]
    x0, x1, x2 = inputs[0], inputs[1], inputs[-1]
    if len({x.stride(0) for x in inputs}) > 1:  # the kernel's one-loop path reads them with x0's row stride
        x0, x1, x2 = (x.contiguous() for x in (x0, x1, x2))
    out = torch.empty(M, N, device=x0.device, dtype=weight.dtype) if out is None else out
    dtype, precision = dot_config(weight.dtype)
    _concat_linear_fwd_kernel[matmul_grid(M, N)](x0, x1, x2, x0.stride(0), x1.stride(0), x2.stride(0), weight,
                                                 weight.stride(0), bias, out, out.stride(0), M, N, K,
                                                 NUM_INPUTS=len(inputs), DOT_DTYPE=dtype, PRECISION=precision)
    return out


def _wanted(inputs, needs_input_grads, input_grad_sums):
    """(input index, its column block's start, its grad sum) of each input whose gradient is needed."""
    K = inputs[0].shape[-1]
    needs_input_grads = needs_input_grads or (True,) * len(inputs)
    input_grad_sums = input_grad_sums or (None,) * len(inputs)
    return [(i, i * K, s) for i, (needed, s) in enumerate(zip(needs_input_grads, input_grad_sums)) if needed]


def concat_linear_bwd_triton(grad_out: torch.Tensor, inputs: Sequence[torch.Tensor], weight: torch.Tensor,
                             grad_sums=(None, None), needs_input_grads=None, input_grad_sums=None
                             ) -> Tuple[List[Optional[torch.Tensor]], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grads of the inputs, each in its input's dtype; grad of weight; grad of bias) for 2-D [M, K] inputs and
    grad_out [M, N]. An input's gradient is None where `needs_input_grads` says it is not needed or where it is
    added into its `input_grad_sums` entry (float32, trm_fast.grad_sums); the weight's and bias's are None when
    added into their `grad_sums` entries. Input gradients by the Triton matmul, the weight's by one cuBLAS matmul
    (split-K) over the inputs joined in the weight's dtype."""
    K = inputs[0].shape[1]
    grad_inputs = [None] * len(inputs)
    for i, start, grad_sum in _wanted(inputs, needs_input_grads, input_grad_sums):
        if grad_sum is not None:
            grad_sum.addmm(grad_out, weight[:, start:start + K])
        else:
            grad_inputs[i] = torch.empty_like(inputs[i])
            matmul_into(grad_out, weight[:, start:start + K], grad_inputs[i], weight.dtype)
    return (grad_inputs, grad_product(grad_sums[0], grad_out.t(), cast_join(inputs, weight.dtype)),
            bias_grad(grad_sums[1], grad_out, weight.dtype))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _check(inputs: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor) -> None:
    if len(inputs) not in (2, 3):
        raise ValueError(f"concat_linear: expects 2 or 3 inputs, got {len(inputs)}")
    first = inputs[0]
    for i, x in enumerate(inputs):
        if x.shape != first.shape or x.dtype != first.dtype or x.device != first.device:
            raise ValueError(f"concat_linear: input {i} is {tuple(x.shape)} {x.dtype} on {x.device}; every input "
                             f"must be {tuple(first.shape)} {first.dtype} on {first.device}")
    K = first.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != len(inputs) * K or bias.shape != (weight.shape[0],):
        raise ValueError(f"concat_linear: weight must be [N, {len(inputs)} * {K}] and bias [N], got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    if not first.is_floating_point() or bias.dtype != weight.dtype or weight.device != first.device:
        raise ValueError(f"concat_linear: weight / bias ({weight.dtype}, {bias.dtype}, {weight.device}) must share "
                         f"a dtype and the inputs' device ({first.dtype}, {first.device})")


def concat_linear_forward(inputs: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The op's forward, in weight's dtype: Triton on CUDA, torch elsewhere; written into `out` (contiguous, the
    output's shape) where given."""
    _check(inputs, weight, bias)
    if not inputs[0].is_cuda:
        return torch_ops.concat_linear([x.to(weight.dtype) for x in inputs], weight, bias, out)
    result = concat_linear_fwd_triton([_flat(x).contiguous() for x in inputs], weight.contiguous(),
                                      bias.contiguous(), _flat(out) if out is not None else None)
    return result.view(*inputs[0].shape[:-1], weight.shape[0])


def concat_linear_backward(grad_out: torch.Tensor, inputs: Sequence[torch.Tensor], weight: torch.Tensor,
                           grad_sums=(None, None), needs_input_grads=None, input_grad_sums=None
                           ) -> Tuple[List[Optional[torch.Tensor]], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """`concat_linear_bwd_triton`'s results for inputs of any shape [..., K] (Triton on CUDA, torch elsewhere)."""
    flat = [_flat(x).contiguous() for x in inputs]
    grad_flat = _flat(grad_out).contiguous()
    if inputs[0].is_cuda:
        grads, grad_weight, grad_bias = concat_linear_bwd_triton(grad_flat, flat, weight.contiguous(), grad_sums,
                                                                 needs_input_grads, input_grad_sums)
    else:
        K, grads = flat[0].shape[1], [None] * len(inputs)
        for i, start, grad_sum in _wanted(flat, needs_input_grads, input_grad_sums):
            grad = grad_product(grad_sum, grad_flat, weight[:, start:start + K])
            grads[i] = grad.to(flat[i].dtype) if grad is not None else None
        grad_weight = grad_product(grad_sums[0], grad_flat.t(), torch.cat([x.to(weight.dtype) for x in flat], dim=1))
        grad_bias = grad_flat.sum(0)
    return [g.view(x.shape) if g is not None else None for g, x in zip(grads, inputs)], grad_weight, grad_bias


@torch.library.custom_op("trm_fast::concat_linear", mutates_args=())
def concat_linear_op(inputs: List[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return concat_linear_forward(inputs, weight, bias)


@concat_linear_op.register_fake
def _(inputs, weight, bias):
    return inputs[0].new_empty(*inputs[0].shape[:-1], weight.shape[0], dtype=weight.dtype)


@torch.library.custom_op("trm_fast::concat_linear_backward", mutates_args=())
def concat_linear_backward_op(grad_out: torch.Tensor, inputs: List[torch.Tensor],
                              weight: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
    return concat_linear_backward(grad_out, inputs, weight)


@concat_linear_backward_op.register_fake
def _(grad_out, inputs, weight):
    return [torch.empty_like(x) for x in inputs], torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    xs, weight, _ = inputs
    ctx.save_for_backward(*xs, weight)


def _backward(ctx, grad_out):
    *xs, weight = ctx.saved_tensors
    grads, grad_weight, grad_bias = concat_linear_backward_op(grad_out, list(xs), weight)
    return list(grads), grad_weight, grad_bias


concat_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _ConcatLinear(torch.autograd.Function):
    """The eager path: the same forward and backward without the custom-op dispatch."""

    @staticmethod
    def forward(ctx, weight, bias, into, *inputs):
        ctx.save_for_backward(*inputs, weight)
        ctx.grad_sums, ctx.input_grad_sums = grad_sums_of(weight, bias), grad_sums_of(*inputs)
        return concat_linear_forward(inputs, weight, bias, into[0])

    @staticmethod
    def backward(ctx, grad_out):
        *xs, weight = ctx.saved_tensors
        grads, grad_weight, grad_bias = concat_linear_backward(grad_out, xs, weight, ctx.grad_sums,
                                                               ctx.needs_input_grad[3:], ctx.input_grad_sums)
        return (grad_weight, grad_bias, None, *grads)


def concat_linear(inputs: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The TinyNet op: `cat(inputs, -1) @ weight.T + bias` (Triton on CUDA, torch elsewhere), computed in the
    weight's dtype, or under autocast in the autocast dtype (the inputs are cast as the kernel loads them); written
    into `out` (contiguous, in that dtype: a JoinedRows slot, trm_fast.grad_sums) where given."""
    weight, bias = autocast_cast(weight, bias)
    if torch.compiler.is_compiling():
        return concat_linear_op(list(inputs), weight, bias)
    return _ConcatLinear.apply(weight, bias, (out,), *inputs)  # (out not an input of the autograd graph)

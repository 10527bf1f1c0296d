"""`trm_fast::act_labels`: the seed's ACT labels of a supervision step, per sequence whether the share of its
tokens (attention_mask != 0) whose argmax is their target reaches `threshold` (all of them at 1.0 or more), as float32
[B, 1]. The seed's torch steps take ~12 small kernels a step (an and, casts, sums, a clamp, a division, a compare);
here one program per sequence counts both and compares (IEEE division, as torch's).
"""
import torch
import triton
import triton.language as tl

from trm_fast import torch_ops


@triton.jit
def _act_labels_kernel(correct_ptr, mask_ptr, labels_ptr, L, stride_c, stride_m, threshold, ALL: tl.constexpr,
                       BLOCK_L: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hits = tl.zeros([], tl.int32)
    valid = tl.zeros([], tl.int32)
    for start in range(0, L, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        inside = cols < L
        counted = tl.load(mask_ptr + b * stride_m + cols, mask=inside, other=0) != 0
        correct = tl.load(correct_ptr + b * stride_c + cols, mask=inside, other=0) != 0
        hits += tl.sum((correct & counted).to(tl.int32), axis=0)
        valid += tl.sum(counted.to(tl.int32), axis=0)
    if ALL:
        label = hits == valid
    else:
        label = tl.math.div_rn(hits.to(tl.float32), tl.maximum(valid, 1).to(tl.float32)) >= threshold
    tl.store(labels_ptr + b, label.to(tl.float32))


def mask_operand(mask: torch.Tensor) -> torch.Tensor:
    """A [B, L] bool or integer tensor as the kernels read it: unit column stride, bool viewed as int8."""
    mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    return mask.view(torch.int8) if mask.dtype == torch.bool else mask


def act_labels_triton(correct: torch.Tensor, attention_mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """The labels [B, 1] float32 of bool correct [B, L] and an integer or bool attention_mask [B, L]."""
    B, L = correct.shape
    correct, mask = mask_operand(correct), mask_operand(attention_mask)
    labels = torch.empty(B, 1, device=correct.device, dtype=torch.float32)
    _act_labels_kernel[(B,)](correct, mask, labels, L, correct.stride(0), mask.stride(0),
                             float(threshold), ALL=threshold >= 1.0, BLOCK_L=min(1024, triton.next_power_of_2(L)))
    return labels


def _check(correct, attention_mask):
    if correct.dim() != 2 or correct.dtype != torch.bool:
        raise ValueError(f"act_labels: correct must be a bool [B, L] tensor, got {correct.dtype} "
                         f"{tuple(correct.shape)}")
    if attention_mask.shape != correct.shape or attention_mask.device != correct.device or \
            attention_mask.is_floating_point():
        raise ValueError(f"act_labels: attention_mask must be an integer or bool {tuple(correct.shape)} tensor on "
                         f"{correct.device}, got {attention_mask.dtype} {tuple(attention_mask.shape)} on "
                         f"{attention_mask.device}")


def act_labels_forward(correct, attention_mask, threshold: float) -> torch.Tensor:
    """Triton on CUDA, the seed's torch steps elsewhere."""
    _check(correct, attention_mask)
    if correct.is_cuda:
        return act_labels_triton(correct, attention_mask, threshold)
    return torch_ops.act_labels(correct, attention_mask, threshold)


@torch.library.custom_op("trm_fast::act_labels", mutates_args=())
def act_labels_op(correct: torch.Tensor, attention_mask: torch.Tensor, threshold: float) -> torch.Tensor:
    return act_labels_forward(correct, attention_mask, threshold)


@act_labels_op.register_fake
def _(correct, attention_mask, threshold):
    return correct.new_empty(correct.shape[0], 1, dtype=torch.float32)


def act_labels(correct: torch.Tensor, attention_mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """The op table's ACT labels (the signature of `torch_ops.act_labels`); no gradient."""
    if torch.compiler.is_compiling():
        return act_labels_op(correct, attention_mask, threshold)
    return act_labels_forward(correct, attention_mask, threshold)

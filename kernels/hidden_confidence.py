"""Max softmax probability of `hidden @ weight.T` per row in one launch, without the logits: each program
takes BLOCK_M rows, computes their logits tile by tile over the vocabulary (dot products accumulated in
float32 on tensor cores for bf16 / fp16 inputs) and keeps an online max and sum. The same numbers as the
extension's `trm_fast::hidden_confidence` (an ATen composite of ~12 launches and a float32 matmul), for early
exit's routing on CUDA.
"""
import torch
import triton
import triton.language as tl

from trm_fast.kernels.matmul import dot_config, tile_configs

_TILES = tile_configs(("BLOCK_M", "BLOCK_V", "BLOCK_D"), [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 4, 3),
                                                         (32, 64, 128, 4, 3)], (16, 16, 16, 4, 1))


@triton.autotune(configs=_TILES, key=["D", "V"])
@triton.jit
def _hidden_confidence_kernel(h_ptr, w_ptr, out_ptr, M, D, V, stride_h, stride_w, PRECISION: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        logits = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            h = tl.load(h_ptr + rows[:, None] * stride_h + dims[None, :], mask=(rows[:, None] < M) & (dims[None, :] < D),
                        other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_w + dims[None, :], mask=(cols[:, None] < V) & (dims[None, :] < D),
                        other=0.0)
            logits = tl.dot(h, tl.trans(w), logits, input_precision=PRECISION)
        logits = tl.where(cols[None, :] < V, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        row_max = new_max
    tl.store(out_ptr + rows, 1.0 / row_sum, mask=rows < M)


def hidden_confidence_triton(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 [N] for hidden [N, D] (unit column stride) and weight [V, D] of one dtype."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.size(1) != weight.size(1) or weight.size(0) == 0:
        raise ValueError(f"hidden_confidence: hidden [N, D] and weight [V, D] with V > 0 must agree, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("hidden_confidence: hidden and weight must share a dtype and have unit column stride")
    M, D = hidden.shape
    out = torch.empty(M, device=hidden.device, dtype=torch.float32)
    _hidden_confidence_kernel[lambda m: (triton.cdiv(M, m["BLOCK_M"]),)](
        hidden, weight, out, M, D, weight.size(0), hidden.stride(0), weight.stride(0),
        PRECISION=dot_config(hidden.dtype)[1])
    return out

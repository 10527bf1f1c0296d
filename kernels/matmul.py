"""One strided Triton matmul with fused epilogues, shared by the TinyNet kernels' forward and backward.

`matmul_into(a, b, out, ...)`: out = epilogue(a @ b) for 2-D tensors of any strides (transposes and column
blocks are views), float32 accumulation. Epilogues: add a bias; add a bias then exact (erf) GELU, keeping
the pre-activation; multiply by GELU'(pre-activation) (the FFN backward).
"""
import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
NONE, BIAS, BIAS_GELU, GELU_GRAD = 0, 1, 2, 3


@triton.jit
def _gelu_parts(x):
    """(gelu(x), gelu'(x)) for the exact GELU."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return x * cdf, cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                   stride_cm, stride_cn, EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + k[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
    in_range = (rows[:, None] < M) & (cols[None, :] < N)
    aux_offsets = rows[:, None] * N + cols[None, :]  # aux: a contiguous [M, N] tensor
    if EPILOGUE == 1 or EPILOGUE == 2:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 2:
        tl.store(aux_ptr + aux_offsets, acc.to(aux_ptr.dtype.element_ty), mask=in_range)
        acc, _ = _gelu_parts(acc)
    if EPILOGUE == 3:
        _, slope = _gelu_parts(tl.load(aux_ptr + aux_offsets, mask=in_range, other=0.0).to(tl.float32))
        acc *= slope
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=in_range)


def autocast_cast(*tensors: torch.Tensor):
    """The tensors in the autocast dtype when autocast is on for their device (what F.linear would run in)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def matmul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, epilogue: int = NONE,
                bias: torch.Tensor = None, aux: torch.Tensor = None) -> None:
    """out[:] = epilogue(a @ b). BIAS: + bias. BIAS_GELU: aux[:] = a @ b + bias, out = gelu(aux).
    GELU_GRAD: out = (a @ b) * gelu'(aux). `aux` is a contiguous [M, N] tensor."""
    (M, K), N = a.shape, b.shape[1]
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _matmul_kernel[grid](a, b, out, bias if bias is not None else out, aux if aux is not None else out, M, N, K,
                         a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
                         EPILOGUE=epilogue, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)

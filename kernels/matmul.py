"""One strided Triton matmul with fused epilogues, shared by the TinyNet kernels' forward and backward, and
the dtype rules they share.

`matmul_into(a, b, out, ...)`: out = epilogue(a @ b) for 2-D tensors of any strides and dtypes (transposes
and column blocks are views; a and b are cast to the dot dtype as they are loaded, so an fp32 state meets a
bf16 weight without a copy), float32 accumulation. Epilogues: none, or add a bias then exact (erf) GELU, keeping
the pre-activation.

`linear_gelu_into(a, w, bias, out, pre)`: the FFN's first layer, gelu(a @ w.T + bias). On Hopper with 16-bit
weights it runs a persistent kernel on TMA descriptors (a cast to the weights' dtype first), two programs per SM
so that one's GELU epilogue overlaps the other's products; elsewhere the tiled `matmul_into`. At the FFN's shape
(M 8192, N 2048, K 512) on the H100: 50 us, the tiled kernel 65 us, cuBLAS without the epilogue 33 us
(scripts/matmul_variants.py, benchmarks/NOTES.md session 16).

The kernels use it where the output has many rows (8192 tokens): forward projections and input gradients.
Weight gradients (a [N, K] output summed over all tokens: few output tiles, long K) go to cuBLAS, which
splits K; a tiled kernel without split-K left most of the GPU idle there (measured, benchmarks/NOTES.md).

Dots follow PyTorch's float32 matmul precision: with fp32 operands they are IEEE float32 unless
`torch.set_float32_matmul_precision("high")` allows TF32, as cuBLAS would.
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from trm_fast.torch_ops import autocast_dtype

NONE, BIAS_GELU = 0, 1  # BIAS_GELU keeps the pre-activation in `aux` when one is given
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("TRM_FAST_AUTOTUNE", "1") != "0"
TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tile_configs(names, tiles, interpreted):
    """Autotuning configs from tuples (*block sizes named by `names`, num_warps, num_stages): all of `tiles`, the
    first alone with TRM_FAST_AUTOTUNE=0, `interpreted` alone under Triton's interpreter (which would time
    every config on the CPU)."""
    chosen = [interpreted] if INTERPRET else tiles if AUTOTUNE else tiles[:1]
    return [triton.Config(dict(zip(names, t)), num_warps=t[-2], num_stages=t[-1]) for t in chosen]


def tile_grid(M: int, N: int):
    """The launch grid of an [M, N] output in the autotuned config's BLOCK_M x BLOCK_N tiles."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))


def dot_config(dtype: torch.dtype):
    """(Triton dot dtype, input precision) for operands computed in `dtype`."""
    if dtype == torch.float32:
        return tl.float32, "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return TRITON_DTYPES[dtype], "tf32"  # Triton's default; it only matters for fp32 operands


_INTERPRETED = tl.constexpr(INTERPRET)


@triton.jit
def dot_as(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with both operands rounded to DOT_DTYPE. (Triton's interpreter multiplies bf16 operands
    wrongly, so there the rounded values are multiplied in float32, which gives the same products.)"""
    a, b = a.to(DOT_DTYPE), b.to(DOT_DTYPE)
    if _INTERPRETED:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def gelu_parts(x):
    """(gelu(x), gelu'(x)) for the exact GELU."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return x * cdf, cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327


@triton.jit
def _grouped_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of the `tile`-th output tile, walked in column strips GROUP_M tile rows high so
    that tiles running together share their operand tiles in L2."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = tile // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    height = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    within = tile % (GROUP_M * tiles_n)
    return first_m + within % height, within // height


# from scripts/kernel_tiles.py on the H100 (benchmarks/NOTES.md, session 14); a persistent variant (one program
# per SM walking the tiles) was no faster there
@triton.autotune(configs=tile_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), [
    (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 3), (128, 256, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4), (128, 128, 64, 1, 8, 3)], (32, 32, 32, 2, 4, 1)), key=["M", "N", "K", "EPILOGUE"])
@triton.heuristics({"EVEN": lambda args: all(args[d] % args["BLOCK_" + d] == 0 for d in "MNK")})
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                   stride_cm, stride_cn, EPILOGUE: tl.constexpr, HAS_AUX: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   EVEN: tl.constexpr):
    """One output tile per program: the K loop (unmasked when EVEN: M, N, K multiples of the blocks), then the
    epilogue."""
    tile_m, tile_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_tile = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN:
            a, b = tl.load(a_tile), tl.load(b_tile)
        else:
            a = tl.load(a_tile, mask=(rows[:, None] < M) & (ks[None, :] < K - k0), other=0.0)
            b = tl.load(b_tile, mask=(ks[:, None] < K - k0) & (cols[None, :] < N), other=0.0)
        acc = dot_as(a, b, acc, DOT_DTYPE, PRECISION)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk
    in_range = (rows[:, None] < M) & (cols[None, :] < N)
    if EPILOGUE == 1:
        acc, out = _bias_gelu(acc, bias_ptr, cols, N)
        if HAS_AUX:  # aux: a contiguous [M, N] tensor
            tl.store(aux_ptr + rows[:, None] * N + cols[None, :], acc.to(aux_ptr.dtype.element_ty), mask=in_range)
    else:
        out = acc
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, out.to(c_ptr.dtype.element_ty),
             mask=in_range)


@triton.jit
def _bias_gelu(acc, bias_ptr, cols, N):
    """(acc + bias, gelu(acc + bias)) for an accumulator tile of columns `cols`."""
    pre = acc + tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out, _ = gelu_parts(pre)
    return pre, out


@triton.jit
def _store_gelu_half(out_desc, pre_desc, bias_ptr, acc, row, col, N, HAS_PRE: tl.constexpr, HALF: tl.constexpr):
    pre, out = _bias_gelu(acc, bias_ptr, col + tl.arange(0, HALF), N)
    if HAS_PRE:
        pre_desc.store([row, col], pre.to(pre_desc.dtype))
    out_desc.store([row, col], out.to(out_desc.dtype))


@triton.jit
def _linear_gelu_tma_kernel(a_desc, w_desc, out_desc, pre_desc, bias_ptr, M, N, K, HAS_PRE: tl.constexpr,
                            DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr):
    """Persistent: program i computes output tiles i, i + PROGRAMS, ... (the tile loop and the K loop pipelined as
    one), each epilogue stored in two column halves."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    stored = tl.program_id(0) - PROGRAMS  # the epilogue's own tile counter, as in Triton's persistent-matmul tutorial
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
        tile_m, tile_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            acc = dot_as(a_desc.load([tile_m * BLOCK_M, k0]), w_desc.load([tile_n * BLOCK_N, k0]).T, acc, DOT_DTYPE,
                         "tf32")
        stored += PROGRAMS
        tile_m, tile_n = _grouped_tile(stored, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        row, col = tile_m * BLOCK_M, tile_n * BLOCK_N
        _store_gelu_half(out_desc, pre_desc, bias_ptr, left, row, col, N, HAS_PRE, BLOCK_N // 2)
        _store_gelu_half(out_desc, pre_desc, bias_ptr, right, row, col + BLOCK_N // 2, N, HAS_PRE, BLOCK_N // 2)


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages, programs per SM): the fastest of scripts/matmul_variants.py's
# configs on the H100; a small tile under the interpreter
TMA_TILE = (32, 32, 32, 2, 4, 1, 1) if INTERPRET else (128, 128, 64, 8, 8, 3, 2)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return 4 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


def _tma_fits(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can address these 16-bit matrices: contiguous, rows and bases 16-byte aligned, on
    Hopper or newer (or under the interpreter)."""
    if any(t.dtype not in (torch.bfloat16, torch.float16) or not t.is_contiguous() or t.shape[1] % 8 or
           t.data_ptr() % 16 for t in tensors):
        return False
    return INTERPRET or (tensors[0].is_cuda and torch.cuda.get_device_capability(tensors[0].device)[0] >= 9)


def linear_gelu_into(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, out: torch.Tensor,
                     pre: torch.Tensor = None) -> None:
    """out[:] = gelu(a @ w.T + bias) in w's dtype for a [M, K] and w [N, K]; pre[:] = a @ w.T + bias when given
    (out and pre contiguous [M, N])."""
    if a.shape[1] % 8 or not _tma_fits(w, out, *([pre] if pre is not None else [])):
        matmul_into(a, w.t(), out, w.dtype, BIAS_GELU, bias=bias, aux=pre)
        return
    a = a.to(w.dtype).contiguous()
    if a.data_ptr() % 16:
        a = a.clone()
    (M, K), N = a.shape, w.shape[0]
    block_m, block_n, block_k, group_m, warps, stages, per_sm = TMA_TILE
    out_desc = TensorDescriptor.from_tensor(out, [block_m, block_n // 2])
    programs = min(per_sm * _sm_count(a.device), triton.cdiv(M, block_m) * triton.cdiv(N, block_n))
    _linear_gelu_tma_kernel[(programs,)](
        TensorDescriptor.from_tensor(a, [block_m, block_k]), TensorDescriptor.from_tensor(w, [block_n, block_k]),
        out_desc, TensorDescriptor.from_tensor(pre, [block_m, block_n // 2]) if pre is not None else out_desc, bias,
        M, N, K, HAS_PRE=pre is not None, DOT_DTYPE=TRITON_DTYPES[w.dtype], BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP_M=group_m, PROGRAMS=programs, num_warps=warps, num_stages=stages)


def autocast_cast(*tensors: torch.Tensor):
    """The tensors in the autocast dtype when autocast is on for their device (what F.linear would run in)."""
    dtype = autocast_dtype(tensors[0].device.type)
    if dtype is None:
        return tensors
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def matmul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, dot_dtype: torch.dtype, epilogue: int = NONE,
                bias: torch.Tensor = None, aux: torch.Tensor = None) -> None:
    """out[:] = epilogue(a @ b), the dot in `dot_dtype`. BIAS_GELU: out = gelu(a @ b + bias), and aux[:] = a @ b +
    bias (a contiguous [M, N] tensor) when `aux` is given."""
    (M, K), N = a.shape, b.shape[1]
    dtype, precision = dot_config(dot_dtype)
    _matmul_kernel[_matmul_grid(M, N)](a, b, out, bias if bias is not None else out, aux if aux is not None else out,
                                       M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
                                       out.stride(1), EPILOGUE=epilogue, HAS_AUX=aux is not None, DOT_DTYPE=dtype,
                                       PRECISION=precision)


def _matmul_grid(M: int, N: int):
    """One program per output tile (a 1-D grid: _grouped_tile places them)."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

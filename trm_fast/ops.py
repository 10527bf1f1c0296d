"""Ops of the compiled extension `trm_fast._C`, with fake kernels and pure-PyTorch fallbacks.

Every `torch.ops.trm_fast.*` op always exists: from `_C` when it was built (C++ on CPU, CUDA where built
with CUDA), else defined here in Python with the same schema and numbers.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch

try:
    from . import _C  # noqa: F401  (its import registers the trm_fast:: ops)
    EXTENSION_ERROR = None
except ImportError as exc:  # no compiler at install time, or a build for another torch
    EXTENSION_ERROR = ("not built (`pip install -e . --no-build-isolation` builds it)"
                       if importlib.util.find_spec(f"{__package__}._C") is None else f"{type(exc).__name__}: {exc}")


def _token_confidence_torch(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1).amax(dim=-1)


def _route_tokens_torch(confidence: torch.Tensor, active: torch.Tensor,
                        threshold: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    exited = active & (confidence >= threshold)
    keep = active & ~exited
    index = torch.full(keep.shape, -1, dtype=torch.long, device=keep.device)
    kept = keep.nonzero().flatten()
    index[: kept.numel()] = kept
    return exited, index, torch.stack([exited.sum(), keep.sum()])


def _route_rows_torch(confidence: torch.Tensor, rows: torch.Tensor, exited_rows: torch.Tensor,
                      exit_step: torch.Tensor, counts: torch.Tensor, step: torch.Tensor, threshold: float) -> None:
    listed = rows >= 0
    exits = listed & (confidence >= threshold)
    keep = listed & ~exits
    exited_ids, kept_ids = rows[exits], rows[keep]
    exit_step[exited_ids] = step.reshape(())
    for out, ids in ((rows, kept_ids), (exited_rows, exited_ids)):
        out.fill_(-1)
        out[:ids.numel()] = ids
    counts.copy_(torch.tensor([exited_ids.numel(), kept_ids.numel()]))


def _gather_rows_torch(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = src.new_zeros(index.numel(), src.size(1))
    keep = index >= 0
    out[keep] = src[index[keep]]
    return out


def _scatter_rows_torch(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    keep = index >= 0
    dst[index[keep]] = src[keep]


def _hidden_confidence_torch(hidden: torch.Tensor, weight: torch.Tensor, chunk: int) -> torch.Tensor:
    h = hidden.float()
    row_max = torch.full((h.size(0),), float("-inf"), device=h.device)
    row_sum = torch.zeros(h.size(0), device=h.device)
    for start in range(0, weight.size(0), chunk):
        logits = h @ weight[start:start + chunk].float().t()
        new_max = torch.maximum(row_max, logits.amax(dim=1))
        row_sum = row_sum * torch.exp(row_max - new_max) + torch.exp(logits - new_max.unsqueeze(1)).sum(1)
        row_max = new_max
    return row_sum.reciprocal()


def _scaled_product(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale * a @ b in float32 (on CUDA from the operands as they are; the CPU has no float32 output for bf16)."""
    if not a.is_cuda or a.dtype == torch.float32:
        return (a.float() @ b.float()).mul_(scale)
    product = a.new_empty(a.shape[0], b.shape[1], dtype=torch.float32)
    return torch.addmm(product, a, b, out_dtype=torch.float32, beta=0, out=product).mul_(scale)


def lt_matmul_torch(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """lt_matmul's fallback, and the product of operands it is not given (kernels/matmul.py `product`)."""
    if scale is not None:
        return _scaled_product(a, b, scale).to(a.dtype)
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def lt_matmul_into_torch(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool,
                         scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> None:
    """lt_matmul_into's fallback: out in a's dtype, or float32 (on the CPU, which has no float32 output for bf16
    GEMMs, from float32 operands)."""
    dtype, beta = out.dtype, 1 if accumulate else 0
    if bias is not None:
        torch.addmm(bias, a, b, out=out)
    elif scale is not None:
        product = _scaled_product(a, b, scale)
        out.add_(product) if accumulate else out.copy_(product)
    elif dtype == a.dtype:
        torch.addmm(out, a, b, beta=beta, out=out)
    elif a.is_cuda:
        torch.addmm(out, a, b, out_dtype=dtype, beta=beta, out=out)
    else:
        product = a.to(dtype) @ b.to(dtype)
        out.add_(product) if accumulate else out.copy_(product)


FALLBACKS = {"token_confidence": _token_confidence_torch, "route_tokens": _route_tokens_torch,
             "route_rows": _route_rows_torch, "gather_rows": _gather_rows_torch, "scatter_rows": _scatter_rows_torch,
             "hidden_confidence": _hidden_confidence_torch, "lt_matmul": lt_matmul_torch,
             "lt_matmul_into": lt_matmul_into_torch}
DEVICE_AGNOSTIC = {"hidden_confidence"}  # one ATen-composite kernel in _C serves every device
MUTATES = {"scatter_rows": ("dst",), "route_rows": ("rows", "exited_rows", "exit_step", "counts"),
           "lt_matmul_into": ("out",)}


def _has_kernel(name: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"trm_fast::{name}", dispatch_key)


if EXTENSION_ERROR is not None:
    for _name, _fn in FALLBACKS.items():
        torch.library.custom_op(f"trm_fast::{_name}", _fn, mutates_args=MUTATES.get(_name, ()))
    CUDA_FALLBACK = set(FALLBACKS)
else:
    # An extension built without CUDA still serves CUDA tensors, through PyTorch.
    CUDA_FALLBACK = {name for name in FALLBACKS if name not in DEVICE_AGNOSTIC and not _has_kernel(name, "CUDA")}
    for _name in CUDA_FALLBACK:
        torch.library.impl(f"trm_fast::{_name}", "CUDA")(FALLBACKS[_name])


@torch.library.register_fake("trm_fast::token_confidence")
def _token_confidence_fake(logits):
    return logits.new_empty(logits.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("trm_fast::route_tokens")
def _route_tokens_fake(confidence, active, threshold):
    n = confidence.shape[0]
    return active.new_empty(n), active.new_empty(n, dtype=torch.long), active.new_empty(2, dtype=torch.long)


@torch.library.register_fake("trm_fast::route_rows")
def _route_rows_fake(confidence, rows, exited_rows, exit_step, counts, step, threshold):
    return None


@torch.library.register_fake("trm_fast::gather_rows")
def _gather_rows_fake(src, index):
    return src.new_empty(index.shape[0], src.shape[1])


@torch.library.register_fake("trm_fast::scatter_rows")
def _scatter_rows_fake(dst, index, src):
    return None


@torch.library.register_fake("trm_fast::hidden_confidence")
def _hidden_confidence_fake(hidden, weight, chunk):
    return hidden.new_empty(hidden.shape[0], dtype=torch.float32)


@torch.library.register_fake("trm_fast::lt_matmul")
def _lt_matmul_fake(a, b, bias=None, scale=None):
    return a.new_empty(a.shape[0], b.shape[1])


@torch.library.register_fake("trm_fast::lt_matmul_into")
def _lt_matmul_into_fake(out, a, b, accumulate, scale=None, bias=None):
    return None


def _check_product(op: str, a, b, bias=None) -> None:
    for name, t in (("a", a), ("b", b)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or (bias is not None and bias.shape != (b.shape[1],)):
        raise ValueError(f"{op}: expects a [R, K], b [K, N] and bias [N] or None, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)} and {None if bias is None else tuple(bias.shape)}")
    if any(t.dtype != a.dtype or t.device != a.device for t in (b, bias) if t is not None):
        raise ValueError(f"{op}: b and bias must have a's dtype and device ({a.dtype}, {a.device})")


def _check_scale(op: str, scale, a, bias=None) -> None:
    if scale is None:
        return
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.numel() != 1 \
            or scale.device != a.device:
        got = f"{scale.dtype} {tuple(scale.shape)} on {scale.device}" if isinstance(scale, torch.Tensor) else \
            type(scale).__name__
        raise ValueError(f"{op}: scale must be a float32 tensor of one element on {a.device}, got {got}")
    if bias is not None:
        raise ValueError(f"{op}: takes a bias or a scale, not both")


def lt_matmul(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None,
              scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a [R, K] @ b [K, N] (+ bias [N]), in a's dtype; with `scale` (a float32 tensor of one element, no bias)
    scale * a @ b, the scale read by the GEMM on the GPU (no pass of its own, no host read). On CUDA, bf16 / fp16
    operands (each with a unit stride: row- or column-major) go to cuBLASLt with no workspace: the kernels that
    torch.addmm's workspace lets its heuristic pick for the TinyNet's products zero it with a memset first, and the
    GPU then idles a few us; these need none.
    Each shape's path is the fastest of cuBLASLt's candidates and torch's call, timed at its first call
    (csrc/cuda/lt_matmul.cu; TRM_FAST_LT_TUNE=0 keeps the heuristic's first). Anything else, and the CPU, runs
    torch.addmm / torch.mm."""
    _check_product("lt_matmul", a, b, bias)
    _check_scale("lt_matmul", scale, a, bias)
    return torch.ops.trm_fast.lt_matmul(a, b, bias, scale)


def lt_matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False,
                   scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> None:
    """out = a @ b, or out += a @ b when `accumulate`, in place; out [R, N] in a's dtype or float32 (float32
    accumulation either way: the weight gradients' sums), with a unit column stride; the product times `scale`
    where given, as `lt_matmul`'s; or out = a @ b + bias (out in a's dtype, not accumulating: `lt_matmul` into a
    given tensor). cuBLASLt as `lt_matmul`."""
    _check_product("lt_matmul_into", a, b, bias)
    _check_scale("lt_matmul_into", scale, a, bias)
    if bias is not None and (accumulate or out.dtype != a.dtype):
        raise ValueError(f"lt_matmul_into: a bias needs out in a's dtype ({a.dtype}) and accumulate=False")
    if not isinstance(out, torch.Tensor) or out.shape != (a.shape[0], b.shape[1]) or out.device != a.device \
            or out.dtype not in (a.dtype, torch.float32) or (out.numel() and out.stride(-1) != 1):
        got = f"{out.dtype} {tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"lt_matmul_into: out must be [{a.shape[0]}, {b.shape[1]}] in {a.dtype} or float32 on "
                         f"{a.device} with a unit column stride, got {got}")
    torch.ops.trm_fast.lt_matmul_into(out, a, b, bool(accumulate), scale, bias)


def lt_matmul_timings(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      out_dtype: Optional[torch.dtype] = None, accumulate: bool = False) -> list:
    """Microseconds per call of each algorithm cuBLASLt offers without a workspace for lt_matmul / lt_matmul_into
    of these operands (out in `out_dtype`, default a's), the heuristic's first first, then of torch's call (last;
    alone when cuBLASLt does not take them): what the op's first call chooses from. CUDA and the compiled extension
    only (scripts/lt_matmul_bench.py)."""
    _check_product("lt_matmul_timings", a, b, bias)
    if not a.is_cuda or not hasattr(torch.ops.trm_fast, "lt_matmul_timings") or "lt_matmul" in CUDA_FALLBACK:
        raise RuntimeError("lt_matmul_timings: needs CUDA tensors and trm_fast._C built with CUDA")
    return torch.ops.trm_fast.lt_matmul_timings(a, b, bias, out_dtype or a.dtype, bool(accumulate)).tolist()


def hidden_confidence(hidden: torch.Tensor, weight: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Max softmax probability of `hidden @ weight.T` per row ([..., D] -> float32 [...]) without the full
    logits: vocab chunks of `chunk` rows with an online softmax, float32 accumulation."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"hidden_confidence: {name} must be a floating-point tensor")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.size(-1) != weight.size(1) or weight.size(0) == 0:
        raise ValueError(f"hidden_confidence: hidden [..., D] and weight [V, D] with V > 0 must agree, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden_confidence: hidden on {hidden.device}, weight on {weight.device}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"hidden_confidence: chunk must be a positive int, got {chunk!r}")
    flat = hidden.reshape(-1, hidden.size(-1))
    return torch.ops.trm_fast.hidden_confidence(flat, weight, chunk).view(hidden.shape[:-1])


# Every op's input is validated here, before the C++ op runs: on the H100 machine (torch 2.11+cu130) a
# failing TORCH_CHECK inside the extension's CPU kernels (route_tokens, gather_rows) crashed the process with
# a segmentation fault instead of raising; the C++ checks stay as a last line of defence only.
def _check_rows(op: str, table: torch.Tensor, index: torch.Tensor) -> None:
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError(f"{op}: the row table must be a 2-D [N, D] tensor, got "
                         f"{tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__}")
    if not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.dim() != 1:
        got = f"{index.dtype} {tuple(index.shape)}" if isinstance(index, torch.Tensor) else type(index).__name__
        raise TypeError(f"{op}: index must be a 1-D int64 tensor, got {got}")
    if index.device != table.device:
        raise ValueError(f"{op}: rows on {table.device} but index on {index.device}")
    if index.device.type == "cpu" and index.numel() and int(index.max()) >= table.size(0):
        raise IndexError(f"{op}: index {int(index.max())} out of range for {table.size(0)} rows")


def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[len(index), D]: src[index[i]] per row, a zero row where index[i] < 0 (route_tokens' padding).
    Compaction of token states to the active rows. Indices >= N raise IndexError on CPU; on CUDA they are not
    checked (that would cost a host sync): pass route_tokens' output or indices known to be in range."""
    _check_rows("gather_rows", src, index)
    return torch.ops.trm_fast.gather_rows(src, index)


def scatter_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """In place: dst[index[i]] = src[i] where index[i] >= 0. The write-back of compacted rows; src may be a
    column block of a wider tensor (unit column stride: read in place, no copy)."""
    _check_rows("scatter_rows", dst, index)
    if not isinstance(src, torch.Tensor) or src.shape != (index.numel(), dst.size(1)) or src.dtype != dst.dtype \
            or src.device != dst.device:
        raise ValueError(f"scatter_rows: src must be [len(index), D] = {(index.numel(), dst.size(1))} of dst's "
                         f"dtype and device, got {tuple(src.shape) if isinstance(src, torch.Tensor) else src}")
    if not dst.is_contiguous():
        raise ValueError("scatter_rows: dst must be contiguous")
    torch.ops.trm_fast.scatter_rows(dst, index, src)


def token_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Max softmax probability over the last dim, float32 (fp32 accumulation for half/bf16 input)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"token_confidence: logits must be a tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"token_confidence: logits must be floating point, got {logits.dtype}")
    if logits.dim() < 1 or logits.size(-1) == 0:
        raise ValueError(f"token_confidence: logits must be [..., vocab] with vocab > 0, got {tuple(logits.shape)}")
    return torch.ops.trm_fast.token_confidence(logits)


def route_tokens(confidence: torch.Tensor, active: torch.Tensor,
                 threshold: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Early-exit routing of N tokens in one launch, with no host sync.

    Returns `exited` (bool [N]: active and confidence >= threshold), `active_index` (int64 [N]: the
    indices of the tokens still active, ascending, then -1 padding) and `counts` (int64 [2]: exited,
    still active).
    """
    for name, t, dtype in (("confidence", confidence, torch.float32), ("active", active, torch.bool)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"route_tokens: {name} must be a 1-D {dtype} tensor, got {got}")
    if confidence.shape != active.shape or confidence.device != active.device:
        raise ValueError(f"route_tokens: confidence {tuple(confidence.shape)} on {confidence.device} and active "
                         f"{tuple(active.shape)} on {active.device} must match")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"route_tokens: threshold must be in [0, 1], got {threshold!r}")
    return torch.ops.trm_fast.route_tokens(confidence, active, float(threshold))


def route_rows(confidence: torch.Tensor, rows: torch.Tensor, exited_rows: torch.Tensor, exit_step: torch.Tensor,
               counts: torch.Tensor, step: torch.Tensor, threshold: float) -> None:
    """Early-exit routing of the listed rows of a compacted run, in place, in one launch with no host sync.

    `rows` (int64 [M]) lists token ids, ascending, then -1 padding; `confidence` (float32 [M]) holds one value
    per entry. The listed tokens whose confidence reaches `threshold` move to `exited_rows` (int64 [M]) and get
    `exit_step[id] = step` (a one-element int64 tensor); the others stay in `rows`. Both lists keep their order
    and are padded with -1; `counts` (int64 [2]) = [exited, still listed]. Ids >= len(exit_step) raise
    IndexError on CPU and are not checked on CUDA (a host sync), like `gather_rows`."""
    tensors = {"confidence": (confidence, torch.float32), "rows": (rows, torch.long),
               "exited_rows": (exited_rows, torch.long), "exit_step": (exit_step, torch.long),
               "counts": (counts, torch.long), "step": (step, torch.long)}
    for name, (t, dtype) in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dtype != dtype:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"route_rows: {name} must be a {dtype} tensor, got {got}")
    if rows.dim() != 1 or confidence.shape != rows.shape or exited_rows.shape != rows.shape:
        raise ValueError(f"route_rows: rows, confidence and exited_rows must be 1-D of one length, got "
                         f"{tuple(rows.shape)}, {tuple(confidence.shape)}, {tuple(exited_rows.shape)}")
    if exit_step.dim() != 1 or counts.shape != (2,) or step.numel() != 1:
        raise ValueError(f"route_rows: exit_step must be 1-D, counts [2] and step one element, got "
                         f"{tuple(exit_step.shape)}, {tuple(counts.shape)}, {tuple(step.shape)}")
    if any(not t.is_contiguous() for t in (rows, exited_rows, exit_step, counts)):
        raise ValueError("route_rows: rows, exited_rows, exit_step and counts must be contiguous")
    if len({t.device for t, _ in tensors.values()}) != 1:
        raise ValueError("route_rows: all tensors must be on one device")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"route_rows: threshold must be in [0, 1], got {threshold!r}")
    if rows.device.type == "cpu" and rows.numel() and int(rows.max()) >= exit_step.numel():
        raise IndexError(f"route_rows: row {int(rows.max())} out of range for {exit_step.numel()} tokens")
    torch.ops.trm_fast.route_rows(confidence, rows, exited_rows, exit_step, counts, step, float(threshold))


def lt_matmul_untimed_captures() -> int:
    """How many products lt_matmul / lt_matmul_into first met under CUDA graph capture with tuning on: each ran
    the heuristic's first algorithm there, untimed (none where every product ran before its capture, as
    GraphedTrainStep's and GraphedForward's warm-ups make sure). 0 without the CUDA extension."""
    op = getattr(torch.ops.trm_fast, "lt_matmul_untimed_captures", None)
    return int(op()) if op is not None else 0


def extension_status() -> str:
    if EXTENSION_ERROR is not None:
        return f"not loaded, pure-PyTorch fallback ({EXTENSION_ERROR})"
    return f"trm_fast._C loaded ({'CPU only' if CUDA_FALLBACK else 'CPU + CUDA'})"


def op_backend(name: str, device: torch.device) -> str:
    if EXTENSION_ERROR is not None or (device.type == "cuda" and name in CUDA_FALLBACK):
        return "pytorch fallback"
    if name in DEVICE_AGNOSTIC:
        return "trm_fast._C (ATen composite)"
    if device.type == "cuda" and name in ("lt_matmul", "lt_matmul_into"):
        untimed = os.environ.get("TRM_FAST_LT_TUNE") == "0" or torch.are_deterministic_algorithms_enabled()
        return "trm_fast._C (CUDA; " + ("cuBLASLt's heuristic's algorithms)" if untimed else
                                         "each shape's algorithm timed at its first call)")
    return "trm_fast._C (CUDA)" if device.type == "cuda" else "trm_fast._C (C++)"

"""Ops of the compiled extension `trm_fast._C`, with fake kernels and pure-PyTorch fallbacks.

Every `torch.ops.trm_fast.*` op always exists: from `_C` when it was built (C++ on CPU, CUDA where built
with CUDA), else defined here in Python with the same schema and numbers.
"""
from __future__ import annotations

import importlib.util
from typing import Tuple

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


FALLBACKS = {"token_confidence": _token_confidence_torch, "route_tokens": _route_tokens_torch}


def _has_kernel(name: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"trm_fast::{name}", dispatch_key)


if EXTENSION_ERROR is not None:
    for _name, _fn in FALLBACKS.items():
        torch.library.custom_op(f"trm_fast::{_name}", _fn, mutates_args=())
    CUDA_FALLBACK = set(FALLBACKS)
else:
    # An extension built without CUDA still serves CUDA tensors, through PyTorch.
    CUDA_FALLBACK = {name for name in FALLBACKS if not _has_kernel(name, "CUDA")}
    for _name in CUDA_FALLBACK:
        torch.library.impl(f"trm_fast::{_name}", "CUDA")(FALLBACKS[_name])


@torch.library.register_fake("trm_fast::token_confidence")
def _token_confidence_fake(logits):
    return logits.new_empty(logits.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("trm_fast::route_tokens")
def _route_tokens_fake(confidence, active, threshold):
    n = confidence.shape[0]
    return active.new_empty(n), active.new_empty(n, dtype=torch.long), active.new_empty(2, dtype=torch.long)


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
    still active). Inputs are validated here, before the op: on the H100 machine (torch 2.11+cu130,
    2026-11-22) a failing TORCH_CHECK inside the C++ route_tokens kernels crashed the process instead of
    raising, while token_confidence's raised cleanly; the cause is not yet found.
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


def extension_status() -> str:
    if EXTENSION_ERROR is not None:
        return f"not loaded, pure-PyTorch fallback ({EXTENSION_ERROR})"
    return f"trm_fast._C loaded ({'CPU only' if CUDA_FALLBACK else 'CPU + CUDA'})"


def op_backend(name: str, device: torch.device) -> str:
    if EXTENSION_ERROR is not None or (device.type == "cuda" and name in CUDA_FALLBACK):
        return "pytorch fallback"
    return "trm_fast._C (CUDA)" if device.type == "cuda" else "trm_fast._C (C++)"

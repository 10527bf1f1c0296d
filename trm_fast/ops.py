"""Ops of the compiled extension `trm_fast._C`, with fake kernels and a pure-PyTorch fallback.

`torch.ops.trm_fast.token_confidence` always exists: from `_C` when it was built (C++ on CPU, CUDA where
built with CUDA), else defined here in Python with the same schema and numbers.
"""
from __future__ import annotations

import importlib.util

import torch

try:
    from . import _C  # noqa: F401  (its import registers the trm_fast:: ops)
    EXTENSION_ERROR = None
except ImportError as exc:  # no compiler at install time, or a build for another torch
    EXTENSION_ERROR = ("not built (`pip install -e . --no-build-isolation` builds it)"
                       if importlib.util.find_spec(f"{__package__}._C") is None else f"{type(exc).__name__}: {exc}")


def _token_confidence_torch(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1).amax(dim=-1)


def check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"token_confidence: logits must be a tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"token_confidence: logits must be floating point, got {logits.dtype}")
    if logits.dim() < 1 or logits.size(-1) == 0:
        raise ValueError(f"token_confidence: logits must be [..., vocab] with vocab > 0, got {tuple(logits.shape)}")


if EXTENSION_ERROR is not None:
    @torch.library.custom_op("trm_fast::token_confidence", mutates_args=())
    def _token_confidence_fallback(logits: torch.Tensor) -> torch.Tensor:
        return _token_confidence_torch(logits)


def _has_kernel(dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("trm_fast::token_confidence", dispatch_key)


# An extension built without CUDA still serves CUDA tensors, through PyTorch.
CUDA_FALLBACK = EXTENSION_ERROR is None and not _has_kernel("CUDA")
if CUDA_FALLBACK:
    torch.library.impl("trm_fast::token_confidence", "CUDA")(_token_confidence_torch)


@torch.library.register_fake("trm_fast::token_confidence")
def _token_confidence_fake(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(logits.shape[:-1], dtype=torch.float32)


def token_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Max softmax probability over the last dim, float32 (fp32 accumulation for half/bf16 input)."""
    check_logits(logits)
    return torch.ops.trm_fast.token_confidence(logits)


def extension_status() -> str:
    if EXTENSION_ERROR is not None:
        return f"not loaded, pure-PyTorch fallback ({EXTENSION_ERROR})"
    return f"trm_fast._C loaded ({'CPU only' if CUDA_FALLBACK else 'CPU + CUDA'})"


def token_confidence_backend(device: torch.device) -> str:
    if EXTENSION_ERROR is not None or (device.type == "cuda" and CUDA_FALLBACK):
        return "pytorch fallback"
    return "trm_fast._C (CUDA)" if device.type == "cuda" else "trm_fast._C (C++)"

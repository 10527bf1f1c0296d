"""Which implementation runs each op: `kernels="auto" | "torch" | "triton"`, and `kernel_status()`."""
from __future__ import annotations

import contextlib
import functools
import importlib
from types import ModuleType, SimpleNamespace
from typing import Any, Dict, Optional

import torch

from . import torch_ops
from . import ops as extension_ops

KERNEL_CHOICES = ("auto", "torch", "triton")
TINYNET_OPS = ("concat_linear", "causal_attention", "add_layer_norm", "add_layer_norm_and_cast", "feed_forward",
               "linear", "cross_entropy", "head_cross_entropy", "halting_loss", "mean_losses", "embed", "masked_mean",
               "q_head")
DECODE_OPS = ("decode_linear", "decode_add_norm_linear", "decode_ffn_add_norm", "decode_attention",
              "add_layer_norm_into", "decode_append", "decode_pool", "decode_select", "decode_emit")


def check_kernels_choice(kernels: str) -> str:
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    return kernels


@functools.lru_cache(maxsize=None)
def triton_tinynet_ops() -> tuple[Optional[ModuleType], str]:
    """(module, note): the Triton TinyNet ops from `trm_fast.kernels`, or None and why not."""
    try:
        import triton
    except ImportError:
        return None, "triton is not installed"
    try:
        module = importlib.import_module("trm_fast.kernels.tinynet")
    except ImportError as exc:
        return None, f"no Triton TinyNet kernels in this build ({exc})"
    if not module.AUTO_ON_CUDA:
        return module, (f"triton {triton.__version__}; TinyNet kernels only with kernels='triton' "
                        "(faster on the H100 only when a step is replayed as a CUDA graph, so 'auto' keeps "
                        "the torch path)")
    return module, f"triton {triton.__version__}"


@functools.lru_cache(maxsize=None)
def decode_ops() -> Any:
    """The incremental decoder's ops: `torch.ops.trm_fast` (Triton on CUDA, PyTorch on CPU) when the
    Triton kernels import, else the torch path."""
    try:
        importlib.import_module("trm_fast.kernels.decode_attention")
        importlib.import_module("trm_fast.kernels.add_layer_norm")
        importlib.import_module("trm_fast.kernels.decode_linear")
        importlib.import_module("trm_fast.kernels.decode_feed_forward")
        importlib.import_module("trm_fast.kernels.decode_step")
    except ImportError:
        return torch_ops
    return torch.ops.trm_fast


@functools.lru_cache(maxsize=None)
def early_exit_kernels() -> SimpleNamespace:
    """The ops of early exit's compacted run: `attention` (`trm_fast::compact_attention`: Triton on CUDA, no
    host sync, when the kernels import; else the torch path, which reads back the widest sequence's query
    count), `syncs(device, head_dim)` (whether `attention` reads back there), and `confidence(hidden, weight)`
    on CUDA (one Triton launch, or the extension's `hidden_confidence`)."""
    try:
        attention = importlib.import_module("trm_fast.kernels.compact_attention")
        confidence = importlib.import_module("trm_fast.kernels.hidden_confidence")
    except ImportError:
        return SimpleNamespace(attention=torch_ops.compact_attention, syncs=lambda device, head_dim: True,
                               confidence=extension_ops.hidden_confidence)
    return SimpleNamespace(attention=torch.ops.trm_fast.compact_attention, syncs=attention.syncs_on,
                           confidence=confidence.hidden_confidence_triton)


def programmatic_launches():
    """The block in which the decode kernels launch with programmatic dependent launch where the GPU has it
    (`kernels/pdl.py`); a no-op on the torch path."""
    if decode_ops() is torch_ops:
        return contextlib.nullcontext()
    return importlib.import_module("trm_fast.kernels.pdl").programmatic_launches()


def tinynet_ops(kernels: str, device: torch.device) -> ModuleType:
    """The op table for TinyNet on `device` under the `kernels` choice."""
    if kernels == "torch":
        return torch_ops
    module, note = triton_tinynet_ops()
    if kernels == "triton":
        if module is None:
            raise RuntimeError(f"kernels='triton' was requested but is not available: {note}; "
                               "use kernels='auto' or 'torch'")
        return module
    return module if module is not None and device.type == "cuda" and module.AUTO_ON_CUDA else torch_ops


def kernel_status(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """What is installed and which implementation each op uses on `device` (default: CUDA if present)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    tinynet_path = "torch" if tinynet_ops("auto", device) is torch_ops else "triton"
    decode_path = "triton" if decode_ops() is not torch_ops and device.type == "cuda" else "torch"
    compact_path = ("triton (steps replayed as CUDA graphs)" if device.type == "cuda"
                    and early_exit_kernels().attention is not torch_ops.compact_attention else "torch")
    pdl = decode_path == "triton" and importlib.import_module("trm_fast.kernels.pdl").active(device)
    return {
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "device": str(device),
        "triton": triton_tinynet_ops()[1],
        "extension": extension_ops.extension_status(),
        "decode_launch": "programmatic dependent launch" if pdl else "plain",
        "ops": {
            **{f"tinynet.{name}": tinynet_path for name in TINYNET_OPS},
            **{f"decode.{name}": decode_path for name in DECODE_OPS},
            "early_exit.compact_attention": compact_path,
            "early_exit.confidence": ("triton" if device.type == "cuda" and early_exit_kernels().confidence
                                      is not extension_ops.hidden_confidence else "hidden_confidence"),
            **{name: extension_ops.op_backend(name, device) for name in extension_ops.FALLBACKS},
        },
    }


def format_kernel_status(status: Dict[str, Any]) -> str:
    lines = [f"torch      {status['torch']}", f"cuda       {status['cuda'] or 'not available'}",
             f"triton     {status['triton']}", f"extension  {status['extension']}",
             f"decode     kernels launched {status['decode_launch']}",
             f"ops on {status['device']}:"]
    lines += [f"  {name:<28} {path}" for name, path in status["ops"].items()]
    return "\n".join(lines)

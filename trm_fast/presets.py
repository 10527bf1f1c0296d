"""Named model sizes and the `create_model` factory."""
from __future__ import annotations

from typing import Any, Dict

from .model import TRMModel
from .reference import TRMConfig

BYTE_VOCAB_SIZE = 259  # the byte-level tokenizer: pad 0, bos 1, eos 2, bytes at offset 3

PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(vocab_size=BYTE_VOCAB_SIZE, d_model=128, n_heads=4, max_seq_len=256),
    "small": dict(vocab_size=BYTE_VOCAB_SIZE, d_model=256, n_heads=8, max_seq_len=512),
    "base": dict(vocab_size=16000, d_model=512, n_heads=8, max_seq_len=512),  # the seed's defaults
}


def preset_config(preset: str = "tiny", **overrides: Any) -> TRMConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return TRMConfig.from_dict({**PRESETS[preset], **overrides})


def create_model(preset: str = "tiny", kernels: str = "auto", **overrides: Any) -> TRMModel:
    """`create_model("small", vocab_size=16000, dropout=0.0)`: a TRMModel of a named size."""
    return TRMModel(preset_config(preset, **overrides), kernels=kernels)

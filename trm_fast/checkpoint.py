"""Checkpoints in the seed's format: {"model", "optimizer", "step", "config"}."""
from __future__ import annotations

import os
import pickle
from typing import Any, Optional

import torch

from .model import TRMModel
from .reference import TRMConfig


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    step: int = 0, **extra: Any) -> None:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
                "step": step, "config": model.config.to_dict(), **extra}, path)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool = True) -> dict:
    """The checkpoint dict, checked for the seed's keys; `config` is returned as a TRMConfig."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"cannot load checkpoint {path} with weights_only={weights_only}: {exc}. "
                         "If you trust the file, pass weights_only=False.") from None
    missing = [key for key in ("model", "config") if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(f"{path} is not a TRM checkpoint: missing keys {missing}")
    config = checkpoint["config"]
    checkpoint["config"] = config if isinstance(config, TRMConfig) else TRMConfig.from_dict(dict(config))
    return checkpoint


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", kernels: str = "auto",
                    weights_only: bool = True, use_ema: bool = False) -> TRMModel:
    """A `TRMModel` with the weights and config of a seed-format checkpoint; `use_ema` takes the EMA
    weights that `trm-fast train` saves beside the trained ones (where the checkpoint has them)."""
    checkpoint = read_checkpoint(path, map_location, weights_only)
    model = TRMModel(checkpoint["config"], kernels=kernels)
    weights = checkpoint.get("ema") if use_ema and checkpoint.get("ema") else checkpoint["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path} does not fit its config: {exc}") from None
    return model.to(map_location) if map_location is not None else model

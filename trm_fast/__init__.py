"""trm_fast: the Generative Tiny Recursion Model with fused kernels, as a drop-in for the seed model."""
from . import reference
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .dispatch import KERNEL_CHOICES, kernel_status
from .early_exit import EarlyExit, calibrate_threshold
from .graphed_forward import GraphedForward
from .graphed_train_step import GraphedTrainStep
from .model import TRMModel
from .ops import route_tokens, token_confidence
from .presets import PRESETS, create_model, preset_config
from .reference import TRMConfig

__version__ = "0.1.0"
__all__ = ["TRMConfig", "TRMModel", "create_model", "preset_config", "PRESETS", "load_checkpoint",
           "read_checkpoint", "save_checkpoint", "kernel_status", "KERNEL_CHOICES", "token_confidence",
           "route_tokens", "reference", "EarlyExit", "calibrate_threshold", "GraphedForward",
           "GraphedTrainStep"]

"""Recursion diagnostics: per supervision step q_hat, confidence, entropy, state norms, and whether the
recursion contracts (how far each latent recursion moves y); model statistics; a JSON report and plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .plot import line_plot


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B]: the mean over the valid (mask = 1) positions of each sequence."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


@torch.no_grad()
def recursion_diagnostics(trace: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                          all_logits: Sequence[torch.Tensor], q_hats: Sequence[torch.Tensor],
                          attention_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sequence diagnostics, each a float32 tensor [steps, B] (token quantities averaged over the valid
    positions). `trace` holds (y_in, y_out, z_out) of every latent recursion in order, deep_steps per
    supervision step.

    q_hat, confidence (max softmax probability), entropy (nats), y_norm / z_norm (L2 per token) per
    supervision step; y_delta: ||y_out - y_in|| of each latent recursion [recursions, B]; contraction:
    y_delta[k] / y_delta[k-1] [recursions - 1, B] (below 1: the recursion contracts).
    """
    steps = len(all_logits)
    per_step = len(trace) // steps
    mask = attention_mask
    probs = [F.softmax(logits.float(), dim=-1) for logits in all_logits]
    y_delta = torch.stack([_token_mean((y_out.float() - y_in.float()).norm(dim=-1), mask)
                           for y_in, y_out, _ in trace])
    ends = [trace[(s + 1) * per_step - 1] for s in range(steps)]
    return {
        "q_hat": torch.stack([q.float().squeeze(-1) for q in q_hats]),
        "confidence": torch.stack([_token_mean(p.amax(dim=-1), mask) for p in probs]),
        "entropy": torch.stack([_token_mean(-(p * p.clamp_min(1e-30).log()).sum(dim=-1), mask) for p in probs]),
        "y_norm": torch.stack([_token_mean(y.float().norm(dim=-1), mask) for _, y, _ in ends]),
        "z_norm": torch.stack([_token_mean(z.float().norm(dim=-1), mask) for _, _, z in ends]),
        "y_delta": y_delta,
        "contraction": y_delta[1:] / y_delta[:-1].clamp_min(1e-30),
    }


def model_statistics(model: torch.nn.Module, seq_len: int | None = None) -> dict:
    """Parameters and the cost of the recursion: TinyNet calls and forward FLOPs per token, per
    supervision step and per forward, for sequences of `seq_len` tokens (default max_seq_len)."""
    cfg = model.config
    params = list(model.parameters())
    D, L = cfg.d_model, seq_len or cfg.max_seq_len
    block = 2 * 3 * D * D + 2 * D * D + 2 * 8 * D * D + 2 * L * D  # QKV, out proj, FFN, causal QK + PV (L/2 keys)
    latent = cfg.latent_steps * (2 * 3 * D * D + 2 * 2 * D * D + 2 * block)  # xyz call + yz call
    step = cfg.deep_steps * latent + 2 * D * cfg.vocab_size  # + the output head
    return {
        "num_parameters": sum(p.numel() for p in params),
        "num_trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "num_layers": 2 * cfg.latent_steps * cfg.deep_steps * cfg.supervision_steps,  # TinyNet calls
        "tinynet_calls_per_step": 2 * cfg.latent_steps * cfg.deep_steps,
        "seq_len": L,
        "flops_per_token_per_step": step,
        "flops_per_token": step * cfg.supervision_steps,
    }


def diagnostics_report(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       out_dir: str | None = None) -> dict:
    """Run a diagnostic forward (eval mode) and return a JSON-ready report: config, statistics and each
    diagnostic averaged over the batch. With out_dir, also write report.json and three plots:
    steps.png (q_hat blue, confidence red, entropy green per supervision step), norms.png (y_norm blue,
    z_norm red) and convergence.png (y_delta per latent recursion blue, contraction red)."""
    was_training = model.training
    model.eval()
    diagnostics = model(input_ids, attention_mask=attention_mask, return_diagnostics=True)["diagnostics"]
    model.train(was_training)
    means: Dict[str, List[float]] = {key: value.mean(dim=1).tolist() for key, value in diagnostics.items()}
    report = {"config": model.config.to_dict(), "statistics": model.get_statistics(input_ids.size(1)),
              "batch": list(input_ids.shape), "diagnostics": means}
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))

        def series(*keys):
            return {key: list(enumerate(means[key], 1)) for key in keys}
        line_plot(str(out / "steps.png"), series("q_hat", "confidence", "entropy"))
        line_plot(str(out / "norms.png"), series("y_norm", "z_norm"))
        line_plot(str(out / "convergence.png"), series("y_delta", "contraction"))
    return report

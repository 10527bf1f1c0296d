"""ASHEM-style training for TRM (SPEC §3): phase 1 trains with fewer supervision steps on every token;
the hard tokens (confidence after those steps below the threshold calibrated to `hard_ratio`) are mined;
phase 2 trains at full depth with the loss on the hard tokens only; evaluation routes tokens with early
exit. TRM shares one TinyNet between its steps, so phase 2 cannot freeze a "shallow part" as ASHEM does
with layers: it fine-tunes the shared weights on the hard tokens (the easy ones' targets are ignored).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional

import torch

from .data import TokenDataset, dataset_batches
from .early_exit import EarlyExit, _confidence, calibrate_threshold, evaluate_early_exit, states_after
from .training import TrainConfig, train


class HardTokenDataset(torch.utils.data.Dataset):
    """The samples of a TokenDataset that have hard tokens, with the pad id as target wherever a token is
    not hard (ignored by the loss)."""

    def __init__(self, dataset: TokenDataset, hard: List[torch.Tensor]):
        self.dataset, self.hard, self.pad_id = dataset, hard, dataset.pad_id
        self.indices = [i for i, mask in enumerate(hard) if bool(mask.any())]  # a sample with none has no loss
        if not self.indices:
            raise ValueError("no hard token was mined: lower the threshold (raise hard_ratio)")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        inputs, targets = self.dataset[self.indices[index]]
        hard = self.hard[self.indices[index]]
        return inputs, torch.where(hard, targets, torch.full_like(targets, self.pad_id))


@torch.no_grad()
def mine_hard_tokens(model, dataset: TokenDataset, threshold: float, steps: int, criterion: str = "max_prob",
                     batch_size: int = 16) -> List[torch.Tensor]:
    """Per sample, a bool [len] mask of the target positions whose confidence after `steps` supervision
    steps is below `threshold`."""
    model.eval()
    device = next(model.parameters()).device
    masks: List[torch.Tensor] = []
    for batch in dataset_batches(dataset, batch_size):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hard = (_confidence(model, states_after(model, ids, mask, steps), criterion) < threshold).cpu()
        masks.extend(row[:int(length)] for row, length in zip(hard, batch["attention_mask"].sum(dim=1)))
    return masks


def ashem_train(model, train_set: TokenDataset, val_set: TokenDataset, phase1: TrainConfig, phase2: TrainConfig,
                hard_ratio: float = 0.5, shallow_steps: int = 1, criterion: str = "max_prob",
                out_dir: Optional[str] = None, log=print) -> Dict:
    """Phase 1, mining, phase 2, then early-exit evaluation on val_set at the threshold calibrated to
    `hard_ratio` after `shallow_steps`. Returns the threshold, the hard fraction mined from the training
    set, and acc / ppl / shallow_ratio / compute_cost with and without exit."""
    if not 1 <= shallow_steps < model.config.supervision_steps:
        raise ValueError(f"shallow_steps must be in [1, supervision_steps={model.config.supervision_steps}), "
                         f"got {shallow_steps}")
    train(model, train_set, val_set, replace(phase1, supervision_steps=shallow_steps),
          out_dir=f"{out_dir}/phase1" if out_dir else None, log=log)
    device = next(model.parameters()).device
    val_batches = [(b["input_ids"].to(device), b["attention_mask"].to(device)) for b in dataset_batches(val_set, 16)]
    threshold = calibrate_threshold(model, val_batches, hard_ratio, criterion, shallow_steps)
    hard = mine_hard_tokens(model, train_set, threshold, shallow_steps, criterion)
    hard_fraction = float(sum(int(h.sum()) for h in hard) / sum(h.numel() for h in hard))
    log(f"ASHEM: threshold {threshold:.4f} (hard_ratio {hard_ratio}), {hard_fraction:.1%} of training tokens hard")
    train(model, HardTokenDataset(train_set, hard), val_set, phase2, out_dir=f"{out_dir}/phase2" if out_dir else None,
          log=log)
    threshold = calibrate_threshold(model, val_batches, hard_ratio, criterion, shallow_steps)
    routed = evaluate_early_exit(model, val_set, EarlyExit(threshold, criterion, shallow_steps))
    full = evaluate_early_exit(model, val_set, EarlyExit(1.0, criterion, shallow_steps))
    return {"threshold": threshold, "hard_fraction": hard_fraction, "early_exit": routed, "no_exit": full}

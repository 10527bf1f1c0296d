"""ASHEM-style two-phase training with hard-token mining, evaluated with early exit."""
import pytest
import torch

import trm_fast
from trm_fast.ashem import HardTokenDataset, ashem_train, mine_hard_tokens
from trm_fast.corpus import default_corpus
from trm_fast.data import ByteTokenizer, TokenDataset
from trm_fast.training import TrainConfig


def _setup():
    torch.manual_seed(0)
    model = trm_fast.TRMModel(trm_fast.TRMConfig(vocab_size=259, d_model=32, n_heads=2, dropout=0.0,
                                                 max_seq_len=32))
    data = TokenDataset(default_corpus()[:20_000].split("\n\n"), ByteTokenizer(), 32, pack=True)
    return model, *data.split(0.2)


def test_ashem_phases_mining_and_routing():
    model, train_set, val_set = _setup()
    phase = TrainConfig(batch_size=8, lr=3e-3, warmup_steps=5, max_steps=30, eval_every=100, ema_decay=0.0)
    result = ashem_train(model, train_set, val_set, phase, phase, hard_ratio=0.5, log=lambda _: None)
    assert 0.3 < result["hard_fraction"] < 0.7  # calibrated on validation, mined on training data
    routed, full = result["early_exit"], result["no_exit"]
    assert routed["shallow_ratio"] == pytest.approx(0.5, abs=0.02)  # calibrated on this very set
    assert routed["compute_cost"] == pytest.approx(1 - routed["shallow_ratio"] / 2)  # 2 supervision steps
    assert full["shallow_ratio"] == 0.0 and full["compute_cost"] == 1.0
    assert routed["ppl"] < 259 and full["ppl"] < 259 and 0 < routed["acc"] <= 1


def test_mining_masks_easy_targets():
    model, train_set, _ = _setup()
    hard = mine_hard_tokens(model, train_set, threshold=0.9, steps=1)
    assert len(hard) == len(train_set) and all(h.shape == train_set[i][1].shape for i, h in enumerate(hard))
    dataset = HardTokenDataset(train_set, hard)
    inputs, targets = dataset[0]
    original = train_set[dataset.indices[0]][1]
    mask = hard[dataset.indices[0]]
    assert torch.equal(targets[mask], original[mask]) and bool((targets[~mask] == 0).all())
    with pytest.raises(ValueError, match="no hard token was mined"):
        HardTokenDataset(train_set, [torch.zeros_like(h) for h in hard])


def test_ashem_argument_errors():
    model, train_set, val_set = _setup()
    with pytest.raises(ValueError, match="shallow_steps must be in \\[1, supervision_steps=2\\)"):
        ashem_train(model, train_set, val_set, TrainConfig(), TrainConfig(), shallow_steps=2)

"""The training loop: schedule, EMA, checkpoints and exact resume, metrics, curve, evaluation numbers."""
import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F

import trm_fast
from trm_fast import reference
from trm_fast.data import ByteTokenizer, TokenDataset, collate_batch
from trm_fast.training import TrainConfig, batch_indices, evaluate, train

TEXT = "the cat sat on the mat. " * 40


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(vocab_size=259, d_model=32, n_heads=2, max_seq_len=16, dropout=0.0, **overrides)
    return trm_fast.TRMModel(trm_fast.TRMConfig(**config))


def _data():
    return TokenDataset([TEXT], ByteTokenizer(), 16, pack=True).split(0.2)


def _quiet(_):
    pass


def test_loss_falls_and_outputs_are_written(tmp_path):
    train_set, val_set = _data()
    config = TrainConfig(batch_size=8, lr=3e-3, warmup_steps=5, max_steps=40, eval_every=20, eval_batches=2,
                         log_every=5)
    result = train(_model(), train_set, val_set, config, out_dir=str(tmp_path), log=_quiet)
    vals = [e["val_loss"] for e in result["history"] if "val_loss" in e]
    assert [e["step"] for e in result["history"] if "val_loss" in e] == [0, 20, 40]
    assert vals[-1] < 0.5 * vals[0] and result["step"] == 40
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(result["history"]))
    lrs = [e["lr"] for e in lines if "lr" in e]
    assert lrs[0] == pytest.approx(3e-3 * 5 / 5 * (1 - 4 / 40))  # step 5: warm-up done, decay by step/max_steps
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    png = (tmp_path / "curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (640, 400)
    checkpoint = trm_fast.read_checkpoint(tmp_path / "checkpoint.pt")
    assert {"model", "optimizer", "step", "config", "ema", "tokenizer"} <= set(checkpoint)
    assert checkpoint["step"] == 40 and checkpoint["tokenizer"] == "byte"
    best = trm_fast.read_checkpoint(tmp_path / "best.pt")
    assert best["step"] == [e["step"] for e in lines if e.get("val_loss") == min(vals)][0]
    ema = trm_fast.load_checkpoint(tmp_path / "checkpoint.pt", use_ema=True)
    assert evaluate(ema, val_set)["loss"] == pytest.approx(vals[-1], rel=1e-5)


@pytest.mark.parametrize("random_windows", [False, True])
def test_resume_continues_exactly(tmp_path, random_windows):
    train_set, _ = _data()
    config = TrainConfig(batch_size=4, lr=1e-3, warmup_steps=2, max_steps=6, eval_every=100, save_every=3,
                         random_windows=random_windows)
    train(_model(), train_set, None, config, out_dir=str(tmp_path / "a"), log=_quiet)
    result = train(_model(seed=5), train_set, None, config, out_dir=str(tmp_path / "b"),
                   resume=str(tmp_path / "a" / "checkpoint-000003.pt"), log=_quiet)
    straight, resumed = (trm_fast.read_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("a", "b"))
    assert result["step"] == resumed["step"] == straight["step"] == 6
    for key in ("model", "ema"):
        for name, value in straight[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)


def test_resume_refuses_another_config(tmp_path):
    train_set, _ = _data()
    train(_model(), train_set, None, TrainConfig(batch_size=4, max_steps=1), out_dir=str(tmp_path), log=_quiet)
    with pytest.raises(ValueError, match=r"its model config differs in \['d_model', 'n_heads'\]"):
        model = trm_fast.TRMModel(trm_fast.TRMConfig(vocab_size=259, d_model=64, n_heads=4, max_seq_len=16,
                                                     dropout=0.0))
        train(model, train_set, None, TrainConfig(max_steps=2), resume=str(tmp_path / "checkpoint.pt"), log=_quiet)


def test_evaluate_equals_cross_entropy_of_the_reference():
    model = _model(seed=3)
    ref = reference.TRMModel(model.config)
    ref.load_state_dict(model.state_dict())
    dataset = TokenDataset(["short", "a longer text here", "mid length"], ByteTokenizer(), 16)
    batch = collate_batch([dataset[i] for i in range(3)], dataset.pad_id)
    with torch.no_grad():
        logits = ref.eval()(batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
    expected = F.cross_entropy(logits.flatten(0, 1), batch["target_ids"].flatten(), ignore_index=0)
    result = evaluate(model, dataset, batch_size=2)
    assert result["tokens"] == int(batch["attention_mask"].sum())
    assert result["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(float(expected)), rel=1e-5)


def test_batch_indices_are_epoch_permutations():
    seen = torch.cat([batch_indices(10, 3, step, seed=1) for step in range(3)])
    assert sorted(seen.tolist()) == sorted(set(seen.tolist())) and len(seen) == 9
    assert torch.equal(batch_indices(10, 3, 4, seed=1), batch_indices(10, 3, 4, seed=1))
    assert not torch.equal(batch_indices(10, 3, 0, seed=1), batch_indices(10, 3, 3, seed=1))


def test_time_budget_stops_the_run():
    train_set, _ = _data()
    result = train(_model(), train_set, None, TrainConfig(batch_size=4, minutes=0.02), log=_quiet)
    assert 1.2 <= result["elapsed"] < 10 and result["step"] > 0


@pytest.mark.parametrize("bad, match", [(dict(batch_size=0), "batch_size must be >= 1"),
                                        (dict(max_steps=0), "must be positive"),
                                        (dict(minutes=-1.0), "must be positive"),
                                        (dict(ema_decay=1.0), "ema_decay must be in"),
                                        (dict(adam_beta2=1.0), "adam_beta2 must be in")])
def test_train_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_adam_beta2_reaches_the_optimizer():
    train_set, _ = _data()
    weights = []
    for beta2 in (0.999, 0.5):
        model = _model()
        train(model, train_set, None, TrainConfig(batch_size=4, max_steps=3, adam_beta2=beta2), log=_quiet)
        weights.append(model.tiny_net.yz_proj.weight.detach().clone())
    assert not torch.allclose(weights[0], weights[1])


def test_curve_axis_labels_use_only_drawable_glyphs():
    from trm_fast.plot import GLYPHS, _label
    assert [_label(v) for v in (2790, 11000, 1.28, -0.5)] == ["2.8k", "11k", "1.28", "-0.5"]
    assert all(set(_label(v)) <= set(GLYPHS) for v in (0, 0.01, 43.8, 999, 1000, 5580, 250000, -12000))

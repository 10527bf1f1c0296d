"""Bad input gets a clear error naming the problem."""
import pytest
import torch

import trm_fast
from parity_helpers import SMALL


@pytest.fixture
def model():
    return trm_fast.TRMModel(trm_fast.TRMConfig(**SMALL))


@pytest.mark.parametrize("ids, error, pattern", [
    (torch.rand(2, 5), TypeError, "integer tensor"),
    (torch.ones(5, dtype=torch.long), ValueError, r"shape \[batch, seq_len\]"),
    (torch.ones(1, 2, 5, dtype=torch.long), ValueError, r"shape \[batch, seq_len\]"),
    (torch.ones(2, 0, dtype=torch.long), ValueError, "both > 0"),
    (torch.full((2, 5), SMALL["vocab_size"]), ValueError, r"outside \[0, vocab_size=61\).*max 61"),
    (torch.full((2, 5), -1), ValueError, "min -1"),
    ([[1, 2, 3]], TypeError, "must be a torch.Tensor"),
])
def test_bad_input_ids(model, ids, error, pattern):
    with pytest.raises(error, match=pattern):
        model(ids)


def test_bad_companions(model):
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="target_ids must have the shape of input_ids"):
        model(ids, target_ids=torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="target_ids has ids outside"):
        model(ids, target_ids=torch.full((2, 5), 99))
    with pytest.raises(ValueError, match="supervision_steps must be a positive int"):
        model(ids, supervision_steps=0)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(vocab_size=0), "vocab_size must be a positive int"),
    (dict(vocab_size=10, d_model=30, n_heads=4), "divisible by n_heads"),
    (dict(vocab_size=10, dropout=1.5), r"dropout must be in \[0, 1\)"),
    (dict(vocab_size=10, pad_token_id=10), r"pad_token_id \(10\) must be in \[0, vocab_size=10\)"),
    (dict(vocab_size=10, eos_token_id=-1), "eos_token_id"),
])
def test_bad_config(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        trm_fast.TRMConfig(**kwargs)


def test_bad_factory_and_kernels():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        trm_fast.create_model("huge")
    with pytest.raises(ValueError, match=r"unknown TRMConfig keys \['layers'\]"):
        trm_fast.create_model("tiny", layers=3)
    with pytest.raises(ValueError, match="kernels must be one of"):
        trm_fast.create_model("tiny", kernels="cuda")
    with pytest.raises(TypeError, match="config must be a TRMConfig"):
        trm_fast.TRMModel({"vocab_size": 10})


def test_triton_request_without_kernels_is_clear(monkeypatch):
    monkeypatch.setattr(trm_fast.dispatch, "triton_tinynet_ops", lambda: (None, "triton is not installed"))
    model = trm_fast.create_model("tiny", kernels="triton")
    with pytest.raises(RuntimeError, match="kernels='triton' was requested but is not available"):
        model(torch.ones(1, 4, dtype=torch.long))


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(prompt_ids=[]), ValueError, "at least one token"),
    (dict(prompt_ids=[1, 99]), ValueError, r"outside \[0, vocab_size=61\): \[99\]"),
    (dict(prompt_ids=[1.5]), TypeError, "sequence of int"),
    (dict(prompt_ids=[1], max_new_tokens=-1), ValueError, "max_new_tokens must be a non-negative int"),
    (dict(prompt_ids=[1], top_p=1.5), ValueError, r"top_p must be in \[0, 1\]"),
    (dict(prompt_ids=[1], top_k=-2), ValueError, "top_k"),
    (dict(prompt_ids=[1], temperature=-1.0), ValueError, "temperature"),
    (dict(prompt_ids=[1], repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(prompt_ids=[1], q_threshold=2.0), ValueError, "q_threshold"),
])
def test_bad_generate_arguments(model, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        model.generate(**kwargs)


def test_generate_zero_new_tokens_returns_prompt(model):
    assert model.generate([4, 5], max_new_tokens=0) == [4, 5]

"""GraphedForward: the model's no-grad forward replayed as a CUDA graph gives the model's outputs."""
import pytest
import torch

import trm_fast
from parity_helpers import random_batch
from trm_fast import GraphedForward


def _model(device="cpu", kernels="auto"):
    torch.manual_seed(0)
    config = trm_fast.TRMConfig(vocab_size=50, d_model=64, n_heads=4, dropout=0.1, supervision_steps=2)
    return trm_fast.TRMModel(config, kernels=kernels).to(device).eval()


def _batch(seed, device="cpu"):
    return random_batch(3, 40, 50, lengths=[40, 30, 40], seed=seed, device=device)


def _assert_same(got, expected, atol=1e-5):
    for key in ("loss", "ce_loss", "act_loss", "logits"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=atol)
    for key in ("all_logits", "q_hats"):
        assert len(got[key]) == len(expected[key])
        for a, b in zip(got[key], expected[key]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


def test_off_cuda_it_calls_the_model():
    model = _model()
    ids, targets = _batch(0)
    with torch.no_grad():
        expected = model(ids, target_ids=targets)
    _assert_same(GraphedForward(model)(ids, target_ids=targets), expected)


def test_capture_and_replay_logic(monkeypatch):
    """The graph bookkeeping, on the CPU with a stand-in graph that reruns the captured function: one graph per
    shape and argument set, inputs copied into its buffers, outputs cloned (or the buffers themselves)."""
    from trm_fast import graphed_forward

    class RerunGraph:
        def __init__(self, fn):
            self.fn = fn
            fn()

        def replay(self):
            self.fn()
    monkeypatch.setattr(graphed_forward, "_graphs_on", lambda device: True)
    monkeypatch.setattr(graphed_forward.cuda_graphs, "capture", lambda fn, pool=None: RerunGraph(fn))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    model = _model()
    graphed = GraphedForward(model)
    for seed in (0, 1):
        ids, targets = _batch(seed)
        with torch.no_grad():
            _assert_same(graphed(ids, target_ids=targets), model(ids, target_ids=targets))
            assert torch.equal(graphed(ids[:2])["logits"], model(ids[:2])["logits"])
            loss = model(ids, target_ids=targets, keep_logits=False)["loss"]
        assert torch.equal(graphed(ids, target_ids=targets, keep_logits=False)["loss"], loss)
    assert len(graphed.graphs) == 3
    kept = graphed(_batch(0)[0])
    graphed(ids)  # a later call leaves the earlier outputs alone
    with torch.no_grad():
        assert torch.equal(kept["logits"], model(_batch(0)[0])["logits"])
    buffers = GraphedForward(model, clone_outputs=False)
    first = buffers(_batch(0)[0])
    second = buffers(ids)  # the q_hats are the graph's outputs; the logits are computed after the replay
    (_, _, graph_outputs, _, _), = buffers.graphs.values()
    assert all(q is state[1] for q, state in zip(second["q_hats"], graph_outputs["states"]))
    with torch.no_grad():
        assert torch.equal(first["logits"], model(_batch(0)[0])["logits"])
        assert torch.equal(second["q_hats"][-1], model(ids)["q_hats"][-1])
    without = buffers(ids, target_ids=targets, keep_logits=False)
    assert buffers(ids, target_ids=targets, keep_logits=False) is without
    with pytest.raises(ValueError, match="outside"):
        graphed(ids + 100)
    model.double()  # reallocated weights: captured again
    graphed(ids.clone())
    assert len(graphed.graphs) == 1


def test_needs_eval_mode_and_the_drop_in():
    model = _model().train()
    with pytest.raises(ValueError, match="eval mode"):
        GraphedForward(model)(_batch(0)[0])
    with pytest.raises(TypeError, match="trm_fast.TRMModel"):
        GraphedForward(trm_fast.reference.TRMModel(model.config))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_replays_equal_the_model(kernels):
    """Capture on the first call, replays with new inputs after it; fp32 and bf16 autocast; the losses without
    logits; a second shape gets its own graph; outputs cloned, or the graph's buffers."""
    pytest.importorskip("triton")
    model = _model("cuda", kernels)
    graphed = GraphedForward(model)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for seed in (0, 1, 2):
            ids, targets = _batch(seed, "cuda")
            with torch.no_grad():
                _assert_same(graphed(ids, target_ids=targets), model(ids, target_ids=targets))
                plain = model(ids, target_ids=targets, keep_logits=False)
            without = graphed(ids, target_ids=targets, keep_logits=False)
            torch.testing.assert_close(without["loss"], plain["loss"], rtol=1e-5, atol=1e-5)
            assert without["logits"] is None and without["all_logits"] == []
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            _assert_same(graphed(ids[:2], target_ids=targets[:2]), model(ids[:2], target_ids=targets[:2]),
                         atol=2e-2)
        assert len(graphed.graphs) == 3
        buffers = GraphedForward(model, clone_outputs=False)
        first, second = (buffers(batch)["q_hats"][-1] for batch in (ids, _batch(5, "cuda")[0]))
        assert first.data_ptr() == second.data_ptr()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bad_input():
    graphed = GraphedForward(_model("cuda"))
    ids, targets = _batch(0, "cuda")
    with pytest.raises(ValueError, match="outside"):
        graphed(ids + 100)
    graphed(ids, target_ids=targets)
    for bad, name in ((dict(input_ids=ids - 100, target_ids=targets), "input_ids"),
                      (dict(input_ids=ids, target_ids=targets + 100), "target_ids")):
        with pytest.raises(ValueError, match=f"{name} has ids outside"):  # the replay's check
            graphed(**bad)
    torch.cuda.synchronize()  # nothing out of range reached a kernel
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        graphed(ids, attention_mask=torch.ones(2, 2, device="cuda"))
    with pytest.raises(ValueError, match="keep_logits=False needs target_ids"):
        graphed(ids, keep_logits=False)

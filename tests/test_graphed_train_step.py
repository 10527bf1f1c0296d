"""GraphedTrainStep: a training step replayed as a CUDA graph trains as the eager step does."""
import copy

import pytest
import torch

import trm_fast
from parity_helpers import random_batch
from trm_fast import GraphedTrainStep, graphed_train_step


def _model(device="cpu", kernels="auto", dropout=0.0):
    torch.manual_seed(0)
    config = trm_fast.TRMConfig(vocab_size=50, d_model=32, n_heads=4, dropout=dropout, supervision_steps=2)
    return trm_fast.TRMModel(config, kernels=kernels).to(device).train()


def _batch(seed, device="cpu"):
    return random_batch(3, 24, 50, lengths=[24, 18, 24], seed=seed, device=device)


def _eager_steps(model, optimizer, batches, max_grad_norm=None, keep_logits=True):
    losses = []
    for ids, targets in batches:
        optimizer.zero_grad(set_to_none=True)
        out = model(ids, target_ids=targets, keep_logits=keep_logits)
        out["loss"].backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        losses.append(out["loss"].detach())
    return losses


def _assert_same_training(model, twin, got_losses, expected_losses):
    torch.testing.assert_close(torch.stack(got_losses), torch.stack(expected_losses), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("keep_logits", [True, False])
def test_off_cuda_it_is_the_eager_step(keep_logits):
    model, batches = _model(), [_batch(0), _batch(1)]
    twin = copy.deepcopy(model)
    step = GraphedTrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-2), max_grad_norm=0.5,
                            keep_logits=keep_logits)
    got = [step(ids, target_ids=targets)["loss"] for ids, targets in batches]
    expected = _eager_steps(twin, torch.optim.AdamW(twin.parameters(), lr=1e-2), batches, 0.5, keep_logits)
    _assert_same_training(model, twin, got, expected)


def test_capture_and_replay_logic(monkeypatch):
    """The graph bookkeeping on the CPU, with a stand-in graph that runs the captured step when replayed (a real
    capture runs nothing): the first call of a shape is a plain step, later calls replay; one graph per shape;
    new inputs are copied in; a float learning rate changed after capture is refused."""
    class RerunGraph:
        def __init__(self, fn):
            self.fn = fn

        def replay(self):
            self.fn()

        def pool(self):
            return None
    monkeypatch.setattr(graphed_train_step, "_graphs_on", lambda device: True)
    monkeypatch.setattr(graphed_train_step.cuda_graphs, "capture", lambda fn, warmups=1, pool=None: RerunGraph(fn))
    monkeypatch.setattr(graphed_train_step.cuda_graphs, "on_side_stream", lambda fn: fn())
    model = _model()
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = GraphedTrainStep(model, optimizer)
    batches = [_batch(0), _batch(1), _batch(2), (_batch(3)[0][:2], _batch(3)[1][:2]), _batch(4)]
    got = [step(ids, target_ids=targets)["loss"] for ids, targets in batches]
    assert len(step.graphs) == 2
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # new state tensors: captured again
    got.append(step(*_batch(5)[:1], target_ids=_batch(5)[1])["loss"])
    assert len(step.graphs) == 1
    expected = _eager_steps(twin, torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9), batches + [_batch(5)])
    _assert_same_training(model, twin, got, expected)
    weights = [p.detach().clone() for p in model.parameters()]
    momenta = [s["momentum_buffer"].clone() for s in optimizer.state.values()]
    ids, targets = _batch(5)
    for bad in (dict(input_ids=ids + 100, target_ids=targets), dict(input_ids=ids, target_ids=targets - 100)):
        with pytest.raises(ValueError, match="outside"):  # a captured shape: the replay's own check, before the update
            step(**bad)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(torch.equal(s["momentum_buffer"], m) for s, m in zip(optimizer.state.values(), momenta))
    optimizer.param_groups[0]["lr"] = 0.01
    with pytest.raises(ValueError, match="learning rate given as a float changed"):
        step(*_batch(5)[:1], target_ids=_batch(5)[1])


def test_rejects_what_it_cannot_replay(monkeypatch):
    model = _model()
    monkeypatch.setattr(graphed_train_step, "_graphs_on", lambda device: True)
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedTrainStep(model, torch.optim.AdamW(model.parameters(), capturable=False))
    monkeypatch.undo()
    with pytest.raises(TypeError, match="trm_fast.TRMModel"):
        GraphedTrainStep(torch.nn.Linear(2, 2), torch.optim.SGD(model.parameters(), lr=0.1))
    step = GraphedTrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ids, targets = _batch(0)
    with pytest.raises(ValueError, match="needs target_ids"):
        step(ids)
    with pytest.raises(ValueError, match="outside"):
        step(ids + 100, target_ids=targets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_cuda_graph_trains_as_the_eager_step(kernels):
    """On CUDA (bf16 autocast, AdamW with a tensor learning rate changed between steps, clipping): the replayed
    steps give the eager steps' losses and weights; with dropout the replays draw fresh masks (losses differ
    between replays of one batch)."""
    model, batches = _model("cuda", kernels), [_batch(i, "cuda") for i in range(4)]
    twin = copy.deepcopy(model)
    untimed = trm_fast.ops.lt_matmul_untimed_captures()

    def optimizer(m):
        return torch.optim.AdamW(m.parameters(), lr=torch.tensor(1e-2, device="cuda"), capturable=True)
    step = GraphedTrainStep(model, opt := optimizer(model), max_grad_norm=1.0)
    twin_opt = optimizer(twin)
    got, expected, lrs = [], [], [1e-2 / (i + 1) for i in range(len(batches))]
    for lr, (ids, targets) in zip(lrs, batches):
        for o in (opt, twin_opt):
            o.param_groups[0]["lr"].fill_(lr)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got.append(step(ids, target_ids=targets)["loss"])
            expected += _eager_steps(twin, twin_opt, [(ids, targets)], 1.0)
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=2e-2, atol=2e-2)
    # every cuBLASLt product of the captured step ran (and was timed) in the plain first step
    assert trm_fast.ops.lt_matmul_untimed_captures() == untimed
    D = model.config.d_model
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        if name.endswith("attn.in_proj_bias"):
            # the key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by a row's
            # scores), so Adam turns its rounding noise into steps of up to lr: bounded, not compared
            assert float((a[D:2 * D] - b[D:2 * D]).detach().abs().max()) <= 2 * sum(lrs)
            a, b = torch.cat([a[:D], a[2 * D:]]), torch.cat([b[:D], b[2 * D:]])
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3, msg=name)
    noisy = _model("cuda", kernels, dropout=0.3)
    noisy_step = GraphedTrainStep(noisy, torch.optim.SGD(noisy.parameters(), lr=0.0))
    ids, targets = batches[0]
    losses = torch.stack([noisy_step(ids, target_ids=targets)["loss"] for _ in range(4)])
    assert len(set(losses.tolist())) == 4, losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_loop_with_cuda_graph_follows_the_eager_loop():
    """trm_fast.training.train(cuda_graph=True) (tensor learning rate on its schedule, clipping, EMA): the same
    losses as the eager loop, step by step."""
    from trm_fast.data import ByteTokenizer, TokenDataset
    from trm_fast.training import TrainConfig, train
    train_set, val_set = TokenDataset(["the cat sat on the mat. " * 60], ByteTokenizer(), 32, pack=True).split(0.2)
    losses = {}
    for graph in (False, True):
        torch.manual_seed(0)
        config = trm_fast.TRMConfig(vocab_size=259, d_model=32, n_heads=4, max_seq_len=32, dropout=0.0)
        model = trm_fast.TRMModel(config, kernels="triton").cuda()
        result = train(model, train_set, val_set, TrainConfig(batch_size=8, lr=3e-3, warmup_steps=3, max_steps=12,
                                                              log_every=1, eval_every=12, cuda_graph=graph),
                       log=lambda _: None)
        losses[graph] = torch.tensor([e["loss"] for e in result["history"] if "loss" in e])
    assert len(losses[True]) == 12
    torch.testing.assert_close(losses[True], losses[False], rtol=2e-2, atol=2e-2)
    assert losses[True][-1] < losses[True][0]

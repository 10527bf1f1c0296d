"""Token-level early exit: the compacted path equals the masked semantics; calibration; bad input."""
import pytest
import torch
import torch.nn.functional as F

import trm_fast
import trm_fast.training
from trm_fast.early_exit import EarlyExit, calibrate_threshold, compacted_early_exit, masked_early_exit


def _model(steps=3, seed=0):
    torch.manual_seed(seed)
    config = trm_fast.TRMConfig(vocab_size=40, d_model=32, n_heads=4, dropout=0.0, supervision_steps=steps)
    return trm_fast.TRMModel(config).eval()


def _ids():
    ids = torch.randint(1, 40, (3, 11), generator=torch.Generator().manual_seed(1))
    ids[1, 7:] = 0  # right padding
    ids[2, :2] = 0  # left padding
    return ids


def _assert_same(a, b):
    scale = float(a["logits"].abs().max())
    torch.testing.assert_close(b["logits"], a["logits"], rtol=1e-5, atol=1e-5 * scale)
    assert torch.equal(a["exit_step"], b["exit_step"])
    assert a["exit_counts"] == b["exit_counts"]
    assert a["shallow_ratio"] == b["shallow_ratio"] and a["compute_cost"] == b["compute_cost"]


@pytest.mark.parametrize("criterion", ["max_prob", "q_head"])
@pytest.mark.parametrize("hard_ratio", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("min_steps", [1, 2])
def test_compacted_equals_masked(criterion, hard_ratio, min_steps):
    model, ids = _model(), _ids()
    threshold = calibrate_threshold(model, [ids], hard_ratio, criterion)
    config = EarlyExit(threshold, criterion, min_steps)
    masked = masked_early_exit(model, ids, config)
    _assert_same(masked, compacted_early_exit(model, ids, config))
    _assert_same(masked, model(ids, early_exit=config))
    counts = masked["exit_counts"]
    assert sum(counts) == int((ids != 0).sum()) and sum(counts[:min_steps - 1]) == 0
    if min_steps == 1:  # the threshold is calibrated at step 1: some tokens exit there, some go on
        assert 0 < counts[0] < sum(counts)


def test_semantics_by_hand():
    """Step-1 exits keep step-1 logits, and with no exit at all the logits are the plain forward's."""
    model, ids = _model(), _ids()
    valid = ids != 0
    none = masked_early_exit(model, ids, EarlyExit(1.0))
    plain = model(ids)
    torch.testing.assert_close(none["logits"][valid], plain["logits"][valid])
    assert none["exit_counts"] == [0, 0, int(valid.sum())] and none["compute_cost"] == 1.0
    assert none["shallow_ratio"] == 0.0 and bool((none["logits"][~valid] == 0).all())
    everyone = compacted_early_exit(model, ids, EarlyExit(0.0))
    torch.testing.assert_close(everyone["logits"][valid], plain["all_logits"][0][valid])
    assert everyone["exit_counts"] == [int(valid.sum()), 0, 0] and everyone["shallow_ratio"] == 1.0
    assert everyone["compute_cost"] == pytest.approx(1 / 3)
    # a frozen token stays visible: the masked result differs from running the active tokens alone
    threshold = calibrate_threshold(model, [ids], 0.5)
    some = masked_early_exit(model, ids, EarlyExit(threshold))
    assert 0 < some["exit_counts"][0] < int(valid.sum())


def test_calibration_is_torch_quantile():
    model, ids = _model(), _ids()
    x = model._embed(ids)
    y, z = model._init_states(x)
    with torch.no_grad():
        _, _, y, _ = model._deep_recursion_step(x, y, z, (ids != 0).long())
        confidence = F.softmax(model.output_head(y), -1).amax(-1)[ids != 0]
    for ratio in (0.0, 0.3, 0.5, 1.0):
        assert calibrate_threshold(model, [ids], ratio) == pytest.approx(float(torch.quantile(confidence, ratio)),
                                                                         rel=1e-6)
    big = torch.rand(17_000_000)
    with pytest.raises(RuntimeError):
        torch.quantile(big, 0.5)  # the limit calibrate_threshold avoids by sorting


def test_ce_loss_with_targets():
    model, ids = _model(), _ids()
    out = model(ids, target_ids=ids, early_exit=EarlyExit(1.0))
    expected = F.cross_entropy(model(ids)["logits"].flatten(0, 1), ids.flatten(), ignore_index=0)
    torch.testing.assert_close(out["ce_loss"], expected)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(threshold=1.5), ValueError, "threshold must be a number in \\[0, 1\\]"),
    (dict(threshold=-0.1), ValueError, "threshold must be a number in \\[0, 1\\]"),
    (dict(threshold="0.5"), ValueError, "threshold must be a number"),
    (dict(threshold=0.5, criterion="entropy"), ValueError, "unknown early-exit criterion 'entropy'"),
    (dict(threshold=0.5, min_steps=0), ValueError, "min_steps must be a positive int"),
])
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        EarlyExit(**kwargs)


def test_bad_inputs():
    model = _model()
    with pytest.raises(TypeError, match="early_exit must be an EarlyExit"):
        compacted_early_exit(model, _ids(), 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        compacted_early_exit(model, torch.zeros(0, 5, dtype=torch.long), EarlyExit(0.5))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.rand(2, 3), early_exit=EarlyExit(0.5))
    with pytest.raises(ValueError, match="hard_ratio must be in \\[0, 1\\]"):
        calibrate_threshold(model, [_ids()], 1.2)
    with pytest.raises(ValueError, match="at least one valid token"):
        calibrate_threshold(model, [], 0.5)


def test_evaluate_early_exit_numbers():
    from trm_fast.data import ByteTokenizer, TokenDataset
    from trm_fast.early_exit import evaluate_early_exit
    torch.manual_seed(0)
    model = trm_fast.TRMModel(trm_fast.TRMConfig(vocab_size=259, d_model=32, n_heads=4, dropout=0.0)).eval()
    dataset = TokenDataset(["the cat sat", "on the mat today", "x"], ByteTokenizer(), 16)
    none = evaluate_early_exit(model, dataset, EarlyExit(1.0), batch_size=2)
    result = trm_fast.training.evaluate(model, dataset, batch_size=2)
    assert none["ppl"] == pytest.approx(result["ppl"], rel=1e-4)
    assert none["shallow_ratio"] == 0.0 and none["compute_cost"] == 1.0
    everyone = evaluate_early_exit(model, dataset, EarlyExit(0.0), batch_size=2)
    assert everyone["shallow_ratio"] == 1.0 and everyone["compute_cost"] == pytest.approx(0.5)
    assert 0.0 <= everyone["acc"] <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("criterion", ["max_prob", "q_head"])
def test_cuda_equals_cpu(criterion):
    """The compacted path on CUDA (fp32, TF32 off) gives the CPU's exits, counts and logits."""
    model, ids = _model(), _ids()
    config = EarlyExit(calibrate_threshold(model, [ids], 0.5, criterion), criterion)
    cpu = compacted_early_exit(model, ids, config)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gpu = compacted_early_exit(model.cuda(), ids.cuda(), config)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    _assert_same(cpu, {k: v.cpu() if torch.is_tensor(v) else v for k, v in gpu.items()})


def _compact_case(B, L, H, Dh, dtype=torch.float32, device="cpu", padding=5):
    """Queries of a random subset of valid tokens (as route_tokens lists them, with `padding` -1 entries) over
    a key / value table of every token, with left and right padding."""
    g = torch.Generator().manual_seed(B * L + Dh)
    key_valid = torch.ones(B, L, dtype=torch.bool)
    key_valid[0, L - 3:] = False
    key_valid[-1, :2] = False
    listed = (key_valid.flatten() & (torch.rand(B * L, generator=g) < 0.6)).nonzero().flatten()
    rows = torch.cat([listed, torch.full((padding,), -1)])
    starts = torch.searchsorted(torch.where(rows >= 0, rows, B * L), torch.arange(B + 1) * L)
    q = torch.randn(rows.numel(), 3 * H * Dh, generator=g)[:, : H * Dh]  # a strided view, as in the model
    kv = torch.randn(B * L, 2 * H * Dh, generator=g)
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), kv.to(dtype=dtype, **to), rows.to(**to), starts.to(**to),
            key_valid.to(**to))


def _compact_attention_by_hand(q, kv, rows, key_valid, H):
    B, L = key_valid.shape
    D = q.size(1)
    out = torch.zeros(q.shape, dtype=torch.float64)
    keys, values = kv.double().view(B * L, 2, H, D // H).unbind(1)
    for i, row in enumerate(rows.tolist()):
        if row < 0:
            continue
        b, pos = divmod(row, L)
        allowed = key_valid[b, : pos + 1].nonzero().flatten() + b * L
        scores = torch.einsum("hd,khd->hk", q[i].double().view(H, -1), keys[allowed]) / (D // H) ** 0.5
        out[i] = torch.einsum("hk,khd->hd", scores.softmax(-1), values[allowed]).flatten()
    return out


@pytest.mark.parametrize("B, L, H, Dh, padding", [(3, 37, 2, 16, 5), (2, 70, 4, 32, 5), (1, 9, 1, 64, 70)])
def test_compact_attention(B, L, H, Dh, padding):
    """Against float64 by hand, the padding rows zero (also where they outnumber a program row's tiles)."""
    from trm_fast import torch_ops
    kernels = pytest.importorskip("trm_fast.kernels.compact_attention")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, kv, rows, starts, key_valid = _compact_case(B, L, H, Dh, device=device, padding=padding)
    expected = _compact_attention_by_hand(q.cpu(), kv.cpu(), rows.cpu(), key_valid.cpu(), H)
    for out in (kernels.compact_attention_triton(q, kv, rows, starts, key_valid, H),
                torch_ops.compact_attention(q, kv, rows, starts, key_valid, H),
                torch.ops.trm_fast.compact_attention(q, kv, rows, starts, key_valid, H)):
        torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-4, atol=1e-5)
    torch.library.opcheck(torch.ops.trm_fast.compact_attention, (q, kv, rows, starts, key_valid, H))


def test_compact_attention_rejects_bad_input():
    pytest.importorskip("trm_fast.kernels.compact_attention")
    q, kv, rows, starts, key_valid = _compact_case(2, 8, 2, 16)
    op = torch.ops.trm_fast.compact_attention
    with pytest.raises(ValueError, match="key_valid must be a bool"):
        op(q, kv, rows, starts, key_valid.long(), 2)
    with pytest.raises(ValueError, match="kv must be a contiguous"):
        op(q, kv[:, :-2], rows, starts, key_valid, 2)
    with pytest.raises(ValueError, match="starts must be int64 \\[3\\]"):
        op(q, kv, rows, starts[:-1], key_valid, 2)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        op(q, kv, rows, starts, key_valid, 3)


def test_compact_index():
    from trm_fast.early_exit import compact_index
    mask = torch.tensor([False, True, True, False, True, False])
    out = torch.empty(6, dtype=torch.long)
    compact_index(mask, out)
    assert out.tolist() == [1, 2, 4, -1, -1, -1]
    compact_index(torch.zeros(6, dtype=torch.bool), out)
    assert out.tolist() == [-1] * 6


@pytest.mark.parametrize("row_multiple", [4, 64])
def test_compacted_with_padded_row_lists(row_multiple):
    """Row lists padded with -1 (as the CUDA-graph runs pad them to a captured size) change nothing: some
    tokens exiting, every token exiting at step 2 (no step runs after it), none exiting."""
    from trm_fast.early_exit import _run_for
    model, ids = _model(), _ids()
    _run_for(model, *ids.shape).row_multiple = row_multiple
    for config in (EarlyExit(calibrate_threshold(model, [ids], 0.5)), EarlyExit(0.0, min_steps=2), EarlyExit(1.0)):
        expected = masked_early_exit(model, ids, config)
        _assert_same(expected, compacted_early_exit(model, ids, config))
    assert expected["exit_counts"] == [0, 0, int((ids != 0).sum())]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("criterion, min_steps, kernels", [("max_prob", 1, "auto"), ("q_head", 2, "auto"),
                                                             ("max_prob", 1, "triton")])
def test_cuda_graph_runs_equal_cpu(criterion, min_steps, kernels):
    """On CUDA with the Triton attention, steps and exits are captured graphs: the first call (eager run +
    capture) and a replayed second call give the CPU's results, on the model's TinyNet ops."""
    from trm_fast.early_exit import _run_for
    torch.manual_seed(0)
    config = trm_fast.TRMConfig(vocab_size=50, d_model=64, n_heads=4, dropout=0.0, supervision_steps=4)
    model = trm_fast.TRMModel(config, kernels=kernels).eval()
    ids = torch.randint(1, 50, (3, 150), generator=torch.Generator().manual_seed(2))
    ids[0, 140:] = 0
    ids[2, :5] = 0
    # 0.4993: a threshold between two tokens' confidences, so that no token sits on it (CPU and CUDA round apart)
    exit_config = EarlyExit(calibrate_threshold(model, [ids], 0.4993, criterion, min_steps), criterion, min_steps)
    cpu = compacted_early_exit(model, ids, exit_config)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model.cuda()
        first = compacted_early_exit(model, ids.cuda(), exit_config)
        assert _run_for(model, *ids.shape).graphs, "no CUDA graph was captured"
        second = compacted_early_exit(model, ids.cuda(), exit_config)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for gpu in (first, second):
        _assert_same(cpu, {k: v.cpu() if torch.is_tensor(v) else v for k, v in gpu.items()})


@pytest.mark.parametrize("N, D, V", [(37, 48, 259), (5, 16, 7), (130, 64, 100)])
def test_hidden_confidence_kernel(N, D, V):
    kernels = pytest.importorskip("trm_fast.kernels.hidden_confidence")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(N)
    hidden, weight = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    expected = torch.softmax(hidden.double() @ weight.double().t(), -1).amax(-1)
    out = kernels.hidden_confidence_triton(hidden.to(device), weight.to(device))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must agree"):
        kernels.hidden_confidence_triton(hidden.to(device), weight[:, :-1].to(device))


def test_runs_are_kept_per_shape_and_dropped_by_reset_state():
    from trm_fast.early_exit import _run_for
    model, ids = _model(), _ids()
    config = EarlyExit(calibrate_threshold(model, [ids], 0.5))
    first = compacted_early_exit(model, ids, config)
    run = _run_for(model, *ids.shape)
    _assert_same(first, compacted_early_exit(model, ids, config))  # buffers reused: the same results again
    assert _run_for(model, *ids.shape) is run
    _assert_same(masked_early_exit(model, ids[:2], config), compacted_early_exit(model, ids[:2], config))
    assert _run_for(model, *ids[:2].shape) is not run  # another shape: new buffers, the old ones dropped
    model.reset_state()
    assert "_early_exit_runs" not in model.__dict__

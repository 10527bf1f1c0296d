"""The drop-in TRMModel against the reference (the seed restated): outputs, gradients, generation."""
import pytest
import torch

from parity_helpers import DEVICES, SMALL, make_pair, random_batch



def assert_close_rel(actual, expected, tol=1e-6, msg=""):
    """‖actual − expected‖ / ‖expected‖ ≤ tol (float64 norms); shapes and dtypes must match."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, msg
    assert actual.isfinite().all(), f"{msg}: non-finite values"
    err = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)
    assert err <= tol, f"{msg}: relative error {err:.3g} > {tol:g}"


def run_both(ref, fast, *args, **kwargs):
    return ref(*args, **kwargs), fast(*args, **kwargs)


def assert_outputs_equal(out_ref, out_fast):
    for key in ("loss", "ce_loss", "act_loss", "logits"):
        if out_ref[key] is None:
            assert out_fast[key] is None, key
        else:
            assert_close_rel(out_fast[key], out_ref[key], msg=key)
    assert len(out_fast["all_logits"]) == len(out_ref["all_logits"])
    for i, (a, b) in enumerate(zip(out_fast["all_logits"] + out_fast["q_hats"],
                                   out_ref["all_logits"] + out_ref["q_hats"])):
        assert_close_rel(a, b, msg=f"all_logits + q_hats [{i}]")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", [None, [12, 7, 1]])
@pytest.mark.parametrize("act_threshold", [0.95, 1.0, 0.0])
def test_forward_outputs_equal(lengths, act_threshold, device):
    ref, fast = make_pair(act_threshold=act_threshold, device=device)
    ids, targets = random_batch(3, 12, SMALL["vocab_size"], lengths, device=device)
    out_ref, out_fast = run_both(ref, fast, ids, target_ids=targets)
    assert out_ref["loss"].isfinite()
    assert len(out_ref["all_logits"]) == 2 and out_ref["q_hats"][0].shape == (3, 1)
    assert_outputs_equal(out_ref, out_fast)


def test_forward_without_targets_and_step_override(pair):
    ref, fast = pair
    ids, _ = random_batch(2, 9, SMALL["vocab_size"])
    out_ref, out_fast = run_both(ref, fast, ids, supervision_steps=3)
    assert out_ref["loss"] is None and len(out_ref["all_logits"]) == 3
    assert_outputs_equal(out_ref, out_fast)


def test_explicit_attention_mask(pair):
    ref, fast = pair
    ids, targets = random_batch(2, 10, SMALL["vocab_size"])
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding by mask alone: ids there are not the pad id
    assert_outputs_equal(*run_both(ref, fast, ids, attention_mask=mask, target_ids=targets))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", [None, [10, 4]])
def test_gradients_equal(lengths, device):
    ref, fast = make_pair(seed=3, device=device)
    ids, targets = random_batch(2, 10, SMALL["vocab_size"], lengths, device=device)
    ref(ids, target_ids=targets)["loss"].backward()
    fast(ids, target_ids=targets)["loss"].backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad is not None, name
        assert_close_rel(p.grad, grads_ref[name].grad, tol=3e-6, msg=name)
    assert grads_ref["tiny_net.block.attn.in_proj_weight"].grad.abs().sum() > 0


def test_truncated_gradient_only_last_deep_step():
    """Only the last latent recursion of each deep step records a graph: deep_steps changes no grad path."""
    ref, fast = make_pair(deep_steps=3)
    ids, targets = random_batch(2, 8, SMALL["vocab_size"])
    assert_outputs_equal(*run_both(ref, fast, ids, target_ids=targets))


def test_train_mode_dropout_zero_equal(pair):
    ref, fast = pair
    ref.train(), fast.train()
    ids, targets = random_batch(2, 8, SMALL["vocab_size"])
    assert_outputs_equal(*run_both(ref, fast, ids, target_ids=targets))


def test_eval_mode_equal_with_dropout_configured():
    ref, fast = make_pair(dropout=0.3)
    ref.eval(), fast.eval()
    ids, targets = random_batch(2, 8, SMALL["vocab_size"], [8, 5])
    assert_outputs_equal(*run_both(ref, fast, ids, target_ids=targets))


def test_left_padding_reference_nan_dropin_finite(pair):
    """A query with no valid key: the seed's attention gives NaN; the drop-in stays finite and leaves
    the sequences without such rows exactly as the reference computes them."""
    ref, fast = pair
    ids, _ = random_batch(2, 8, SMALL["vocab_size"])
    ids[0, :3] = 0  # left padding in row 0 only
    out_ref, out_fast = run_both(ref, fast, ids)
    assert out_ref["logits"][0].isnan().any()
    assert out_fast["logits"].isfinite().all()
    assert_close_rel(out_fast["logits"][1], out_ref["logits"][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q_threshold", [None, 0.7, 0.0])
def test_greedy_generation_identical(q_threshold, device):
    ref, fast = make_pair(seed=5, supervision_steps=3, device=device)
    prompt = [5, 9, 2, 33, 7]
    # 30 new tokens go past max_seq_len=24: the positional table grows in both models.
    kwargs = dict(max_new_tokens=30, top_k=1, q_threshold=q_threshold)
    torch.manual_seed(0)
    out_ref = ref.generate(prompt, **kwargs)
    torch.manual_seed(0)
    out_fast = fast.generate(prompt, **kwargs)
    assert out_fast == out_ref
    assert out_ref[:5] == prompt and len(out_ref) == 35  # no pad sampled: all 30 tokens generated
    assert ref.config.max_seq_len == fast.config.max_seq_len == 34  # grown to the longest input


def test_sampled_generation_identical_with_same_seed(pair):
    ref, fast = pair
    kwargs = dict(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(7)
    out_ref = ref.generate([3, 4, 5], **kwargs)
    torch.manual_seed(7)
    assert fast.generate([3, 4, 5], **kwargs) == out_ref


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_forward_backward(device):
    """On CUDA the seed's BCE raises under autocast; both models here must train in bf16."""
    ref, fast = make_pair(device=device)
    ids, targets = random_batch(2, 8, SMALL["vocab_size"], device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out_fast = fast(ids, target_ids=targets)
        out_ref = ref(ids, target_ids=targets)
    out_fast["loss"].backward()
    out_ref["loss"].backward()
    assert out_fast["logits"].dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.isfinite().all() for p in fast.parameters())
    assert_close_rel(out_fast["loss"], out_ref["loss"], tol=2e-2)


def test_autocast_casts_each_linear_weight_once_and_grads_flow(monkeypatch):
    """Under autocast a forward casts each linear parameter once (no-grad deep steps and the gradient step share
    the copy) and the gradients through it match the reference's (bf16 tolerance)."""
    from trm_fast.model import DispatchTinyNet
    ref, fast = make_pair()
    casts = []
    real_cast = DispatchTinyNet._cast
    monkeypatch.setattr(DispatchTinyNet, "_cast", staticmethod(lambda p, *rest: casts.append(p) or real_cast(p, *rest)))
    ids, targets = random_batch(2, 8, SMALL["vocab_size"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast(ids, target_ids=targets)["loss"].backward()
        ref(ids, target_ids=targets)["loss"].backward()
    linear_params = [p for name, p in fast.tiny_net.named_parameters() if "ln" not in name]
    assert len(casts) == len(linear_params) == len({id(p) for p in casts})
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        error = float((p_fast.grad - p_ref.grad).norm() / p_ref.grad.norm().clamp(min=1e-12))
        assert error < 5e-2, name


def test_dropin_under_torch_compile(pair):
    """The dispatch layer traces: a compiled drop-in computes what the reference computes."""
    ref, fast = pair
    ids, targets = random_batch(2, 10, SMALL["vocab_size"], [10, 6])
    compiled = torch.compile(fast, backend="aot_eager")
    out = compiled(ids, target_ids=targets)
    assert_outputs_equal(ref(ids, target_ids=targets), out)
    out["loss"].backward()
    assert fast.tiny_net.xyz_proj.weight.grad.abs().sum() > 0

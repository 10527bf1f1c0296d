"""The fused output head + cross-entropy (no [N, vocab] logits) and `model(..., keep_logits=False)`."""
import pytest
import torch
import torch.nn.functional as F

from parity_helpers import make_pair, random_batch
from trm_fast.linear_cross_entropy import linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 4096, None])
def test_matches_cross_entropy_of_the_logits(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[:5] = 0  # ignored
    loss, correct = linear_cross_entropy(hidden, weight, targets, ignore_index=0, chunk=chunk)
    (loss * 3).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.t()
    expected = F.cross_entropy(logits, targets, ignore_index=0)
    (expected * 3).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(correct, logits.argmax(-1) == targets)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-6)


def test_no_grad_computes_the_loss_only():
    hidden, weight = torch.randn(6, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    targets = torch.randint(0, 5, (6,))
    with torch.no_grad():
        loss, _ = linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), targets))
    assert not loss.requires_grad


def test_all_ignored_gives_nan_like_cross_entropy():
    loss, _ = linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), 0)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(torch.randn(3, 5), torch.zeros(3, dtype=torch.long),
                                                             ignore_index=0))


def test_bad_input():
    with pytest.raises(ValueError, match="must agree"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be int64"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="chunk must be None or a positive int"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), chunk=0)


def test_model_without_logits_equals_the_seed_losses_and_gradients():
    ref, fast = make_pair()
    ids, targets = random_batch(3, 11, 61, lengths=[11, 7, 3])
    expected = ref(ids, target_ids=targets)
    got = fast(ids, target_ids=targets, keep_logits=False)
    assert got["logits"] is None and got["all_logits"] == []
    for key in ("loss", "ce_loss", "act_loss"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(got["q_hats"], expected["q_hats"]):
        torch.testing.assert_close(a, b)
    expected["loss"].backward()
    got["loss"].backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    with pytest.raises(ValueError, match="keep_logits=False needs target_ids"):
        fast(ids, keep_logits=False)

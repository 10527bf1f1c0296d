"""trm_fast.grad_sums: parameter gradients summed in float32 by the ops, over uses of one cast copy or alias."""
import pytest
import torch
import torch.nn.functional as F

from parity_helpers import DEVICES
from trm_fast.grad_sums import GradSum, cast_summing_grads, params_summing_grads, shared_grad_sum, summing_grads
from trm_fast.kernels.linear import linear
from trm_fast.kernels.residual_layer_norm import add_layer_norm


def _two_uses(w, b, x):
    """linear(linear(x, w, b), w, b): two uses of the weight and bias (bf16 math, float32 result)."""
    return linear(linear(x, w, b), w, b).float()


@pytest.mark.parametrize("device", DEVICES)
def test_grad_sums_match_autograd_and_keep_one_pass_per_total(device):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, 8, generator=g).to(device).requires_grad_(), torch.randn(8, generator=g).to(device)
    b.requires_grad_()
    x = torch.randn(5, 8, generator=g).bfloat16().to(device).requires_grad_()
    w_plain, b_plain = (t.detach().clone().requires_grad_() for t in (w, b))
    _two_uses(w_plain.bfloat16(), b_plain.bfloat16(), x).sum().backward()  # autograd sums the bf16 gradients
    w16, b16 = cast_summing_grads(w, torch.bfloat16), cast_summing_grads(b, torch.bfloat16)
    out = _two_uses(w16, b16, x).sum()
    assert w16.grad_sum is not None and b16.grad_sum is not None
    # a pass that does not reach the weight must leave nothing behind for the next one
    torch.autograd.grad(out, x, retain_graph=True)
    out.backward(retain_graph=True)
    for p, plain in ((w, w_plain), (b, b_plain)):
        assert p.grad.dtype == torch.float32
        _assert_near(p.grad, plain.grad)
    out.backward()  # a second full pass over the same graph adds the same gradient again
    for p, plain in ((w, w_plain), (b, b_plain)):
        _assert_near(p.grad, 2 * plain.grad)


def _assert_near(got, expected):
    """Within 1% in norm: autograd's sum of the uses' gradients is rounded to bf16, the float32 sum is not."""
    assert float((got - expected.float()).norm() / expected.float().norm()) < 1e-2


def test_uses_that_return_their_gradient_still_count():
    """A use outside the summing ops (plain autograd) is added at the cast."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 8, generator=g).requires_grad_()
    x = torch.randn(5, 8, generator=g).bfloat16()
    w16 = cast_summing_grads(w, torch.bfloat16)
    (linear(x, w16, None).float().sum() + (x @ w16.t()).float().sum()).backward()
    expected = 2 * x.float().sum(0).expand(8, 8)
    torch.testing.assert_close(w.grad, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_params_summed_once_per_pass(device):
    """A LayerNorm's weight, bias and residual bias as aliases sharing one float32 sum (params_summing_grads):
    two uses of the op and one plain-autograd use give autograd's gradients, pass after pass."""
    g = torch.Generator().manual_seed(2)
    h, r = (torch.randn(6, 16, generator=g).to(device).requires_grad_() for _ in range(2))
    params = [torch.randn(16, generator=g).to(device).requires_grad_() for _ in range(3)]
    plain = [p.detach().clone().requires_grad_() for p in params]

    def uses(w, b, rb):
        once = add_layer_norm(h, r, w, b, 1e-5, 0.0, rb)
        return (add_layer_norm(once, r, w, b, 1e-5, 0.0, rb) * h).sum() + F.layer_norm(h, (16,), w, b).square().sum()
    uses(*plain).backward()
    aliases = params_summing_grads(*params)
    assert shared_grad_sum(*aliases) is not None and shared_grad_sum(*aliases[:2]) is None  # all three, in order
    out = uses(*aliases)
    torch.autograd.grad(out, h, retain_graph=True)  # reaches no parameter: leaves no stale total
    out.backward(retain_graph=True)
    for p, q in zip(params, plain):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
    out.backward()
    for p, q in zip(params, plain):
        torch.testing.assert_close(p.grad, 2 * q.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_activation_gradient_summed_in_its_dtype(device):
    """An activation read by a LayerNorm and a linear layer (a TinyNet block's input) as `summing_grads`' alias:
    the LayerNorm's backward hands its gradient over as the sum (bf16), the linear's input-gradient GEMM adds into
    it, and the alias's gradient is that sum: autograd's gradient of the two uses, pass after pass (the second
    pass with a third use outside the ops, whose returned gradient is added)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 6, 16, generator=g).bfloat16().to(device).requires_grad_()
    r = torch.randn(2, 6, 16, generator=g).to(device)
    w, b = torch.randn(24, 16, generator=g).bfloat16().to(device), torch.randn(24, generator=g).bfloat16().to(device)
    ln_w, ln_b = torch.randn(16, generator=g).to(device), torch.randn(16, generator=g).to(device)

    def uses(x, plain_use=False):
        out = add_layer_norm(x, r, ln_w, ln_b, 1e-5, 0.0).sum(-1, keepdim=True) * linear(x, w, b).float()
        return out.square().sum() + (x.float().square().sum() if plain_use else 0.0)
    expected = torch.autograd.grad(uses(h), h)[0]
    alias = summing_grads(h)
    assert alias.grad_sum.dtype == torch.bfloat16
    got = torch.autograd.grad(uses(alias), h)[0]
    assert got.dtype == torch.bfloat16 and alias.grad_sum.total is None  # taken by the alias's backward
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2 * float(expected.abs().max()))
    expected = torch.autograd.grad(uses(h, plain_use=True), h)[0]
    got = torch.autograd.grad(uses(summing_grads(h), plain_use=True), h)[0]
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_band_sums_summed_once_at_take(device):
    """GradSum(band_slots=3): `band_sums` hands out slots of one buffer (then, or for another shape, new tensors),
    whose column sums `add_column_sums` defers to `take` (one reduction): the total of summing each at once. On CUDA
    the first pass over a long tensor goes to a slot too."""
    g = torch.Generator().manual_seed(3)
    grad_sum = GradSum(band_slots=3)
    parts = [torch.randn(4, 6, generator=g).to(device) for _ in range(5)]
    sums = [grad_sum.band_sums(4, 6, parts[0].device) for _ in range(4)] + [
        grad_sum.band_sums(5, 6, parts[0].device)[:4]]
    assert [s._base is grad_sum.bands for s in sums] == [True, True, True, False, False]
    for s, part in zip(sums, parts):
        grad_sum.add_column_sums(s.copy_(part))
    assert grad_sum.bands_used == 3
    torch.testing.assert_close(grad_sum.take(), torch.stack(parts).sum((0, 1)))
    assert grad_sum.bands_used == 0 and grad_sum.take() is None
    long_sum = GradSum(band_slots=2)
    x = torch.randn(1000, 24, generator=g).bfloat16().to(device)
    for _ in range(2):
        long_sum.add_column_sums(x)
    assert long_sum.bands_used == (2 if device == "cuda" else 0)
    torch.testing.assert_close(long_sum.take(), 2 * x.float().sum(0), rtol=1e-5, atol=1e-4)
    long_slots = GradSum(band_slots=2)  # a slot longer than one pass is summed at `take` alone
    slot = long_slots.band_sums(1000, 24, x.device).copy_(x.float())
    long_slots.add_column_sums(slot)
    assert long_slots.bands_used == 1
    torch.testing.assert_close(long_slots.take(), x.float().sum(0), rtol=1e-5, atol=1e-4)

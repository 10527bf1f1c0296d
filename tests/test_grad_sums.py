"""trm_fast.grad_sums: weight gradients summed in float32 by the ops, over uses of one cast copy."""
import pytest
import torch

from parity_helpers import DEVICES
from trm_fast.grad_sums import cast_summing_grads
from trm_fast.kernels.linear import linear


def _two_uses(w, x):
    """x @ w.T @ w.T: two uses of the weight (bf16 math, float32 result)."""
    return linear(linear(x, w, None), w, None).float()


@pytest.mark.parametrize("device", DEVICES)
def test_grad_sums_match_autograd_and_keep_one_pass_per_total(device):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, generator=g).to(device).requires_grad_()
    x = torch.randn(5, 8, generator=g).bfloat16().to(device).requires_grad_()
    w_plain = w.detach().clone().requires_grad_()
    _two_uses(w_plain.bfloat16(), x).sum().backward()  # autograd sums the two bf16 gradients
    w16 = cast_summing_grads(w, torch.bfloat16)
    out = _two_uses(w16, x).sum()
    assert w16.grad_sum is not None
    # a pass that does not reach the weight must leave nothing behind for the next one
    torch.autograd.grad(out, x, retain_graph=True)
    out.backward(retain_graph=True)
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, w_plain.grad.float(), rtol=2e-2, atol=2e-2)
    out.backward()  # a second full pass over the same graph adds the same gradient again
    torch.testing.assert_close(w.grad, 2 * w_plain.grad.float(), rtol=2e-2, atol=2e-2)


def test_uses_that_return_their_gradient_still_count():
    """A use outside the summing ops (plain autograd) is added at the cast."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 8, generator=g).requires_grad_()
    x = torch.randn(5, 8, generator=g).bfloat16()
    w16 = cast_summing_grads(w, torch.bfloat16)
    (linear(x, w16, None).float().sum() + (x @ w16.t()).float().sum()).backward()
    expected = 2 * x.float().sum(0).expand(8, 8)
    torch.testing.assert_close(w.grad, expected, rtol=2e-2, atol=2e-2)

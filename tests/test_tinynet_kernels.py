"""Triton training kernels for TinyNet (issue 3) against float64 PyTorch: forward and every gradient.
CPU: Triton's interpreter runs the launchers (conftest.py); CUDA: the compiled kernels and the ops."""
import pytest
import torch
import torch.nn.functional as F

from parity_helpers import DEVICES

triton = pytest.importorskip("triton")
from trm_fast.kernels import concat_linear as cl  # noqa: E402
from trm_fast.kernels import residual_layer_norm as rln  # noqa: E402

KERNEL_DEVICE = "cuda" if "cuda" in DEVICES else "cpu"


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(KERNEL_DEVICE)


def _double_leaves(*tensors):
    return [t.double().requires_grad_() for t in tensors]


def _close(got, expected, tol=1e-4):
    scale = float(expected.detach().abs().max()) or 1.0
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("num_inputs, M, K, N", [(3, 37, 24, 40), (2, 70, 33, 17), (3, 1, 8, 8)])
def test_concat_linear_kernels(num_inputs, M, K, N):
    xs = [_randn(M, K, seed=i) for i in range(num_inputs)]
    weight, bias, grad_out = _randn(N, num_inputs * K, seed=7), _randn(N, seed=8), _randn(M, N, seed=9)
    out = cl.concat_linear_fwd_triton(xs, weight, bias)
    leaves = _double_leaves(*xs, weight, bias)
    expected = F.linear(torch.cat(leaves[:num_inputs], dim=-1), leaves[-2], leaves[-1])
    (expected * grad_out.double()).sum().backward()
    tol = 1e-4 if KERNEL_DEVICE == "cpu" else 2e-3  # tf32 dots on the GPU
    _close(out, expected.detach(), tol)
    grads, grad_weight, grad_bias = cl.concat_linear_bwd_triton(grad_out, xs, weight)
    for got, leaf in zip(grads + [grad_weight, grad_bias], leaves):
        _close(got, leaf.grad, tol)


@pytest.mark.parametrize("M, N", [(19, 48), (5, 130), (1, 32)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_residual_layer_norm_kernels(M, N, p):
    h, residual, weight, bias, grad_out = (_randn(*shape, seed=i) for i, shape in
                                           enumerate([(M, N), (M, N), (N,), (N,), (M, N)]))
    out, mean, rstd = rln.residual_layer_norm_fwd_triton(h, residual, weight, bias, 1e-5, p, 123)
    grad_h, grad_residual, grad_weight, grad_bias = rln.residual_layer_norm_bwd_triton(
        grad_out, h, residual, weight, mean, rstd, p, 123)
    keep = torch.ones_like(h, dtype=torch.bool) if p == 0 else grad_residual != 0  # the mask the kernels drew
    if p > 0:
        assert abs(1 - float(keep.float().mean()) - p) < 0.15
    leaves = _double_leaves(h, residual, weight, bias)
    expected = F.layer_norm(leaves[0] + leaves[1] * keep / (1 - p), (N,), leaves[2], leaves[3], 1e-5)
    (expected * grad_out.double()).sum().backward()
    _close(out, expected.detach())
    for got, leaf in zip((grad_h, grad_residual, grad_weight, grad_bias), leaves):
        _close(got, leaf.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_autograd_and_opcheck(device):
    """The registered ops (Triton on CUDA, the same math in torch on CPU): values, gradients, opcheck."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 16, generator=g).to(device).requires_grad_() for _ in range(3)]
    weight, bias = torch.randn(8, 48, generator=g).to(device), torch.randn(8, generator=g).to(device)
    torch.library.opcheck(torch.ops.trm_fast.concat_linear.default, (xs, weight.requires_grad_(), bias.requires_grad_()))
    out = cl.concat_linear(xs, weight, bias)
    _close(out, F.linear(torch.cat([x.double() for x in xs], -1), weight.double(), bias.double()), 2e-3)
    h, r = torch.randn(2, 5, 16, generator=g).to(device), torch.randn(2, 5, 16, generator=g).to(device)
    w, b = torch.randn(16, generator=g).to(device), torch.randn(16, generator=g).to(device)
    for p, seed in ((0.0, 0), (0.25, 7)):
        args = (h.requires_grad_(), r.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5, p, seed)
        torch.library.opcheck(torch.ops.trm_fast.add_layer_norm.default, args)
    _close(rln.add_layer_norm(h, r, w, b, 1e-5, 0.0),
           F.layer_norm((h + r).double(), (16,), w.double(), b.double(), 1e-5))


def test_ops_reject_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="expects 2 or 3 inputs"):
        cl.concat_linear([x], torch.randn(3, 8), torch.randn(3))
    with pytest.raises(ValueError, match="every input must be"):
        cl.concat_linear([x, torch.randn(4, 7)], torch.randn(3, 15), torch.randn(3))
    with pytest.raises(ValueError, match=r"weight must be \[N, 2 \* 8\]"):
        cl.concat_linear([x, x], torch.randn(3, 17), torch.randn(3))
    with pytest.raises(ValueError, match="must match the inputs"):
        cl.concat_linear([x, x], torch.randn(3, 16, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="dropout probability must be in"):
        rln.add_layer_norm(x, x, torch.ones(8), torch.zeros(8), 1e-5, 1.0)
    with pytest.raises(ValueError, match="weight and bias must be"):
        rln.add_layer_norm(x, x, torch.ones(7), torch.zeros(8), 1e-5, 0.0)

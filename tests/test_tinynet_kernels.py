"""Triton training kernels for TinyNet (issue 3) against float64 PyTorch: forward and every gradient.
CPU: Triton's interpreter runs the launchers (conftest.py); CUDA: the compiled kernels and the ops."""
import math

import pytest
import torch
import torch.nn.functional as F

from parity_helpers import DEVICES

triton = pytest.importorskip("triton")
from trm_fast import torch_ops  # noqa: E402
from trm_fast.kernels import attention as attn  # noqa: E402
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


def _attention_float64(q, k, v, key_valid, keep_scale):
    """Masked softmax attention in float64; a query with no allowed key gives zero."""
    L, Dh = q.shape[1], q.shape[-1]
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(Dh)
    allowed = torch.ones(L, L, dtype=torch.bool, device=q.device).tril() & key_valid[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhlm,bmhd->blhd", probs * keep_scale, v)


@pytest.mark.parametrize("B, L, H, Dh", [(2, 37, 2, 32), (1, 70, 1, 16), (2, 5, 2, 64), (1, 1, 1, 32), (1, 9, 1, 128)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_attention_kernels(B, L, H, Dh, p):
    qkv = _randn(B, L, 3, H, Dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # strided views, as TinyNet passes them
    key_valid = torch.rand(B, L, generator=torch.Generator().manual_seed(1)) > 0.3
    key_valid[0, : min(3, L)] = False  # the first queries of row 0 have no key at all
    key_valid = key_valid.to(KERNEL_DEVICE)
    out, lse = attn.attention_fwd_triton(q, k, v, key_valid, p, 11)
    assert bool(torch.isfinite(out).all()) and bool((out[0, : min(3, L)] == 0).all())
    keep_scale = attn.dropout_keep_mask(B, H, L, p, 11, KERNEL_DEVICE).double() / (1 - p) if p > 0 else 1.0
    leaves = _double_leaves(q, k, v)
    expected = _attention_float64(*leaves, key_valid, keep_scale)
    grad_out = _randn(B, L, H, Dh, seed=2)
    (expected * grad_out.double()).sum().backward()
    tol = 1e-4 if KERNEL_DEVICE == "cpu" else 2e-3
    _close(out, expected.detach(), tol)
    for got, leaf in zip(attn.attention_bwd_triton(grad_out, q, k, v, out, lse, key_valid, p, 11), leaves):
        _close(got, leaf.grad, tol)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_op_matches_torch_path(device):
    """TinyNet's causal_attention on the attention op equals torch_ops' (values and every gradient)."""
    g = torch.Generator().manual_seed(0)
    B, L, D, H = 2, 9, 32, 2
    h = torch.randn(B, L, D, generator=g).to(device).requires_grad_()
    key_valid = (torch.rand(B, L, generator=g) > 0.3).to(device)
    key_valid[1, :2] = False
    weights = [(torch.randn(*shape, generator=g) * 0.2).to(device).requires_grad_()
               for shape in ((3 * D, D), (3 * D,), (D, D), (D,))]
    got = attn.causal_attention(h, key_valid, *weights, H, 0.0)
    expected = torch_ops.causal_attention(h, key_valid, *weights, H, 0.0)
    tol = 1e-5 if device == "cpu" else 2e-3
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    for a, b in zip(torch.autograd.grad(got.sum(), [h] + weights), torch.autograd.grad(expected.sum(), [h] + weights)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    q, k, v = (torch.randn(B, L, H, 16, generator=g).to(device).requires_grad_() for _ in range(3))
    for p, seed in ((0.0, 0), (0.3, 5)):
        torch.library.opcheck(torch.ops.trm_fast.attention.default, (q, k, v, key_valid, p, seed))


def test_attention_rejects_bad_input():
    q = torch.randn(1, 4, 2, 32)
    valid = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="head dim must be"):
        attn.attention_op(torch.randn(1, 4, 2, 24), torch.randn(1, 4, 2, 24), torch.randn(1, 4, 2, 24), valid, 0.0, 0)
    with pytest.raises(ValueError, match="same \\[B, L, H, Dh\\]"):
        attn.attention_op(q, q[:, :3], q, valid, 0.0, 0)
    with pytest.raises(ValueError, match="key_valid must be a bool"):
        attn.attention_op(q, q, q, valid.long(), 0.0, 0)
    with pytest.raises(ValueError, match="dropout probability"):
        attn.attention_op(q, q, q, valid, 1.0, 0)

"""Triton training kernels for TinyNet (issue 3) against float64 PyTorch: forward and every gradient.
CPU: Triton's interpreter runs the launchers (conftest.py); CUDA: the compiled kernels and the ops."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from parity_helpers import DEVICES, make_pair, random_batch

triton = pytest.importorskip("triton")
from trm_fast import torch_ops  # noqa: E402
from trm_fast.grad_sums import GradSum  # noqa: E402
from trm_fast.reference import TRMModel, halting_bce  # noqa: E402
from trm_fast.kernels import attention as attn  # noqa: E402
from trm_fast.kernels import column_sum  # noqa: E402
from trm_fast.kernels import concat_linear as cl  # noqa: E402
from trm_fast.kernels import cross_entropy as ce  # noqa: E402
from trm_fast.kernels import embedding as emb  # noqa: E402
from trm_fast.kernels import feed_forward as ffn  # noqa: E402
from trm_fast.kernels import halting_loss as hl  # noqa: E402
from trm_fast.kernels import head_cross_entropy as hce  # noqa: E402
from trm_fast.kernels import id_bounds  # noqa: E402
from trm_fast.kernels import linear  # noqa: E402
from trm_fast.kernels import masked_mean as mm  # noqa: E402
from trm_fast.kernels import mean_losses as ml  # noqa: E402
from trm_fast.kernels import q_head as qh  # noqa: E402
from trm_fast.kernels import residual_layer_norm as rln  # noqa: E402

KERNEL_DEVICE = "cuda" if "cuda" in DEVICES else "cpu"


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(KERNEL_DEVICE)


def _double_leaves(*tensors):
    return [t.double().requires_grad_() for t in tensors]


def _seed(value, device=KERNEL_DEVICE):
    return torch.tensor([value], device=device)


def _close(got, expected, tol=1e-4):
    scale = float(expected.detach().abs().max()) or 1.0
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("num_inputs, M, K, N", [(3, 37, 24, 40), (2, 70, 33, 17), (3, 1, 8, 8), (3, 64, 32, 64)])
def test_concat_linear_kernels(num_inputs, M, K, N):
    xs = [_randn(M, K, seed=i) for i in range(num_inputs)]
    weight, bias, grad_out = _randn(N, num_inputs * K, seed=7), _randn(N, seed=8), _randn(M, N, seed=9)
    out = cl.concat_linear_fwd_triton(xs, weight, bias)
    strided = [xs[0]] + [torch.cat([x, x], 1)[:, :K] for x in xs[1:]]  # row strides that differ: copied first
    assert torch.equal(cl.concat_linear_fwd_triton(strided, weight, bias), out)
    leaves = _double_leaves(*xs, weight, bias)
    expected = F.linear(torch.cat(leaves[:num_inputs], dim=-1), leaves[-2], leaves[-1])
    (expected * grad_out.double()).sum().backward()
    tol = 1e-4  # fp32 dots are IEEE unless torch.set_float32_matmul_precision allows TF32
    _close(out, expected.detach(), tol)
    grads, grad_weight, grad_bias = cl.concat_linear_bwd_triton(grad_out, xs, weight)
    for got, leaf in zip(grads + [grad_weight, grad_bias], leaves):
        _close(got, leaf.grad, tol)
    grad_sums = (GradSum(), GradSum())  # the weight's and bias's gradients added into float32 totals, twice
    for _ in range(2):
        assert cl.concat_linear_bwd_triton(grad_out, xs, weight, grad_sums)[1:] == (None, None)
    for grad_sum, leaf in zip(grad_sums, leaves[-2:]):
        _close(grad_sum.take(), 2 * leaf.grad, tol)
    # the first input's gradient not needed, the last's added into a float32 sum (twice), the others returned
    needs, input_sums = (False,) + (True,) * (num_inputs - 1), (None,) * (num_inputs - 1) + (GradSum(),)
    for _ in range(2):
        grads = cl.concat_linear_bwd_triton(grad_out, xs, weight, (None, None), needs, input_sums)[0]
    assert grads[0] is None and grads[-1] is None
    if num_inputs == 3:
        _close(grads[1], leaves[1].grad, tol)
    _close(input_sums[-1].take(), 2 * leaves[num_inputs - 1].grad, tol)


@pytest.mark.parametrize("num_inputs, M, K", [(3, 37, 33), (2, 70, 200)])
def test_cast_join(num_inputs, M, K):
    """The concat backward's one-pass copy of its inputs into one buffer: cat then cast, exactly (inputs with a
    row stride of their own). Triton's interpreter rounds float32 to bf16 otherwise than the GPU (round to
    nearest even, as torch): there the inputs hold bf16 values."""
    rounded = (lambda x: x.bfloat16().float()) if KERNEL_DEVICE == "cpu" else (lambda x: x)
    xs = [rounded(_randn(M, K + 5, seed=i))[:, 2:K + 2] for i in range(num_inputs)]
    got = cl.cast_join(xs, torch.bfloat16)
    assert torch.equal(got, torch.cat(xs, -1).bfloat16())


@pytest.mark.parametrize("M, N", [(19, 48), (5, 130), (1, 32)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_residual_bias", [False, True])
def test_residual_layer_norm_kernels(M, N, p, with_residual_bias):
    """layer_norm(h + dropout(residual (+ residual_bias))) and every gradient against float64 autograd."""
    h, residual, weight, bias, residual_bias, grad_out = (_randn(*shape, seed=i) for i, shape in
                                                          enumerate([(M, N), (M, N), (N,), (N,), (N,), (M, N)]))
    residual_bias = residual_bias if with_residual_bias else None
    out, mean, rstd = rln.residual_layer_norm_fwd_triton(h, residual, weight, bias, 1e-5, p, _seed(123),
                                                         residual_bias=residual_bias)
    grads = rln.residual_layer_norm_bwd_triton(grad_out, h, residual, weight, mean, rstd, p, _seed(123),
                                               residual_bias=residual_bias)
    keep = torch.ones_like(h, dtype=torch.bool) if p == 0 else grads[1] != 0  # the mask the kernels drew
    if p > 0:
        assert abs(1 - float(keep.float().mean()) - p) < 0.15
    leaves = _double_leaves(h, residual, weight, bias, *([residual_bias] if with_residual_bias else []))
    r = leaves[1] + leaves[4] if with_residual_bias else leaves[1]
    expected = F.layer_norm(leaves[0] + r * keep / (1 - p), (N,), leaves[2], leaves[3], 1e-5)
    (expected * grad_out.double()).sum().backward()
    _close(out, expected.detach())
    assert (grads[4] is None) != with_residual_bias
    for got, leaf in zip(grads, leaves):
        _close(got, leaf.grad)
    # the parameters' gradients added into a float32 total, twice: at once, or their band sums summed at the end
    for band_slots in (0, 2):
        grad_sum = GradSum(3 if with_residual_bias else 2, band_slots=band_slots)
        for _ in range(2):
            summed = rln.residual_layer_norm_bwd_triton(grad_out, h, residual, weight, mean, rstd, p, _seed(123),
                                                        residual_bias=residual_bias, grad_sum=grad_sum)
        assert summed[2:] == (None, None, None) and grad_sum.bands_used == band_slots
        _close(grad_sum.take(), 2 * torch.cat([leaf.grad for leaf in leaves[2:]]))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_residual_layer_norm_cast_copy(p):
    """The LayerNorm kernels' cast copy: the output again in bf16, and a gradient that adds to the output's."""
    M, N = 19, 48
    h, residual, weight, bias, grad_out = (_randn(*shape, seed=i) for i, shape in
                                           enumerate([(M, N), (M, N), (N,), (N,), (M, N)]))
    grad_cast = _randn(M, N, seed=9).bfloat16()
    cast = torch.empty(M, N, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    out, mean, rstd = rln.residual_layer_norm_fwd_triton(h, residual, weight, bias, 1e-5, p, _seed(5), cast)
    _close(cast, out.double(), 1e-2)
    got = rln.residual_layer_norm_bwd_triton(grad_out, h, residual, weight, mean, rstd, p, _seed(5), grad_cast)
    expected = rln.residual_layer_norm_bwd_triton(grad_out + grad_cast.float(), h, residual, weight, mean, rstd, p,
                                                  _seed(5))
    for a, b in zip(got[:4], expected[:4]):
        _close(a, b.double(), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_add_layer_norm_and_cast_op(device):
    """The TinyNet op table's add_layer_norm_and_cast: the torch path's values and gradients (both outputs
    used), opcheck, and the output itself when no cast is asked for."""
    g = torch.Generator().manual_seed(3)
    leaves = [torch.randn(*shape, generator=g).to(device).requires_grad_() for shape in ((2, 5, 16), (2, 5, 16),
                                                                                          (16,), (16,))]
    grads = [torch.randn(2, 5, 16, generator=g).to(device) for _ in range(2)]
    results = []
    for fn in (rln.add_layer_norm_and_cast, torch_ops.add_layer_norm_and_cast):
        out, cast = fn(*leaves, 1e-5, 0.0, torch.bfloat16)
        assert out.dtype == torch.float32 and cast.dtype == torch.bfloat16
        loss = (out * grads[0]).sum() + (cast.float() * grads[1]).sum()
        results.append((out, cast.float(), *torch.autograd.grad(loss, leaves)))
    for got, expected in zip(*results):
        _close(got, expected.detach().double(), 1e-2 if got is results[0][1] else 1e-4)
    out, same = rln.add_layer_norm_and_cast(*leaves, 1e-5, 0.0, None)
    assert same is out
    for dtype in (None, torch.bfloat16):
        torch.library.opcheck(torch.ops.trm_fast.add_layer_norm.default, (*leaves, 1e-5, 0.0, None, dtype, None))


@pytest.mark.parametrize("device", DEVICES)
def test_add_layer_norm_cast_summing_grads(device):
    """A cast copy whose uses add their gradients into its float32 GradSum (concat_linear here, reading it twice)
    gives the gradients of the same copy whose uses return them; the output's own gradient may be absent, and with
    `cast_only` the output is not kept at all (the op returns the copy twice)."""
    g = torch.Generator().manual_seed(5)
    h, residual = (torch.randn(2, 5, 16, generator=g).to(device) for _ in range(2))
    weight, bias = torch.randn(16, generator=g).to(device), torch.randn(16, generator=g).to(device)
    proj_weight, proj_bias = torch.randn(8, 32, generator=g).to(device), torch.randn(8, generator=g).to(device)
    grad_out = torch.randn(2, 5, 8, generator=g).to(device)
    results = []
    for sums, cast_only in ((False, False), (True, False), (True, True)):
        leaves = [t.clone().requires_grad_() for t in (h, residual, weight, bias)]
        state, cast = rln.add_layer_norm_and_cast(*leaves, 1e-5, 0.0, torch.float64, cast_sums_grads=sums,
                                                  cast_only=cast_only)
        assert isinstance(getattr(cast, "grad_sum", None), GradSum) == sums and (state is cast) == cast_only
        out = cl.concat_linear([cast, cast], proj_weight, proj_bias)
        results.append(torch.autograd.grad(out, leaves, grad_out))
    for summed in results[1:]:
        for got, expected in zip(summed, results[0]):
            _close(got, expected.double(), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_add_layer_norm_residual_bias_op(device, p):
    """add_layer_norm with the bias of the residual's layer (a bf16 residual, a float32 bias, as in the model):
    the values and gradients of adding the bias to the residual first, on the same dropout mask; opcheck."""
    g = torch.Generator().manual_seed(4)
    h, residual_bias = (torch.randn(*shape, generator=g).to(device).requires_grad_() for shape in ((2, 5, 16), (16,)))
    residual = torch.randn(2, 5, 16, generator=g).to(device).bfloat16().requires_grad_()
    weight, bias = (torch.randn(16, generator=g).to(device).requires_grad_() for _ in range(2))
    grad_out = torch.randn(2, 5, 16, generator=g).to(device)
    seed = _seed(11, device) if p > 0 else None
    leaves = (h, residual, weight, bias, residual_bias)
    out = torch.ops.trm_fast.add_layer_norm(h, residual, weight, bias, 1e-5, p, seed, None, residual_bias)[0]
    got = torch.autograd.grad(out, leaves, grad_out)
    expected_out = torch.ops.trm_fast.add_layer_norm(h, residual.float() + residual_bias, weight, bias, 1e-5, p, seed,
                                                     None, None)[0]
    expected = torch.autograd.grad(expected_out, leaves, grad_out)
    _close(out, expected_out.detach().double(), 1e-5)
    grad_residual_sum = expected[1].float().sum((0, 1))
    for a, b in zip(got, expected[:4] + (grad_residual_sum,)):
        _close(a.float(), b.detach().double(), 1e-2 if a.dtype == torch.bfloat16 else 1e-5)
    torch.library.opcheck(torch.ops.trm_fast.add_layer_norm.default,
                          (h, residual.float(), weight, bias, 1e-5, p, seed, None, residual_bias))


@pytest.mark.parametrize("device", DEVICES)
def test_ops_autograd_and_opcheck(device):
    """The registered ops (Triton on CUDA, the same math in torch on CPU): values, gradients, opcheck."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 16, generator=g).to(device).requires_grad_() for _ in range(3)]
    weight, bias = torch.randn(8, 48, generator=g).to(device), torch.randn(8, generator=g).to(device)
    torch.library.opcheck(torch.ops.trm_fast.concat_linear.default,
                          (xs, weight.requires_grad_(), bias.requires_grad_()))
    out = cl.concat_linear(xs, weight, bias)
    _close(out, F.linear(torch.cat([x.double() for x in xs], -1), weight.double(), bias.double()), 1e-4)
    h, r = torch.randn(2, 5, 16, generator=g).to(device), torch.randn(2, 5, 16, generator=g).to(device)
    w, b = torch.randn(16, generator=g).to(device), torch.randn(16, generator=g).to(device)
    for p, seed in ((0.0, None), (0.25, _seed(7, device))):
        args = (h.requires_grad_(), r.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5, p, seed, None,
                None)
        torch.library.opcheck(torch.ops.trm_fast.add_layer_norm.default, args)
    _close(rln.add_layer_norm(h, r, w, b, 1e-5, 0.0),
           F.layer_norm((h + r).double(), (16,), w.double(), b.double(), 1e-5))
    inputs = [torch.randn(*shape, generator=g).to(device).requires_grad_() for shape in ((2, 70, 16), (8, 16), (8,))]
    torch.library.opcheck(torch.ops.trm_fast.linear.default, inputs)
    leaves = _double_leaves(*[t.detach() for t in inputs])
    expected = F.linear(*leaves)
    grad_out = torch.randn(expected.shape, generator=g).to(device)
    (expected * grad_out.double()).sum().backward()
    got = linear.linear(*inputs)
    _close(got, expected.detach())
    for grad, leaf in zip(torch.autograd.grad(got, inputs, grad_out), leaves):
        _close(grad, leaf.grad)
    torch.library.opcheck(torch.ops.trm_fast.linear.default, (*inputs[:2], None))
    without_bias = linear.linear(*inputs[:2], None)
    _close(without_bias, F.linear(*leaves[:2]).detach())
    for grad, leaf in zip(torch.autograd.grad(without_bias, inputs[:2], grad_out), leaves):
        _close(grad, leaf.grad)


def test_ops_reject_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="expects 2 or 3 inputs"):
        cl.concat_linear([x], torch.randn(3, 8), torch.randn(3))
    with pytest.raises(ValueError, match="every input must be"):
        cl.concat_linear([x, torch.randn(4, 7)], torch.randn(3, 15), torch.randn(3))
    with pytest.raises(ValueError, match=r"weight must be \[N, 2 \* 8\]"):
        cl.concat_linear([x, x], torch.randn(3, 17), torch.randn(3))
    with pytest.raises(ValueError, match="must share a dtype"):
        cl.concat_linear([x, x], torch.randn(3, 16, dtype=torch.float64), torch.randn(3))
    with pytest.raises(ValueError, match="dropout probability must be in"):
        rln.add_layer_norm(x, x, torch.ones(8), torch.zeros(8), 1e-5, 1.0)
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        rln.add_layer_norm(x, x, torch.ones(7), torch.zeros(8), 1e-5, 0.0)
    with pytest.raises(ValueError, match="weight and bias must be tensors"):
        rln.add_layer_norm(x, x, torch.ones(8), None, 1e-5, 0.0)
    with pytest.raises(ValueError, match=r"residual_bias must be \[8\]"):
        rln.add_layer_norm(x, x, torch.ones(8), torch.zeros(8), 1e-5, 0.0, torch.zeros(4))
    with pytest.raises(ValueError, match=r"linear: for x \[..., 8\] expects weight \[N, 8\]"):
        linear.linear(x, torch.randn(3, 7), torch.randn(3))


def test_kernels_take_wider_inputs_than_their_weights():
    """Under autocast the states are float32 and the weights bf16: the matmul kernels cast the inputs as they
    load them and compute in the weights' dtype (F.linear's autocast result); add_layer_norm sums a bf16 h and a
    float32 residual in float32 and returns its weight's dtype."""
    M, K, N = 37, 32, 48
    xs = [_randn(M, K, seed=i) for i in range(3)]
    weight, bias = (_randn(N, 3 * K, seed=7) * 0.2).bfloat16(), _randn(N, seed=8).bfloat16()
    out = cl.concat_linear_fwd_triton(xs, weight, bias)
    assert out.dtype == torch.bfloat16
    expected = F.linear(torch.cat(xs, -1).bfloat16().double(), weight.double(), bias.double())
    _close(out, expected, 1e-2)
    w1, b1, w2, b2 = ((_randn(*s, seed=10 + i) * 0.2).bfloat16() for i, s in enumerate([(64, K), (64,), (K, 64), (K,)]))
    got = ffn.feed_forward_fwd_triton(xs[0], w1, b1, w2, b2)[0]
    expected = torch_ops.feed_forward(xs[0].bfloat16().double(), w1.double(), b1.double(), w2.double(), b2.double())
    _close(got, expected, 2e-2)
    h, residual = xs[0].bfloat16(), xs[1]
    ln_w, ln_b = _randn(K, seed=20), _randn(K, seed=21)
    out, _, _ = rln.residual_layer_norm_fwd_triton(h, residual, ln_w, ln_b, 1e-5, 0.0, None)
    assert out.dtype == torch.float32
    _close(out, F.layer_norm(h.double() + residual.double(), (K,), ln_w.double(), ln_b.double(), 1e-5))


def _attention_float64(q, k, v, key_valid, keep_scale):
    """Masked softmax attention in float64; a query with no allowed key gives zero."""
    L, Dh = q.shape[1], q.shape[-1]
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(Dh)
    allowed = torch.ones(L, L, dtype=torch.bool, device=q.device).tril() & key_valid[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhlm,bmhd->blhd", probs * keep_scale, v)


@pytest.mark.parametrize("B, L, H, Dh", [(2, 37, 2, 32), (2, 70, 1, 16), (2, 5, 2, 64), (1, 1, 1, 32), (1, 9, 1, 128)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_attention_kernels(B, L, H, Dh, p):
    if KERNEL_DEVICE == "cuda" and Dh not in attn.TRITON_HEAD_DIMS:
        pytest.skip(f"head dim {Dh} is not enabled on CUDA yet")
    qkv = _randn(B, L, 3, H, Dh)
    key_valid = torch.rand(B, L, generator=torch.Generator().manual_seed(1)) > 0.3
    key_valid[0, : min(3, L)] = False  # the first queries of row 0 have no key at all
    if B > 1:  # right padding only: the key tiles before it are run without the key test
        key_valid[1] = torch.arange(L) < 2 * L // 3
    key_valid = key_valid.to(KERNEL_DEVICE)
    out, lse = attn.attention_fwd_triton(qkv, key_valid, p, _seed(11))
    assert bool(torch.isfinite(out).all()) and bool((out[0, : min(3, L)] == 0).all())
    keep_scale = attn.dropout_keep_mask(B, H, L, p, _seed(11)).double() / (1 - p) if p > 0 else 1.0
    leaves = _double_leaves(*qkv.unbind(2))
    expected = _attention_float64(*leaves, key_valid, keep_scale)
    grad_out = _randn(B, L, H, Dh, seed=2)
    (expected * grad_out.double()).sum().backward()
    tol = 1e-4
    _close(out, expected.detach(), tol)
    dqkv = attn.attention_bwd_triton(grad_out, qkv, out, lse, key_valid, p, _seed(11))
    for got, leaf in zip(dqkv.unbind(2), leaves):
        _close(got, leaf.grad, tol)


def test_dropout_masks_are_uniform_and_fresh_per_seed():
    """The hashed keep-mask (kernels/dropout.py): keep rate 1 - p, neighbouring elements agree as often as
    independent draws do, and another seed gives an independent mask."""
    p, agree = 0.3, 0.3**2 + 0.7**2
    keep = attn.dropout_keep_mask(2, 2, 128, p, _seed(3))  # 65536 draws: std of the rate ~0.002
    assert abs(float(keep.float().mean()) - (1 - p)) < 0.01
    for same in (keep[..., 1:] == keep[..., :-1], keep[..., 1:, :] == keep[..., :-1, :], keep[1] == keep[0],
                 keep == attn.dropout_keep_mask(2, 2, 128, p, _seed(4))):
        assert abs(float(same.float().mean()) - agree) < 0.015


def test_seeds_drawn_together_are_views_of_one_draw():
    """trm_fast.seeds: within drawn_together, SEEDS_PER_DRAW seeds share one draw (then a new one starts); a
    nested use shares the outer pool; outside, each seed is its own draw."""
    from trm_fast import seeds
    with seeds.drawn_together():
        got = [seeds.new_seed("cpu") for _ in range(seeds.SEEDS_PER_DRAW)]
        with seeds.drawn_together():
            next_draw = seeds.new_seed("cpu")
    storages = {t.untyped_storage().data_ptr() for t in got}
    assert len(storages) == 1 and next_draw.untyped_storage().data_ptr() not in storages
    assert all(t.shape == (1,) and t.dtype == torch.int64 for t in got + [next_draw])
    assert len({int(t) for t in got}) > seeds.SEEDS_PER_DRAW - 3  # distinct draws (collisions ~1e-7)
    alone = [seeds.new_seed("cpu") for _ in range(2)]
    assert alone[0].untyped_storage().data_ptr() != alone[1].untyped_storage().data_ptr()


def _mix_column_np(x):
    """kernels/dropout.py's per-element hash in numpy (uint64 holding uint32 values)."""
    import numpy as np
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(0xFFFFFFFF)
    return ((x ^ (x >> np.uint64(15))) * np.uint64(0x846CA68B)) & np.uint64(0xFFFFFFFF)


def _mix_np(x):
    """kernels/dropout.py's 32-bit mixer in numpy."""
    import numpy as np
    x = _mix_column_np(x ^ (x >> np.uint64(16)))
    return x ^ (x >> np.uint64(16))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_is_the_documented_hash(p):
    """keep[b, h, i, j] = top 24 bits of mix_column(mix(((b*H+h)*L+i) * golden + seed) ^ j) >= ceil(p * 2**24)."""
    import numpy as np
    B, H, L, seed = 1, 2, 40, 123457
    rows = np.arange(B * H * L, dtype=np.uint64)
    key = _mix_np((rows * np.uint64(0x9E3779B9) + np.uint64(seed)) & np.uint64(0xFFFFFFFF))
    bits = _mix_column_np(key[:, None] ^ np.arange(L, dtype=np.uint64)[None, :]) >> np.uint64(8)
    expected = bits >= np.uint64(math.ceil(float(np.float32(p)) * 2**24))
    got = attn.dropout_keep_mask(B, H, L, p, _seed(seed)).cpu().numpy().reshape(B * H * L, L)
    assert (got == expected).all()


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
    tol = 1e-5 if device == "cpu" else 1e-4
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    for a, b in zip(torch.autograd.grad(got.sum(), [h] + weights), torch.autograd.grad(expected.sum(), [h] + weights)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    qkv = torch.randn(B, L, 3, H, 16, generator=g).to(device).requires_grad_()
    for p, seed in ((0.0, None), (0.3, _seed(5, device))):
        torch.library.opcheck(torch.ops.trm_fast.attention.default, (qkv, key_valid, p, seed))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
def test_attention_head_dim_outside_the_kernels_is_clear_on_cuda():
    qkv = torch.randn(1, 4, 3, 2, 24, device="cuda")
    with pytest.raises(ValueError, match="head dim must be one of"):
        attn.attention_op(qkv, torch.ones(1, 4, dtype=torch.bool, device="cuda"), 0.0, None)


def test_attention_rejects_bad_input():
    qkv = torch.randn(1, 4, 3, 2, 32)
    valid = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="qkv must be \\[B, L, 3, H, Dh\\]"):
        attn.attention_op(qkv[:, :, :2], valid, 0.0, None)
    with pytest.raises(ValueError, match="key_valid must be a bool"):
        attn.attention_op(qkv, valid.long(), 0.0, None)
    with pytest.raises(ValueError, match="dropout probability"):
        attn.attention_op(qkv, valid, 1.0, _seed(0, "cpu"))
    with pytest.raises(ValueError, match="dropout needs a one-element integer seed tensor"):
        attn.attention_forward(qkv, valid, 0.1, 7)


@pytest.mark.parametrize("N, V", [(37, 300), (6, 2500), (3, 9000), (1, 7)])  # 9000: several blocks in each pass
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_kernels(N, V, dtype):
    """Per-row loss, log-sum-exp, argmax == target (ties: the first column, across blocks too) and the gradient
    (softmax - one-hot) * scale, written apart or in place over the logits; target 0 is ignored."""
    logits = (_randn(N, V, seed=3) * 3).to(dtype)
    logits[0, [2, V - 1]] = 50.0  # a tie for the maximum, in different column blocks when V > 2048
    targets = torch.randint(1, V, (N,), generator=torch.Generator().manual_seed(4)).to(KERNEL_DEVICE)
    targets[0] = 2
    targets[1:2] = 0  # (when N > 1)
    x = logits.double()
    counted = targets != 0
    rows, lse, correct = ce.cross_entropy_rows_triton(logits, targets, 0)
    _close(rows, F.cross_entropy(x, targets, ignore_index=0, reduction="none"), 1e-5)
    _close(lse, torch.logsumexp(x, dim=-1), 1e-6)
    assert torch.equal(correct, logits.argmax(-1) == targets) and bool(correct[0])
    scale = torch.tensor([0.37], device=KERNEL_DEVICE)
    expected = (torch.softmax(x, -1) - F.one_hot(targets, V)) * 0.37 * counted[:, None]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    _close(ce.cross_entropy_grad_triton(logits, targets, lse, 0, scale), expected, tol)
    in_place = logits.clone()
    ce.cross_entropy_rows_triton(in_place, targets, 0, grad_scale=scale)
    _close(in_place, expected, tol)
    apart = torch.empty_like(logits)
    _close(ce.cross_entropy_rows_triton(logits, targets, 0, scale, apart)[0], rows.double(), 1e-6)  # other blocks
    _close(apart, expected, tol)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_op_matches_torch_path(device):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 40, generator=g) * 2).to(device).requires_grad_()
    targets = torch.randint(0, 40, (9,), generator=g).to(device)
    targets[3] = -100
    loss, correct = ce.cross_entropy(logits, targets, -100)
    expected, expected_correct = torch_ops.cross_entropy(logits, targets, -100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(correct, expected_correct)
    torch.testing.assert_close(torch.autograd.grad(loss * 3, logits)[0], torch.autograd.grad(expected * 3, logits)[0],
                               rtol=1e-5, atol=1e-6)
    torch.library.opcheck(torch.ops.trm_fast.cross_entropy.default, (logits, targets, -100))
    all_ignored, _ = ce.cross_entropy(logits, torch.full_like(targets, -100), -100)
    assert torch.isnan(all_ignored)  # as F.cross_entropy: 0 / 0
    with pytest.raises(ValueError, match="targets must be int64"):
        ce.cross_entropy(logits, targets.int(), -100)


@pytest.mark.parametrize("L", [10, 1500])  # 1500: two blocks of tokens
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_halting_loss_kernels(L, threshold, dtype):
    """Labels, loss and q_hat's gradient against the seed's torch steps: random rows, an all-padding row, 9 of 10 tokens
    correct (0.9 exactly in float32, as torch divides), q_hat 0 and 1 (the logarithms' clamp), an integer and a bool
    mask, 19 sequences (two tiles of rows); labels and (on CUDA) the gradient bit for bit, the loss to a few float32
    units."""
    g = torch.Generator().manual_seed(L)
    B = 19
    correct = torch.rand(B, L, generator=g) < 0.7
    mask = (torch.rand(B, L, generator=g) < 0.8).long()
    mask[1] = 0
    mask[2], correct[2] = 0, False
    mask[2, :10], correct[2, :9] = 1, True
    q_hat = torch.rand(B, 1, generator=g).to(dtype)
    q_hat[3], q_hat[4], q_hat[5] = 0.0, 1.0, 1e-7
    expected_labels = TRMModel._act_labels(correct, mask, threshold)
    assert bool(expected_labels[2]) == (threshold <= 0.9)
    leaf = q_hat.to(KERNEL_DEVICE, copy=True).requires_grad_()
    expected = halting_bce(leaf, expected_labels.to(KERNEL_DEVICE))
    expected.backward(torch.tensor(0.75, device=KERNEL_DEVICE))
    for m in (mask, mask.bool()):
        loss, labels = hl.halting_loss_fwd_triton(correct.to(KERNEL_DEVICE), m.to(KERNEL_DEVICE),
                                                  q_hat.to(KERNEL_DEVICE), threshold)
        assert loss.shape == () and loss.dtype == labels.dtype == torch.float32 and labels.shape == (B,)
        assert torch.equal(labels.cpu(), expected_labels.view(-1))
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=0)
    grad = hl.halting_loss_bwd_triton(torch.tensor(0.75, device=KERNEL_DEVICE), q_hat.to(KERNEL_DEVICE), labels)
    assert grad.dtype == dtype
    if KERNEL_DEVICE == "cuda":  # the mean's 1 / B a product with its reciprocal, as torch's CUDA `div_` forms it
        assert torch.equal(grad, leaf.grad)
    else:  # (torch's CPU `div_` divides: one float32 unit apart at most)
        torch.testing.assert_close(grad, leaf.grad, rtol=2e-7 if dtype == torch.float32 else 8e-3, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_halting_loss_op(device):
    """The op against the seed's steps (torch_ops), its gradient, opcheck, and bad arguments refused."""
    correct = torch.tensor([[True, False, True], [True, True, False]], device=device)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], device=device)
    q_hat = torch.tensor([[0.3], [0.8]], device=device, requires_grad=True)
    for threshold in (0.6, 1.0):
        loss = hl.halting_loss(correct, mask, q_hat, threshold)
        grad, = torch.autograd.grad(loss, q_hat)
        expected = torch_ops.halting_loss(correct, mask, q_hat, threshold)
        expected_grad, = torch.autograd.grad(expected, q_hat)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        assert torch.equal(grad, expected_grad)
    torch.library.opcheck(torch.ops.trm_fast.halting_loss.default, (correct, mask, q_hat, 0.6))
    with pytest.raises(ValueError, match="correct must be a bool"):
        hl.halting_loss(correct.int(), mask, q_hat, 0.6)
    with pytest.raises(ValueError, match="attention_mask must be an integer or bool"):
        hl.halting_loss(correct, mask.float(), q_hat, 0.6)
    with pytest.raises(ValueError, match=r"q_hat must be a float \[2, 1\]"):
        hl.halting_loss(correct, mask, q_hat.view(1, 2), 0.6)


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_mean_losses_kernels(steps):
    """The three means against the seed's steps (within float32 units; the means bit for bit for 1 or 2 steps), and
    the steps' gradients from any of the three outputs' (absent ones None), bit for bit on CUDA."""
    g = torch.Generator().manual_seed(steps)
    losses = (torch.rand(2 * steps, generator=g) * 5).to(KERNEL_DEVICE)
    ce, act = list(losses[:steps]), list(losses[steps:])
    got = ml.mean_losses_fwd_triton(losses, 0.3)
    expected = torch_ops.mean_losses(ce, act, 0.3)
    for a, b in zip(got, expected):
        assert a.shape == () and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=4e-7, atol=0)
    if steps <= 2:  # (more steps: the sums' order and 1 / S's rounding may differ by a unit)
        assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])
    grad_out = [torch.tensor(v, device=KERNEL_DEVICE) for v in (1.0, 0.25, -2.0)]
    for present in ((True, False, False), (False, True, True), (True, True, True)):
        leaves = losses.clone().requires_grad_()
        outputs = torch_ops.mean_losses(list(leaves[:steps]), list(leaves[steps:]), 0.3)
        torch.autograd.backward([o for o, p in zip(outputs, present) if p], [g for g, p in zip(grad_out, present) if p])
        got_grad = ml.mean_losses_bwd_triton([g if p else None for g, p in zip(grad_out, present)], steps, 0.3)
        if KERNEL_DEVICE == "cuda":
            assert torch.equal(got_grad, leaves.grad)
        else:  # (torch's CPU division by S against the product with 1 / S: a float32 unit at most)
            torch.testing.assert_close(got_grad, leaves.grad, rtol=2e-7, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_mean_losses_op(device):
    """The op's outputs and gradients (through the eager Function and opcheck's custom op), bad arguments refused."""
    ce = [torch.tensor(v, device=device, requires_grad=True) for v in (2.0, 3.0)]
    act = [torch.tensor(v, device=device, requires_grad=True) for v in (0.5, 0.25)]
    loss, ce_loss, act_loss = ml.mean_losses(ce, act, 0.5)
    assert (loss.item(), ce_loss.item(), act_loss.item()) == (2.6875, 2.5, 0.375)
    loss.backward()
    assert [t.grad.item() for t in ce + act] == [0.5, 0.5, 0.25, 0.25]
    torch.library.opcheck(torch.ops.trm_fast.mean_losses.default, (torch.stack(ce + act).detach().requires_grad_(),
                                                                   0.5))
    with pytest.raises(ValueError, match="as many ce as act losses"):
        ml.mean_losses(ce, act[:1], 0.5)
    with pytest.raises(ValueError, match="0-dim float32"):
        ml.mean_losses([t.double() for t in ce], act, 0.5)


def _embed_case(D):
    """ids [3, 7] with repeats and padding (row 0), token and positional tables (the latter longer than L)."""
    ids = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(D))
    ids[0, :3], ids[1] = 0, 5
    return ids.to(KERNEL_DEVICE), _randn(11, D, seed=1), _randn(9, D, seed=2)


def _embed_grads(ids, scaled, V, P, pad):
    """float64 token and positional gradients of an embedding whose output got the gradient `scaled`."""
    D = scaled.shape[-1]
    token = torch.zeros(V, D, dtype=torch.float64, device=scaled.device).index_add_(0, ids.flatten(),
                                                                                    scaled.reshape(-1, D))
    token[pad] = 0
    pos = torch.zeros(P, D, dtype=torch.float64, device=scaled.device)
    pos[:ids.shape[1]] = scaled.sum(0)
    return token, pos


@pytest.mark.parametrize("D", [24, 64])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_embed_kernels(D, p):
    """Forward and both gradients against float64 torch: repeated ids, the padding row (no token gradient), a
    positional table longer than L; with dropout the kept elements scaled by 1 / (1 - p) and the backward drawing the
    forward's mask; the gradients added atomically and the scaled gradient written (the deterministic path's)."""
    ids, tok, pos = _embed_case(D)
    seed = _seed(5)
    out = emb.embed_fwd_triton(ids, tok, pos, p, seed)
    keep = out != 0
    assert bool(keep.all()) if p == 0 else 0.55 < float(keep.float().mean()) < 0.85
    _close(out, (tok.double()[ids] + pos.double()[:7]) * keep / (1 - p), 1e-6)
    grad = _randn(3, 7, D, seed=3)
    scaled = grad.double() * keep / (1 - p)
    token_grad, pos_grad = torch.zeros_like(tok), torch.zeros_like(pos)
    emb.embed_bwd_triton(grad, ids, token_grad, pos_grad, 0, p, seed)
    expected_token, expected_pos = _embed_grads(ids, scaled, 11, 9, 0)
    _close(token_grad, expected_token, 1e-6)
    _close(pos_grad, expected_pos, 1e-6)
    _close(emb.embed_bwd_triton(grad, ids, token_grad, pos_grad, 0, p, seed, atomic=False), scaled.reshape(-1, D),
           1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_embed_op(device):
    """The op table's embed against the torch path's (p = 0): output and both weight gradients (none for the padding
    row), the deterministic path, the custom op under opcheck, the token gradient added into the GradSum of a cast
    copy (the tied output head's) instead of returned; bad input named."""
    from trm_fast.grad_sums import cast_summing_grads
    ids, tok, pos = (t.to(device) for t in _embed_case(16))
    weight = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(4)).to(device)
    leaves = _double_leaves(tok, pos)
    expected = (torch_ops.embed(ids, *leaves, 0, 0.0) * weight.double()).sum()
    expected_grads = torch.autograd.grad(expected, leaves)
    assert not expected_grads[0][0].any()
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            leaves = [t.clone().requires_grad_() for t in (tok, pos)]
            got = (emb.embed(ids, *leaves, 0, 0.0) * weight).sum()
            got_grads = torch.autograd.grad(got, leaves)
        finally:
            torch.use_deterministic_algorithms(False)
        _close(got, expected, 1e-6)
        for a, b in zip(got_grads, expected_grads):
            _close(a, b, 1e-6)
    torch.library.opcheck(torch.ops.trm_fast.embed.default, (ids, tok.requires_grad_(), pos, 0, 0.0, None))
    leaf = tok.detach().clone().requires_grad_()
    copy = cast_summing_grads(leaf, torch.bfloat16)
    x = emb.embed(ids, leaf, pos, 0, 0.0, copy)
    (x * weight).sum().backward()
    _close(leaf.grad, expected_grads[0], 1e-6)
    with pytest.raises(ValueError, match="ids must be an int64"):
        emb.embed(ids.int(), tok, pos, 0, 0.0)
    with pytest.raises(ValueError, match="pos_weight"):
        emb.embed(ids, tok, pos[:5], 0, 0.0)


@pytest.mark.parametrize("N, ignored", [(1, 0), (7, 3), (5000, 1234), (6, 6)])
def test_target_count_kernel(N, ignored):
    """The count of targets that are not ignore_index and its reciprocal (1 where none count) match torch's."""
    targets = torch.randint(1, 50, (N,), generator=torch.Generator().manual_seed(N))
    targets[torch.randperm(N, generator=torch.Generator().manual_seed(1))[:ignored]] = 0
    count, scale = ce.target_count_triton(targets.to(KERNEL_DEVICE), 0)
    assert count.shape == () and scale.shape == (1,) and count.dtype == scale.dtype == torch.float32
    assert count.item() == N - ignored
    assert scale.item() == (1.0 / torch.tensor(float(max(N - ignored, 1)))).item()


@pytest.mark.parametrize("shape", [(1, 1), (3, 40), (4, 700)])
def test_id_bounds_kernel(shape):
    """[min, max] of each id tensor as torch's aminmax gives them (before the clamp, int64 extremes included), then
    the ids clamped into the vocabulary in place, their dtype kept; one tensor or two; bad arguments refused."""
    g = torch.Generator().manual_seed(shape[1])
    ids = torch.randint(-3, 60, shape, generator=g)
    ids.view(-1)[-1] = 2**63 - 1
    targets = torch.randint(0, 70, shape, generator=g, dtype=torch.int32)
    targets.view(-1)[0] = -5
    expected = torch.cat([torch.stack(torch.aminmax(t)).long() for t in (ids, targets)])
    got_ids, got_targets = ids.to(KERNEL_DEVICE, copy=True), targets.to(KERNEL_DEVICE, copy=True)
    assert torch.equal(id_bounds.id_bounds_then_clamp([got_ids, got_targets], 50).cpu(), expected)
    assert torch.equal(got_ids.cpu(), ids.clamp(0, 49)) and torch.equal(got_targets.cpu(), targets.clamp(0, 49))
    assert got_targets.dtype == torch.int32
    alone = ids.to(KERNEL_DEVICE, copy=True)
    assert torch.equal(id_bounds.id_bounds_then_clamp([alone], 50).cpu(), expected[:2])
    with pytest.raises(ValueError, match="contiguous integer tensors of one shape"):
        id_bounds.id_bounds_then_clamp([alone.t()], 50) if shape != (1, 1) else id_bounds.id_bounds_then_clamp(
            [alone, alone[:, :0]], 50)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("logits_grad", [False, True])
def test_head_cross_entropy_matches_linear_then_cross_entropy(device, logits_grad):
    """Logits, loss, argmax and the gradients of h and the weight (for the loss alone, whose gradient the forward
    formed, and with a gradient for the logits too) against `torch_ops.head_cross_entropy`."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 16, generator=g).to(device).requires_grad_()
    weight = torch.randn(40, 16, generator=g).to(device).requires_grad_()
    targets = torch.randint(0, 40, (9,), generator=g).to(device)
    targets[3] = -100
    logits_weights = torch.randn(9, 40, generator=g).to(device) if logits_grad else torch.zeros(9, 40, device=device)
    results = []
    for op in (hce.head_cross_entropy, torch_ops.head_cross_entropy):
        logits, loss, correct = op(h, weight, targets, -100)
        ((loss * 3) + (logits * logits_weights).sum() if logits_grad else loss * 3).backward()
        results.append((logits.detach(), loss.detach(), correct, h.grad, weight.grad))
        h.grad = weight.grad = None
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.library.opcheck(torch.ops.trm_fast.head_cross_entropy.default, (h, weight, targets, -100))
    with torch.no_grad():
        torch.testing.assert_close(hce.head_cross_entropy(h, weight, targets, -100)[1], results[1][1])
    all_ignored = hce.head_cross_entropy(h, weight, torch.full_like(targets, -100), -100)[1]
    assert torch.isnan(all_ignored)  # as F.cross_entropy: 0 / 0
    all_ignored.backward()
    assert not h.grad.any() and not weight.grad.any()
    with pytest.raises(ValueError, match="must share a dtype"):
        hce.head_cross_entropy(h, weight.double(), targets, -100)
    with pytest.raises(ValueError, match=r"h \[N, D\] and weight \[V, D\] must agree"):
        hce.head_cross_entropy(h, weight[:, :8], targets, -100)
    with pytest.raises(ValueError, match="targets must be int64"):
        hce.head_cross_entropy(h, weight, targets[:4], -100)


@pytest.mark.parametrize("R, N", [(1, 5), (300, 7), (1100, 130)])  # the last: two passes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_rows(R, N, dtype):
    x = _randn(R + 3, N)[3:].to(dtype)  # a row offset: any start works
    expected = x.double().sum(0)
    _close(column_sum.sum_rows(x, torch.float32), expected, 1e-5)
    _close(column_sum.sum_rows(x, dtype), expected, 1e-5 if dtype == torch.float32 else 1e-2)
    total = _randn(N, seed=1)
    into = total.clone()
    assert column_sum.sum_rows(x, dtype, into=into) is into
    _close(into, total.double() + expected, 1e-5)
    with pytest.raises(ValueError, match="unit column stride"):
        column_sum.sum_rows(x.t(), dtype)
    with pytest.raises(ValueError, match="into must be a contiguous float32"):
        column_sum.sum_rows(x, dtype, into=total[:-1])


@pytest.mark.parametrize("M, D, F_", [(37, 24, 96), (1, 16, 64), (70, 32, 40), (64, 32, 64)])  # last: unmasked tiles
@pytest.mark.parametrize("with_b2", [True, False])
def test_feed_forward_kernels(M, D, F_, with_b2):
    """Forward and every gradient, the backward with gelu(pre) as the forward kept it and formed again."""
    h, w1, b1, w2, b2, grad_out = (_randn(*shape, seed=i) for i, shape in
                                   enumerate([(M, D), (F_, D), (F_,), (D, F_), (D,), (M, D)]))
    b2 = b2 if with_b2 else None
    out, pre, act = ffn.feed_forward_fwd_triton(h, w1 * 0.3, b1, w2 * 0.3, b2)
    leaves = _double_leaves(h, w1 * 0.3, b1, w2 * 0.3, *([b2] if with_b2 else []))
    expected = torch_ops.feed_forward(*leaves, *([] if with_b2 else [None]))
    (expected * grad_out.double()).sum().backward()
    tol = 1e-4
    _close(out, expected.detach(), tol)
    _close(act, F.gelu(pre.double()), tol)
    for kept in (None, act):
        grads = ffn.feed_forward_bwd_triton(grad_out, h, pre, w1 * 0.3, w2 * 0.3, with_b2, act=kept)
        assert (grads[4] is None) != with_b2
        for got, leaf in zip(grads, leaves):
            _close(got, leaf.grad, tol)
    b1_sum = GradSum(band_slots=2)  # grad b1's band sums of two calls, summed once at the end
    for _ in range(2):
        assert ffn.feed_forward_bwd_triton(grad_out, h, pre, w1 * 0.3, w2 * 0.3, with_b2,
                                           grad_sums=(None, b1_sum, None, None))[2] is None
    assert b1_sum.bands_used == 2
    _close(b1_sum.take(), 2 * leaves[2].grad, tol)


@pytest.mark.parametrize("device", DEVICES)
def test_feed_forward_op(device):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 8, generator=g).to(device).requires_grad_()
    weights = [torch.randn(*shape, generator=g).to(device).requires_grad_()
               for shape in ((16, 8), (16,), (8, 16), (8,))]
    torch.library.opcheck(torch.ops.trm_fast.feed_forward.default, (h, *weights))
    got = ffn.feed_forward(h, *weights)
    expected = torch_ops.feed_forward(h, *weights)
    tol = 1e-5 if device == "cpu" else 1e-4
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    without_b2 = (h, *weights[:3], None)
    torch.library.opcheck(torch.ops.trm_fast.feed_forward.default, without_b2)
    got, expected = ffn.feed_forward(*without_b2), torch_ops.feed_forward(*without_b2)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    for a, b in zip(*(torch.autograd.grad(out.sum(), without_b2[:4]) for out in (got, expected))):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="expects w1"):
        ffn.feed_forward(h, weights[0][:, :7], *weights[1:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d_model, n_heads", [(32, 4), (64, 2)])  # head dims 8 (torch fallback on CUDA) and 32
def test_model_on_the_triton_op_table_matches_the_reference(device, d_model, n_heads):
    """TRMModel(kernels="triton"): loss, logits and every parameter gradient equal the seed reference's."""
    ref, fast = make_pair(kernels="triton", device=device, d_model=d_model, n_heads=n_heads)
    ids, targets = random_batch(3, 11, 61, lengths=[11, 7, 3], device=device)
    expected, got = ref(ids, target_ids=targets), fast(ids, target_ids=targets)
    tol = 1e-4 if device == "cpu" else 1e-3  # 16 recursive calls: fp32 summation order shows at 1e-5
    valid = ids != 0
    torch.testing.assert_close(got["logits"][valid], expected["logits"][valid], rtol=tol, atol=tol)
    torch.testing.assert_close(got["loss"], expected["loss"], rtol=tol, atol=tol)
    expected["loss"].backward()
    got["loss"].backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_auto_keeps_the_torch_path_until_verified_on_a_gpu():
    from trm_fast.dispatch import tinynet_ops, triton_tinynet_ops
    from trm_fast.kernels import tinynet
    assert triton_tinynet_ops()[0] is tinynet
    assert tinynet_ops("triton", torch.device("cpu")) is tinynet
    assert tinynet_ops("auto", torch.device("cuda")) is (tinynet if tinynet.AUTO_ON_CUDA else torch_ops)


def test_model_on_the_triton_op_table_under_autocast(monkeypatch):
    """bf16 autocast (CPU here, CUDA in the benchmarks): the op table casts as F.linear / layer_norm do, and the
    weight gradients it sums in float32 (trm_fast.grad_sums) match the reference's; each step's output head and
    loss are one op (kernels/head_cross_entropy.py); the embedding adds its gradient into the tied head weight's
    sum."""
    from trm_fast.kernels import tinynet
    heads, head_copies = [], []
    monkeypatch.setattr(tinynet, "head_cross_entropy", lambda *a: heads.append(a) or hce.head_cross_entropy(*a))
    monkeypatch.setattr(tinynet, "embed", lambda *a: head_copies.append(a[-1]) or emb.embed(*a))
    ref, fast = make_pair(kernels="triton", d_model=64, n_heads=2)
    ids, targets = random_batch(2, 11, 61, lengths=[11, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = ref(ids, target_ids=targets), fast(ids, target_ids=targets)
        got["loss"].backward()
        expected["loss"].backward()
    assert len(heads) == fast.config.supervision_steps == len(got["all_logits"])
    assert head_copies[0] is heads[0][1]  # the head's weight copy, cast once
    assert got["logits"].dtype == expected["logits"].dtype and got["logits"].shape == expected["logits"].shape
    for a, b in zip(got["all_logits"], expected["all_logits"]):  # bf16 through 16 TinyNet calls: ~1% apart
        a, b = a.detach().float(), b.detach().float()
        assert float((a - b).norm() / b.norm()) < 2e-2
    torch.testing.assert_close(got["loss"].float(), expected["loss"].float(), rtol=2e-2, atol=2e-2)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        error = float((a.grad - b.grad).norm() / b.grad.norm().clamp(min=1e-12))
        assert error < 5e-2, name


def test_states_carry_their_autocast_copies(monkeypatch):
    """Under autocast the Triton op table's states carry a bf16 copy (x's cast once per forward) that every
    projection reads; without the copies (autocast's casts per use, gradients returned in bf16) the loss and
    gradients agree to bf16 rounding."""
    from trm_fast import model as model_module
    from trm_fast.kernels import tinynet
    fast = make_pair(kernels="triton", d_model=64, n_heads=2)[1]
    ids, targets = random_batch(2, 11, 61, lengths=[11, 6])
    projection_inputs = []
    real_concat = cl.concat_linear
    monkeypatch.setattr(tinynet, "concat_linear", lambda xs, *a: projection_inputs.append(xs) or real_concat(xs, *a))
    results = []
    for carry in (True, False):
        monkeypatch.setattr(tinynet, "STATES_CARRY_COPIES", carry)
        fast.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fast(ids, target_ids=targets)["loss"]
            loss.backward()
        results.append((loss.detach().float(), [p.grad.clone() for p in fast.parameters()]))
    calls = len(projection_inputs) // 2
    assert all(x.dtype == torch.bfloat16 for xs in projection_inputs[:calls] for x in xs)
    first = projection_inputs[0]
    assert first[1] is first[0] and not first[2].any()  # y0 = x's copy, z0 bf16 zeros: no casts of their own
    assert len({id(xs[0]) for xs in projection_inputs[:calls] if len(xs) == 3}) == 1  # x cast once
    assert all(x.dtype == torch.float32 for xs in projection_inputs[calls:] for x in xs)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)  # the same bf16 forward
    state = torch.zeros(3, dtype=torch.bfloat16)
    model_module._keep_copy(state, state)  # a state already in the copy's dtype keeps no copy (no cycle)
    assert not hasattr(state, "dtype_copy")
    for (name, _), a, b in zip(fast.named_parameters(), results[0][1], results[1][1]):
        assert float((a - b).norm() / b.norm().clamp(min=1e-12)) < 2e-2, name


def test_latent_state_as_its_copy_alone(monkeypatch):
    """Under autocast the model's forward keeps z (forward_xyz's output) only as its bf16 copy, which is all the
    projections read: the loss, the q_hats and every gradient are those of the forward that keeps z in float32
    too (a TinyNet call hook, which may read z, switches it back), in training mode with dropout."""
    from trm_fast.task_vectors import tinynet_call_hook
    fast = make_pair(kernels="triton", d_model=64, n_heads=2, dropout=0.1)[1].train()
    ids, targets = random_batch(2, 11, 61, lengths=[11, 6])
    real_xyz = type(fast.tiny_net).forward_xyz
    z_dtypes = []

    def recording_xyz(self, *args):
        z = real_xyz(self, *args)
        z_dtypes.append(z.dtype)
        return z
    monkeypatch.setattr(type(fast.tiny_net), "forward_xyz", recording_xyz)
    results = []
    for hooked in (False, True):
        fast.zero_grad()
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16), \
                (tinynet_call_hook(fast, lambda i, h: h) if hooked else contextlib.nullcontext()):
            out = fast(ids, target_ids=targets)
            out["loss"].backward()
        results.append((out["loss"].detach(), [q.detach() for q in out["q_hats"]],
                        [p.grad.clone() for p in fast.parameters()]))
    calls = len(z_dtypes) // 2
    assert set(z_dtypes[:calls]) == {torch.bfloat16} and set(z_dtypes[calls:]) == {torch.float32}
    (loss, q_hats, grads), (loss_hooked, q_hats_hooked, grads_hooked) = results
    assert torch.equal(loss, loss_hooked)
    assert all(torch.equal(a, b) for a, b in zip(q_hats, q_hats_hooked))
    for (name, _), a, b in zip(fast.named_parameters(), grads, grads_hooked):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("B, L, D", [(3, 37, 40), (2, 300, 70), (1, 1, 8)])
def test_masked_mean_kernels(B, L, D):
    """The q head's pooling and its gradient against float64 torch (the seed's formula): an integer mask with an
    all-padding row (count clamped to 1), a bool and a weighted float mask, a y with a row stride of its own."""
    g = torch.Generator().manual_seed(L)
    y = torch.randn(B, L, 2 * D, generator=g)[:, :, :D].to(KERNEL_DEVICE)
    grad = torch.randn(B, D, generator=g).to(KERNEL_DEVICE)
    mask = (torch.rand(B, L, generator=g) < 0.7).long()
    mask[0] = 0
    for m in (mask, mask.bool(), mask * torch.rand(B, L, generator=g)):
        leaf = y.double().cpu().requires_grad_()
        expected = torch_ops.masked_mean(leaf, m)
        (expected * grad.double().cpu()).sum().backward()
        pooled, count = mm.masked_mean_fwd_triton(y, m.to(KERNEL_DEVICE))
        assert pooled.dtype == torch.float32 and count.shape == (B,) and float(count.min()) >= 1.0
        _close(pooled.cpu(), expected.detach(), 1e-5)
        _close(mm.masked_mean_bwd_triton(grad, m.to(KERNEL_DEVICE), count).cpu(), leaf.grad, 1e-5)


def _q_head_params(D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) * scale + shift).to(KERNEL_DEVICE)
            for shape, scale, shift in (((D,), 0.2, 1.0), ((D,), 0.2, 0.0), ((1, D), D ** -0.5, 0.0), ((1,), 0.5, 0.0))]


@pytest.mark.parametrize("B, D", [(3, 40), (16, 512), (1, 8), (40, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_head_kernels(B, D, dtype):
    """q_hat and every gradient against the seed's modules' math with autocast's casts made explicit (float64 for a
    float32 head; a bf16 head rounds where autocast does: within a step of bf16, its gradients, sums over rows of
    rounded terms, within a few: the interpreter truncates to bf16 and torch's CPU kernels round in steps)."""
    ln_w, ln_b, w, b = _q_head_params(D, B)
    pooled = torch.randn(B, D, generator=torch.Generator().manual_seed(D)).to(KERNEL_DEVICE) * 3 + 1
    grad_q = torch.randn(B, 1, generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE, dtype)
    ref_dtype = torch.float64 if dtype == torch.float32 else dtype
    leaves = [t.cpu().to(torch.float64 if dtype == torch.float32 else torch.float32).requires_grad_()
              for t in (pooled, ln_w, ln_b, w, b)]
    expected = qh._torch_q_head(*leaves[:3], 1e-5, *leaves[3:], ref_dtype)
    expected.backward(grad_q.cpu().to(ref_dtype))
    q = qh.q_head_fwd_triton(pooled, ln_w, ln_b, 1e-5, w, b, dtype)
    assert q.dtype == dtype and q.shape == (B, 1)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(q.cpu().double(), expected.detach().double(), rtol=tol, atol=tol)
    grads = qh.q_head_bwd_triton(grad_q, pooled, ln_w, ln_b, 1e-5, w, q)
    for got, leaf in zip(grads, leaves):
        assert got.dtype == torch.float32 and got.shape == leaf.shape
        scale = float(leaf.grad.abs().max()) + 1e-12
        assert float((got.cpu().double() - leaf.grad.double()).abs().max()) <= (2 if B < 32 else 4) * tol * scale


@pytest.mark.parametrize("device", DEVICES)
def test_q_head_op(device):
    """The op table's q head equals the seed's modules (value and gradients, float32), under bf16 autocast too on
    CUDA; opcheck; errors."""
    ln_w, ln_b, w, b = (t.to(device) for t in _q_head_params(24))
    pooled = torch.randn(5, 24, generator=torch.Generator().manual_seed(2)).to(device)
    head = torch.nn.Sequential(torch.nn.LayerNorm(24), torch.nn.Linear(24, 1)).to(device)
    with torch.no_grad():
        for param, value in zip(head.parameters(), (ln_w, ln_b, w, b)):
            param.copy_(value)
    x1, x2 = pooled.clone().requires_grad_(), pooled.clone().requires_grad_()
    got = qh.q_head(x1, head[0].weight, head[0].bias, head[0].eps, head[1].weight, head[1].bias, None)
    expected = torch.sigmoid(head(x2))
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.sum(), [x1, *head.parameters()])
    expected_grads = torch.autograd.grad(expected.sum(), [x2, *head.parameters()])
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e)
    if device == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, expected = qh.q_head(pooled, ln_w, ln_b, 1e-5, w, b, torch.bfloat16), torch.sigmoid(head(pooled))
        assert got.dtype == expected.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected.float(), rtol=2 ** -7, atol=2 ** -8)
    torch.library.opcheck(torch.ops.trm_fast.q_head.default,
                          (pooled.clone().requires_grad_(), ln_w, ln_b, 1e-5, w.clone().requires_grad_(), b,
                           torch.float32))
    with pytest.raises(ValueError, match=r"q_head: weight must be \[1, 24\]"):
        qh.q_head(pooled, ln_w, ln_b, 1e-5, w[:, :4], b, None)
    with pytest.raises(ValueError, match="pooled must be a float"):
        qh.q_head(pooled[0], ln_w, ln_b, 1e-5, w, b, None)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_mean_op(device):
    """The op's value and gradient equal the seed's torch steps (bf16 y within its rounding); opcheck; errors."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 5, 8, generator=g).to(device)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], device=device)
    leaves = y.clone().requires_grad_(), y.clone().requires_grad_()
    got, expected = mm.masked_mean(leaves[0], mask), torch_ops.masked_mean(leaves[1], mask)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(leaves[0].grad, leaves[1].grad)
    torch.testing.assert_close(mm.masked_mean(y.bfloat16(), mask).float(), expected.detach(), rtol=1e-2, atol=1e-2)
    torch.library.opcheck(torch.ops.trm_fast.masked_mean.default, (y.clone().requires_grad_(), mask))
    with pytest.raises(ValueError, match="attention_mask must be a \\(2, 5\\) tensor"):
        mm.masked_mean(y, mask[:, :4])
    with pytest.raises(ValueError, match="y must be a float"):
        mm.masked_mean(y[0], mask)


def test_joined_weight_gradients(monkeypatch):
    """A forward whose backward runs once (`memoized_forward(one_backward=...)`, as GraphedTrainStep's) lays the
    tracked calls' FFN, output-projection and QKV inputs and output gradients out in row buffers (JoinedRows; the
    QKV gradients one slot on) and forms each of those weights' gradients with one GEMM over all of them: the loss
    and every gradient are those of the per-call GEMMs, in training mode with dropout, to float32 summation order;
    only those four weights' sums are joined, each over all eight tracked calls."""
    from trm_fast import grad_sums
    fast = make_pair(kernels="triton", d_model=64, n_heads=2, dropout=0.1)[1].train()
    ids, targets = random_batch(2, 11, 61, lengths=[11, 6])
    joined_products = []
    real_add = grad_sums.JoinedRows.add_product_into

    def recording_add(self, grad_sum):
        joined_products.append((self.grads.shape[1], self.inputs.shape[1], sorted(self.filled)) if self.filled
                               else None)
        real_add(self, grad_sum)
    monkeypatch.setattr(grad_sums.JoinedRows, "add_product_into", recording_add)
    results = []
    for one_backward in (None, 0):
        fast.zero_grad()
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16), fast.memoized_forward(one_backward=one_backward):
            out = fast(ids, target_ids=targets)
        out["loss"].backward()
        results.append((out["loss"].detach(), [p.grad.clone() for p in fast.parameters()]))
    assert sorted(p for p in joined_products if p is not None) == [
        (64, 64, list(range(8))), (64, 256, list(range(8))), (192, 64, list(range(8))), (256, 64, list(range(8)))]
    (loss, grads), (loss_joined, grads_joined) = results
    assert torch.equal(loss, loss_joined)
    for (name, _), a, b in zip(fast.named_parameters(), grads, grads_joined):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_joined_rows_slots_and_runs():
    """JoinedRows hands out one slot per use up to its capacity (rows fixed by the first), finds a tensor's slot by
    address, and forms the sum of the filled slots' products in one GEMM per run of adjacent slots."""
    from trm_fast.grad_sums import GradSum, JoinedRows
    weight = torch.zeros(3, 4)
    joined = JoinedRows(4)
    assert [joined.take(5, weight) for _ in range(4)] + [joined.take(5, weight)] == [0, 1, 2, 3, None]
    assert joined.inputs.shape == (20, 4) and joined.grads.shape == (20, 3)
    assert JoinedRows(2).take(5, weight) == 0 and joined.take(6, weight) is None
    g = torch.Generator().manual_seed(0)
    joined.inputs.copy_(torch.randn(20, 4, generator=g))
    joined.grads.copy_(torch.randn(20, 3, generator=g))
    assert joined.slot_of(joined.slot(joined.grads, 2).view(5, 1, 3), joined.grads) == 2
    assert joined.slot_of(joined.slot(joined.grads, 2).clone(), joined.grads) is None
    assert joined.slot_of(joined.grads[1:6], joined.grads) is None
    for k in (3, 0, 1):
        joined.fill(k)
    products = []
    total = GradSum(shape=weight.shape, joined=joined)
    real_addmm = total.addmm
    total.addmm = lambda a, b, scale=None: products.append(a.shape[1]) or real_addmm(a, b, scale)
    rows = torch.cat([torch.arange(0, 10), torch.arange(15, 20)])
    expected = joined.grads[rows].t() @ joined.inputs[rows]
    torch.testing.assert_close(total.take(), expected)
    assert products == [10, 5] and joined.inputs is None


def test_joined_rows_shifted_by_one_slot():
    """With shift 1 use k's output gradient goes to slot k + 1's gradient rows (one slot more than uses), handed out
    only once no backward reads the output there (the backward runs the uses last to first), and the weight's GEMM
    pairs those rows with slot k's inputs."""
    from trm_fast.grad_sums import GradSum, JoinedRows
    weight = torch.zeros(3, 4)
    joined = JoinedRows(3, shift=1)
    assert [joined.take(5, weight) for _ in range(3)] == [0, 1, 2] and joined.grads.shape == (20, 3)
    outputs = [joined.slot(joined.grads, k) for k in range(3)]
    assert joined.gradient_rows(outputs[0]) is None  # slot 1's output is still to be read
    grads = [joined.gradient_rows(outputs[k]) for k in (2, 1, 0)][::-1]
    assert [joined.slot_of(g, joined.grads) for g in grads] == [1, 2, 3]
    assert joined.gradient_rows(outputs[0].clone()) is None
    g = torch.Generator().manual_seed(1)
    joined.inputs.copy_(torch.randn(15, 4, generator=g))
    joined.grads.copy_(torch.randn(20, 3, generator=g))
    assert [joined.joins(k, grads[k]) for k in range(3)] == [True, True, True]
    assert not joined.joins(0, outputs[0])
    expected = joined.grads[5:].t() @ joined.inputs
    torch.testing.assert_close(GradSum(shape=weight.shape, joined=joined).take(), expected)

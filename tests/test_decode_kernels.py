"""The decoder's Triton kernels against the torch path (CPU: Triton's interpreter; CUDA: compiled)."""
import pytest
import torch

from parity_helpers import DEVICES
from trm_fast import torch_ops

triton = pytest.importorskip("triton")
from trm_fast.kernels import add_layer_norm, decode_attention, decode_feed_forward, decode_linear, pdl  # noqa: E402

# Where the Triton launchers run: the GPU, or Triton's interpreter on a CPU-only machine (conftest.py).
KERNEL_DEVICE = ["cuda"] if "cuda" in DEVICES else ["cpu"]


def attention_case(batch, capacity, heads, head_dim, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = heads * head_dim
    qkv = torch.randn(batch, 3 * D, generator=g).to(device, dtype)
    cache = torch.randn(batch, capacity, 2, heads, head_dim, generator=g).to(device, dtype)
    valid = torch.rand(batch, capacity, generator=g) > 0.3
    pos = torch.randint(0, capacity, (batch,), generator=g)
    pos[0], pos[-1] = capacity - 1, 0  # the last slot; a first token whose only key is itself
    valid[-1, 0] = True
    if batch > 2:
        valid[1, : pos[1] + 1] = False  # no valid key at all: zero output
    return qkv, cache, valid.to(device), pos.to(device)


@pytest.mark.parametrize("device", KERNEL_DEVICE)
@pytest.mark.parametrize("heads, head_dim", [(4, 32), (8, 64), (2, 128)])
@pytest.mark.parametrize("capacity", [1, 7, 64, 130])
def test_decode_attention_matches_torch(device, heads, head_dim, capacity):
    batch = 3 if capacity > 1 else 2
    qkv, cache, valid, pos = attention_case(batch, capacity, heads, head_dim, device, torch.float32)
    cache_ref = cache.clone()
    expected = torch_ops.decode_attention(qkv, cache_ref, valid, pos, heads)
    got = decode_attention.decode_attention_triton(qkv, cache, valid, pos, heads)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache, cache_ref)  # the new keys/values landed at pos, nothing else changed
    if batch > 2:
        assert torch.equal(got[1], torch.zeros_like(got[1]))


@pytest.mark.parametrize("device", KERNEL_DEVICE)
@pytest.mark.parametrize("config", [(16, 4), (128, 4), (32, 2), (64, 8)])
def test_decode_attention_configs(device, config):
    """Keys per block, warps."""
    qkv, cache, valid, pos = attention_case(5, 300, 4, 32, device, torch.float32, seed=config[0])
    pos[2] = 130
    expected = torch_ops.decode_attention(qkv, cache.clone(), valid, pos, 4)
    got = decode_attention.decode_attention_triton(qkv, cache, valid, pos, 4, config)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", KERNEL_DEVICE)
@pytest.mark.parametrize("rows, n, k", [(1, 512, 1536), (3, 37, 100), (8, 2048, 512), (2, 300, 8), (37, 70, 300),
                                        (64, 512, 2048)])
@pytest.mark.parametrize("bias, gelu", [(True, False), (True, True), (False, False)])
def test_decode_linear_matches_torch(device, rows, n, k, bias, gelu):
    g = torch.Generator().manual_seed(n + k)
    state = torch.randn(rows, k + 5, generator=g).to(device)
    x = state[:, 5:]  # a strided view, as the decoder's y | z slots
    weight = (torch.randn(n, k, generator=g) / k ** 0.5).to(device)
    b = torch.randn(n, generator=g).to(device) if bias else None
    got = decode_linear.decode_linear_triton(x, weight, b, gelu)
    torch.testing.assert_close(got, torch_ops.decode_linear(x, weight, b, gelu), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", KERNEL_DEVICE)
@pytest.mark.parametrize("rows, n, k", [(1, 2048, 512), (3, 37, 100)])
def test_decode_add_norm_linear_matches_torch(device, rows, n, k):
    g = torch.Generator().manual_seed(n)
    x, residual = (torch.randn(rows, k, generator=g).to(device) * 2 for _ in range(2))
    ln_w, ln_b, bias = (torch.randn(size, generator=g).to(device) for size in (k, k, n))
    weight = (torch.randn(n, k, generator=g) / k ** 0.5).to(device)
    state = torch.zeros(rows, 3 * k, device=device)
    normed = state[:, k: 2 * k]  # strided, as the decoder's h1 could be
    expected_normed = torch.empty(rows, k, device=device)
    expected = torch_ops.decode_add_norm_linear(x, residual, ln_w, ln_b, 1e-5, expected_normed, weight, bias, True)
    got = decode_linear.decode_linear_triton(x, weight, bias, True, (residual, ln_w, ln_b, 1e-5, normed))
    torch.testing.assert_close(normed, expected_normed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not state[:, :k].any() and not state[:, 2 * k:].any()
    with pytest.raises(ValueError, match="add_norm is fused for at most 4 rows, got"):
        decode_linear.decode_linear_triton(x.repeat(5, 1), weight, bias, True,
                                           (residual.repeat(5, 1), ln_w, ln_b, 1e-5, normed.repeat(5, 1)))


def ffn_case(rows, d, hidden, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(rows + d)
    h = torch.randn(rows, d + 3, generator=g)[:, 3:]  # strided rows, as the decoder's h1 could be
    w1, w2 = torch.randn(hidden, d, generator=g) / d ** 0.5, torch.randn(d, hidden, generator=g) / hidden ** 0.5
    vectors = [torch.randn(size, generator=g) for size in (hidden, d, d, d)]
    return [t.to(device, dtype) for t in (h, w1, vectors[0], w2, *vectors[1:])]


@pytest.mark.parametrize("device", KERNEL_DEVICE)
@pytest.mark.parametrize("rows, d, hidden, splits, config", [(5, 32, 512, 4, None), (37, 48, 200, 3, None),
                                                             (64, 64, 256, 1, (16, 32, 16, 4, 1)),
                                                             (20, 40, 100, 8, (32, 16, 16, 4, 1))])
def test_decode_ffn_add_norm_matches_torch(device, rows, d, hidden, splits, config):
    h, w1, b1, w2, b2, ln_w, ln_b = ffn_case(rows, d, hidden, device)
    expected = torch.empty(rows, d, device=device)
    torch_ops.decode_ffn_add_norm(h, w1, b1, w2, b2, ln_w, ln_b, 1e-5, expected)
    state = torch.zeros(rows, 3 * d, device=device)
    decode_feed_forward.decode_ffn_add_norm_triton(h, w1, b1, w2, b2, ln_w, ln_b, 1e-5, state[:, d: 2 * d], splits,
                                                   config)
    torch.testing.assert_close(state[:, d: 2 * d], expected, rtol=1e-5, atol=1e-5)
    assert not state[:, :d].any() and not state[:, 2 * d:].any()
    a = torch_ops.decode_linear(h, w1, b1, True)
    parts = decode_linear.split_k_partials(a, w2, splits, config)
    assert parts.shape[1:] == (rows, d) and (parts.shape[0] > 1) == (splits > 1) and parts.shape[0] <= splits
    torch.testing.assert_close(parts.sum(0), a @ w2.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 16, 64, 65])
def test_decode_ffn_add_norm_bf16_cuda(rows):
    args = ffn_case(rows, 512, 2048, "cuda", torch.bfloat16)
    expected = torch.empty(rows, 512, device="cuda")
    torch_ops.decode_ffn_add_norm(*[t.float() for t in args], 1e-5, expected)
    out = torch.empty(rows, 512, device="cuda", dtype=torch.bfloat16)
    torch.ops.trm_fast.decode_ffn_add_norm(*args, 1e-5, out)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=3e-2)


def test_decode_linear_tiles():
    assert decode_linear.block_n(512, 1536) == 4 and decode_linear.block_n(2048, 512) == 16
    assert decode_linear.block_n(1536, 512) == 8 and decode_linear.block_n(16000, 512) == 16
    assert decode_linear.block_n(1, 64) == 1 and decode_linear.block_n(100, 16384) == 1
    x = torch.zeros(5, 512)
    assert not decode_linear.fits(x, torch.zeros(8, 512)) and decode_linear.fits(x[:4], torch.zeros(2048, 512))
    assert decode_linear.fits(x[:1], torch.zeros(16000, 512)) and not decode_linear.fits(x[:2], torch.zeros(16000, 512))
    assert not decode_linear.fits(x[:1, :1], torch.zeros(8, 16385))
    w = torch.zeros(2048, 512)
    assert decode_linear.fits_tiles(x, w) and not decode_linear.fits_tiles(x[:4], w)
    assert not decode_linear.fits_tiles(torch.zeros(65, 512), w)
    assert not decode_linear.fits_tiles(x, torch.zeros(16000, 512))
    assert decode_linear.tile_config(64, 512, 2048) == (64, 16, 128, 4, 3)
    assert decode_linear.tile_config(5, 512, 100) == (16, 16, 128, 4, 3)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
def test_decode_linear_bf16_cuda():
    g = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=g).cuda().bfloat16() for shape in ((2, 512), (2048, 512), (2048,)))
    expected = torch.nn.functional.gelu(torch.nn.functional.linear(x.float(), weight.float(), bias.float()))
    torch.testing.assert_close(torch.ops.trm_fast.decode_linear(x, weight, bias, True).float(), expected,
                               rtol=2e-2, atol=2e-2)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
def test_decode_attention_bf16_cuda():
    qkv, cache, valid, pos = attention_case(64, 320, 8, 64, "cuda", torch.bfloat16)
    expected = torch_ops.decode_attention(qkv.float(), cache.float(), valid, pos, 8)
    got = torch.ops.trm_fast.decode_attention(qkv, cache, valid, pos, 8)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", KERNEL_DEVICE)
@pytest.mark.parametrize("n", [32, 100, 512])
def test_add_layer_norm_into_strided_output(device, n):
    g = torch.Generator().manual_seed(n)
    x, r = (torch.randn(5, n, generator=g).to(device) * 3 for _ in range(2))
    w, b = torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device)
    state = torch.zeros(5, 3 * n, device=device)
    add_layer_norm.add_layer_norm_triton(x, r, w, b, 1e-5, state[:, n: 2 * n])
    expected = torch.nn.functional.layer_norm(x + r, (n,), w, b, 1e-5)
    torch.testing.assert_close(state[:, n: 2 * n], expected, rtol=1e-5, atol=1e-5)
    assert not state[:, :n].any() and not state[:, 2 * n:].any()


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_opcheck_and_errors(device):
    qkv, cache, valid, pos = attention_case(3, 16, 4, 32, device, torch.float32)
    torch.library.opcheck(torch.ops.trm_fast.decode_attention, (qkv, cache, valid, pos, 4))
    x = torch.randn(4, 32, device=device)
    out = torch.empty(4, 64, device=device)[:, :32]
    torch.library.opcheck(torch.ops.trm_fast.add_layer_norm_into,
                          (x, x.clone(), torch.ones(32, device=device), torch.zeros(32, device=device), 1e-5, out))
    w = torch.randn(16, 32, device=device)
    torch.library.opcheck(torch.ops.trm_fast.decode_linear, (x, w, torch.randn(16, device=device), True))
    torch.library.opcheck(torch.ops.trm_fast.decode_linear, (x, w, None, False))
    normed = torch.empty(4, 32, device=device)
    ln = (torch.ones(32, device=device), torch.zeros(32, device=device))
    torch.library.opcheck(torch.ops.trm_fast.decode_add_norm_linear, (x, x.clone(), *ln, 1e-5, normed, w, None, True))
    h, w1, b1, w2, b2, ln_w, ln_b = ffn_case(6, 32, 64, device)
    ffn_out = torch.empty(6, 32, device=device)
    torch.library.opcheck(torch.ops.trm_fast.decode_ffn_add_norm, (h, w1, b1, w2, b2, ln_w, ln_b, 1e-5, ffn_out))
    with pytest.raises(ValueError, match=r"decode_ffn_add_norm: w2 must be \[32, 64\]"):
        torch.ops.trm_fast.decode_ffn_add_norm(h, w1, b1, w2.t().contiguous(), b2, ln_w, ln_b, 1e-5, ffn_out)
    with pytest.raises(ValueError, match="decode_ffn_add_norm: out must be"):
        torch.ops.trm_fast.decode_ffn_add_norm(h, w1, b1, w2, b2, ln_w, ln_b, 1e-5, ffn_out[:5])
    with pytest.raises(ValueError, match="of h's dtype"):
        torch.ops.trm_fast.decode_ffn_add_norm(h, w1.double(), b1, w2, b2, ln_w, ln_b, 1e-5, ffn_out)
    with pytest.raises(ValueError, match="decode_add_norm_linear: residual and normed"):
        torch.ops.trm_fast.decode_add_norm_linear(x, x[:3], *ln, 1e-5, normed, w, None, True)
    with pytest.raises(ValueError, match=r"decode_linear: x \(4, 32\) and weight \(16, 31\)"):
        torch.ops.trm_fast.decode_linear(x, w[:, :31].contiguous(), None, False)
    with pytest.raises(ValueError, match="bias must be"):
        torch.ops.trm_fast.decode_linear(x, w, torch.zeros(15, device=device), False)
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.trm_fast.decode_linear(x, w.double(), None, False)
    with pytest.raises(ValueError, match="kv_cache"):
        torch.ops.trm_fast.decode_attention(qkv, cache[:, :, :1], valid, pos, 4)
    with pytest.raises(ValueError, match="pos"):
        torch.ops.trm_fast.decode_attention(qkv, cache, valid, pos.int(), 4)
    with pytest.raises(ValueError, match="weight"):
        torch.ops.trm_fast.add_layer_norm_into(x, x, torch.ones(31, device=device), torch.zeros(32, device=device),
                                               1e-5, out)


def test_programmatic_cuda_launch_only_inside_the_decode_block():
    """PDL launches (Hopper+ CUDA only) happen inside `programmatic_launches`, never elsewhere or on the CPU."""
    cpu = torch.zeros(1)
    with pdl.programmatic_launches():
        with pdl.programmatic_launches():
            assert pdl.launch_options(cpu) == {"PDL": False}
        assert pdl._in_decode_step
    assert not pdl._in_decode_step
    if "cuda" in DEVICES and pdl.active(torch.device("cuda")):
        gpu = cpu.cuda()
        assert pdl.launch_options(gpu) == {"PDL": False}
        with pdl.programmatic_launches():
            assert pdl.launch_options(gpu) == {"PDL": True, "launch_pdl": True}

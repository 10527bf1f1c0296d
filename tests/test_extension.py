"""trm_fast._C ops (or their fallback) against PyTorch: numbers, dtypes, fake kernels, opcheck."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import trm_fast
from trm_fast import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def expected_confidence(logits):
    return torch.softmax(logits.double(), dim=-1).amax(dim=-1).float()


def test_extension_is_built():
    """`pip install -e .` must have built trm_fast._C (set TRM_FAST_ALLOW_NO_EXTENSION=1 to run without)."""
    if os.environ.get("TRM_FAST_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("running without the compiled extension on purpose")
    assert ops.EXTENSION_ERROR is None, ops.EXTENSION_ERROR
    if torch.cuda.is_available():
        assert not ops.CUDA_FALLBACK, "trm_fast._C was built without its CUDA ops on a CUDA machine"


def test_a_failed_compile_still_builds(tmp_path):
    """setup.py's promise: when the extension does not compile, the build (an in-place one, as `pip install -e .`
    makes) still succeeds without it, saying why (before session 32 it failed copying the missing library)."""
    shutil.copy(pathlib.Path(__file__).parents[1] / "setup.py", tmp_path)
    for folder in ("csrc", "trm_fast", "kernels"):
        (tmp_path / folder).mkdir()
    (tmp_path / "csrc" / "broken.cpp").write_text("this is not C++\n")
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "TRM_FAST_NO_CUDA": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "could not build trm_fast._C" in run.stdout + run.stderr
    assert not list((tmp_path / "trm_fast").glob("_C*"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-6), (torch.bfloat16, 1e-6),
                                        (torch.float16, 1e-6)])
@pytest.mark.parametrize("shape", [(7, 3, 50), (4, 16000), (1, 1), (3, 1025)])
def test_token_confidence_matches_softmax(device, dtype, tol, shape):
    logits = (torch.randn(shape, device=device) * 4).to(dtype)
    out = trm_fast.token_confidence(logits)
    assert out.dtype == torch.float32 and out.shape == shape[:-1]
    # bf16/fp16 inputs: compared with the same rounded inputs in float64, so only accumulation differs.
    torch.testing.assert_close(out, expected_confidence(logits), rtol=tol * 10, atol=tol)
    assert (out > 0).all() and (out <= 1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_token_confidence_extremes(device):
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, -100.0, 0.0, 0.0], [-1e4, -1e4, -1e4, 50.0],
                           [float("-inf"), 1.0, float("-inf"), 1.0]], device=device)
    expected = torch.tensor([0.25, 1.0, 1.0, 0.5], device=device)
    torch.testing.assert_close(trm_fast.token_confidence(logits), expected)
    empty = trm_fast.token_confidence(torch.empty(0, 5, device=device))
    assert empty.shape == (0,)
    strided = torch.randn(6, 40, device=device)[:, ::2]  # non-contiguous input
    torch.testing.assert_close(trm_fast.token_confidence(strided), expected_confidence(strided))


def test_token_confidence_bad_input():
    with pytest.raises(TypeError, match="floating point"):
        trm_fast.token_confidence(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab > 0"):
        trm_fast.token_confidence(torch.ones(2, 0))
    with pytest.raises(TypeError, match="must be a tensor"):
        trm_fast.token_confidence([1.0, 2.0])


@pytest.mark.parametrize("device", DEVICES)
def test_token_confidence_opcheck(device):
    for logits in (torch.randn(3, 4, 33, device=device), torch.randn(5, 700, device=device).bfloat16()):
        torch.library.opcheck(torch.ops.trm_fast.token_confidence.default, (logits,))


def test_token_confidence_under_compile():
    compiled = torch.compile(lambda x: trm_fast.token_confidence(x) * 2, fullgraph=True, backend="aot_eager")
    logits = torch.randn(4, 9, 31)
    torch.testing.assert_close(compiled(logits), expected_confidence(logits) * 2)


def expected_route(confidence, active, threshold):
    """route_tokens by a plain loop."""
    exited, index = [], []
    for i, (c, a) in enumerate(zip(confidence.tolist(), active.tolist())):
        exited.append(a and c >= threshold)
        if a and not exited[-1]:
            index.append(i)
    n = len(exited)
    return exited, index + [-1] * (n - len(index)), [sum(exited), len(index)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [0, 1, 31, 1023, 1024, 1025, 5000, 70001])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_route_tokens_matches_loop(device, n, threshold):
    g = torch.Generator().manual_seed(n)
    confidence = torch.rand(n, generator=g)
    confidence[::7] = 1.0  # exact hits of threshold 1.0 exit
    active = torch.rand(n, generator=g) > 0.3
    exited, index, counts = trm_fast.route_tokens(confidence.to(device), active.to(device), threshold)
    want = expected_route(confidence, active, threshold)
    assert exited.dtype == torch.bool and index.dtype == counts.dtype == torch.long
    assert (exited.tolist(), index.tolist(), counts.tolist()) == want


@pytest.mark.parametrize("device", DEVICES)
def test_route_tokens_all_and_none_exit(device):
    confidence = torch.full((3000,), 0.9, device=device)
    active = torch.ones(3000, dtype=torch.bool, device=device)
    exited, index, counts = trm_fast.route_tokens(confidence, active, 0.5)
    assert exited.all() and (index == -1).all() and counts.tolist() == [3000, 0]
    exited, index, counts = trm_fast.route_tokens(confidence, active, 0.95)
    assert not exited.any() and torch.equal(index, torch.arange(3000, device=device)) and counts.tolist() == [0, 3000]
    exited, index, counts = trm_fast.route_tokens(confidence, ~active, 0.5)  # nothing active: nothing exits
    assert not exited.any() and (index == -1).all() and counts.tolist() == [0, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_route_tokens_opcheck(device):
    confidence = torch.rand(2048, device=device)
    active = torch.rand(2048, device=device) > 0.5
    torch.library.opcheck(torch.ops.trm_fast.route_tokens.default, (confidence, active, 0.4))


def test_route_tokens_bad_input():
    conf, act = torch.rand(5), torch.ones(5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 1.5"):
        trm_fast.route_tokens(conf, act, 1.5)
    with pytest.raises(ValueError, match="threshold"):
        trm_fast.route_tokens(conf, act, -0.1)
    with pytest.raises(TypeError, match="confidence must be a 1-D torch.float32"):
        trm_fast.route_tokens(conf.double(), act, 0.5)
    with pytest.raises(TypeError, match="active must be a 1-D torch.bool"):
        trm_fast.route_tokens(conf, act.long(), 0.5)
    with pytest.raises(TypeError, match="1-D"):
        trm_fast.route_tokens(conf.view(1, 5), act.view(1, 5), 0.5)
    with pytest.raises(ValueError, match="must match"):
        trm_fast.route_tokens(conf, act[:4], 0.5)


def route_rows_inputs(m, n_tokens, device, seed=0):
    """A listed-rows routing case: ascending ids with -1 padding (about a tenth), one confidence per entry."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(n_tokens, generator=g)[:m - m // 10].sort().values
    rows = torch.cat([ids, torch.full((m - ids.numel(),), -1)])
    confidence = torch.rand(m, generator=g)
    confidence[::7] = 1.0
    exit_step = torch.randint(0, 3, (n_tokens,), generator=g)
    return [t.to(device) for t in (confidence, rows, torch.full((m,), 99), exit_step, torch.zeros(2, dtype=torch.long),
                                   torch.tensor(4))]


def expected_route_rows(confidence, rows, exit_step, step, threshold):
    """route_rows by a plain loop: (rows, exited_rows, exit_step, counts) after the call."""
    kept, exited, steps = [], [], exit_step.tolist()
    for c, i in zip(confidence.tolist(), rows.tolist()):
        if i >= 0:
            (exited if c >= threshold else kept).append(i)
            if c >= threshold:
                steps[i] = step
    m = rows.numel()
    return kept + [-1] * (m - len(kept)), exited + [-1] * (m - len(exited)), steps, [len(exited), len(kept)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [0, 1, 33, 1024, 1025, 5000, 9000])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_route_rows_matches_loop(device, m, threshold):
    confidence, rows, exited_rows, exit_step, counts, step = route_rows_inputs(m, m + 100, device, seed=m)
    want = expected_route_rows(confidence, rows, exit_step, 4, threshold)
    ops.route_rows(confidence, rows, exited_rows, exit_step, counts, step, threshold)
    assert (rows.tolist(), exited_rows.tolist(), exit_step.tolist(), counts.tolist()) == want


@pytest.mark.parametrize("device", DEVICES)
def test_route_rows_reads_strided_confidence(device):
    confidence, rows, exited_rows, exit_step, counts, step = route_rows_inputs(3000, 5000, device)
    strided = torch.stack([confidence, torch.zeros_like(confidence)], dim=1)[:, 0]  # every other float
    want = expected_route_rows(confidence, rows, exit_step, 4, 0.5)
    ops.route_rows(strided, rows, exited_rows, exit_step, counts, step, 0.5)
    assert (rows.tolist(), exited_rows.tolist(), exit_step.tolist(), counts.tolist()) == want


@pytest.mark.parametrize("device", DEVICES)
def test_route_rows_all_and_none_exit(device):
    for threshold, exited in ((0.0, True), (1.0, False)):
        confidence, rows, exited_rows, exit_step, counts, step = route_rows_inputs(3000, 5000, device)
        confidence.clamp_(max=0.99)
        listed = rows[rows >= 0].clone()
        ops.route_rows(confidence, rows, exited_rows, exit_step, counts, step, threshold)
        moved, stayed = (exited_rows, rows) if exited else (rows, exited_rows)
        assert torch.equal(moved[:listed.numel()], listed) and (moved[listed.numel():] == -1).all()
        assert (stayed == -1).all()
        assert counts.tolist() == ([listed.numel(), 0] if exited else [0, listed.numel()])
        assert (exit_step[listed] == 4).all() == exited


@pytest.mark.parametrize("device", DEVICES)
def test_route_rows_opcheck(device):
    torch.library.opcheck(torch.ops.trm_fast.route_rows.default, (*route_rows_inputs(2048, 4000, device), 0.4))


def test_route_rows_bad_input():
    confidence, rows, exited_rows, exit_step, counts, step = route_rows_inputs(10, 20, "cpu")
    good = dict(confidence=confidence, rows=rows, exited_rows=exited_rows, exit_step=exit_step, counts=counts,
                step=step, threshold=0.5)
    for change, error, match in [
            (dict(threshold=1.5), ValueError, r"threshold must be in \[0, 1\], got 1.5"),
            (dict(confidence=confidence.double()), TypeError, "confidence must be a torch.float32"),
            (dict(rows=rows.int()), TypeError, "rows must be a torch.int64"),
            (dict(confidence=confidence[:9]), ValueError, "one length"),
            (dict(counts=counts[:1]), ValueError, "counts"),
            (dict(exit_step=exit_step[::2]), ValueError, "contiguous"),
            (dict(exit_step=exit_step[:5]), IndexError, "out of range for 5 tokens")]:
        with pytest.raises(error, match=match):
            ops.route_rows(**{**good, **change})


def test_fallbacks_match_loop():
    """The pure-PyTorch fallbacks (used when _C is not built) compute the same as the reference loops."""
    confidence, active = torch.rand(2500), torch.rand(2500) > 0.4
    exited, index, counts = ops.FALLBACKS["route_tokens"](confidence, active, 0.6)
    assert (exited.tolist(), index.tolist(), counts.tolist()) == expected_route(confidence, active, 0.6)
    confidence, rows, exited_rows, exit_step, counts, step = route_rows_inputs(1500, 3000, "cpu")
    want = expected_route_rows(confidence, rows, exit_step, 4, 0.6)
    ops.FALLBACKS["route_rows"](confidence, rows, exited_rows, exit_step, counts, step, 0.6)
    assert (rows.tolist(), exited_rows.tolist(), exit_step.tolist(), counts.tolist()) == want
    logits = torch.randn(4, 300)
    torch.testing.assert_close(ops.FALLBACKS["token_confidence"](logits), expected_confidence(logits))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("width", [1, 3, 64, 130])
def test_gather_and_scatter_rows(device, dtype, width):
    src = torch.randn(9, width, device=device).to(dtype)
    index = torch.tensor([4, 0, -1, 8, 4, -1], device=device)
    out = ops.gather_rows(src, index)
    expected = torch.stack([src[i] if i >= 0 else torch.zeros_like(src[0]) for i in index.tolist()])
    assert torch.equal(out, expected) and torch.equal(ops._gather_rows_torch(src, index), expected)
    dst = torch.zeros(9, width, device=device, dtype=dtype)
    rows = torch.tensor([7, -1, 2], device=device)
    block = torch.randn(3, width, device=device).to(dtype)
    ops.scatter_rows(dst, rows, block)
    assert torch.equal(dst[7], block[0]) and torch.equal(dst[2], block[2])
    assert int((dst != 0).any(dim=1).sum()) <= 2  # nothing else written
    reference = torch.zeros_like(dst)
    ops._scatter_rows_torch(reference, rows, block)
    assert torch.equal(dst, reference)
    assert ops.gather_rows(src, index[:0]).shape == (0, width)
    # src as a column block of a wider tensor (read in place, also off 4-byte alignment), or strided columns
    wide = torch.randn(3, 2 * width + 3, device=device).to(dtype)
    for block in (wide[:, 1:1 + width], wide[:, width + 2:2 * width + 2], wide[:, ::2][:, :width]):
        dst.zero_()
        reference.zero_()
        ops.scatter_rows(dst, rows, block)
        ops._scatter_rows_torch(reference, rows, block)
        assert torch.equal(dst, reference) and torch.equal(dst[7], block[0])


@pytest.mark.parametrize("device", DEVICES)
def test_rows_opcheck(device):
    src, index = torch.randn(6, 5, device=device), torch.tensor([3, -1, 0], device=device)
    torch.library.opcheck(torch.ops.trm_fast.gather_rows.default, (src, index))
    torch.library.opcheck(torch.ops.trm_fast.scatter_rows.default, (src.clone(), index, torch.randn(3, 5, device=device)))


def test_rows_bad_input():
    src = torch.randn(4, 3)
    with pytest.raises(TypeError, match="index must be a 1-D int64 tensor"):
        ops.gather_rows(src, torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        ops.gather_rows(torch.randn(4), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"src must be \[len\(index\), D\]"):
        ops.scatter_rows(src, torch.tensor([1]), torch.randn(2, 3))
    with pytest.raises(ValueError, match="contiguous"):
        ops.scatter_rows(torch.randn(3, 4).t(), torch.tensor([1]), torch.randn(1, 3))
    with pytest.raises(IndexError, match="gather_rows: index 4 out of range for 4 rows"):
        ops.gather_rows(src, torch.tensor([0, 4]))
    with pytest.raises(IndexError, match="scatter_rows: index 5 out of range for 4 rows"):
        ops.scatter_rows(src, torch.tensor([5]), torch.randn(1, 3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [1, 37, 4096])
def test_hidden_confidence_matches_softmax_of_the_head(device, dtype, chunk):
    hidden = (torch.randn(3, 5, 24, device=device) * 0.7).to(dtype)
    weight = torch.randn(300, 24, device=device).to(dtype)
    out = ops.hidden_confidence(hidden, weight, chunk)
    expected = torch.softmax(hidden.double() @ weight.double().t(), dim=-1).amax(-1).float()
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    fallback = ops._hidden_confidence_torch(hidden.reshape(-1, 24), weight, chunk).view(3, 5)
    torch.testing.assert_close(fallback, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ops.token_confidence(hidden.float() @ weight.float().t()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_hidden_confidence_opcheck(device):
    torch.library.opcheck(torch.ops.trm_fast.hidden_confidence.default,
                          (torch.randn(6, 8, device=device), torch.randn(50, 8, device=device), 16))


def test_hidden_confidence_bad_input():
    with pytest.raises(TypeError, match="floating-point"):
        ops.hidden_confidence(torch.ones(2, 3, dtype=torch.long), torch.randn(5, 3))
    with pytest.raises(ValueError, match="must agree"):
        ops.hidden_confidence(torch.randn(2, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        ops.hidden_confidence(torch.randn(2, 3), torch.randn(5, 3), 0)


def lt_matmul_operands(R, K, N, dtype, device, transposed=True, has_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(R, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype)
    bias = torch.randn(N, generator=g).to(device, dtype) if has_bias else None
    return a, (w.t() if transposed else w.t().contiguous()), bias


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("R, K, N", [(1, 1, 1), (37, 24, 40), (130, 512, 1536), (64, 256, 1000)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
def test_lt_matmul_matches_float64(device, dtype, tol, R, K, N, transposed, has_bias):
    a, b, bias = lt_matmul_operands(R, K, N, dtype, device, transposed, has_bias)
    out = ops.lt_matmul(a, b, bias)
    expected = a.double() @ b.double() + (bias.double() if has_bias else 0)
    assert out.dtype == dtype and out.shape == (R, N)
    assert float((out.double() - expected).abs().max()) <= tol * float(expected.abs().max())
    # torch's own product rounds the same float32 sums: at most one unit of the last place apart
    torch.testing.assert_close(out, ops.lt_matmul_torch(a, b, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_lt_matmul_any_strides(device):
    """Operands in other layouts, which cuBLASLt takes (a column-major a, every other row of a, a column block of
    a wider b) or does not (b with no unit stride), give torch's numbers."""
    a, b, bias = lt_matmul_operands(48, 64, 80, torch.bfloat16, device)
    wide = torch.randn(64, 170, device=device).bfloat16()
    for a_, b_ in ((a.t().contiguous().t(), b), (a, wide[:, ::2][:, :80]), (a, wide[:, 3:83]), (a[::2], b)):
        torch.testing.assert_close(ops.lt_matmul(a_, b_, bias), ops.lt_matmul_torch(a_, b_, bias))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@pytest.mark.parametrize("R, K, N", [(8192, 512, 1536), (8192, 512, 2048), (8192, 256, 768), (8192, 2048, 512)])
def test_lt_matmul_is_torchs_product_at_the_tinynet_shapes(R, K, N):
    """At the shapes the TinyNet gives it (QKV and FFN up with their bias, the FFN backward's products) the tuned
    algorithm sums the same float32 products as torch's kernel, in another order at most: within one bf16 unit
    of torch's outputs."""
    for transposed, has_bias in ((True, True), (False, False)):
        a, b, bias = lt_matmul_operands(R, K, N, torch.bfloat16, "cuda", transposed, has_bias)
        ours, theirs = ops.lt_matmul(a, b, bias).float(), ops.lt_matmul_torch(a, b, bias).float()
        assert bool(((ours - theirs).abs() <= theirs.abs() * 2 ** -7 + 1e-6).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("R, K, N", [(37, 24, 40), (130, 512, 256)])
def test_lt_matmul_into_matches_float64(device, out_dtype, accumulate, R, K, N):
    """out (=|+=) a @ b for every layout of a and b (the weight gradients' grad.T @ x reads a column-major a), into a
    float32 or bf16 out."""
    a, b, _ = lt_matmul_operands(R, K, N, torch.bfloat16, device, has_bias=False)
    start = torch.randn(R, N, generator=torch.Generator().manual_seed(1)).to(device, out_dtype)
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    for a_ in (a, a.t().contiguous().t()):
        for b_ in (b, b.contiguous()):
            out = start.clone()
            ops.lt_matmul_into(out, a_, b_, accumulate)
            expected = a.double() @ b.double() + (start.double() if accumulate else 0)
            assert float((out.double() - expected).abs().max()) <= tol * float(expected.abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_lt_matmul_scaled_matches_float64(device, out_dtype, accumulate):
    """With a scale tensor the product is scale * a @ b (the scale read on the device), new or into out, for every
    layout of a and b."""
    a, b, _ = lt_matmul_operands(130, 512, 256, torch.bfloat16, device, has_bias=False, seed=5)
    scale = torch.tensor([0.3], device=device)
    start = torch.randn(130, 256, generator=torch.Generator().manual_seed(2)).to(device, out_dtype)
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    product = 0.3 * (a.double() @ b.double())
    for a_ in (a, a.t().contiguous().t()):
        for b_ in (b, b.contiguous()):
            out = start.clone()
            ops.lt_matmul_into(out, a_, b_, accumulate, scale=scale)
            expected = product + (start.double() if accumulate else 0)
            assert float((out.double() - expected).abs().max()) <= tol * float(expected.abs().max())
            new = ops.lt_matmul(a_, b_, scale=scale)
            assert new.dtype == torch.bfloat16
            torch.testing.assert_close(new, ops.lt_matmul_torch(a_, b_, None, scale))
            assert float((new.double() - product).abs().max()) <= 1e-2 * float(product.abs().max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_lt_matmul_scale_is_read_at_each_replay():
    """In a CUDA graph the scale is read when the product runs: a new value in the same tensor scales the next
    replay."""
    from trm_fast import cuda_graphs
    a, b, _ = lt_matmul_operands(512, 128, 384, torch.bfloat16, "cuda", has_bias=False)
    scale = torch.tensor([1.0], device="cuda")
    out = torch.zeros(512, 384, device="cuda")
    graph = cuda_graphs.capture(lambda: ops.lt_matmul_into(out, a, b, accumulate=False, scale=scale))
    scale.fill_(0.25)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, 0.25 * (a.float() @ b.float()), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_lt_matmul_into_a_column_block(device):
    """out may be a column block of a wider tensor (its rows' stride > N): the block gets the product, with the
    first call's timing included, and the columns around it are left as they were."""
    a, b, _ = lt_matmul_operands(160, 64, 48, torch.bfloat16, device, has_bias=False, seed=3)
    for dtype in (torch.float32, torch.bfloat16):
        wide = torch.randn(160, 70, device=device).to(dtype)
        before = wide.clone()
        ops.lt_matmul_into(wide[:, 5:53], a, b, accumulate=True)
        expected = before[:, 5:53].double() + a.double() @ b.double()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert float((wide[:, 5:53].double() - expected).abs().max()) <= tol * float(expected.abs().max())
        assert torch.equal(wide[:, :5], before[:, :5]) and torch.equal(wide[:, 53:], before[:, 53:])


@pytest.mark.parametrize("device", DEVICES)
def test_lt_matmul_into_opcheck(device):
    a, b, _ = lt_matmul_operands(33, 40, 24, torch.bfloat16, device, has_bias=False)
    for out_dtype, accumulate in ((torch.float32, True), (torch.bfloat16, False)):
        out = torch.randn(33, 24, device=device).to(out_dtype)
        torch.library.opcheck(torch.ops.trm_fast.lt_matmul_into.default, (out, a.t().contiguous().t(), b, accumulate))
        torch.library.opcheck(torch.ops.trm_fast.lt_matmul_into.default,
                              (out, a, b, accumulate, torch.tensor([0.5], device=device)))


@pytest.mark.parametrize("device", DEVICES)
def test_lt_matmul_into_with_a_bias(device):
    """out = a @ b + bias into a given tensor (a row block of a larger buffer) is lt_matmul's product, bit for bit;
    a bias with accumulation, a float32 out or a scale is refused."""
    a, b, bias = lt_matmul_operands(33, 40, 24, torch.bfloat16, device, has_bias=True)
    buffer = torch.zeros(66, 24, device=device, dtype=torch.bfloat16)
    ops.lt_matmul_into(buffer[33:], a, b, bias=bias)
    assert torch.equal(buffer[33:], ops.lt_matmul(a, b, bias)) and not buffer[:33].any()
    torch.library.opcheck(torch.ops.trm_fast.lt_matmul_into.default, (buffer[33:], a, b, False, None, bias))
    for out, accumulate, scale in ((buffer[33:], True, None), (torch.zeros(33, 24, device=device), False, None),
                                   (buffer[33:], False, torch.tensor([0.5], device=device))):
        with pytest.raises(ValueError, match="lt_matmul_into: (a bias needs|takes a bias or a scale)"):
            ops.lt_matmul_into(out, a, b, accumulate, scale=scale, bias=bias)


def test_lt_matmul_into_bad_input():
    a, b, _ = lt_matmul_operands(4, 3, 5, torch.bfloat16, "cpu", has_bias=False)
    for out in (torch.zeros(4, 6), torch.zeros(4, 5, dtype=torch.float16), torch.zeros(5, 4).t(), "out"):
        with pytest.raises(ValueError, match=r"lt_matmul_into: out must be \[4, 5\]"):
            ops.lt_matmul_into(out, a, b)
    with pytest.raises(ValueError, match=r"lt_matmul_into: expects a \[R, K\], b \[K, N\]"):
        ops.lt_matmul_into(torch.zeros(4, 5), a, b.t())
    with pytest.raises(RuntimeError, match="lt_matmul_timings: needs CUDA tensors"):
        ops.lt_matmul_timings(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_lt_matmul_timings():
    """Every algorithm cuBLASLt offers for a TinyNet product runs, and so does torch's call (timed last); a product
    cuBLASLt does not take (a with no unit stride) has torch's call alone."""
    a, b, bias = lt_matmul_operands(8192, 512, 1536, torch.bfloat16, "cuda")
    for args in ((a, b, bias), (a.t().contiguous().t(), b.contiguous(), None, torch.float32, True)):
        times = ops.lt_matmul_timings(*args)
        assert len(times) >= 2 and all(0 < t for t in times) and times[0] < float("inf") > times[-1]
    assert len(ops.lt_matmul_timings(a[:, ::2], b[::2])) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_lt_matmul_in_a_cuda_graph():
    from trm_fast import cuda_graphs
    a, b, bias = lt_matmul_operands(512, 128, 384, torch.bfloat16, "cuda")
    out = {}
    graph = cuda_graphs.capture(lambda: out.update(value=ops.lt_matmul(a, b, bias)))
    a.copy_(torch.randn_like(a))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out["value"], ops.lt_matmul_torch(a, b, bias))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@pytest.mark.skipif(os.environ.get("TRM_FAST_LT_TUNE") == "0", reason="counted only with tuning on")
def test_lt_matmul_first_met_under_capture_is_counted():
    """A product first met under graph capture cannot be timed: it runs the heuristic's first algorithm (right
    numbers) and is counted; one run before its capture, as cuda_graphs.capture's warm-up does, is not."""
    a, b, _ = lt_matmul_operands(200, 96, 136, torch.bfloat16, "cuda", has_bias=False)
    ops.lt_matmul(a[:8], b)  # cuBLASLt's handle made outside the capture
    before = ops.lt_matmul_untimed_captures()
    out = {}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out["value"] = ops.lt_matmul(a, b)
    graph.replay()
    torch.cuda.synchronize()
    assert ops.lt_matmul_untimed_captures() == before + 1
    torch.testing.assert_close(out["value"], ops.lt_matmul_torch(a, b))
    from trm_fast import cuda_graphs
    cuda_graphs.capture(lambda: ops.lt_matmul(a[:, :72], b[:72]))
    assert ops.lt_matmul_untimed_captures() == before + 1


@pytest.mark.parametrize("device", DEVICES)
def test_lt_matmul_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16):
        a, b, bias = lt_matmul_operands(33, 40, 24, dtype, device)
        torch.library.opcheck(torch.ops.trm_fast.lt_matmul.default, (a, b, bias))
        torch.library.opcheck(torch.ops.trm_fast.lt_matmul.default, (a, b.contiguous()))
        torch.library.opcheck(torch.ops.trm_fast.lt_matmul.default, (a, b, None, torch.tensor([2.0], device=device)))


def test_lt_matmul_bad_input():
    a, b, bias = lt_matmul_operands(4, 3, 5, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"lt_matmul: expects a \[R, K\], b \[K, N\]"):
        ops.lt_matmul(a, b.t(), bias)
    with pytest.raises(ValueError, match=r"bias \[N\]"):
        ops.lt_matmul(a, b, bias[:4])
    with pytest.raises(ValueError, match="must have a's dtype"):
        ops.lt_matmul(a, b.double(), bias)
    with pytest.raises(TypeError, match="b must be a floating-point tensor"):
        ops.lt_matmul(a, b.long())
    for scale in (torch.tensor([0.5], dtype=torch.float64), torch.ones(2), 0.5):
        with pytest.raises(ValueError, match="scale must be a float32 tensor of one element"):
            ops.lt_matmul(a, b, scale=scale)
        with pytest.raises(ValueError, match="scale must be a float32 tensor of one element"):
            ops.lt_matmul_into(torch.zeros(4, 5), a, b, scale=scale)
    with pytest.raises(ValueError, match="a bias or a scale, not both"):
        ops.lt_matmul(a, b, bias, scale=torch.ones(1))


def test_doctor_says_whether_lt_matmul_times_its_algorithms(monkeypatch):
    monkeypatch.setattr(ops, "EXTENSION_ERROR", None)
    monkeypatch.setattr(ops, "CUDA_FALLBACK", set())
    monkeypatch.delenv("TRM_FAST_LT_TUNE", raising=False)
    cuda = torch.device("cuda")
    timed = "trm_fast._C (CUDA; each shape's algorithm timed at its first call)"
    assert ops.op_backend("lt_matmul_into", cuda) == timed
    monkeypatch.setenv("TRM_FAST_LT_TUNE", "0")
    assert ops.op_backend("lt_matmul", cuda) == "trm_fast._C (CUDA; cuBLASLt's heuristic's algorithms)"
    assert ops.op_backend("gather_rows", cuda) == "trm_fast._C (CUDA)"

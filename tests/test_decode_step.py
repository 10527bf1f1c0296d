"""The decode step's bookkeeping kernels against their torch versions (CPU: Triton's interpreter; CUDA:
compiled), float32, exact where the torch version is exact."""
import pytest
import torch

from parity_helpers import DEVICES
from trm_fast import torch_ops

triton = pytest.importorskip("triton")
from trm_fast.kernels import decode_step  # noqa: E402

KERNEL_DEVICE = ["cuda"] if "cuda" in DEVICES else ["cpu"]


def _clones(*tensors):
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("device", KERNEL_DEVICE)
@pytest.mark.parametrize("D", [32, 48])
def test_append(device, D):
    g = torch.Generator().manual_seed(D)
    B, T, V = 4, 9, 30
    token = torch.tensor([5, 0, 29, 7]).to(device)  # row 1 appends the pad id
    pos = torch.tensor([0, 3, 8, 4]).to(device)
    embed, table = torch.randn(V, D, generator=g).to(device), torch.randn(T, D, generator=g).to(device)
    state = [torch.randn(B, T, D, generator=g).to(device), (torch.rand(B, T, generator=g) > 0.5).to(device),
             torch.rand(B, generator=g).to(device) * 5, torch.randn(B, 3 * D, generator=g).to(device)]
    expected = _clones(*state)
    torch_ops.decode_append(token, pos, embed, table, 0, *expected)
    decode_step.append_triton(token, pos, embed, table, 0, *state)
    for got, want in zip(state, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not state[1][1, 3] and state[1][0, 0] and torch.equal(state[3][:, 2 * D:], torch.zeros(B, D).to(device))


@pytest.mark.parametrize("device", KERNEL_DEVICE)
def test_pool(device):
    g = torch.Generator().manual_seed(0)
    B, D = 3, 40
    slots = torch.randn(B, 3 * D, generator=g).to(device)
    y = slots[:, D: 2 * D]  # the decoder's y slot: a strided view
    token_valid = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    pos = torch.tensor([1, 2, 0]).to(device)  # rows 0, 1 add a valid token, row 2 an invalid one (count 0)
    count = torch.tensor([2.0, 3.0, 0.0]).to(device)
    ln_w, ln_b, q_w = (torch.randn(*shape, generator=g).to(device) for shape in ((D,), (D,), (1, D)))
    q_b = torch.randn(1, generator=g).to(device)
    state = [torch.zeros(B, D).to(device), torch.randn(B, D, generator=g).to(device), torch.zeros(B).to(device)]
    expected = _clones(*state)
    args = (y, token_valid.to(device), pos, count, ln_w, ln_b, 1e-5, q_w, q_b)
    torch_ops.decode_pool(*args, *expected)
    decode_step.pool_triton(*args, *state)
    for got, want in zip(state, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(state[0], y) and ((state[2] > 0) & (state[2] < 1)).all()


@pytest.mark.parametrize("device", KERNEL_DEVICE)
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_select(device, steps, per_sequence):
    g = torch.Generator().manual_seed(steps)
    B, D = 5, 16
    ys = torch.randn(steps, B, D, generator=g).to(device)
    threshold = torch.tensor(0.5).to(device)
    cases = [torch.rand(steps, B, generator=g), torch.full((steps, B), 0.9)]  # mixed; everyone halts at step 0
    cases.append(cases[0].clone())
    cases[2][:, 1] = 0.1  # one row never halts, but it is inactive: the batch-wide rule ignores it
    for q in cases:
        active = torch.ones(B, dtype=torch.bool)
        active[1] = q is not cases[2]
        args = (ys, q.to(device), active.to(device), threshold, torch.tensor(per_sequence).to(device))
        torch.testing.assert_close(decode_step.select_triton(*args), torch_ops.decode_select(*args), rtol=0, atol=0)
    if steps > 1:
        assert torch.equal(decode_step.select_triton(ys, cases[1].to(device), active.to(device), threshold,
                                                     torch.tensor(per_sequence).to(device)), ys[0])


@pytest.mark.parametrize("device", KERNEL_DEVICE)
@pytest.mark.parametrize("V", [37, 20000])
def test_emit(device, V):
    g = torch.Generator().manual_seed(V)
    B, T = 3, 8
    logits = torch.randn(B, V, generator=g)
    logits[0, [3, V - 2]] = 50.0  # a tie: the first index wins (across blocks when V > 16384)
    logits[1, 2] = 60.0  # row 1 emits stop id 2
    logits = logits.to(device)
    stop_ids, greedy = torch.tensor([2, 9]).to(device), torch.tensor(True).to(device)
    first_pos, pos = torch.tensor([4, 1, 6]).to(device), torch.tensor([7, 1, 8]).to(device)
    state = [torch.zeros(B, dtype=torch.long).to(device), torch.full((T, B), -1).to(device),
             torch.tensor([True, True, False]).to(device), pos, torch.zeros(B, V).to(device)]
    expected = _clones(*state)
    torch_ops.decode_emit(logits, stop_ids, greedy, first_pos, *expected)
    decode_step.emit_triton(logits, stop_ids, greedy, first_pos, *state)
    for got, want in zip(state, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert state[0].tolist()[:2] == [3, 2] and state[2].tolist() == [True, False, False]
    assert state[1][3, 0] == 3 and state[1][0, 1] == 2 and state[3].tolist() == [8, 2, 9]


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_opcheck_and_errors(device):
    B, T, D = 2, 5, 8
    long = dict(dtype=torch.long, device=device)
    token, pos = torch.tensor([3, 0], **long), torch.tensor([1, 2], **long)
    embed, table = torch.randn(10, D, device=device), torch.randn(T, D, device=device)
    valid, count = torch.zeros(B, T, dtype=torch.bool, device=device), torch.zeros(B, device=device)
    xyz, x_cache = torch.zeros(B, 3 * D, device=device), torch.zeros(B, T, D, device=device)
    ops = torch.ops.trm_fast
    torch.library.opcheck(ops.decode_append, (token, pos, embed, table, 0, x_cache, valid, count, xyz))
    ln_w, ln_b, q_w, q_b = (torch.randn(*s, device=device) for s in ((D,), (D,), (1, D), (1,)))
    ys, pooled, q = torch.zeros(3, B, D, device=device), torch.zeros(B, D, device=device), torch.zeros(3, B, device=device)
    torch.library.opcheck(ops.decode_pool, (xyz[:, D: 2 * D], valid, pos, count, ln_w, ln_b, 1e-5, q_w, q_b, ys[0],
                                            pooled, q[0]))
    active = torch.ones(B, dtype=torch.bool, device=device)
    flags = (torch.tensor(0.5, device=device), torch.tensor(False, device=device))
    torch.library.opcheck(ops.decode_select, (ys, q, active, *flags))
    logits = torch.randn(B, 12, device=device)
    torch.library.opcheck(ops.decode_emit, (logits, torch.tensor([0, 1], **long), torch.tensor(True, device=device),
                                            pos.clone(), token.clone(), torch.zeros(T, B, **long), active.clone(),
                                            pos.clone(), torch.empty_like(logits)))
    with pytest.raises(ValueError, match="decode_append: pos must be contiguous torch.int64"):
        ops.decode_append(token, pos.int(), embed, table, 0, x_cache, valid, count, xyz)
    with pytest.raises(ValueError, match=r"decode_pool: y, ys and pooled \[2, 8\]"):
        ops.decode_pool(xyz[:, D: 2 * D], valid, pos, count, ln_w, ln_b, 1e-5, q_w[:, :4], q_b, ys[0], pooled, q[0])
    with pytest.raises(ValueError, match="decode_select: ys"):
        ops.decode_select(ys, q.double(), active, *flags)
    with pytest.raises(ValueError, match="decode_emit: logits"):
        ops.decode_emit(logits, torch.tensor([0], **long), torch.tensor(True, device=device), pos, token,
                        torch.zeros(T, B, **long), active, pos, torch.empty_like(logits))

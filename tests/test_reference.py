"""The reference against SPEC §1, computed independently by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from trm_fast import reference
from parity_helpers import SMALL, make_pair, random_batch


def manual_block(block, h, mask):
    """TinyBlock by hand: per-head causal softmax attention with key padding, post-LN, erf GELU FFN."""
    B, L, D = h.shape
    H = block.attn.num_heads
    qkv = h @ block.attn.in_proj_weight.T + block.attn.in_proj_bias
    q, k, v = (t.reshape(B, L, H, D // H).transpose(1, 2) for t in qkv.split(D, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // H)
    allowed = torch.ones(L, L, dtype=torch.bool).tril() & (mask != 0)[:, None, None, :]
    a = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(B, L, D)
    a = a @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    h = F.layer_norm(h + a, (D,), block.ln1.weight, block.ln1.bias)
    f = block.ffn[0](h)
    f = 0.5 * f * (1 + torch.erf(f / math.sqrt(2)))
    return F.layer_norm(h + block.ffn[2](f), (D,), block.ln2.weight, block.ln2.bias)


def test_tiny_block_matches_hand_computation(pair):
    ref, _ = pair
    h = torch.randn(2, 7, SMALL["d_model"])
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    torch.testing.assert_close(ref.tiny_net.block(h, mask), manual_block(ref.tiny_net.block, h, mask),
                               rtol=1e-5, atol=1e-5)


def test_forward_matches_hand_written_recursion(pair):
    ref, _ = pair
    cfg = ref.config
    ids, targets = random_batch(2, 9, cfg.vocab_size, [9, 6])
    mask = (ids != 0).long()
    net = ref.tiny_net
    x = ref.token_embed(ids) + ref.pos_embed.weight[:9]
    y, z = x.clone(), torch.zeros_like(x)
    ces, bces, qs = [], [], []
    for _ in range(cfg.supervision_steps):
        for _ in range(cfg.deep_steps * cfg.latent_steps):
            z = manual_block(net.block, net.xyz_proj(torch.cat([x, y, z], -1)), mask)
            y = manual_block(net.block, net.yz_proj(torch.cat([y, z], -1)), mask)
        logits = y @ ref.token_embed.weight.T  # tied head
        m = mask.unsqueeze(-1).float()
        q = torch.sigmoid(ref.q_head((y * m).sum(1) / m.sum(1)))
        acc = ((logits.argmax(-1) == targets) & (mask == 1)).sum(1) / mask.sum(1)
        label = (acc >= cfg.act_threshold).float().unsqueeze(-1)
        ces.append(F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1), ignore_index=0))
        bces.append(-(label * q.log() + (1 - label) * (1 - q).log()).mean())
        qs.append(q)
    out = ref(ids, target_ids=targets)
    torch.testing.assert_close(out["ce_loss"], torch.stack(ces).mean(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["act_loss"], torch.stack(bces).mean(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["loss"], out["ce_loss"] + cfg.act_weight * out["act_loss"])
    torch.testing.assert_close(out["q_hats"][-1], qs[-1], rtol=1e-4, atol=1e-4)


def test_act_labels_both_rules():
    logits = torch.zeros(2, 4, 5)
    logits[0, :, 1] = 1  # row 0 predicts 1 everywhere
    logits[1, :, 2] = 1  # row 1 predicts 2 everywhere
    targets = torch.tensor([[1, 1, 1, 3], [2, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = reference.TRMModel._compute_act_labels
    assert labels(logits, targets, mask, 0.75).flatten().tolist() == [1.0, 1.0]  # 3/4 and 2/2
    assert labels(logits, targets, mask, 0.8).flatten().tolist() == [0.0, 1.0]
    assert labels(logits, targets, mask, 1.0).flatten().tolist() == [0.0, 1.0]  # pads count as correct


def test_positional_table_growth_copies_last_row(pair):
    ref, _ = pair
    old = ref.pos_embed.weight.detach().clone()
    ref(torch.ones(1, SMALL["max_seq_len"] + 5, dtype=torch.long))
    assert ref.config.max_seq_len == SMALL["max_seq_len"] + 5
    assert torch.equal(ref.pos_embed.weight[: len(old)], old)
    assert torch.equal(ref.pos_embed.weight[len(old):], old[-1].expand(5, -1))


def test_deep_step_graph_only_in_last_recursion(pair):
    ref, _ = pair
    ids, targets = random_batch(1, 6, SMALL["vocab_size"])
    calls = []
    original = ref.latent_recursion

    def spy(*args):
        calls.append(torch.is_grad_enabled())
        return original(*args)

    ref.latent_recursion = spy
    ref(ids, target_ids=targets)
    assert calls == [False, True] * ref.config.supervision_steps


def test_inference_cycle_halts_batch_wide():
    ref, _ = make_pair(supervision_steps=4)
    ids, _ = random_batch(2, 6, SMALL["vocab_size"])
    x = ref._embed(ids)
    mask = torch.ones_like(ids)
    steps = []
    ref.q_head.register_forward_hook(lambda *a: steps.append(1))
    _, _, q = ref._inference_cycle(x, x.clone(), torch.zeros_like(x), mask, None, q_threshold=0.0)
    assert len(steps) == 1 and (q > 0).all()  # every q_hat > 0: stop after the first step
    steps.clear()
    ref._inference_cycle(x, x.clone(), torch.zeros_like(x), mask, None, q_threshold=1.0)
    assert len(steps) == 4  # sigmoid never exceeds 1: all steps run
    steps.clear()
    ref._inference_cycle(x, x.clone(), torch.zeros_like(x), mask, None, q_threshold=None)
    assert len(steps) == 4


def test_sampler_rules():
    torch.manual_seed(0)
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])
    assert {int(reference.sample_logits(logits, top_k=1)) for _ in range(20)} == {0}
    assert {int(reference.sample_logits(logits, top_k=2)) for _ in range(200)} == {0, 1}
    # softmax = [.705, .259, .035, .0002]: top_p 0.5 keeps only the first token, 0.9 the first two
    assert {int(reference.sample_logits(logits, top_p=0.5)) for _ in range(50)} == {0}
    assert {int(reference.sample_logits(logits, top_p=0.9)) for _ in range(300)} == {0, 1}
    nan_row = torch.full((1, 4), float("nan"))
    assert int(reference.sample_logits(nan_row)) in range(4)  # NaN guard: no crash, a valid id
    penalised = reference.apply_repetition_penalty(torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[0, 1, 1]]), 2.0)
    assert penalised.tolist() == [[1.0, -1.0, 1.0]]  # divides whatever the sign (seed quirk)


def test_generate_stops_on_pad_and_eos():
    ref, _ = make_pair()
    favoured = [7]

    def logits_for(y):  # every position predicts `favoured[0]`
        logits = torch.zeros(*y.shape[:2], SMALL["vocab_size"])
        logits[..., favoured[0]] = 10.0
        return logits

    ref._output_logits = logits_for
    assert ref.generate([5, 6], max_new_tokens=4, top_k=1) == [5, 6, 7, 7, 7, 7]
    favoured[0] = 0  # the pad id stops generation (seed rule)
    assert ref.generate([5, 6], max_new_tokens=4, top_k=1) == [5, 6, 0]
    favoured[0] = 3
    ref.config.eos_token_id = 3
    assert ref.generate([5, 6], max_new_tokens=4, top_k=1) == [5, 6, 3]


def test_halting_bce_is_autocast_safe_and_exact():
    q = torch.tensor([[0.2], [0.9]])
    labels = torch.tensor([[0.0], [1.0]])
    expected = F.binary_cross_entropy(q, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = reference.halting_bce(q.bfloat16(), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(reference.halting_bce(q, labels), expected, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)

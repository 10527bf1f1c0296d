"""Incremental decoding (trm_fast.decoding) against the seed's generation, which re-runs everything."""
import pytest
import torch

from parity_helpers import DEVICES, make_pair
from trm_fast import decoding, reference

PROMPT = [5, 17, 42, 3, 9]
# With make_pair's weights the pooled q_hat of this prompt wanders between about 0.63 and 0.83 during
# decoding, so these thresholds halt some tokens after one step and others later (checked below).
THRESHOLDS = [None, 0.7, 0.72]
SCHEDULES = ["lazy", "all_steps"]


def eval_pair(device="cpu", **overrides):
    ref, fast = make_pair(device=device, **overrides)
    return ref.eval(), fast.eval()


def seeded(fn, *args, **kwargs):
    torch.manual_seed(1234)
    return fn(*args, **kwargs)


def reference_batch_generate(ref, prompts, max_new_tokens, q_threshold, stop_ids, per_sequence=False):
    """The seed's algorithm for several prompts, greedy, each on its own positions. Halting is batch-wide
    over the unfinished sequences (or per sequence); a sequence leaves after a stop id."""
    seqs = [list(p) for p in prompts]
    alive = list(range(len(prompts)))
    with torch.no_grad():
        for _ in range(max_new_tokens):
            states = []
            for i in alive:
                ids = torch.tensor([seqs[i]], device=ref.token_embed.weight.device)
                mask = (ids != ref.config.pad_token_id).long()
                x = ref._embed(ids)
                states.append([x, *ref._init_states(x), mask, None])
            halted = [False] * len(alive)
            for _ in range(ref.config.supervision_steps):
                for k, (x, y, z, mask, _) in enumerate(states):
                    if per_sequence and halted[k]:
                        continue
                    for _ in range(ref.config.deep_steps):
                        y, z = ref.latent_recursion(x, y, z, mask)
                    states[k] = [x, y, z, mask, float(ref._q_hat(y, mask))]
                over = [q_threshold is not None and s[4] > q_threshold for s in states]
                halted = [h or o for h, o in zip(halted, over)] if per_sequence else [all(over)] * len(alive)
                if all(halted):
                    break
            for k, i in enumerate(list(alive)):
                logits = ref._output_logits(states[k][1])[:, -1]
                token = int(reference.sample_logits(logits, top_k=1))
                seqs[i].append(token)
                if token in stop_ids:
                    alive.remove(i)
            if not alive:
                break
    return seqs


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("q_threshold", THRESHOLDS)
def test_greedy_256_tokens_equal_the_seed(q_threshold, schedule):
    ref, fast = eval_pair()
    expected = ref.generate(PROMPT, 256, top_k=1, q_threshold=q_threshold)
    got = fast.generate_batch([PROMPT], 256, top_k=1, q_threshold=q_threshold, schedule=schedule)[0]
    assert len(expected) == len(PROMPT) + 256
    assert got == expected
    # The positional table grew past max_seq_len=24 exactly as the seed's did.
    assert fast.config.max_seq_len == ref.config.max_seq_len == len(expected) - 1
    assert torch.equal(fast.pos_embed.weight, ref.pos_embed.weight)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("q_threshold", THRESHOLDS)
def test_sampling_equals_the_seed(q_threshold, schedule):
    """Same random draws as the seed, including those of the positional table's growth past max_seq_len."""
    ref, fast = eval_pair(supervision_steps=3)
    kwargs = dict(temperature=0.8, top_k=8, top_p=0.9, repetition_penalty=1.3, q_threshold=q_threshold)
    expected = seeded(ref.generate, PROMPT, 40, **kwargs)
    assert seeded(fast.generate_batch, [PROMPT], 40, schedule=schedule, **kwargs)[0] == expected
    assert seeded(fast.generate, PROMPT, 40, **kwargs) == seeded(ref.generate, PROMPT, 40, **kwargs)
    assert torch.equal(fast.pos_embed.weight, ref.pos_embed.weight)


def test_lazy_schedule_catches_up_skipped_steps(monkeypatch):
    """Tokens halt after different numbers of steps, so later tokens catch earlier positions up."""
    ref, fast = eval_pair(supervision_steps=3)
    chunks = []
    catch_up = decoding.Decoder._catch_up

    def record(self, step):
        chunks.append((step, self.units - self.done[step]))
        catch_up(self, step)

    monkeypatch.setattr(decoding.Decoder, "_catch_up", record)
    expected = ref.generate(PROMPT, 40, top_k=1, q_threshold=0.7)
    assert fast.generate_batch([PROMPT], 40, top_k=1, q_threshold=0.7, schedule="lazy")[0] == expected
    steps_run = {step for step, width in chunks if width > 0}
    assert steps_run == {0, 1, 2}
    assert any(width > 1 for step, width in chunks if step > 0), "no catch-up chunk was needed"


def test_prompt_with_pad_inside_and_supervision_override():
    ref, fast = eval_pair()
    prompt = [7, 0, 12, 0, 30]  # pad id 0 inside the prompt: masked as a key and out of the pooled q
    for steps in (1, 3):
        expected = ref.generate(prompt, 30, top_k=1, supervision_steps=steps, q_threshold=0.7)
        assert fast.generate(prompt, 30, top_k=1, supervision_steps=steps, q_threshold=0.7) == expected


def test_stop_on_pad_and_eos():
    ref, fast = eval_pair()
    expected = ref.generate(PROMPT, 30, top_k=1, q_threshold=None)
    eos = expected[len(PROMPT) + 4]
    stop = expected.index(eos, len(PROMPT))
    assert fast.generate_batch([PROMPT], 30, top_k=1, q_threshold=None, eos_token_id=eos)[0] == expected[:stop + 1]
    assert list(fast.stream(PROMPT, 30, top_k=1, q_threshold=None, eos_token_id=eos)) == expected[len(PROMPT):stop + 1]
    fast.config.pad_token_id = ref.config.pad_token_id = eos  # the seed's rule: stop on the pad id
    assert fast.generate(PROMPT, 30, top_k=1, q_threshold=None) == ref.generate(PROMPT, 30, top_k=1, q_threshold=None)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("per_sequence", [True, False])
def test_batch_of_mixed_lengths_with_eos(per_sequence, schedule):
    ref, fast = eval_pair()
    prompts = [PROMPT, [11], [3, 8, 21, 40, 2, 2, 19, 33, 6], [50, 1, 60]]
    free = reference_batch_generate(ref, prompts, 24, 0.7, {0}, per_sequence)
    eos = free[1][4]  # ends sequence 1 early, and others wherever it appears
    expected = reference_batch_generate(ref, prompts, 24, 0.7, {0, eos}, per_sequence)
    lengths = [len(s) - len(p) for s, p in zip(expected, prompts)]
    assert min(lengths) < 24 and len(set(lengths)) > 2  # sequences leave the batch at different times
    got = fast.generate_batch(prompts, 24, top_k=1, q_threshold=0.7, per_sequence_halting=per_sequence,
                              eos_token_id=eos, schedule=schedule)
    assert got == expected
    if per_sequence:  # each sequence gets what it would get alone (up to its stop)
        for seq, prompt in zip(got, prompts):
            assert ref.generate(prompt, 24, top_k=1, q_threshold=0.7)[:len(seq)] == seq


def test_batch_wide_halting_differs_from_per_sequence():
    """The two halting rules are really different rules (else the test above proves less)."""
    ref, _ = eval_pair()
    prompts = [PROMPT, [11], [3, 8, 21, 40, 2, 2, 19, 33, 6]]
    assert (reference_batch_generate(ref, prompts, 24, 0.7, {0}, True)
            != reference_batch_generate(ref, prompts, 24, 0.7, {0}, False))


def test_stream_and_reset_state():
    _, fast = eval_pair()
    streamed = fast.stream(PROMPT, 20, top_k=1)
    first = next(streamed)
    assert [first, *streamed] == fast.generate(PROMPT, 20, top_k=1)[len(PROMPT):]
    assert decoding._DECODERS.get(fast)
    fast.reset_state()
    assert not decoding._DECODERS.get(fast)
    assert fast.generate(PROMPT, 0) == PROMPT


def test_training_mode_with_dropout_runs_the_seed_algorithm():
    ref, fast = make_pair(dropout=0.1)
    ref.train(), fast.train()
    assert seeded(fast.generate, PROMPT, 12, top_k=4) == seeded(ref.generate, PROMPT, 12, top_k=4)


@pytest.mark.parametrize("bad, error, match", [
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=-0.1), ValueError, "top_p"),
    (dict(top_k=-2), ValueError, "top_k"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(q_threshold=2.0), ValueError, "q_threshold"),
    (dict(eos_token_id=10**6), ValueError, "eos_token_id"),
    (dict(schedule="fast"), ValueError, "schedule"),
    (dict(cuda_graph=True), ValueError, "cuda_graph"),
])
def test_bad_generation_arguments(bad, error, match):
    _, fast = eval_pair()
    with pytest.raises(error, match=match):
        fast.generate_batch([PROMPT], **{"max_new_tokens": 4, **bad})


@pytest.mark.parametrize("prompts, match", [([], "non-empty"), ([[]], r"prompts\[0\]"), ([[1], [2, 10**6]], "outside"),
                                            ([[1], ["a"]], "int token ids")])
def test_bad_prompts(prompts, match):
    _, fast = eval_pair()
    with pytest.raises((ValueError, TypeError), match=match):
        fast.generate_batch(prompts, max_new_tokens=4)
    with pytest.raises(ValueError, match="at least one"):
        list(fast.stream([], 4))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("q_threshold", THRESHOLDS)
def test_cuda_graph_decoding_equals_the_seed(q_threshold):
    ref, fast = eval_pair(device="cuda")
    expected = ref.generate(PROMPT, 256, top_k=1, q_threshold=q_threshold)
    assert fast.generate(PROMPT, 256, top_k=1, q_threshold=q_threshold) == expected
    store = decoding._DECODERS[fast]
    assert all(d.graph is not None for d in store.values())
    kwargs = dict(top_k=8, top_p=0.9, repetition_penalty=1.3, q_threshold=q_threshold)
    assert seeded(fast.generate, PROMPT, 40, **kwargs) == seeded(ref.generate, PROMPT, 40, **kwargs)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
def test_cuda_graph_decoding_same_without_programmatic_launch(monkeypatch):
    """The decode kernels wait for the previous kernel's writes when launched with PDL (Hopper and newer):
    a batched bf16 generation gives the same tokens with PDL as without it."""
    pdl = pytest.importorskip("trm_fast.kernels.pdl")
    assert pdl.active(torch.device("cuda")) == (pdl.ENABLED and torch.cuda.get_device_capability()[0] >= 9)
    _, fast = eval_pair(device="cuda", d_model=128, max_seq_len=128)
    fast.to(torch.bfloat16)
    prompts = torch.randint(3, 61, (24, 9), generator=torch.Generator().manual_seed(3)).tolist()
    launched = fast.generate_batch(prompts, 96, top_k=1, q_threshold=0.7)
    fast.reset_state()
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert fast.generate_batch(prompts, 96, top_k=1, q_threshold=0.7) == launched


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("per_sequence", [True, False])
def test_cuda_graph_batch_compaction(per_sequence):
    ref, fast = eval_pair(device="cuda")
    prompts = [PROMPT, [11], [3, 8, 21, 40, 2, 2, 19, 33, 6], [50, 1, 60], [4, 4], [9, 31, 7]]
    eos = reference_batch_generate(ref, prompts, 40, 0.7, {0}, per_sequence)[1][4]
    expected = reference_batch_generate(ref, prompts, 40, 0.7, {0, eos}, per_sequence)
    got = fast.generate_batch(prompts, 40, top_k=1, q_threshold=0.7, per_sequence_halting=per_sequence,
                              eos_token_id=eos)
    assert got == expected
    lengths = [len(s) - len(p) for s, p in zip(expected, prompts)]
    assert sum(n < max(lengths) for n in lengths) >= 3  # compaction to a smaller graph


@pytest.mark.parametrize("per_sequence", [True, False])
@pytest.mark.parametrize("sync_every", [1, 5])
def test_graph_decoding_logic_on_cpu(monkeypatch, per_sequence, sync_every):
    """The CUDA-graph schedule's control flow (greedy bursts, rows marked finished inside the step,
    compaction into smaller decoders) with the captured step run eagerly instead of replayed."""
    monkeypatch.setattr(decoding.Decoder, "capture",
                        lambda self: setattr(self, "graph", type("EagerGraph", (), {"replay": self._graph_step})))
    ref, fast = eval_pair()
    prompts = [PROMPT, [11], [3, 8, 21, 40, 2, 2, 19, 33, 6], [50, 1, 60], [4, 4], [9, 31, 7]]
    eos = reference_batch_generate(ref, prompts, 30, 0.7, {0}, per_sequence)[1][4]
    expected = reference_batch_generate(ref, prompts, 30, 0.7, {0, eos}, per_sequence)
    outputs = [list(p) for p in prompts]
    for row, token in decoding.decode(fast, prompts, 30, top_k=1, q_threshold=0.7, per_sequence_halting=per_sequence,
                                      stop_ids=[0, eos], cuda_graph=True, sync_every=sync_every):
        outputs[row].append(token)
    assert outputs == expected
    batches = sorted(d.batch for d in decoding._DECODERS[fast].values())
    assert len(batches) > 1 and batches[-1] == len(prompts)  # the batch was compacted into a smaller decoder
    kwargs = dict(top_k=8, top_p=0.9, repetition_penalty=1.3, q_threshold=0.7)  # sampled on the host
    assert seeded(lambda: [PROMPT + [t for _, t in decoding.decode(fast, [PROMPT], 30, cuda_graph=True, **kwargs)]]) \
        == [seeded(ref.generate, PROMPT, 30, **kwargs)]


@pytest.mark.parametrize("per_sequence", [True, False])
def test_graph_decoding_prefills_prompts_of_one_length_by_replays(monkeypatch, per_sequence):
    """Prompts of one length go through the captured step token by token (no eager prefill) and give
    the seed's tokens, greedy with stops and compaction, and sampled on the host."""
    monkeypatch.setattr(decoding.Decoder, "capture",
                        lambda self: setattr(self, "graph", type("EagerGraph", (), {"replay": self._graph_step})))
    eager_prefill = []
    monkeypatch.setattr(decoding.Decoder, "_catch_up", lambda self, step: eager_prefill.append(step))
    ref, fast = eval_pair()
    prompts = [PROMPT[:5], [11, 4, 9, 0, 7], [3, 8, 21, 40, 2], [50, 1, 60, 5, 5], [4, 4, 4, 4, 4]]
    eos = reference_batch_generate(ref, prompts, 30, 0.7, {0}, per_sequence)[1][8]  # row 1's 4th new token
    expected = reference_batch_generate(ref, prompts, 30, 0.7, {0, eos}, per_sequence)
    got = [list(p) for p in prompts]
    for row, token in decoding.decode(fast, prompts, 30, top_k=1, q_threshold=0.7, per_sequence_halting=per_sequence,
                                      stop_ids=[0, eos], cuda_graph=True, sync_every=4):
        got[row].append(token)
    assert got == expected and not eager_prefill
    assert sum(len(s) < max(map(len, expected)) for s in expected) >= 3  # rows ended: compaction ran
    kwargs = dict(top_k=8, top_p=0.9, repetition_penalty=1.3, q_threshold=0.7)
    assert seeded(lambda: PROMPT + [t for _, t in decoding.decode(fast, [PROMPT], 30, cuda_graph=True, **kwargs)]) \
        == seeded(ref.generate, PROMPT, 30, **kwargs)


def test_graph_step_ends_rows_that_emit_a_stop_id(monkeypatch):
    """Inside a greedy burst the step itself takes a row that emitted a stop id out of batch-wide halting."""
    monkeypatch.setattr(decoding.Decoder, "capture",
                        lambda self: setattr(self, "graph", type("EagerGraph", (), {"replay": self._graph_step})))
    _, fast = eval_pair()

    def burst(stop_ids):
        decoder = decoding.decoder_for(fast, 2, 40, 2, lazy=False, graph=True)
        decoder.start([PROMPT, [11]], 0.7, False, stop_ids, greedy=True)
        decoder.token.copy_(decoder.next_logits().argmax(dim=-1))
        for _ in range(10):
            decoder.replay()
        return decoder.out[:10].t().clone(), decoder.active.clone()

    free, active = burst([0])
    assert active.all()
    eos = int(free[1, 3])
    out, active = burst([0, eos])
    assert torch.equal(out[:, :4], free[:, :4])
    assert active.tolist() == [bool((out[0] != eos).all()), False]

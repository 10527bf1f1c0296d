"""Task vectors: the call hook, extraction, injection at every layer, generation, the task suite."""
import random

import pytest
import torch

import trm_fast
from trm_fast import reference
from trm_fast.data import ByteTokenizer
from trm_fast.task_vectors import (TASKS, build_prompt, extract_task_vectors, first_token_accuracy,
                                   last_position_states, modulated_forward, modulated_generate, num_layers,
                                   select_layer, task_item, tinynet_call_hook, training_texts)

CONFIG = dict(vocab_size=259, d_model=32, n_heads=2, dropout=0.0, max_seq_len=64)
TOK = ByteTokenizer()


def _model(seed=0, cls=trm_fast.TRMModel):
    torch.manual_seed(seed)
    return cls(reference.TRMConfig(**CONFIG)).eval()


def _ids(text):
    return torch.tensor([TOK.encode(text, add_eos=False)])


def test_hook_sees_every_call_in_order_on_both_paths():
    fast, ref = _model(), _model(cls=reference.TRMModel)
    ref.load_state_dict(fast.state_dict())
    seen = []
    with tinynet_call_hook(fast, lambda i, h: seen.append(i) or h):
        fast(_ids("a>b,c>"))
    assert seen == list(range(num_layers(fast))) == list(range(16)) and fast._call_hook is None
    prompts = ["a>b,c>", "x>y,z>", "abc>a,"]
    torch.testing.assert_close(last_position_states(fast, TOK, prompts), last_position_states(ref, TOK, prompts),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", range(16))
def test_injection_at_every_layer(layer):
    model = _model(seed=1)
    ids = _ids("a>b,c>d,e>")
    plain = model(ids)["logits"]
    own = last_position_states(model, TOK, ["a>b,c>d,e>"])[:, layer]
    torch.testing.assert_close(modulated_forward(model, ids, own, layer), plain, rtol=1e-5, atol=1e-5)
    other = last_position_states(model, TOK, ["q>r,s>t,u>"])[:, layer]
    moved = modulated_forward(model, ids, other, layer)
    torch.testing.assert_close(moved[:, :-1], plain[:, :-1], rtol=1e-5, atol=1e-5)  # causal: earlier positions keep
    assert (moved[:, -1] - plain[:, -1]).abs().max() > 1e-3


def test_extraction_averages_alternative_queries_and_is_deterministic():
    model = _model(seed=2)
    demos = [[("a", "b"), ("c", "d")], [("abc", "a")]]
    queries = [["e", "f", "g"], ["xyz", "pqr"]]
    vectors = extract_task_vectors(model, TOK, demos, queries, num_test_inputs_to_avg=2)
    assert vectors.shape == (2, 16, 32)
    states = last_position_states(model, TOK, ["a>b,c>d,e>", "a>b,c>d,f>"])
    torch.testing.assert_close(vectors[0], states.mean(dim=0))
    assert torch.equal(vectors, extract_task_vectors(model, TOK, demos, queries, num_test_inputs_to_avg=2))


def test_relative_vectors_subtract_the_bare_query_states():
    model = _model(seed=2)
    vectors = extract_task_vectors(model, TOK, [[("a", "b")]], [["e", "fg"]], num_test_inputs_to_avg=2, relative=True)
    with_demos = last_position_states(model, TOK, ["a>b,e>", "a>b,fg>"])
    bare = last_position_states(model, TOK, ["e>", "fg>"])
    torch.testing.assert_close(vectors[0], (with_demos - bare).mean(dim=0))


def test_query_position_vectors_read_and_add_at_the_query_token():
    model = _model(seed=2)
    vectors = extract_task_vectors(model, TOK, [[("a", "b")]], [["e", "fg"]], 2, relative=True, position=-2)
    with_demos = last_position_states(model, TOK, ["a>b,e>", "a>b,fg>"], position=-2)
    bare = last_position_states(model, TOK, ["e>", "fg>"], position=-2)
    torch.testing.assert_close(vectors[0], (with_demos - bare).mean(dim=0))
    ids, layer, last, query = _ids("a>b,c>d,e>"), 9, torch.randn(1, 32), torch.randn(1, 32)

    def by_hand(index, h):
        if index == layer:
            h = h.clone()
            h[:, -1] += 2.0 * last
            h[:, -2] += 2.0 * query
        return h
    with tinynet_call_hook(model, by_hand):
        expected = model(ids)["logits"]
    got = modulated_forward(model, ids, last, layer, mode="add", scale=2.0, query_vectors=query)
    torch.testing.assert_close(got, expected)
    assert (got[:, -1] - modulated_forward(model, ids, last, layer, mode="add", scale=2.0)[:, -1]).abs().max() > 1e-3
    assert select_layer(model, TOK, [task_item("copy", random.Random(0), 2, 2)], mode="add", scale=2.0,
                        vectors=torch.zeros(1, 16, 32), query_vectors=torch.zeros(1, 16, 32))[1] == select_layer(
        model, TOK, [task_item("copy", random.Random(0), 2, 2)], mode="add", vectors=torch.zeros(1, 16, 32))[1]
    with pytest.raises(ValueError, match="query_vectors need mode='add'"):
        modulated_forward(model, ids, last, layer, query_vectors=query)
    with pytest.raises(ValueError, match="query_vectors need mode='add'"):
        modulated_forward(model, ids, last, layer, mode="add", query_vectors=torch.zeros(2, 32))
    with pytest.raises(ValueError, match="position must be -1, or -2 with relative=True"):
        extract_task_vectors(model, TOK, [[("a", "b")]], [["e"]], 1, position=-2)


@pytest.mark.parametrize("layer", [3, 14])
def test_add_mode_adds_the_scaled_vector_to_the_call_output(layer):
    model = _model(seed=1)
    ids = _ids("a>b,c>d,e>")
    plain = model(ids)["logits"]
    torch.testing.assert_close(modulated_forward(model, ids, torch.zeros(1, 32), layer, mode="add"), plain)
    vector = torch.randn(1, 32)

    def by_hand(index, h):
        if index == layer:
            h = h.clone()
            h[:, -1] += 1.5 * vector
        return h
    with tinynet_call_hook(model, by_hand):
        expected = model(ids)["logits"]
    added = modulated_forward(model, ids, vector, layer, mode="add", scale=1.5)
    torch.testing.assert_close(added, expected)
    assert (added[:, -1] - plain[:, -1]).abs().max() > 1e-3
    answers = modulated_generate(model, TOK, ["e"], vector, layer, max_new_tokens=1, mode="add", scale=1.5)
    assert answers == [TOK.decode([int(modulated_forward(model, _ids("e>"), vector, layer, mode="add",
                                                         scale=1.5)[0, -1].argmax())]).split(",")[0]]


def test_modulated_generate_takes_the_injected_first_token():
    model = _model(seed=3)
    vectors = torch.randn(2, 32)
    answers = modulated_generate(model, TOK, ["e", "f"], vectors, layer=5, max_new_tokens=1)
    logits = modulated_forward(model, torch.cat([_ids("e>"), _ids("f>")]), vectors, 5)
    assert answers == [TOK.decode([int(t)]).split(",")[0] for t in logits[:, -1].argmax(-1)]


def test_select_layer_scores_the_first_token_of_the_injected_pass():
    model = _model(seed=3)
    rng = random.Random(0)
    dev = [task_item(task, rng) for task in ("to_upper", "first_of_list", "copy", "last_of_list", "copy", "to_upper")]
    vectors = extract_task_vectors(model, TOK, [d["demos"] for d in dev], [d["alt_queries"] for d in dev], 2,
                                   relative=True)
    layer, matches = 9, []
    for i, d in enumerate(dev):  # even items: the answer is the injected pass's own (ASCII) prediction
        token = int(modulated_forward(model, _ids(build_prompt([], d["query"])), vectors[i: i + 1, layer], layer,
                                      mode="add", scale=2.0)[0, -1].argmax())
        matches.append(i % 2 == 0 and TOK.offset <= token < TOK.offset + 128)
        d["answer"] = chr(token - TOK.offset) if matches[-1] else ("q" if token != TOK.encode("q", False)[0] else "r")
    expected = sum(matches) / len(dev)
    assert expected >= 1 / 3
    assert first_token_accuracy(model, TOK, dev, vectors[:, layer], layer, mode="add", scale=2.0) == expected
    best, accuracies = select_layer(model, TOK, dev, mode="add", scale=2.0)
    assert len(accuracies) == 16 and accuracies[best] == max(accuracies) and accuracies[layer] == expected
    assert select_layer(model, TOK, dev, mode="add", scale=2.0, vectors=vectors) == (best, accuracies)


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match=r"layer must be in \[0, 16\)"):
        modulated_forward(model, _ids("a>"), torch.zeros(1, 32), 16)
    with pytest.raises(ValueError, match="vectors must have shape"):
        modulated_forward(model, _ids("a>"), torch.zeros(2, 32), 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        modulated_forward(model, _ids("a>"), torch.zeros(1, 32), 0, mode="mix")
    with pytest.raises(ValueError, match="demos and queries must pair up"):
        extract_task_vectors(model, TOK, [[("a", "b")]], [], 1)
    with pytest.raises(ValueError, match="at least num_test_inputs_to_avg=3"):
        extract_task_vectors(model, TOK, [[("a", "b")]], [["c", "d"]], 3)
    with pytest.raises(ValueError, match="unknown task 'sort'"):
        task_item("sort", random.Random(0))


def test_task_suite():
    rng = random.Random(0)
    for task, fn in TASKS.items():
        item = task_item(task, rng, num_demos=3, num_alt_queries=2)
        assert item["answer"] == fn(item["query"]) and len(item["alt_queries"]) == 2
        assert all(y == fn(x) for x, y in item["demos"])
    assert TASKS["next_letter"]("z") == "a" and TASKS["last_of_list"]("abc") == "c"
    assert build_prompt([("a", "b"), ("c", "d")], "e") == "a>b,c>d,e>"
    lines = training_texts(50, seed=1)
    assert len(lines) == 50 and all(line.endswith(",") and ">" in line for line in lines)
    assert lines == training_texts(50, seed=1)


@pytest.mark.parametrize("layer", [1, 6, 9])
def test_every_step_injects_the_same_call_of_each_later_step(layer):
    model = _model(seed=1)
    ids = _ids("a>b,c>d,e>")
    vector = last_position_states(model, TOK, ["q>r,s>t,u>"])[:, layer]
    per_step = num_layers(model) // model.config.supervision_steps
    targets = set(range(layer, num_layers(model), per_step))

    def by_hand(index, h):
        if index in targets:
            h = h.clone()
            h[:, -1] = vector
        return h
    with tinynet_call_hook(model, by_hand):
        expected = model(ids)["logits"]
    torch.testing.assert_close(modulated_forward(model, ids, vector, layer, every_step=True), expected)
    single = modulated_forward(model, ids, vector, layer)
    assert (len(targets) > 1) == bool((single[:, -1] - expected[:, -1]).abs().max() > 1e-4)

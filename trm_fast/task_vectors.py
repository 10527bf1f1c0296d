"""Task vectors on TRM: every TinyNet call of the recursion is a "layer" (supervision x deep x latent x 2
of them). The state a call outputs at the last position of a few-shot prompt, averaged over alternative
queries, is the task vector; injecting it at that call into a pass over the bare query should recover
the in-context behaviour.

Two ways to inject: `mode="replace"` (Hendel et al.) overwrites the call's output at the last position;
`mode="add"` adds `scale` times a relative vector (`extract_task_vectors(..., relative=True)`: the state
with demonstrations minus the state of the same query without them) to it, so the query's own state,
which the replacement throws away, is kept. In that mode `query_vectors` (relative vectors read at the
query's last token, `position=-2`) can be added at that position too.

Prompts use the format `a>b,c>d,e>`: demonstrations `input>output` joined by `,`, then the query and `>`.
"""
from __future__ import annotations

import itertools
import random
import string
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Demo = Tuple[str, str]


def build_prompt(demos: Sequence[Demo], query: str) -> str:
    return "".join(f"{x}>{y}," for x, y in demos) + f"{query}>"


@contextmanager
def tinynet_call_hook(model, hook: Callable[[int, torch.Tensor], torch.Tensor]):
    """Within the block, hook(index, h) sees (and may replace) the output of every TinyNet call of each
    forward, indexed in recursion order from 0."""
    counter = itertools.count()
    model._call_hook = lambda h: hook(next(counter), h)
    try:
        yield
    finally:
        model._call_hook = None


def num_layers(model) -> int:
    cfg = model.config
    return cfg.supervision_steps * cfg.deep_steps * cfg.latent_steps * 2


def _encode_batch(model, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    ids = [tokenizer.encode(p, add_eos=False) for p in prompts]
    if len({len(i) for i in ids}) != 1:
        raise ValueError("prompts in one batch must have the same number of tokens (group them by length)")
    return torch.tensor(ids, dtype=torch.long, device=next(model.parameters()).device)


def _by_length(tokenizer, prompts: Sequence[str]) -> Dict[int, List[int]]:
    groups: Dict[int, List[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(len(tokenizer.encode(prompt, add_eos=False)), []).append(index)
    return groups


@torch.no_grad()
def last_position_states(model, tokenizer, prompts: Sequence[str], position: int = -1) -> torch.Tensor:
    """[len(prompts), layers, D]: each TinyNet call's output at the last position of each prompt (or at
    `position`, counted from the end when negative)."""
    model.eval()
    result = torch.empty(len(prompts), num_layers(model), model.config.d_model,
                         device=next(model.parameters()).device)
    for indices in _by_length(tokenizer, prompts).values():
        states: List[torch.Tensor] = []
        with tinynet_call_hook(model, lambda i, h: states.append(h[:, position].float()) or h):
            model(_encode_batch(model, tokenizer, [prompts[i] for i in indices]))
        result[indices] = torch.stack(states, dim=1)
    return result


def extract_task_vectors(model, tokenizer, demos: Sequence[Sequence[Demo]], queries: Sequence[Sequence[str]],
                         num_test_inputs_to_avg: int = 2, relative: bool = False, position: int = -1) -> torch.Tensor:
    """[len(demos), layers, D]: for each demonstration set, the last-position states of its prompt with
    each of `num_test_inputs_to_avg` alternative queries (queries[k][:n]), averaged. With `relative`, the
    states of the bare queries (`q>`) are subtracted first: what the demonstrations add (for mode="add").
    `position=-2` reads the states at the query's last token instead (relative only: `query_vectors`)."""
    if len(demos) != len(queries):
        raise ValueError(f"demos and queries must pair up: {len(demos)} demo sets, {len(queries)} query lists")
    if num_test_inputs_to_avg < 1 or any(len(q) < num_test_inputs_to_avg for q in queries):
        raise ValueError(f"every query list needs at least num_test_inputs_to_avg={num_test_inputs_to_avg} queries")
    if position not in (-1, -2) or (position == -2 and not relative):
        raise ValueError(f"position must be -1, or -2 with relative=True, got {position}")
    pairs = [(d, q) for d, qs in zip(demos, queries) for q in qs[:num_test_inputs_to_avg]]
    states = last_position_states(model, tokenizer, [build_prompt(d, q) for d, q in pairs], position)
    if relative:
        states -= last_position_states(model, tokenizer, [build_prompt([], q) for _, q in pairs], position)
    return states.view(len(demos), num_test_inputs_to_avg, *states.shape[1:]).mean(dim=1)


INJECTION_MODES = ("replace", "add")


@torch.no_grad()
def modulated_forward(model, input_ids: torch.Tensor, vectors: torch.Tensor, layer: int,
                      every_step: bool = False, mode: str = "replace", scale: float = 1.0,
                      query_vectors: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Final logits [B, L, V] of a forward in which the output of TinyNet call `layer` at the last
    position is replaced by `scale` * vectors [B, D] (mode "replace") or has it added (mode "add"); with
    `every_step`, also the same call of every later supervision step (the recursion contracts, so a
    single early injection fades). `query_vectors` [B, D] (mode "add"): also added, times `scale`, at the
    position before the last (the query's last token)."""
    layers = num_layers(model)
    if not 0 <= layer < layers:
        raise ValueError(f"layer must be in [0, {layers}), got {layer}")
    if mode not in INJECTION_MODES:
        raise ValueError(f"mode must be one of {INJECTION_MODES}, got {mode!r}")
    if vectors.shape != (input_ids.size(0), model.config.d_model):
        raise ValueError(f"vectors must have shape [batch, d_model] = {(input_ids.size(0), model.config.d_model)}, "
                         f"got {tuple(vectors.shape)}")
    if query_vectors is not None and (mode != "add" or query_vectors.shape != vectors.shape
                                      or input_ids.size(1) < 2):
        raise ValueError(f"query_vectors need mode='add', the shape of vectors {tuple(vectors.shape)} and prompts "
                         f"of at least 2 tokens, got {tuple(query_vectors.shape)} with mode {mode!r}")

    per_step = layers // model.config.supervision_steps

    def inject(index: int, h: torch.Tensor) -> torch.Tensor:
        if index != layer and not (every_step and index > layer and (index - layer) % per_step == 0):
            return h
        h = h.clone()
        vector = scale * vectors.to(h.dtype)
        h[:, -1] = h[:, -1] + vector if mode == "add" else vector
        if query_vectors is not None:
            h[:, -2] += scale * query_vectors.to(h.dtype)
        return h

    model.eval()
    with tinynet_call_hook(model, inject):
        return model(input_ids)["logits"]


def _rows(vectors: Optional[torch.Tensor], indices: List[int]) -> Optional[torch.Tensor]:
    return None if vectors is None else vectors[indices]


def decode_prediction(tokenizer, ids: Sequence[int]) -> str:
    """The answer in new tokens: the text before the first `,` (the end of an example)."""
    return tokenizer.decode(list(ids)).split(",")[0]


@torch.no_grad()
def modulated_generate(model, tokenizer, queries: Sequence[str], vectors: torch.Tensor, layer: int,
                       max_new_tokens: int = 2, every_step: bool = False, mode: str = "replace",
                       scale: float = 1.0, query_vectors: Optional[torch.Tensor] = None) -> List[str]:
    """For each bare query `q>`: the first token greedily from the injected pass (`modulated_forward`),
    the rest by ordinary greedy generation; returns the decoded answers."""
    answers: List[str] = [""] * len(queries)
    prompts = [build_prompt([], q) for q in queries]
    for indices in _by_length(tokenizer, prompts).values():
        ids = _encode_batch(model, tokenizer, [prompts[i] for i in indices])
        first = modulated_forward(model, ids, vectors[indices], layer, every_step, mode, scale,
                                  _rows(query_vectors, indices))[:, -1].argmax(dim=-1)
        for row, index in enumerate(indices):
            prompt = ids[row].tolist() + [int(first[row])]
            out = model.generate(prompt, max_new_tokens - 1, top_k=1, q_threshold=None) if max_new_tokens > 1 else prompt
            answers[index] = decode_prediction(tokenizer, out[ids.size(1):])
    return answers


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 2) -> List[str]:
    """Plain greedy continuation of each prompt, decoded as an answer (zero-shot and in-context runs)."""
    model.eval()
    answers = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_eos=False)
        out = model.generate(ids, max_new_tokens, top_k=1, q_threshold=None)
        answers.append(decode_prediction(tokenizer, out[len(ids):]))
    return answers


@torch.no_grad()
def first_token_accuracy(model, tokenizer, items: Sequence[dict], vectors: torch.Tensor, layer: int,
                         every_step: bool = False, mode: str = "replace", scale: float = 1.0,
                         query_vectors: Optional[torch.Tensor] = None) -> float:
    """Share of `items` (with "query" and "answer") whose answer's first token is the argmax of the pass over
    the bare query with `vectors` [len(items), D] injected at `layer` (one batched forward per length)."""
    prompts = [build_prompt([], item["query"]) for item in items]
    correct = 0
    for indices in _by_length(tokenizer, prompts).values():
        ids = _encode_batch(model, tokenizer, [prompts[i] for i in indices])
        logits = modulated_forward(model, ids, vectors[indices], layer, every_step, mode, scale,
                                   _rows(query_vectors, indices))
        answers = torch.tensor([tokenizer.encode(items[i]["answer"], add_eos=False)[0] for i in indices])
        correct += int((logits[:, -1].argmax(dim=-1).cpu() == answers).sum())
    return correct / len(items)


def select_layer(model, tokenizer, dev_set: Sequence[dict], num_test_inputs_to_avg: int = 2,
                 every_step: bool = False, mode: str = "replace", scale: float = 1.0,
                 vectors: Optional[torch.Tensor] = None,
                 query_vectors: Optional[torch.Tensor] = None) -> Tuple[int, List[float]]:
    """The layer whose task vectors give the best first-token accuracy on dev_set (items with "demos",
    "alt_queries", "query", "answer"); returns it and the accuracy of every layer. `vectors` [len(dev_set),
    layers, D] reuses an extraction (mode "add" extracts relative vectors, "replace" plain ones);
    `query_vectors` (same shape, mode "add") are added at the query's last token too."""
    if vectors is None:
        vectors = extract_task_vectors(model, tokenizer, [d["demos"] for d in dev_set],
                                       [d["alt_queries"] for d in dev_set], num_test_inputs_to_avg,
                                       relative=mode == "add")
    accuracies = [first_token_accuracy(model, tokenizer, dev_set, vectors[:, layer], layer, every_step, mode, scale,
                                       None if query_vectors is None else query_vectors[:, layer])
                  for layer in range(num_layers(model))]
    return max(range(len(accuracies)), key=accuracies.__getitem__), accuracies


# -- a synthetic in-context task suite ------------------------------------------------------------------

LETTERS = string.ascii_lowercase
TASKS: Dict[str, Callable[[str], str]] = {
    "next_letter": lambda s: LETTERS[(LETTERS.index(s) + 1) % 26],
    "prev_letter": lambda s: LETTERS[(LETTERS.index(s) - 1) % 26],
    "to_upper": str.upper,
    "copy": lambda s: s,
    "first_of_list": lambda s: s[0],
    "last_of_list": lambda s: s[-1],
}
LIST_TASKS = {"first_of_list", "last_of_list"}


def task_input(task: str, rng: random.Random) -> str:
    return "".join(rng.sample(LETTERS, 3)) if task in LIST_TASKS else rng.choice(LETTERS)


def task_item(task: str, rng: random.Random, num_demos: int = 4, num_alt_queries: int = 2) -> dict:
    """One evaluation item: demonstrations, a query with its answer, and alternative queries."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {sorted(TASKS)}")
    inputs = [task_input(task, rng) for _ in range(num_demos + 1 + num_alt_queries)]
    demos = [(x, TASKS[task](x)) for x in inputs[:num_demos]]
    query = inputs[num_demos]
    return {"task": task, "demos": demos, "query": query, "answer": TASKS[task](query),
            "alt_queries": inputs[num_demos + 1:]}


def training_texts(count: int, seed: int = 0, max_demos: int = 5) -> List[str]:
    """Few-shot lines over all tasks (1..max_demos demonstrations, then a solved query) to train on."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        task = rng.choice(sorted(TASKS))
        item = task_item(task, rng, num_demos=rng.randint(1, max_demos), num_alt_queries=0)
        texts.append(build_prompt(item["demos"], item["query"]) + item["answer"] + ",")
    return texts

"""Eager reference vs torch.compile(reference) vs trm_fast.TRMModel: forward and train step.

    pytest benchmarks --benchmark-only [--benchmark-json=benchmarks/results/<device>.json]

CUDA timings synchronize the device after each call; peak memory is recorded in extra_info.
"""
import contextlib

import pytest
import torch

import trm_fast
from trm_fast import reference
from trm_fast.graphed_train_step import backward_and_step
from bench_cases import CASES, CUDA, DTYPE

# compiled-graphs: torch.compile(mode="reduce-overhead"), which replays CUDA graphs; trm_fast-triton: kernels="triton"
# (issue 3); -nologits: also keep_logits=False (loss without [B, L, V] logits); -graph: the forward replayed as
# one CUDA graph (trm_fast.GraphedForward), the train step as another (trm_fast.GraphedTrainStep)
IMPLS = ("eager", "compiled", "compiled-graphs", "trm_fast", "trm_fast-graph", "trm_fast-triton",
         "trm_fast-triton-nologits", "trm_fast-triton-graph", "trm_fast-triton-nologits-graph")
CALL_KWARGS = {impl: dict(keep_logits=False) for impl in IMPLS if "nologits" in impl}
MODES = ("forward", "train_step")


def build(impl: str, case: dict):
    config = dict(vocab_size=case["vocab_size"], d_model=case["d_model"], n_heads=case["n_heads"],
                  max_seq_len=case["length"])
    torch.manual_seed(0)
    if impl.startswith("trm_fast"):
        model = trm_fast.TRMModel(trm_fast.TRMConfig(**config), kernels="triton" if "triton" in impl else "auto")
    else:
        model = reference.TRMModel(reference.TRMConfig(**config))
    device = "cuda" if CUDA else "cpu"
    model = model.to(device)
    if impl == "compiled":
        runner = torch.compile(model)
    elif impl == "compiled-graphs":
        runner = torch.compile(model, mode="reduce-overhead")
    elif impl.endswith("-graph"):
        runner = trm_fast.GraphedForward(model)
    else:
        runner = model
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(1, case["vocab_size"], (case["batch"], case["length"]), device=device, generator=g)
    targets = torch.randint(1, case["vocab_size"], (case["batch"], case["length"]), device=device, generator=g)
    return model, runner, ids, targets


def autocast():
    return torch.autocast("cuda", dtype=DTYPE) if DTYPE is not None else contextlib.nullcontext()


def sync():
    if CUDA:
        torch.cuda.synchronize()


def make_forward_step(impl: str, model, runner, ids, targets):
    """One no-grad forward of `impl` under autocast (model in eval mode); its outputs."""
    kwargs = CALL_KWARGS.get(impl, {})
    model.eval()

    def step():
        with torch.no_grad(), autocast():
            return runner(ids, target_ids=targets, **kwargs)
    return step


def make_train_step(impl: str, model, runner, ids, targets):
    """One train step of `impl` (forward under autocast, backward, AdamW, zeroed gradients); its outputs."""
    kwargs = CALL_KWARGS.get(impl, {})
    model.train()
    if impl.endswith("-graph"):  # a tensor learning rate and capturable=True: what a replayed AdamW needs
        lr = torch.tensor(3e-4, device=ids.device) if CUDA else 3e-4
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, capturable=CUDA, fused=CUDA)
        graphed = trm_fast.GraphedTrainStep(model, optimizer, **kwargs)

        def step():
            with autocast():
                return graphed(ids, target_ids=targets)
        return step
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=CUDA)  # every impl alike

    def step():
        with autocast():
            out = runner(ids, target_ids=targets, **kwargs)
        backward_and_step(model, optimizer, out["loss"])
        optimizer.zero_grad(set_to_none=True)
        return out
    return step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_model(benchmark, case, impl, mode):
    spec = CASES[case]
    model, runner, ids, targets = build(impl, spec)
    make_step = make_forward_step if mode == "forward" else make_train_step
    unsynced_step = make_step(impl, model, runner, ids, targets)

    def step():
        out = unsynced_step()
        sync()
        return out

    warmup = 3 if benchmark.enabled else 0
    for _ in range(warmup):  # compilation and autotuning stay out of the timing
        step()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    out = benchmark.pedantic(step, rounds=50 if CUDA else 5, iterations=1, warmup_rounds=0)
    assert torch.isfinite(out["loss"]), "benchmarked step produced a non-finite loss"
    tokens = spec["batch"] * spec["length"]
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(DTYPE or torch.float32),
        tokens=tokens, kernels=("triton" if "triton" in impl else "reference" if not impl.startswith("trm_fast")
                                else trm_fast.kernel_status()["ops"]["tinynet.causal_attention"]),
        peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if CUDA else None)

"""Generation: the seed's algorithm (re-run everything per token) vs trm_fast's incremental decoding.

    pytest benchmarks --benchmark-only -k generate

Greedy (`top_k=1`), prompt 16, 256 new tokens, the default `q_threshold=0.7`. CUDA: d 512 / 8 heads /
vocab 16000 in bf16 weights, batch 1 and 64; `trm_fast-nograph` is the same decoder without CUDA graphs.
CPU: the `small` preset (d 256, 8 heads, byte vocab) in fp32, batch 1. A round is one whole generation
(prefill included, capture excluded by a warm-up call); tokens/s = batch x 256 / median.
"""
import pytest
import torch

import trm_fast
from trm_fast import decoding, reference
from bench_cases import CUDA

PROMPT, NEW = 16, 256
if CUDA:
    GEN_CASES = {f"gen-d512-B{b}": dict(batch=b, d_model=512, n_heads=8, vocab_size=16000) for b in (1, 64)}
    GEN_DTYPE, IMPLS = torch.bfloat16, ("seed", "trm_fast", "trm_fast-nograph")
else:
    GEN_CASES = {"gen-small-B1": dict(batch=1, d_model=256, n_heads=8, vocab_size=259)}
    GEN_DTYPE, IMPLS = torch.float32, ("seed", "trm_fast")


def seed_generate(model, prompts: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The seed's generation loop, over a batch of equal-length prompts (batch 1: `generate` itself)."""
    ids = prompts
    for _ in range(max_new_tokens):
        mask = (ids != model.config.pad_token_id).long()
        x = model._embed(ids)
        y, z = model._init_states(x)
        y, z, _ = model._inference_cycle(x, y, z, mask, None, 0.7)
        token = reference.sample_logits(model._output_logits(y)[:, -1], top_k=1)
        ids = torch.cat([ids, token[:, None]], dim=1)
    return ids


@pytest.mark.parametrize("mode", ["generate"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(GEN_CASES))
def test_generate(benchmark, case, impl, mode):
    spec = GEN_CASES[case]
    device = "cuda" if CUDA else "cpu"
    config = dict(vocab_size=spec["vocab_size"], d_model=spec["d_model"], n_heads=spec["n_heads"], dropout=0.0)
    torch.manual_seed(0)
    model_cls, config_cls = ((reference.TRMModel, reference.TRMConfig) if impl == "seed"
                             else (trm_fast.TRMModel, trm_fast.TRMConfig))
    model = model_cls(config_cls(**config)).to(device=device, dtype=GEN_DTYPE).eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, spec["vocab_size"], (spec["batch"], PROMPT), generator=g)

    if impl == "seed":
        def run():
            with torch.no_grad():
                return seed_generate(model, prompts.to(device), NEW).tolist()
    else:
        graph = impl == "trm_fast"

        def run():
            return model.generate_batch(prompts.tolist(), NEW, top_k=1, cuda_graph=graph if CUDA else None)

    def timed():
        out = run()
        if CUDA:
            torch.cuda.synchronize()
        return out

    if benchmark.enabled:
        timed()  # capture and allocation stay out of the timing
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    rounds = (10 if impl == "trm_fast" else 3) if CUDA else 2
    out = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    new_tokens = sum(len(seq) - PROMPT for seq in out)
    assert new_tokens == spec["batch"] * NEW, "a sequence stopped early: tokens/s would be miscounted"
    if not benchmark.enabled:
        return  # smoke run (--benchmark-disable): no timings to report
    cache = sum(d.nbytes() for d in decoding._DECODERS.get(model, {}).values())
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(GEN_DTYPE), batch=spec["batch"],
        new_tokens=new_tokens, tokens_per_s=new_tokens / benchmark.stats.stats.median,
        cache_mb=cache / 1e6 if cache else None,
        peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if CUDA else None)

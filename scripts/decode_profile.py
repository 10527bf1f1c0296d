"""Where a CUDA-graph decode step's time goes (d512 / 8 heads / vocab 16000, bf16, greedy, prompt 16,
256 new tokens): generation tokens/s, GPU time per replayed step, kernels per step and the heaviest
ones.

    python3 scripts/decode_profile.py
"""
import statistics
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import trm_fast
from trm_fast import decoding


def measure(model, prompts, label):
    for batch in (1, 64):
        p = prompts[:batch]
        model.generate_batch(p, 256, top_k=1)  # capture
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate_batch(p, 256, top_k=1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        decoder = next(d for d in decoding._DECODERS[model].values() if d.batch == batch)
        decoder.start(p, 0.7, False, [0], greedy=True)  # back to the prompt: 101 replays fit the cache
        decoder.token.copy_(decoder.next_logits().argmax(dim=-1))
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(100):
            decoder.graph.replay()
        end.record()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decoder.graph.replay()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels)
        print(f"{label} B{batch}: generate {median * 1e3:.1f} ms = {batch * 256 / median:.0f} tokens/s; "
              f"replay {begin.elapsed_time(end) * 10:.1f} us/step; {len(kernels)} kernels/step, "
              f"{busy:.1f} us busy")
        by_name = Counter()
        for e in kernels:
            by_name[e.name[:70]] += e.device_time
        for name, t in by_name.most_common(8):
            print(f"    {t:8.1f} us  {name}")


def main():
    torch.manual_seed(0)
    config = trm_fast.TRMConfig(vocab_size=16000, d_model=512, n_heads=8, dropout=0.0)
    model = trm_fast.TRMModel(config).cuda().to(torch.bfloat16).eval()
    prompts = torch.randint(3, 16000, (64, 16), generator=torch.Generator().manual_seed(1)).tolist()
    measure(model, prompts, "graph")


if __name__ == "__main__":
    main()

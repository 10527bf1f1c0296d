"""cuBLAS with and without its bias epilogue, replayed as CUDA graphs (session 24): the bias GEMMs of the step
(QKV, FFN up) come with a memset and ~5 us of idle before them. Each variant: a graph of 10 calls, each followed
by a small elementwise kernel as in the step; median replay time per call, and the kernels of one replay with the
idle time before each.
    device run: python3 scripts/bias_gemm_bench.py
"""
import statistics

import torch

from profiling import kernel_times

M, K = 8192, 512
CALLS = 10


def graph_of(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def replay_us(graph, repeats: int = 30) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    return statistics.median(times)


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    for n in (1536, 2048):
        weight = (torch.randn(n, K, device="cuda", generator=g) * 0.05).bfloat16()
        bias = torch.randn(n, device="cuda", generator=g).bfloat16()
        out = torch.empty(M, n, device="cuda", dtype=torch.bfloat16)
        small = torch.zeros(M, K, device="cuda", dtype=torch.bfloat16)
        variants = {
            "addmm bias": lambda: torch.addmm(bias, x, weight.t()),
            "F.linear bias": lambda: torch.nn.functional.linear(x, weight, bias),
            "mm": lambda: x @ weight.t(),
            "mm out=": lambda: torch.mm(x, weight.t(), out=out),
            "mm + bias add": lambda: (x @ weight.t()).add_(bias),
        }
        for name, fn in variants.items():
            def calls(fn=fn):
                for _ in range(CALLS):
                    fn()
                    small.add_(1)
            graph = graph_of(calls)
            us = replay_us(graph)
            count, busy, by_name, launches = kernel_times(graph.replay, name_width=60,
                                                          sequence_path=f"/tmp/seq_{n}_{name.replace(' ', '_')}")
            gaps = [float(line.split()[0]) for line in open(f"/tmp/seq_{n}_{name.replace(' ', '_')}")]
            kinds = ", ".join(f"{k.strip()} x{launches[k]}" for k in by_name)
            print(f"N {n:5d} {name:15s} {us:6.1f} us a call (busy {busy / CALLS:5.1f}, idle {sum(gaps) / CALLS:4.1f}) "
                  f"{kinds}")
        torch.testing.assert_close((x @ weight.t()).add_(bias).float(), torch.addmm(bias, x, weight.t()).float(),
                                   rtol=2e-2, atol=2e-2)


if __name__ == "__main__":
    main()

"""What the train step's weight-gradient GEMMs would cost as one GEMM per weight over all the calls that use it
(K = calls x 8192 rows) instead of one per call (K = 8192, each adding into the float32 total): microseconds per
weight and TFLOP/s, trm_fast.ops.lt_matmul_into (cuBLASLt, each shape's algorithm timed at its first call) replayed
from a CUDA graph, the d512 config's shapes (B16 L512).
    device run: python3 scripts/weight_grad_k_bench.py
"""
import torch

from profiling import graph_us
from trm_fast.ops import lt_matmul_into

ROWS = 8192  # tokens a call
# weight: (out features, in features, tracked calls a train step)
WEIGHTS = {"QKV": (1536, 512, 8), "output projection": (512, 512, 8), "FFN w1": (2048, 512, 8),
           "FFN w2": (512, 2048, 8), "concat xyz": (512, 1536, 4), "concat yz": (512, 1024, 4),
           "head": (16000, 512, 2)}


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    g = torch.Generator(device="cuda").manual_seed(0)
    sums = {}
    for name, (out, inp, calls) in WEIGHTS.items():
        grads = torch.randn(calls * ROWS, out, device="cuda", generator=g).bfloat16()
        inputs = torch.randn(calls * ROWS, inp, device="cuda", generator=g).bfloat16()
        total = torch.zeros(out, inp, device="cuda")
        line = f"{name:18s} [{out}, {inp}] x {calls} calls:"
        timed = {}
        for label, joined in (("one", 1), ("pairs", 2), ("all", calls)):  # calls per GEMM
            if joined not in timed:
                def step(joined=joined):
                    for start in range(0, calls * ROWS, joined * ROWS):
                        rows = slice(start, start + joined * ROWS)
                        lt_matmul_into(total, grads[rows].t(), inputs[rows], accumulate=True)
                step()  # each shape's algorithm chosen outside the capture
                timed[joined] = graph_us(step, calls=10)
            us = timed[joined]
            sums[label] = sums.get(label, 0.0) + us
            line += f" | {label} {us:7.1f} us ({2 * calls * ROWS * out * inp / us / 1e6:4.0f} TFLOP/s)"
        print(line)
    print("all weights, calls a GEMM: " + ", ".join(f"{k} {v:7.1f} us" for k, v in sums.items()))


if __name__ == "__main__":
    main()

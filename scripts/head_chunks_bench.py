"""The output head and its loss pass in row chunks (session 31's question): the head's product for a chunk of rows
written into the logits, then the loss pass (kernels/cross_entropy.py, with the gradient) over that chunk while it
may still sit in L2, against the whole product then the whole pass. Microseconds per head + loss replayed from a
CUDA graph, at the d512 config's shape ([8192, 512] @ [512, 16000]), for several chunk heights.
    device run: python3 scripts/head_chunks_bench.py
"""
import torch

from profiling import graph_us
from trm_fast.kernels.cross_entropy import cross_entropy_rows_triton
from trm_fast.ops import lt_matmul, lt_matmul_into

N, D, V = 8192, 512, 16000


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, D, device="cuda", generator=g).bfloat16()
    w_t = (torch.randn(V, D, device="cuda", generator=g) / D ** 0.5).bfloat16().t()
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    scale = torch.full((1,), 1.0 / N, device="cuda")
    logits = torch.empty(N, V, device="cuda", dtype=torch.bfloat16)
    grad = torch.empty_like(logits)

    def whole():
        out = lt_matmul(h, w_t)
        cross_entropy_rows_triton(out, targets, -100, scale, grad)

    def chunked(rows):
        def run():
            for start in range(0, N, rows):
                part = slice(start, start + rows)
                lt_matmul_into(logits[part], h[part], w_t)
                cross_entropy_rows_triton(logits[part], targets[part], -100, scale, grad[part])
        return run

    whole()
    reference = grad.clone()
    product_us = graph_us(lambda: lt_matmul(h, w_t), 10)
    print(f"whole: product {product_us:6.1f} us, product + loss {graph_us(whole, 10):6.1f} us")
    for rows in (256, 512, 1024, 2048, 4096):
        run = chunked(rows)
        run()
        same = torch.equal(grad, reference)
        product_us = graph_us(lambda: [lt_matmul_into(logits[s:s + rows], h[s:s + rows], w_t)
                                       for s in range(0, N, rows)], 10)
        print(f"chunks of {rows:5d} rows: product {product_us:6.1f} us, product + loss {graph_us(run, 10):6.1f} us "
              f"(gradient as the whole pass's: {same})")


if __name__ == "__main__":
    main()

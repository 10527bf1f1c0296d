"""Experiment (issue 3, session 16): the FFN-up product (M 8192, N 2048, K 512, bias + GELU epilogue) and the
FFN-down product by a persistent TMA-descriptor Triton kernel, beside cuBLAS (+ a separate GELU pass, the path
adopted in session 18) and kernels/matmul.py for FFN down. Faster alone, slower in the graphed step: not adopted
(benchmarks/NOTES.md, session 16); kept as the record of what was measured. (The tiled kernel's GELU epilogue that
session 16 also timed here has left kernels/matmul.py.)

    python3 scripts/matmul_variants.py [--cold] [--json out.json]
"""
import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

from trm_fast.kernels import matmul
from trm_fast.kernels.feed_forward import gelu_parts
from trm_fast.kernels.matmul import grouped_tile, dot_as

M = 8192


@triton.jit
def gelu_fast(x):
    """x * Phi(x) with erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7): one reciprocal, one exp."""
    u = tl.abs(x) * 0.7071067811865476
    t = 1.0 / (1.0 + 0.3275911 * u)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    half_erfc = 0.5 * poly * tl.exp(-u * u)
    return x * tl.where(x >= 0, 1.0 - half_erfc, half_erfc)


@triton.jit
def _store_half(c_desc, aux_desc, bias_ptr, acc, row, col, EPILOGUE: tl.constexpr, HAS_AUX: tl.constexpr,
                HALF: tl.constexpr):
    if EPILOGUE >= 1:
        acc += tl.load(bias_ptr + col + tl.arange(0, HALF)).to(tl.float32)[None, :]
    if HAS_AUX:
        aux_desc.store([row, col], acc.to(aux_desc.dtype))
    if EPILOGUE == 2:
        acc, _ = gelu_parts(acc)
    if EPILOGUE == 3:
        acc = gelu_fast(acc)
    c_desc.store([row, col], acc.to(c_desc.dtype))


@triton.jit
def _matmul_tma_kernel(a_desc, b_desc, c_desc, aux_desc, bias_ptr, M, N, K, EPILOGUE: tl.constexpr,
                       HAS_AUX: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, WS: tl.constexpr):
    k_steps = tl.cdiv(K, BLOCK_K)
    done = tl.program_id(0) - NUM_SMS
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), NUM_SMS, flatten=True,
                         warp_specialize=WS):
        tile_m, tile_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_steps):
            a = a_desc.load([tile_m * BLOCK_M, ki * BLOCK_K]).to(DOT_DTYPE)
            b = b_desc.load([tile_n * BLOCK_N, ki * BLOCK_K])
            acc = dot_as(a, b.T, acc, DOT_DTYPE, "tf32")
        done += NUM_SMS
        tile_m, tile_n = grouped_tile(done, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        _store_half(c_desc, aux_desc, bias_ptr, acc0, tile_m * BLOCK_M, tile_n * BLOCK_N, EPILOGUE, HAS_AUX,
                    BLOCK_N // 2)
        _store_half(c_desc, aux_desc, bias_ptr, acc1, tile_m * BLOCK_M, tile_n * BLOCK_N + BLOCK_N // 2, EPILOGUE,
                    HAS_AUX, BLOCK_N // 2)


def matmul_tma(a, w, out, epilogue, bias, aux, tile):
    """out = epilogue(a @ w.T + bias) for w [N, K] contiguous."""
    BM, BN, BK, G, warps, stages, per_sm, ws = tile
    (Mr, K), N = a.shape, w.shape[0]
    a_desc = TensorDescriptor.from_tensor(a, [BM, BK])
    b_desc = TensorDescriptor.from_tensor(w, [BN, BK])
    c_desc = TensorDescriptor.from_tensor(out, [BM, BN // 2])
    aux_desc = TensorDescriptor.from_tensor(aux, [BM, BN // 2]) if aux is not None else c_desc
    programs = min(torch.cuda.get_device_properties(a.device).multi_processor_count * per_sm,
                   triton.cdiv(Mr, BM) * triton.cdiv(N, BN))
    _matmul_tma_kernel[(programs,)](a_desc, b_desc, c_desc, aux_desc, bias, Mr, N, K, EPILOGUE=epilogue,
                                    HAS_AUX=aux is not None, DOT_DTYPE=tl.bfloat16, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                                    GROUP_M=G, NUM_SMS=programs, WS=ws, num_warps=warps, num_stages=stages)


@triton.jit
def _gelu_kernel(pre_ptr, act_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(pre_ptr + offs, mask=offs < n).to(tl.float32)
    g, _ = gelu_parts(x)
    tl.store(act_ptr + offs, g.to(act_ptr.dtype.element_ty), mask=offs < n)


@triton.jit
def _gelu_fast_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, gelu_fast(tl.load(x_ptr + offs)))


def gelu_into(pre, act):
    n = pre.numel()
    _gelu_kernel[(triton.cdiv(n, 4096),)](pre, act, n, BLOCK=4096, num_warps=8)


TMA_TILES = [(128, 256, 64, 8, 8, 4, 1, False), (128, 256, 64, 8, 8, 4, 1, True), (128, 128, 64, 8, 8, 4, 1, True),
             (128, 128, 64, 8, 8, 2, 2, False), (128, 128, 64, 8, 4, 2, 2, False), (128, 128, 64, 8, 8, 3, 2, False),
             (128, 64, 64, 8, 4, 3, 2, False), (128, 64, 64, 8, 4, 4, 3, False), (128, 128, 64, 8, 4, 2, 2, True)]


def bench(fn, calls=10, buffer_sets=None):
    """Median ms of one call, timed as a CUDA graph of `calls` calls (no host launch cost). With `buffer_sets`,
    call i is fn(*buffer_sets[i % len]): operands that together exceed L2, as in the step."""
    sets = buffer_sets or [()]
    fn(*sets[0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*sets[i % len(sets)])
    return round(do_bench(graph.replay, warmup=20, rep=100, return_mode="median") / calls, 4)


def cold_l2_times(D: int, F_: int, tile, count: int) -> dict:
    """FFN up cycling through `count` sets of (h, act, pre) bf16 buffers (10: ~750 MB at d512, no operand stays in
    L2; 1: the same buffers every call, as above)."""
    bf = torch.bfloat16
    w1, b1 = torch.randn(F_, D, device="cuda", dtype=bf) * 0.05, torch.randn(F_, device="cuda", dtype=bf)
    sets16 = [(torch.randn(M, D, device="cuda", dtype=bf), torch.empty(M, F_, device="cuda", dtype=bf),
               torch.empty(M, F_, device="cuda", dtype=bf)) for _ in range(count)]
    return {
        f"TMA {tile}, h bf16": bench(lambda h, act, pre: matmul_tma(h, w1, act, 2, b1, None, tile),
                                     buffer_sets=sets16),
        f"TMA {tile}, h bf16, keep pre": bench(lambda h, act, pre: matmul_tma(h, w1, act, 2, b1, pre, tile),
                                               buffer_sets=sets16),
        "cuBLAS addmm, h bf16": bench(lambda h, act, pre: torch.addmm(b1, h, w1.t(), out=pre), buffer_sets=sets16),
    }


def warm_l2_times(D: int, F_: int) -> dict:
    """FFN up (the TMA kernel under each tile and epilogue, cuBLAS), the fast GELU's accuracy,
    and FFN down, on the same buffers every call."""
    bf = torch.bfloat16
    w1, w2 = (torch.randn(*s, device="cuda", dtype=bf) * 0.05 for s in ((F_, D), (D, F_)))
    b1, b2 = torch.randn(F_, device="cuda", dtype=bf), torch.randn(D, device="cuda", dtype=bf)
    h32 = torch.randn(M, D, device="cuda")
    h16 = h32.to(bf)
    act, pre = torch.empty(M, F_, device="cuda", dtype=bf), torch.empty(M, F_, device="cuda", dtype=bf)
    out = torch.empty(M, D, device="cuda", dtype=bf)
    ref_act = F.gelu(F.linear(h16, w1, b1).float())
    ref_out = F.linear(act.copy_(ref_act), w2, b2).float()
    up = {}
    for tile in TMA_TILES:
        for epi, epi_name in ((2, "erf"), (3, "fast erf"), (1, "bias only")):
            name = f"tma A bf16 {tile} {epi_name}"
            try:
                run = lambda: matmul_tma(h16, w1, act, epi, b1, None, tile)  # noqa: E731
                run()
                up[name] = (bench(run), f"err {(act.float() - ref_act).abs().max().item():.3g}")
                if epi != 1:
                    up[name + " keep pre"] = bench(lambda: matmul_tma(h16, w1, act, epi, b1, pre, tile))
            except Exception as e:  # a tile that does not fit is reported, not fatal
                up[name] = str(e).splitlines()[0][:100]
    up["cuBLAS addmm bf16 A"] = bench(lambda: torch.addmm(b1, h16, w1.t(), out=pre))
    up["cuBLAS addmm + gelu pass"] = bench(lambda: (torch.addmm(b1, h16, w1.t(), out=pre), gelu_into(pre, act)))
    up["cast A + cuBLAS addmm + gelu pass"] = bench(
        lambda: (torch.addmm(b1, h32.to(bf), w1.t(), out=pre), gelu_into(pre, act)))
    up["tflop"] = 2 * M * F_ * D / 1e12
    x = torch.linspace(-12, 12, 1 << 22, device="cuda")
    y_ref, torch_gelu = F.gelu(x.double()), F.gelu(x)
    fast = torch.empty_like(x)
    _gelu_fast_kernel[(x.numel() // 4096,)](x, fast, BLOCK=4096)
    up["fast gelu max abs err vs fp64"] = (fast.double() - y_ref).abs().max().item()
    up["torch gelu fp32 max abs err vs fp64"] = (torch_gelu.double() - y_ref).abs().max().item()
    up["fast vs torch fp32 gelu, bf16-rounded outputs differing"] = (
        fast.to(bf) != torch_gelu.to(bf)).float().mean().item()
    act.copy_(ref_act)
    down = {"tiled (no bias)": bench(lambda: matmul.matmul_into(act, w2.t(), out, bf)),
            "cuBLAS addmm": bench(lambda: torch.addmm(b2, act, w2.t(), out=out))}
    for tile in TMA_TILES:
        try:
            run = lambda: matmul_tma(act, w2, out, 1, b2, None, tile)  # noqa: E731
            run()
            down[f"tma {tile}"] = (bench(run), f"err {(out.float() - ref_out).abs().max().item():.3g}")
        except Exception as e:
            down[f"tma {tile}"] = str(e).splitlines()[0][:100]
    return {f"ffn_up d{D}": up, f"ffn_down d{D}": down}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--cold", action="store_true", help="only the cold-L2 timings (cold_l2_times)")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name()}
    if args.cold:
        for count in (1, 10):
            results[f"ffn_up d512, {count} buffer sets"] = cold_l2_times(512, 2048, (128, 128, 64, 8, 8, 3, 2, False),
                                                                         count)
    else:
        results.update(warm_l2_times(512, 2048))
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""Compile the TinyNet training kernels that changed most for Hopper (sm90) on a machine without a GPU, to catch
what Triton's interpreter lets through but its compiler rejects (session 14: a jit helper returning a float in one
branch and a tensor in the other passed the interpreter and failed on the H100). Run it under the Triton the GPU
machine has:

    python3 -m venv /tmp/t36 --system-site-packages && /tmp/t36/bin/pip install "triton==3.6.*"
    /tmp/t36/bin/python scripts/compile_sm90.py
"""
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from trm_fast.kernels import column_sum, matmul
from trm_fast.kernels import residual_layer_norm as rln

TARGET = GPUTarget("cuda", 90, 32)


def compile_for_sm90(kernel, signature: dict, constexprs: dict, **options) -> None:
    jit = kernel
    while not isinstance(jit, triton.runtime.jit.JITFunction):  # under the autotuner / heuristics
        jit = jit.fn
    for name in constexprs:
        signature[name] = "constexpr"
    compiled = triton.compile(ASTSource(fn=jit, signature=signature, constexprs=constexprs), target=TARGET,
                              options=options)
    print(f"ok {jit.__name__} {constexprs} shared memory {compiled.metadata.shared} B")


def main():
    pointers = dict(a_ptr="*fp32", b_ptr="*bf16", c_ptr="*bf16", bias_ptr="*bf16", aux_ptr="*bf16", sums_ptr="*fp32")
    for epilogue, aux, sums, even in ((2, True, False, True), (3, True, True, True), (1, False, False, False)):
        compile_for_sm90(matmul._matmul_kernel, dict(pointers, **{k: "i32" for k in (
            "M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn")}),
            dict(EPILOGUE=epilogue, HAS_AUX=aux, COLUMN_SUMS=sums, DOT_DTYPE=tl.bfloat16, PRECISION="tf32",
                 BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, EVEN=even), num_warps=8, num_stages=3)
    for dropout in (False, True):
        compile_for_sm90(rln._residual_layer_norm_fwd_kernel, dict(
            h_ptr="*bf16", r_ptr="*bf16", w_ptr="*fp32", b_ptr="*fp32", out_ptr="*fp32", mean_ptr="*fp32",
            rstd_ptr="*fp32", N="i32", eps="fp32", p="fp32", seed_ptr="*i64"),
            dict(HAS_DROPOUT=dropout, BLOCK=512), num_warps=4)
        compile_for_sm90(rln._residual_layer_norm_bwd_kernel, dict(
            dy_ptr="*fp32", h_ptr="*bf16", r_ptr="*bf16", w_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32",
            dh_ptr="*bf16", dr_ptr="*bf16", sums_ptr="*fp32", M="i32", N="i32", p="fp32", seed_ptr="*i64"),
            dict(HAS_DROPOUT=dropout, ROWS=16, BLOCK=512), num_warps=4)
    compile_for_sm90(column_sum._column_sum_kernel, dict(x_ptr="*bf16", out_ptr="*fp32", R="i32", N="i32",
                                                         stride_r="i32", band_rows="i32"),
                     dict(BLOCK_R=64, BLOCK_N=128), num_warps=4)


if __name__ == "__main__":
    main()

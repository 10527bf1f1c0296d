"""Compile the TinyNet training kernels that changed lately for Hopper (sm90) on a machine without a GPU, to catch
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

from trm_fast.kernels import attention, column_sum, matmul
from trm_fast.kernels import concat_linear as cl
from trm_fast.kernels import cross_entropy as ce
from trm_fast.kernels import embedding as emb
from trm_fast.kernels import feed_forward as ffn
from trm_fast.kernels import halting_loss as hl
from trm_fast.kernels import id_bounds
from trm_fast.kernels import masked_mean as mm
from trm_fast.kernels import residual_layer_norm as rln

TARGET = GPUTarget("cuda", 90, 32)


def compile_for_sm90(kernel, signature: dict, constexprs: dict, **options):
    """The compiled kernel, its integer and pointer arguments marked divisible by 16 as the launcher marks the
    step's (so that loads are vectorized as they are on the GPU), but for the head count H."""
    jit = kernel
    while not isinstance(jit, triton.runtime.jit.JITFunction):  # under the autotuner / heuristics
        jit = jit.fn
    attrs = {(jit.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
             if kind != "fp32" and name != "H"}
    for name in constexprs:
        signature[name] = "constexpr"
    compiled = triton.compile(ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=TARGET, options=options)
    print(f"ok {jit.__name__} {constexprs} shared memory {compiled.metadata.shared} B")
    return compiled


def main():
    ints = lambda *names: {name: "i32" for name in names}  # noqa: E731
    for even in (True, False):
        compile_for_sm90(matmul._matmul_kernel, dict(
            a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16",
            **ints("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn")),
            dict(DOT_DTYPE=tl.bfloat16, PRECISION="tf32", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, EVEN=even),
            num_warps=8, num_stages=3)
    compile_for_sm90(ffn._gelu_backward_kernel, dict(grad_ptr="*bf16", pre_ptr="*bf16", act_ptr="*bf16",
                                                     sums_ptr="*fp32", out_ptr="*bf16", **ints("M", "N")),
                     dict(WRITE_ACT=False, BLOCK_N=128), num_warps=8)
    compile_for_sm90(cl._cast_join_kernel, dict(x0_ptr="*fp32", x1_ptr="*fp32", x2_ptr="*fp32",
                                                **ints("stride_x0", "stride_x1", "stride_x2"), out_ptr="*bf16",
                                                **ints("stride_out", "M", "K")),
                     dict(NUM_INPUTS=3, BLOCK_M=32, BLOCK_K=128))
    strides = ints("stride_b", "stride_l", "stride_t", "stride_h", "H", "L")
    compile_for_sm90(attention._attention_fwd_kernel, dict(
        qkv_ptr="*bf16", key_valid_ptr="*i1", o_ptr="*bf16", lse_ptr="*fp32", **strides,
        **ints("stride_ob", "stride_ol", "stride_oh"), qk_scale="fp32", p="fp32", seed_ptr="*i64"),
        dict(HAS_DROPOUT=True, PRECISION="tf32", HEAD_DIM=64, BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=3)
    for kernel, o_ptr in ((attention._attention_bwd_dkdv_kernel, {}), (attention._attention_bwd_dq_kernel,
                                                                       dict(o_ptr="*bf16"))):
        compile_for_sm90(kernel, dict(
            qkv_ptr="*bf16", key_valid_ptr="*i1", do_ptr="*bf16", **o_ptr, lse_ptr="*fp32", delta_ptr="*fp32",
            dqkv_ptr="*bf16", **strides, **ints("stride_gb", "stride_gl", "stride_gh"), qk_scale="fp32",
            ds_scale="fp32", p="fp32", seed_ptr="*i64"),
            dict(HAS_DROPOUT=True, HEAD_DIM=64, PRECISION="tf32", BLOCK_M=64, BLOCK_N=64), num_warps=4,
            num_stages=2)
    norm_flags = lambda dropout: dict(HAS_DROPOUT=dropout, HAS_CAST=True, HAS_RESIDUAL_BIAS=True)  # noqa: E731
    for dropout in (False, True):
        compile_for_sm90(rln._residual_layer_norm_fwd_kernel, dict(
            h_ptr="*bf16", r_ptr="*fp32", rb_ptr="*fp32", w_ptr="*fp32", b_ptr="*fp32", out_ptr="*fp32",
            cast_ptr="*bf16", mean_ptr="*fp32", rstd_ptr="*fp32", N="i32", eps="fp32", p="fp32", seed_ptr="*i64"),
            dict(norm_flags(dropout), HAS_OUT=not dropout, BLOCK=512), num_warps=4)
        compile_for_sm90(rln._residual_layer_norm_bwd_kernel, dict(
            dy_ptr="*fp32", dcast_ptr="*bf16", h_ptr="*bf16", r_ptr="*fp32", rb_ptr="*fp32", w_ptr="*fp32",
            mean_ptr="*fp32", rstd_ptr="*fp32", dh_ptr="*bf16", dr_ptr="*fp32", sums_ptr="*fp32", M="i32", N="i32",
            p="fp32", seed_ptr="*i64"), dict(norm_flags(dropout), ROWS=16, BLOCK=512), num_warps=4)
    compile_for_sm90(column_sum._column_sum_kernel, dict(x_ptr="*bf16", out_ptr="*fp32",
                                                         **ints("R", "N", "stride_r", "band_rows")),
                     dict(BLOCK_R=64, BLOCK_N=128), num_warps=4)
    compile_for_sm90(ce._cross_entropy_kernel, dict(
        logits_ptr="*bf16", stride_row="i32", targets_ptr="*i64", lse_ptr="*fp32", loss_ptr="*fp32", correct_ptr="*i8",
        grad_ptr="*bf16", **ints("stride_grad"), scale_ptr="*fp32", **ints("V", "ignore_index")),
        dict(STATS=True, WRITE_GRAD=True, BLOCK_V=8192), num_warps=8)
    compile_for_sm90(hl._halting_loss_fwd_kernel, dict(
        correct_ptr="*i8", mask_ptr="*i64", q_ptr="*bf16", labels_ptr="*fp32", loss_ptr="*fp32",
        **ints("B", "L", "stride_c", "stride_m", "stride_q"), threshold="fp32", inv_b="fp32"),
        dict(ALL=False, BLOCK_B=16, BLOCK_L=512))
    compile_for_sm90(hl._halting_loss_bwd_kernel, dict(grad_ptr="*fp32", q_ptr="*bf16", labels_ptr="*fp32",
                                                       grad_q_ptr="*bf16", **ints("B", "stride_q"), inv_b="fp32"),
                     dict(BLOCK_B=16))
    compile_for_sm90(id_bounds._id_bounds_kernel, dict(first_ptr="*i64", second_ptr="*i64", n="i32",
                                                       bounds_ptr="*i64", high="i32"), dict(BLOCK=8192), num_warps=16)
    compile_for_sm90(emb._embed_fwd_kernel, dict(ids_ptr="*i64", token_ptr="*fp32", pos_ptr="*fp32", out_ptr="*fp32",
                                                 seed_ptr="*i64", **ints("n_rows", "L", "D"), p="fp32", scale="fp32"),
                     dict(DROPOUT=True, BLOCK_R=8, BLOCK_D=512), num_warps=4)
    for atomic in (True, False):
        compile_for_sm90(emb._embed_bwd_kernel, dict(
            grad_ptr="*fp32", ids_ptr="*i64", token_grad_ptr="*fp32", pos_grad_ptr="*fp32", seed_ptr="*i64",
            **ints("n_rows", "L", "D", "padding_idx"), p="fp32", scale="fp32"),
            dict(DROPOUT=True, ATOMIC=atomic, BLOCK_R=8, BLOCK_D=512), num_warps=4)
    compile_for_sm90(mm._masked_mean_fwd_kernel, dict(y_ptr="*fp32", mask_ptr="*i64", out_ptr="*fp32",
                                                      count_ptr="*fp32", **ints("L", "D", "stride_yb", "stride_yl",
                                                                                "stride_mb")),
                     dict(BLOCK_L=128, BLOCK_D=64), num_warps=8)
    compile_for_sm90(mm._masked_mean_bwd_kernel, dict(grad_ptr="*fp32", mask_ptr="*i64", count_ptr="*fp32",
                                                      grad_y_ptr="*fp32", **ints("L", "D", "stride_mb")),
                     dict(BLOCK_L=32, BLOCK_D=64), num_warps=4)


if __name__ == "__main__":
    main()

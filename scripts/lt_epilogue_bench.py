"""Whether cuBLASLt's bias-gradient epilogue would save the train step its bias column sums (session 28, a
measurement for the issue-3 notes, not a path of the package): weight gradients total += grad_out.T @ input
(float32, beta = 1) with grad_out.sum(0) formed by the GEMM's BGRADB epilogue, against cuBLAS addmm +
kernels/column_sum.py (what the model runs). Microseconds per call replayed from a CUDA graph, each result checked
against float64.
    device run: python3 scripts/lt_epilogue_bench.py
"""
import glob
import os
import sys

import torch
from torch.utils.cpp_extension import CUDA_HOME, load_inline

from profiling import graph_us, kernel_times
from trm_fast.kernels.column_sum import sum_rows

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>

#define LT_CHECK(expr) do { cublasStatus_t s_ = (expr); \
  TORCH_CHECK(s_ == CUBLAS_STATUS_SUCCESS, #expr ": ", cublasLtGetStatusString(s_)); } while (0)

// D (column-major m x n, ld_d) = op(A) op(B) + beta D, bf16 A and B, float32 compute; returns false when no
// algorithm fits (nothing run).
static bool lt_run(const void* a, bool ta, int64_t lda, const void* b, bool tb, int64_t ldb, void* d,
                   cudaDataType_t d_type, int64_t ldd, int64_t m, int64_t n, int64_t k, float beta,
                   cublasLtEpilogue_t epilogue, void* bias, cudaDataType_t bias_type, int64_t workspace_bytes) {
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulDesc_t desc;
  LT_CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  LT_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)));
  LT_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)));
  LT_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  if (bias != nullptr) {
    LT_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    LT_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                            sizeof(bias_type)));
  }
  cublasLtMatrixLayout_t la, lb, ld;
  LT_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, ta ? k : m, ta ? m : k, lda));
  LT_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, tb ? n : k, tb ? k : n, ldb));
  LT_CHECK(cublasLtMatrixLayoutCreate(&ld, d_type, m, n, ldd));
  cublasLtMatmulPreference_t pref;
  LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  uint64_t ws = workspace_bytes;
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  cublasLtMatmulHeuristicResult_t result;
  int found = 0;
  cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle, desc, la, lb, ld, ld, pref, 1, &result, &found);
  bool ok = st == CUBLAS_STATUS_SUCCESS && found > 0;
  if (ok) {
    at::Tensor workspace = at::empty({std::max<int64_t>(result.workspaceSize, 1)},
                                     at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
    float alpha = 1.0f;
    LT_CHECK(cublasLtMatmul(handle, desc, &alpha, a, la, b, lb, &beta, d, ld, d, ld, &result.algo,
                            workspace.data_ptr(), result.workspaceSize, c10::cuda::getCurrentCUDAStream()));
  }
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la); cublasLtMatrixLayoutDestroy(lb); cublasLtMatrixLayoutDestroy(ld);
  cublasLtMatmulDescDestroy(desc);
  return ok;
}

// total [N, K] float32 (+)= grad_out[R, N].T @ input[R, K]; bias_grad [N] float32 = grad_out.sum(0) when defined.
bool weight_grad(at::Tensor grad_out, at::Tensor input, at::Tensor total, c10::optional<at::Tensor> bias_grad,
                 double beta, int64_t workspace_bytes) {
  const int64_t R = grad_out.size(0), N = grad_out.size(1), K = input.size(1);
  void* bias = bias_grad.has_value() ? bias_grad->data_ptr() : nullptr;
  return lt_run(input.data_ptr(), false, input.stride(0), grad_out.data_ptr(), true, grad_out.stride(0),
                total.data_ptr(), CUDA_R_32F, total.stride(0), K, N, R, static_cast<float>(beta),
                bias ? CUBLASLT_EPILOGUE_BGRADB : CUBLASLT_EPILOGUE_DEFAULT, bias, CUDA_R_32F, workspace_bytes);
}
"""

DECLARATIONS = """
bool weight_grad(at::Tensor grad_out, at::Tensor input, at::Tensor total, c10::optional<at::Tensor> bias_grad,
                 double beta, int64_t workspace_bytes);
"""
WGRAD_SHAPES = {"QKV": (8192, 1536, 512), "concat xyz": (8192, 512, 1536), "concat yz": (8192, 512, 1024),
                "FFN up": (8192, 2048, 512), "FFN down": (8192, 512, 2048)}
WORKSPACE = 32 << 20


def build():
    roots = [CUDA_HOME or "/usr/local/cuda", *glob.glob(os.path.join(os.path.dirname(torch.__file__), "..",
                                                                     "nvidia", "*"))]
    headers = [os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "include", "cublasLt.h"))]
    libs = [p for r in roots for p in glob.glob(os.path.join(r, "lib*", "libcublasLt.so*"))]
    print("cublasLt.h in", headers, "| lib", libs[:2])
    if not headers or not libs:
        sys.exit("no cuBLASLt header or library")
    return load_inline("lt_bench", cpp_sources=DECLARATIONS, cuda_sources=SOURCE, functions=["weight_grad"],
                       extra_include_paths=headers[:1], extra_ldflags=[libs[0]], verbose=False)


def kernel_names(fn) -> str:
    return ", ".join(sorted(k[:45] for k in kernel_times(fn)[2]))


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    lt = build()
    g = torch.Generator(device="cuda").manual_seed(0)
    print("\nweight gradient + bias gradient (us per call; float32 total += grad_out.T @ input)")
    for name, (R, N, K) in WGRAD_SHAPES.items():
        grad_out = torch.randn(R, N, device="cuda", generator=g).bfloat16()
        inp = torch.randn(R, K, device="cuda", generator=g).bfloat16()
        total, bias_total = torch.zeros(N, K, device="cuda"), torch.zeros(N, device="cuda")
        bias_part = torch.zeros(N, device="cuda")
        want_w = grad_out.double().t() @ inp.double()
        want_b = grad_out.double().sum(0)
        for ws in (WORKSPACE, 0):
            total.zero_()
            if not lt.weight_grad(grad_out, inp, total, bias_part, 0.0, ws):
                print(f"  {name}: no BGRADB algorithm (workspace {ws})")
                continue
            torch.cuda.synchronize()
            err_w = float((total.double() - want_w).abs().max() / want_w.abs().max())
            err_b = float((bias_part.double() - want_b).abs().max() / want_b.abs().max())
            bias_part.fill_(7.0)  # written, not accumulated?
            lt.weight_grad(grad_out, inp, total, bias_part, 1.0, ws)
            accumulates = float((bias_part.double() - want_b).abs().max()) > 1.0
            current = graph_us(lambda: (torch.addmm(total, grad_out.t(), inp, out_dtype=torch.float32, out=total),
                                        sum_rows(grad_out, torch.float32, into=bias_total)))
            plain = graph_us(lambda: lt.weight_grad(grad_out, inp, total, None, 1.0, ws))
            fused = graph_us(lambda: (lt.weight_grad(grad_out, inp, total, bias_part, 1.0, ws),
                                      bias_total.add_(bias_part)))
            print(f"  {name:11s} [{R}, {N}] x [{R}, {K}] ws {ws >> 20:2d} MB: addmm + column sums {current:6.1f} | "
                  f"lt no bias {plain:6.1f} | lt BGRADB + add {fused:6.1f}   (rel err w {err_w:.1e}, b {err_b:.1e}, "
                  f"bias accumulates: {accumulates})")
        print("     addmm:", kernel_names(lambda: torch.addmm(total, grad_out.t(), inp, out_dtype=torch.float32,
                                                               out=total)))
        print("     BGRADB:", kernel_names(lambda: lt.weight_grad(grad_out, inp, total, bias_part, 1.0, 0)))


if __name__ == "__main__":
    main()

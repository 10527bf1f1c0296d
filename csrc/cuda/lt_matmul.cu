// trm_fast::lt_matmul on CUDA: out = a @ b (+ bias) for bf16 / fp16 operands by cuBLASLt with no workspace.
// torch.addmm's cuBLASLt call gives the heuristic a workspace, and the kernels it then picks for the TinyNet's
// K = 512 products (QKV, FFN up) zero part of it with a memset first, after which the GPU idles 3-6 us
// (benchmarks/NOTES.md, sessions 27-28); without one the heuristic picks kernels that need none, as fast and
// with the same results. Each shape's algorithm is chosen once and cached. Anything cuBLASLt does not take
// (other dtypes or strides, no algorithm) runs lt_matmul_fallback (at::addmm / at::mm).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/all.h>

#include <cublasLt.h>

#include <array>
#include <map>
#include <mutex>
#include <optional>

namespace trm_fast {

at::Tensor lt_matmul_fallback(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias);

namespace {

#define TRM_LT_CHECK(expr)                                                                                  \
  do {                                                                                                      \
    const cublasStatus_t status_ = (expr);                                                                  \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "lt_matmul: ", #expr, " failed: ",                        \
                cublasLtGetStatusString(status_));                                                          \
  } while (0)

// The largest power of two, at most 256, that divides the address (what the heuristic may assume).
uint32_t alignment(const void* p) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 1;
  while (align < 256 && address % (2 * align) == 0) align *= 2;
  return align;
}

// The descriptors of one product, destroyed with it.
struct Descriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  Descriptors(const Descriptors&) = delete;
  Descriptors& operator=(const Descriptors&) = delete;
  Descriptors() = default;
  ~Descriptors() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// device, dtype, m, n, k, lda, ldb, ldd, transa, bias, and the alignments of a, b, d and bias
using Key = std::array<int64_t, 14>;
std::map<Key, std::optional<cublasLtMatmulAlgo_t>> algorithms;
std::mutex algorithms_mutex;

}  // namespace

// a [R, K] with unit column stride, b [K, N] with a unit stride (b itself or a transposed [N, K]), bias [N].
at::Tensor lt_matmul_cuda(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "lt_matmul: a [R, K] and b [K, N] must agree, "
              "got ", a.sizes(), " and ", b.sizes());
  const int64_t R = a.size(0), K = a.size(1), N = b.size(1);
  const auto dtype = a.scalar_type();
  const bool half = dtype == at::kBFloat16 || dtype == at::kHalf;
  // column-major, out.T [N, R] = b.T [N, K] @ a.T [K, R]: a row-major b is b.T column-major (not transposed),
  // b = w.T of a row-major w [N, K] is w.T = b column-major [K, N] (transposed)
  const bool b_rows = b.stride(1) == 1 && b.stride(0) >= N, b_cols = b.stride(0) == 1 && b.stride(1) >= K;
  const bool usable = half && b.scalar_type() == dtype && a.stride(1) == 1 && a.stride(0) >= K && (b_rows || b_cols) &&
                      R > 0 && N > 0 && K > 0 &&
                      (!bias.has_value() || (bias->scalar_type() == dtype && bias->dim() == 1 &&
                                             bias->size(0) == N && bias->stride(0) == 1));
  if (!usable) return lt_matmul_fallback(a, b, bias);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({R, N}, a.options());
  const bool transa = !b_rows;
  const int64_t lda = b_rows ? b.stride(0) : b.stride(1), ldb = a.stride(0);
  const cudaDataType_t type = dtype == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  const void* bias_ptr = bias.has_value() ? bias->data_ptr() : nullptr;

  Descriptors desc;
  TRM_LT_CHECK(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_a = transa ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = CUBLAS_OP_N;
  TRM_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  TRM_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  if (bias_ptr != nullptr) {
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    TRM_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    TRM_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &type, sizeof(type)));
    TRM_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr,
                                                sizeof(bias_ptr)));
  }
  TRM_LT_CHECK(cublasLtMatrixLayoutCreate(&desc.a, type, transa ? K : N, transa ? N : K, lda));
  TRM_LT_CHECK(cublasLtMatrixLayoutCreate(&desc.b, type, K, R, ldb));
  TRM_LT_CHECK(cublasLtMatrixLayoutCreate(&desc.d, type, N, R, N));

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const uint32_t align_a = alignment(b.data_ptr()), align_b = alignment(a.data_ptr()),
                 align_d = alignment(out.data_ptr());
  const Key key{a.get_device(), static_cast<int64_t>(dtype), N, R, K, lda, ldb, N, transa, bias_ptr != nullptr,
                align_a, align_b, align_d, bias_ptr ? alignment(bias_ptr) : 0};
  std::optional<cublasLtMatmulAlgo_t> algo;
  {
    const std::lock_guard<std::mutex> lock(algorithms_mutex);
    auto found = algorithms.find(key);
    if (found == algorithms.end()) {
      cublasLtMatmulPreference_t preference;
      TRM_LT_CHECK(cublasLtMatmulPreferenceCreate(&preference));
      const uint64_t no_workspace = 0;
      cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &no_workspace,
                                           sizeof(no_workspace));
      cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                                           sizeof(align_a));
      cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                                           sizeof(align_b));
      cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d,
                                           sizeof(align_d));
      cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d,
                                           sizeof(align_d));
      cublasLtMatmulHeuristicResult_t result;
      int count = 0;
      const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.d, desc.d,
                                                                   preference, 1, &result, &count);
      cublasLtMatmulPreferenceDestroy(preference);
      std::optional<cublasLtMatmulAlgo_t> chosen;
      if (status == CUBLAS_STATUS_SUCCESS && count > 0 && result.workspaceSize == 0) chosen = result.algo;
      found = algorithms.emplace(key, chosen).first;
    }
    algo = found->second;
  }
  if (!algo.has_value()) return lt_matmul_fallback(a, b, bias);
  const float alpha = 1.0f, beta = 0.0f;
  TRM_LT_CHECK(cublasLtMatmul(handle, desc.op, &alpha, b.data_ptr(), desc.a, a.data_ptr(), desc.b, &beta,
                              out.data_ptr(), desc.d, out.data_ptr(), desc.d, &*algo, nullptr, 0,
                              c10::cuda::getCurrentCUDAStream()));
  return out;
}

TORCH_LIBRARY_IMPL(trm_fast, CUDA, m) {
  m.impl("lt_matmul", &lt_matmul_cuda);
}

}  // namespace trm_fast

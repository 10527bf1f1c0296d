// trm_fast::lt_matmul and lt_matmul_into on CUDA: out (=|+=) scale * a @ b (+ bias) for bf16 / fp16 operands by
// cuBLASLt with no workspace, out in their dtype or float32 (the weight gradients' sums); scale, when given, a
// float32 tensor of one element read by the GEMM on the GPU (cuBLASLt's device pointer mode: no host read, so a
// gradient's incoming scale needs no pass of its own, and graph capture is unaffected).
// torch.addmm's cuBLASLt call gives the heuristic a workspace, and the kernels it then picks for the TinyNet's
// K = 512 products (QKV, FFN up) zero part of it with a memset first, after which the GPU idles 3-6 us
// (benchmarks/NOTES.md, sessions 27-28); without one the heuristic picks kernels that need none. The heuristic's
// first is often not the fastest at these shapes (session 31), so each product's path is chosen once per shape,
// strides and alignments and cached: the fastest of the heuristic's first candidates and of torch's own call,
// each timed on the GPU at the first call. Under graph capture (nothing may be timed) a product not seen before
// gets the heuristic's first, uncached (lt_matmul_untimed_captures counts those); TRM_FAST_LT_TUNE=0 or
// deterministic algorithms keep the heuristic's first always. lt_matmul_timings reports the times. Anything
// cuBLASLt does not take (other dtypes or strides, no algorithm) runs lt_matmul_fallback / lt_matmul_into_fallback
// (torch's call).
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Sleep.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/all.h>

#include <cublasLt.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

namespace trm_fast {

at::Tensor lt_matmul_fallback(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& scale);
void lt_matmul_into_fallback(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                             const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias);

namespace {

#define TRM_LT_CHECK(expr)                                                                                  \
  do {                                                                                                      \
    const cublasStatus_t status_ = (expr);                                                                  \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "lt_matmul: ", #expr, " failed: ",                        \
                cublasLtGetStatusString(status_));                                                          \
  } while (0)

constexpr int kCandidates = 16;  // heuristic results timed when an algorithm is chosen
constexpr int kWarmupRuns = 3;   // runs before the timed ones (clocks, caches, lazy initialization)
constexpr int kTimedRuns = 10;   // runs per timing round
constexpr int kRounds = 3;       // timing rounds; the fastest counts
constexpr double kClearly = 0.97;  // another path replaces the heuristic's first when this much faster
constexpr int64_t kHoldCycles = 1000000;  // ~0.5 ms: the GPU waits while the host queues a round's runs

// Microseconds per call of run_once() on `stream`, the current stream (it returns false when it cannot run:
// infinity). Each round's runs are queued behind a spinning kernel, so that the host's cost of a call (torch's is
// 10-20 us) is not timed in place of a short kernel's.
template <typename Run>
double time_us(const Run& run_once, cudaStream_t stream) {
  for (int i = 0; i < kWarmupRuns; ++i)
    if (!run_once()) return std::numeric_limits<double>::infinity();
  cudaEvent_t start, stop;
  C10_CUDA_CHECK(cudaEventCreate(&start));
  C10_CUDA_CHECK(cudaEventCreate(&stop));
  double best = std::numeric_limits<double>::infinity();
  for (int round = 0; round < kRounds; ++round) {
    at::cuda::sleep(kHoldCycles);
    C10_CUDA_CHECK(cudaEventRecord(start, stream));
    for (int i = 0; i < kTimedRuns; ++i) run_once();
    C10_CUDA_CHECK(cudaEventRecord(stop, stream));
    C10_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    best = std::min(best, 1000.0 * ms / kTimedRuns);
  }
  C10_CUDA_CHECK(cudaEventDestroy(start));
  C10_CUDA_CHECK(cudaEventDestroy(stop));
  return best;
}

// The largest power of two, at most 256, that divides the address (what the heuristic may assume).
uint32_t alignment(const void* p) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 1;
  while (align < 256 && address % (2 * align) == 0) align *= 2;
  return align;
}

// A [rows, cols] operand t as cuBLASLt's column-major view of t.T: row-major t is t.T column-major (not
// transposed); column-major t is t itself, transposed by the op. Empty when neither stride is 1 with the other
// spanning its line.
struct Operand {
  cublasOperation_t op;
  uint64_t rows, cols;
  int64_t ld;
};

std::optional<Operand> as_transposed(const at::Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(cols, 1))
    return Operand{CUBLAS_OP_N, static_cast<uint64_t>(cols), static_cast<uint64_t>(rows), t.stride(0)};
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(rows, 1))
    return Operand{CUBLAS_OP_T, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), t.stride(1)};
  return std::nullopt;
}

// device, input dtype, output dtype, N, R, K, ld of b, a and out, b's and a's op, bias, accumulate, the
// alignments of b, a, out and bias, a device scale, and whether tuning is allowed (last: a choice made under either
// setting stays its own)
using Key = std::array<int64_t, 19>;
std::map<Key, std::optional<cublasLtMatmulAlgo_t>> algorithms;  // empty: torch's call
std::mutex algorithms_mutex;
std::atomic<int64_t> untimed_captures{0};  // products first met under capture with tuning on

// 0 and 1 in device memory: beta, where the scale puts cuBLASLt in device pointer mode (alpha and beta both read
// on the GPU)
__device__ const float kBetas[2] = {0.0f, 1.0f};

const float* device_betas() {
  static std::mutex mutex;
  static std::map<int, const float*> by_device;
  const std::lock_guard<std::mutex> lock(mutex);
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  auto found = by_device.find(device);
  if (found == by_device.end()) {
    void* address = nullptr;
    C10_CUDA_CHECK(cudaGetSymbolAddress(&address, kBetas));
    found = by_device.emplace(device, static_cast<const float*>(address)).first;
  }
  return found->second;
}

bool tuning_allowed() {
  static const bool enabled = [] {
    const char* value = std::getenv("TRM_FAST_LT_TUNE");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return enabled && !at::globalContext().deterministicAlgorithms();
}

// One product out [R, N] (=|+=) a [R, K] @ b [K, N] (+ bias [N]) as cuBLASLt's column-major out.T = b.T @ a.T.
struct Product {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t b_layout = nullptr, a_layout = nullptr, out_layout = nullptr;
  const void *a_ptr = nullptr, *b_ptr = nullptr;
  void* out_ptr = nullptr;
  float beta = 0.0f;
  const float* device_alpha = nullptr;  // the scale, where given (then beta is read on the GPU too)
  const float* device_beta = nullptr;
  Key key{};

  Product(const Product&) = delete;
  Product& operator=(const Product&) = delete;
  Product() = default;
  ~Product() {
    if (out_layout) cublasLtMatrixLayoutDestroy(out_layout);
    if (a_layout) cublasLtMatrixLayoutDestroy(a_layout);
    if (b_layout) cublasLtMatrixLayoutDestroy(b_layout);
    if (op) cublasLtMatmulDescDestroy(op);
  }

  // Fills the descriptors; false when cuBLASLt is not given these operands (the caller falls back).
  bool describe(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                const at::Tensor& out, bool accumulate, const std::optional<at::Tensor>& scale) {
    const auto dtype = a.scalar_type(), out_dtype = out.scalar_type();
    const int64_t R = a.size(0), K = a.size(1), N = b.size(1);
    const auto b_view = as_transposed(b), a_view = as_transposed(a);
    const bool usable = (dtype == at::kBFloat16 || dtype == at::kHalf) && b.scalar_type() == dtype &&
                        (out_dtype == dtype || out_dtype == at::kFloat) && b_view && a_view && R > 0 && N > 0 &&
                        K > 0 && out.stride(1) == 1 && out.stride(0) >= N &&
                        (!bias.has_value() || (out_dtype == dtype && !accumulate && bias->scalar_type() == dtype &&
                                               bias->dim() == 1 && bias->size(0) == N && bias->stride(0) == 1)) &&
                        (!scale.has_value() || (!bias.has_value() && scale->scalar_type() == at::kFloat &&
                                                scale->numel() == 1 && scale->device() == a.device()));
    if (!usable) return false;
    const cudaDataType_t type = dtype == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
    const cudaDataType_t out_type = out_dtype == at::kFloat ? CUDA_R_32F : type;
    const void* bias_ptr = bias.has_value() ? bias->data_ptr() : nullptr;
    TRM_LT_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    TRM_LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &b_view->op, sizeof(b_view->op)));
    TRM_LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &a_view->op, sizeof(a_view->op)));
    if (scale.has_value()) {
      const cublasLtPointerMode_t mode = CUBLASLT_POINTER_MODE_DEVICE;
      TRM_LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &mode, sizeof(mode)));
      device_alpha = scale->data_ptr<float>();
      device_beta = device_betas() + (accumulate ? 1 : 0);
    }
    if (bias_ptr != nullptr) {
      const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
      TRM_LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
      TRM_LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &type, sizeof(type)));
      TRM_LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr,
                                                  sizeof(bias_ptr)));
    }
    TRM_LT_CHECK(cublasLtMatrixLayoutCreate(&b_layout, type, b_view->rows, b_view->cols, b_view->ld));
    TRM_LT_CHECK(cublasLtMatrixLayoutCreate(&a_layout, type, a_view->rows, a_view->cols, a_view->ld));
    TRM_LT_CHECK(cublasLtMatrixLayoutCreate(&out_layout, out_type, N, R, out.stride(0)));
    a_ptr = a.data_ptr();
    b_ptr = b.data_ptr();
    out_ptr = out.data_ptr();
    beta = accumulate ? 1.0f : 0.0f;
    key = {a.get_device(), static_cast<int64_t>(dtype), static_cast<int64_t>(out_dtype), N, R, K, b_view->ld,
           a_view->ld, out.stride(0), b_view->op, a_view->op, bias_ptr != nullptr, accumulate, alignment(b_ptr),
           alignment(a_ptr), alignment(out_ptr), bias_ptr ? alignment(bias_ptr) : 0, scale.has_value(),
           tuning_allowed()};
    return true;
  }

  // Up to `count` algorithms that need no workspace, the heuristic's first first.
  std::vector<cublasLtMatmulAlgo_t> candidates(cublasLtHandle_t handle, int count) const {
    cublasLtMatmulPreference_t preference;
    TRM_LT_CHECK(cublasLtMatmulPreferenceCreate(&preference));
    const uint64_t no_workspace = 0;
    const std::array<std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t>, 4> alignments{{
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment(b_ptr)},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment(a_ptr)},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment(out_ptr)},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment(out_ptr)}}};
    cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &no_workspace,
                                         sizeof(no_workspace));
    for (const auto& [attribute, value] : alignments)
      cublasLtMatmulPreferenceSetAttribute(preference, attribute, &value, sizeof(value));
    std::vector<cublasLtMatmulHeuristicResult_t> results(count);
    int found = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, op, b_layout, a_layout, out_layout,
                                                                 out_layout, preference, count, results.data(),
                                                                 &found);
    cublasLtMatmulPreferenceDestroy(preference);
    std::vector<cublasLtMatmulAlgo_t> algos;
    if (status != CUBLAS_STATUS_SUCCESS) return algos;
    for (int i = 0; i < found; ++i)
      if (results[i].state == CUBLAS_STATUS_SUCCESS && results[i].workspaceSize == 0) algos.push_back(results[i].algo);
    return algos;
  }

  cublasStatus_t run(cublasLtHandle_t handle, const cublasLtMatmulAlgo_t& algo, void* into,
                     cudaStream_t stream) const {
    const float alpha = 1.0f;
    const bool on_device = device_alpha != nullptr;
    return cublasLtMatmul(handle, op, on_device ? device_alpha : &alpha, b_ptr, b_layout, a_ptr, a_layout,
                          on_device ? device_beta : &beta, into, out_layout, into, out_layout, &algo, nullptr, 0,
                          stream);
  }
};

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Microseconds per call of each candidate writing `scratch` (out's shape), then of torch's call (`torch_call`)
// unless the product is scaled (torch's scaled call, a float32 product then a multiply, is never the faster).
template <typename TorchCall>
std::vector<double> time_paths(const Product& product, const std::vector<cublasLtMatmulAlgo_t>& algos,
                               const TorchCall& torch_call, at::Tensor scratch, cublasLtHandle_t handle,
                               cudaStream_t stream) {
  std::vector<double> times;
  for (const auto& algo : algos)
    times.push_back(time_us([&] { return product.run(handle, algo, scratch.data_ptr(), stream) ==
                                         CUBLAS_STATUS_SUCCESS; }, stream));
  if (product.device_alpha == nullptr) times.push_back(time_us([&] { torch_call(scratch); return true; }, stream));
  return times;
}

// The product's path: cached, else chosen (timed into a scratch output when tuning is allowed and the stream is
// not being captured: a choice first made under capture is not cached, so that a later call may time it); an empty
// algorithm means torch's call.
template <typename TorchCall>
std::optional<cublasLtMatmulAlgo_t> path(const Product& product, const at::Tensor& out, const TorchCall& torch_call,
                                         cublasLtHandle_t handle, cudaStream_t stream) {
  const std::lock_guard<std::mutex> lock(algorithms_mutex);
  const auto found = algorithms.find(product.key);
  if (found != algorithms.end()) return found->second;
  const bool allowed = product.key.back() != 0, tune = allowed && !capturing(stream);
  const auto algos = product.candidates(handle, tune ? kCandidates : 1);
  if (!tune) {
    const auto first = algos.empty() ? std::nullopt : std::optional<cublasLtMatmulAlgo_t>(algos.front());
    if (allowed) {
      ++untimed_captures;
    } else {
      algorithms.emplace(product.key, first);
    }
    return first;
  }
  // the scratch has out's strides (out may be a column block of a wider tensor: its rows' stride is the layout's)
  const at::Tensor scratch = at::empty_strided(out.sizes(), out.strides(), out.options()).zero_();
  const auto times = time_paths(product, algos, torch_call, scratch, handle, stream);
  // the heuristic's first unless another path is clearly faster (timing noise is ~1-2%)
  const size_t fastest = std::min_element(times.begin(), times.end()) - times.begin();
  const size_t chosen = times[fastest] < kClearly * times.front() ? fastest : 0;
  const std::optional<cublasLtMatmulAlgo_t> choice =
      chosen < algos.size() ? std::optional<cublasLtMatmulAlgo_t>(algos[chosen]) : std::nullopt;
  algorithms.emplace(product.key, choice);
  return choice;
}

// Runs the product into `out` on its path; false when that is torch's call (the caller's `torch_call`).
template <typename TorchCall>
bool lt_product(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias, at::Tensor& out,
                bool accumulate, const std::optional<at::Tensor>& scale, const TorchCall& torch_call) {
  Product product;
  if (!product.describe(a, b, bias, out, accumulate, scale)) return false;
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto algo = path(product, out, torch_call, handle, stream);
  if (!algo.has_value()) return false;
  TRM_LT_CHECK(product.run(handle, *algo, out.data_ptr(), stream));
  return true;
}

void check_shapes(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "lt_matmul: a [R, K] and b [K, N] must agree, "
              "got ", a.sizes(), " and ", b.sizes());
}

}  // namespace

// a [R, K] and b [K, N] each with a unit stride (row- or column-major), bias [N] or scale: a new [R, N] in a's
// dtype.
at::Tensor lt_matmul_cuda(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& scale) {
  check_shapes(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  const auto torch_call = [&](at::Tensor&) { lt_matmul_fallback(a, b, bias, scale); };
  if (!lt_product(a, b, bias, out, false, scale, torch_call)) return lt_matmul_fallback(a, b, bias, scale);
  return out;
}

// out [R, N] (a's dtype or float32, unit column stride) = scale * a @ b, or += when accumulating; or a @ b + bias
// (out in a's dtype, not accumulating).
void lt_matmul_into_cuda(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias) {
  check_shapes(a, b);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == a.size(0) && out.size(1) == b.size(1), "lt_matmul_into: out must be [",
              a.size(0), ", ", b.size(1), "], got ", out.sizes());
  const c10::cuda::CUDAGuard guard(a.device());
  const auto torch_call = [&](at::Tensor& into) { lt_matmul_into_fallback(into, a, b, accumulate, scale, bias); };
  if (!lt_product(a, b, bias, out, accumulate, scale, torch_call))
    lt_matmul_into_fallback(out, a, b, accumulate, scale, bias);
}

// Microseconds per call of each algorithm cuBLASLt offers without a workspace for the product (the heuristic's
// first first; infinity where one failed), then of torch's call, each timed into a scratch output; torch's alone
// when cuBLASLt does not take the product.
at::Tensor lt_matmul_timings_cuda(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                                  at::ScalarType out_dtype, bool accumulate) {
  check_shapes(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor scratch = at::zeros({a.size(0), b.size(1)}, a.options().dtype(out_dtype));
  // torch's call as the op that would run this product times it: lt_matmul's (a bias, or a new output in a's
  // dtype), else lt_matmul_into's
  const bool new_output = bias.has_value() || (out_dtype == a.scalar_type() && !accumulate);
  const auto torch_call = [&](at::Tensor& into) {
    new_output ? (void)lt_matmul_fallback(a, b, bias, std::nullopt)
               : lt_matmul_into_fallback(into, a, b, accumulate, std::nullopt, std::nullopt);
  };
  Product product;
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool described = product.describe(a, b, bias, scratch, accumulate, std::nullopt);
  const auto algos = described ? product.candidates(handle, kCandidates) : std::vector<cublasLtMatmulAlgo_t>{};
  return at::tensor(time_paths(product, algos, torch_call, scratch, handle, stream),
                    at::TensorOptions().dtype(at::kDouble));
}

// How many products were first met under graph capture with tuning on (each got the heuristic's first, untimed).
int64_t lt_matmul_untimed_captures() { return untimed_captures.load(); }

TORCH_LIBRARY_FRAGMENT(trm_fast, m) {
  m.def("lt_matmul_untimed_captures() -> int", &lt_matmul_untimed_captures);
}

TORCH_LIBRARY_IMPL(trm_fast, CUDA, m) {
  m.impl("lt_matmul", &lt_matmul_cuda);
  m.impl("lt_matmul_into", &lt_matmul_into_cuda);
  m.impl("lt_matmul_timings", &lt_matmul_timings_cuda);
}

}  // namespace trm_fast

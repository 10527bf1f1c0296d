// trm_fast._C: op schemas and CPU kernels. CUDA kernels live in csrc/cuda/ and register for the
// same schemas when the extension is built with CUDA.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <torch/all.h>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <tuple>
#include <limits>
#include <optional>

extern "C" {
// An importable module `trm_fast._C` whose import runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace trm_fast {

// Max softmax probability of each row of `logits` [..., V], float32 out (exp in float32, sum in float64):
// max_j softmax(x)_j = 1 / sum_j exp(x_j - max(x)).
at::Tensor token_confidence_cpu(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu(), "token_confidence_cpu: logits must be a CPU tensor");
  TORCH_CHECK(logits.dim() >= 1, "token_confidence: logits must have at least 1 dimension");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "token_confidence: logits must be floating point, got ", logits.scalar_type());
  const int64_t vocab = logits.size(-1);
  TORCH_CHECK(vocab > 0, "token_confidence: the last dimension (vocab) must be non-empty");
  at::Tensor input = logits.contiguous();
  auto out_sizes = logits.sizes().vec();
  out_sizes.pop_back();
  at::Tensor out = at::empty(out_sizes, logits.options().dtype(at::kFloat));
  const int64_t rows = out.numel();
  float* out_ptr = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "token_confidence_cpu", [&] {
    const scalar_t* in_ptr = input.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = in_ptr + r * vocab;
        float row_max = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < vocab; ++j) row_max = std::max(row_max, static_cast<float>(row[j]));
        double sum = 0.0;  // a serial float sum over a 16k vocab drifts by ~1e-5
        for (int64_t j = 0; j < vocab; ++j) sum += std::exp(static_cast<float>(row[j]) - row_max);
        out_ptr[r] = static_cast<float>(1.0 / sum);
      }
    });
  });
  return out;
}

void check_route_inputs(const at::Tensor& confidence, const at::Tensor& active, double threshold) {
  TORCH_CHECK(confidence.dim() == 1 && active.dim() == 1 && confidence.size(0) == active.size(0),
              "route_tokens: confidence and active must be 1-D of the same length, got ", confidence.sizes(),
              " and ", active.sizes());
  TORCH_CHECK(confidence.scalar_type() == at::kFloat, "route_tokens: confidence must be float32, got ",
              confidence.scalar_type());
  TORCH_CHECK(active.scalar_type() == at::kBool, "route_tokens: active must be bool, got ", active.scalar_type());
  TORCH_CHECK(confidence.device() == active.device(), "route_tokens: confidence and active are on different devices");
  TORCH_CHECK(threshold >= 0.0 && threshold <= 1.0, "route_tokens: threshold must be in [0, 1], got ", threshold);
}

// Early-exit routing of N tokens: exited = active & (confidence >= threshold); active_index holds the
// indices of the tokens still active, ascending, padded with -1 to length N; counts = [exited, active].
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_tokens_cpu(const at::Tensor& confidence,
                                                                const at::Tensor& active, double threshold) {
  check_route_inputs(confidence, active, threshold);
  const at::Tensor conf = confidence.contiguous(), act = active.contiguous();
  const int64_t n = conf.size(0);
  at::Tensor exited = at::empty({n}, act.options());
  at::Tensor index = at::full({n}, -1, act.options().dtype(at::kLong));
  const float* c = conf.const_data_ptr<float>();
  const bool* a = act.const_data_ptr<bool>();
  bool* e = exited.data_ptr<bool>();
  int64_t* idx = index.data_ptr<int64_t>();
  int64_t n_exited = 0, n_active = 0;
  const float t = static_cast<float>(threshold);
  for (int64_t i = 0; i < n; ++i) {
    e[i] = a[i] && c[i] >= t;
    n_exited += e[i];
    if (a[i] && !e[i]) idx[n_active++] = i;
  }
  at::Tensor counts = at::tensor({n_exited, n_active}, act.options().dtype(at::kLong));
  return {exited, index, counts};
}

void check_route_rows_inputs(const at::Tensor& confidence, const at::Tensor& rows, const at::Tensor& exited_rows,
                             const at::Tensor& exit_step, const at::Tensor& counts, const at::Tensor& step,
                             double threshold) {
  const int64_t m = rows.numel();
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(),
              "route_rows: rows must be a contiguous 1-D int64 tensor, got ", rows.scalar_type(), " ", rows.sizes());
  TORCH_CHECK(confidence.dim() == 1 && confidence.size(0) == m && confidence.scalar_type() == at::kFloat,
              "route_rows: confidence must be float32 [", m, "], got ", confidence.scalar_type(), " ",
              confidence.sizes());
  TORCH_CHECK(exited_rows.dim() == 1 && exited_rows.size(0) == m && exited_rows.scalar_type() == at::kLong &&
              exited_rows.is_contiguous(), "route_rows: exited_rows must be a contiguous int64 [", m, "], got ",
              exited_rows.scalar_type(), " ", exited_rows.sizes());
  TORCH_CHECK(exit_step.dim() == 1 && exit_step.scalar_type() == at::kLong && exit_step.is_contiguous(),
              "route_rows: exit_step must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(counts.numel() == 2 && counts.scalar_type() == at::kLong && counts.is_contiguous(),
              "route_rows: counts must be a contiguous int64 [2]");
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kLong, "route_rows: step must be one int64");
  for (const at::Tensor* t : {&rows, &exited_rows, &exit_step, &counts, &step}) {
    TORCH_CHECK(t->device() == confidence.device(), "route_rows: all tensors must be on one device");
  }
  TORCH_CHECK(threshold >= 0.0 && threshold <= 1.0, "route_rows: threshold must be in [0, 1], got ", threshold);
}

// Early-exit routing of listed rows, in place: of the token ids in `rows` (ascending, -1 padding), those whose
// `confidence` (one per entry) reaches `threshold` move to `exited_rows` and get exit_step[id] = step; the rest
// stay in `rows`, both lists keep their order and are padded with -1; counts = [exited, still listed].
void route_rows_cpu(const at::Tensor& confidence, at::Tensor& rows, at::Tensor& exited_rows, at::Tensor& exit_step,
                    at::Tensor& counts, const at::Tensor& step, double threshold) {
  check_route_rows_inputs(confidence, rows, exited_rows, exit_step, counts, step, threshold);
  const int64_t m = rows.numel(), n = exit_step.numel(), step_value = step.item<int64_t>();
  const at::Tensor conf = confidence.contiguous();  // held: a temporary's pointer would dangle
  const float* c = conf.const_data_ptr<float>();
  int64_t* kept = rows.data_ptr<int64_t>();
  int64_t* exited = exited_rows.data_ptr<int64_t>();
  int64_t* steps = exit_step.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK(kept[i] < n, "route_rows: row ", kept[i], " out of range for ", n, " tokens");
  }
  int64_t n_exited = 0, n_kept = 0;
  const float t = static_cast<float>(threshold);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t id = kept[i];
    if (id < 0) continue;
    if (c[i] >= t) {
      exited[n_exited++] = id;
      steps[id] = step_value;
    } else {
      kept[n_kept++] = id;
    }
  }
  std::fill(kept + n_kept, kept + m, -1);
  std::fill(exited + n_exited, exited + m, -1);
  int64_t* out = counts.data_ptr<int64_t>();
  out[0] = n_exited;
  out[1] = n_kept;
}

void check_rows_inputs(const char* op, const at::Tensor& table, const at::Tensor& index) {
  TORCH_CHECK(table.dim() == 2, op, ": the row table must be 2-D [N, D], got ", table.sizes());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, op, ": index must be a 1-D int64 tensor, got ",
              index.scalar_type(), " ", index.sizes());
  TORCH_CHECK(table.device() == index.device(), op, ": the rows and the index are on different devices");
}

// `src` itself where its rows are unit-stride (the row pitch is free), else a contiguous copy.
at::Tensor rows_view(const at::Tensor& src) {
  return src.size(1) <= 1 || src.stride(1) == 1 ? src : src.contiguous();
}

// Copy rows between a contiguous [N, D] table and a compact [M, D] block (rows of any stride, unit column
// stride) along an index list (-1 entries: padding, as route_tokens writes them). Both directions share this
// loop; `gather` picks which side is indexed.
void copy_rows_cpu(const char* op, const at::Tensor& table, const at::Tensor& index, const at::Tensor& block,
                   bool gather) {
  const int64_t n = table.size(0), width = table.size(1) * table.element_size();
  const int64_t pitch = block.stride(0) * block.element_size();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    TORCH_CHECK(idx[i] < n, op, ": index ", idx[i], " out of range for ", n, " rows");
  }
  char* t = static_cast<char*>(table.data_ptr());
  char* b = static_cast<char*>(block.data_ptr());
  at::parallel_for(0, index.numel(), 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (idx[i] < 0) {
        if (gather) std::memset(b + i * pitch, 0, width);
        continue;
      }
      if (gather) std::memcpy(b + i * pitch, t + idx[i] * width, width);
      else std::memcpy(t + idx[i] * width, b + i * pitch, width);
    }
  });
}

// out[i] = src[index[i]] (a zero row where index[i] < 0).
at::Tensor gather_rows_cpu(const at::Tensor& src, const at::Tensor& index) {
  check_rows_inputs("gather_rows", src, index);
  const at::Tensor table = src.contiguous(), idx = index.contiguous();
  at::Tensor out = at::empty({idx.size(0), table.size(1)}, table.options());
  copy_rows_cpu("gather_rows", table, idx, out, true);
  return out;
}

// dst[index[i]] = src[i] for index[i] >= 0, in place; src may be a column block of a wider tensor (no copy).
void scatter_rows_cpu(at::Tensor& dst, const at::Tensor& index, const at::Tensor& src) {
  check_rows_inputs("scatter_rows", dst, index);
  TORCH_CHECK(dst.is_contiguous(), "scatter_rows: dst must be contiguous");
  TORCH_CHECK(src.dim() == 2 && src.size(0) == index.size(0) && src.size(1) == dst.size(1) &&
              src.scalar_type() == dst.scalar_type(), "scatter_rows: src must be [len(index), D] of dst's dtype, got ",
              src.scalar_type(), " ", src.sizes());
  copy_rows_cpu("scatter_rows", dst, index.contiguous(), rows_view(src), false);
}

// Max softmax probability of hidden [N, D] @ weight[V, D]^T per row without the [N, V] logits: the vocab
// in chunks of `chunk` rows of weight, an online (max, sum of exp) per row, float32 throughout. Written
// with ATen ops, so one implementation serves every device (cuBLAS for the chunk matmuls on CUDA).
at::Tensor hidden_confidence(const at::Tensor& hidden, const at::Tensor& weight, int64_t chunk) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden_confidence: hidden must be [N, D] and weight [V, D], got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()) && at::isFloatingType(weight.scalar_type()),
              "hidden_confidence: hidden and weight must be floating point");
  TORCH_CHECK(hidden.device() == weight.device(), "hidden_confidence: hidden and weight are on different devices");
  TORCH_CHECK(chunk > 0 && weight.size(0) > 0, "hidden_confidence: chunk and vocab must be positive");
  const at::Tensor h = hidden.to(at::kFloat);
  const int64_t vocab = weight.size(0);
  at::Tensor row_max = at::full({hidden.size(0)}, -std::numeric_limits<float>::infinity(), h.options());
  at::Tensor row_sum = at::zeros({hidden.size(0)}, h.options());
  for (int64_t start = 0; start < vocab; start += chunk) {
    const at::Tensor logits = at::matmul(h, weight.narrow(0, start, std::min(chunk, vocab - start)).to(at::kFloat).t());
    const at::Tensor new_max = at::maximum(row_max, std::get<0>(logits.max(1)));
    row_sum = row_sum * at::exp(row_max - new_max) + at::exp(logits - new_max.unsqueeze(1)).sum(1);
    row_max = new_max;
  }
  return row_sum.reciprocal();
}

// scale * a @ b in float32 (on CUDA from the operands as they are; the CPU has no float32 output for bf16 GEMMs).
static at::Tensor scaled_product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale) {
  if (!a.is_cuda() || a.scalar_type() == at::kFloat) return at::mm(a.to(at::kFloat), b.to(at::kFloat)).mul_(scale);
  at::Tensor product = at::empty({a.size(0), b.size(1)}, a.options().dtype(at::kFloat));
  return at::addmm_out(product, product, a, b, at::kFloat, 0).mul_(scale);
}

// a [R, K] @ b [K, N] (+ bias [N]) by ATen: the CPU kernel of trm_fast::lt_matmul, and its CUDA kernel's
// path for what cuBLASLt without a workspace does not take (csrc/cuda/lt_matmul.cu). With `scale` (float32, one
// element) the product is formed in float32, scaled, and rounded once.
at::Tensor lt_matmul_fallback(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "lt_matmul: a [R, K] and b [K, N] must agree, "
              "got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(!(bias.has_value() && scale.has_value()), "lt_matmul: takes a bias or a scale, not both");
  if (scale.has_value()) return scaled_product(a, b, *scale).to(a.scalar_type());
  return bias.has_value() ? at::addmm(*bias, a, b) : at::mm(a, b);
}

// out [R, N] (=|+=) (scale *) a [R, K] @ b [K, N] by ATen, out in a's dtype or float32 (on the CPU, which has no
// float32 output for bf16 GEMMs, from float32 operands), or out = a @ b + bias [N] (out in a's dtype, not
// accumulating, no scale): the CPU kernel of trm_fast::lt_matmul_into, and its CUDA kernel's path for what cuBLASLt
// does not take.
void lt_matmul_into_fallback(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                             const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) && out.dim() == 2 && out.size(0) == a.size(0) &&
              out.size(1) == b.size(1), "lt_matmul_into: out [R, N], a [R, K] and b [K, N] must agree, got ",
              out.sizes(), ", ", a.sizes(), " and ", b.sizes());
  const auto dtype = out.scalar_type();
  TORCH_CHECK(!bias.has_value() || (!accumulate && !scale.has_value() && dtype == a.scalar_type()),
              "lt_matmul_into: a bias needs out in a's dtype, no accumulation and no scale");
  const int beta = accumulate ? 1 : 0;
  if (bias.has_value()) {
    at::addmm_out(out, *bias, a, b);
  } else if (scale.has_value()) {
    const at::Tensor product = scaled_product(a, b, *scale);
    accumulate ? out.add_(product) : out.copy_(product);
  } else if (dtype == a.scalar_type()) {
    at::addmm_out(out, out, a, b, beta);
  } else if (a.is_cuda()) {
    at::addmm_out(out, out, a, b, dtype, beta);
  } else {
    const at::Tensor product = at::mm(a.to(dtype), b.to(dtype));
    accumulate ? out.add_(product) : out.copy_(product);
  }
}

TORCH_LIBRARY(trm_fast, m) {
  m.def("token_confidence(Tensor logits) -> Tensor");
  m.def("route_tokens(Tensor confidence, Tensor active, float threshold) -> (Tensor, Tensor, Tensor)");
  m.def("route_rows(Tensor confidence, Tensor(a!) rows, Tensor(b!) exited_rows, Tensor(c!) exit_step, "
        "Tensor(d!) counts, Tensor step, float threshold) -> ()");
  m.def("gather_rows(Tensor src, Tensor index) -> Tensor");
  m.def("scatter_rows(Tensor(a!) dst, Tensor index, Tensor src) -> ()");
  m.def("hidden_confidence(Tensor hidden, Tensor weight, int chunk) -> Tensor");
  m.def("lt_matmul(Tensor a, Tensor b, Tensor? bias=None, Tensor? scale=None) -> Tensor");
  m.def("lt_matmul_into(Tensor(a!) out, Tensor a, Tensor b, bool accumulate, Tensor? scale=None, Tensor? bias=None) "
        "-> ()");
  m.def("lt_matmul_timings(Tensor a, Tensor b, Tensor? bias, ScalarType out_dtype, bool accumulate) -> Tensor");
}

TORCH_LIBRARY_IMPL(trm_fast, CompositeExplicitAutograd, m) {
  m.impl("hidden_confidence", &hidden_confidence);
}

TORCH_LIBRARY_IMPL(trm_fast, CPU, m) {
  m.impl("token_confidence", &token_confidence_cpu);
  m.impl("route_tokens", &route_tokens_cpu);
  m.impl("route_rows", &route_rows_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
  m.impl("lt_matmul", &lt_matmul_fallback);
  m.impl("lt_matmul_into", &lt_matmul_into_fallback);
}

}  // namespace trm_fast

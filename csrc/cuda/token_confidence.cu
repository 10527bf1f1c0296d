// CUDA kernel for trm_fast::token_confidence: one block per row, one pass with an online softmax.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/all.h>

#include <cuda_runtime.h>

namespace trm_fast {

namespace {

constexpr int kThreads = 256;

// Merge two (max, sum of exp(x - max)) pairs.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float new_m = fmaxf(m, m2);
  if (new_m == -INFINITY) return;
  s = s * __expf(m - new_m) + s2 * __expf(m2 - new_m);
  m = new_m;
}

template <typename scalar_t>
__global__ void token_confidence_kernel(const scalar_t* __restrict__ logits, float* __restrict__ out,
                                        int64_t vocab) {
  const scalar_t* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  float m = -INFINITY, s = 0.f;
  for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
    merge(m, s, static_cast<float>(row[j]), 1.f);
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffff, m, offset);
    const float s2 = __shfl_xor_sync(0xffffffff, s, offset);
    merge(m, s, m2, s2);
  }
  __shared__ float warp_m[kThreads / 32], warp_s[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kThreads / 32 ? warp_m[lane] : -INFINITY;
    s = lane < kThreads / 32 ? warp_s[lane] : 0.f;
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffff, m, offset);
      const float s2 = __shfl_xor_sync(0xffffffff, s, offset);
      merge(m, s, m2, s2);
    }
    if (lane == 0) out[blockIdx.x] = 1.f / s;
  }
}

}  // namespace

at::Tensor token_confidence_cuda(const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), "token_confidence_cuda: logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() >= 1, "token_confidence: logits must have at least 1 dimension");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "token_confidence: logits must be floating point, got ", logits.scalar_type());
  const int64_t vocab = logits.size(-1);
  TORCH_CHECK(vocab > 0, "token_confidence: the last dimension (vocab) must be non-empty");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor input = logits.contiguous();
  auto out_sizes = logits.sizes().vec();
  out_sizes.pop_back();
  at::Tensor out = at::empty(out_sizes, logits.options().dtype(at::kFloat));
  const int64_t rows = out.numel();
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "token_confidence: too many rows (", rows, ")");
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "token_confidence_cuda", [&] {
    token_confidence_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0,
                                        c10::cuda::getCurrentCUDAStream()>>>(
        input.const_data_ptr<scalar_t>(), out.data_ptr<float>(), vocab);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(trm_fast, CUDA, m) {
  m.impl("token_confidence", &token_confidence_cuda);
}

}  // namespace trm_fast

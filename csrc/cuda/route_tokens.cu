// CUDA kernel for trm_fast::route_tokens: one launch of one block that scans the tokens in chunks,
// so the compacted index list is stable (ascending) without a second pass or a host sync.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/all.h>

#include <cuda_runtime.h>

#include <tuple>

namespace trm_fast {

void check_route_inputs(const at::Tensor& confidence, const at::Tensor& active, double threshold);

namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

__global__ void route_tokens_kernel(const float* __restrict__ confidence, const bool* __restrict__ active,
                                    float threshold, int64_t n, bool* __restrict__ exited,
                                    int64_t* __restrict__ index, int64_t* __restrict__ counts) {
  __shared__ int warp_totals[kWarps];
  __shared__ int64_t base;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x == 0) base = 0;
  int64_t my_exited = 0;
  __syncthreads();
  for (int64_t start = 0; start < n; start += kThreads) {
    const int64_t i = start + threadIdx.x;
    bool keep = false;
    if (i < n) {
      const bool is_active = active[i];
      const bool exits = is_active && confidence[i] >= threshold;
      exited[i] = exits;
      my_exited += exits;
      keep = is_active && !exits;
    }
    // Exclusive prefix of `keep` across the block: ballot within warps, then over warp totals.
    const unsigned ballot = __ballot_sync(0xffffffff, keep);
    const int in_warp = __popc(ballot & ((1u << lane) - 1u));
    if (lane == 0) warp_totals[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {
      int total = lane < kWarps ? warp_totals[lane] : 0;
      for (int offset = 1; offset < 32; offset <<= 1) {
        const int up = __shfl_up_sync(0xffffffff, total, offset);
        if (lane >= offset) total += up;
      }
      if (lane < kWarps) warp_totals[lane] = total;  // inclusive prefix over warps
    }
    __syncthreads();
    const int before = (warp == 0 ? 0 : warp_totals[warp - 1]) + in_warp;
    if (keep) index[base + before] = i;
    __syncthreads();
    if (threadIdx.x == 0) base += warp_totals[kWarps - 1];
    __syncthreads();
  }
  for (int offset = 16; offset > 0; offset >>= 1) my_exited += __shfl_xor_sync(0xffffffff, my_exited, offset);
  __shared__ int64_t exited_totals[kWarps];
  if (lane == 0) exited_totals[warp] = my_exited;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int w = 0; w < kWarps; ++w) total += exited_totals[w];
    counts[0] = total;
    counts[1] = base;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_tokens_cuda(const at::Tensor& confidence,
                                                                 const at::Tensor& active, double threshold) {
  check_route_inputs(confidence, active, threshold);
  TORCH_CHECK(confidence.is_cuda(), "route_tokens_cuda: inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(confidence.device());
  const at::Tensor conf = confidence.contiguous(), act = active.contiguous();
  const int64_t n = conf.size(0);
  at::Tensor exited = at::empty({n}, act.options());
  at::Tensor index = at::full({n}, -1, act.options().dtype(at::kLong));
  at::Tensor counts = at::empty({2}, act.options().dtype(at::kLong));
  route_tokens_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      conf.const_data_ptr<float>(), act.const_data_ptr<bool>(), static_cast<float>(threshold), n,
      exited.data_ptr<bool>(), index.data_ptr<int64_t>(), counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {exited, index, counts};
}

TORCH_LIBRARY_IMPL(trm_fast, CUDA, m) {
  m.impl("route_tokens", &route_tokens_cuda);
}

}  // namespace trm_fast

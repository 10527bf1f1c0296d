// CUDA kernels for trm_fast::route_tokens and trm_fast::route_rows: one launch of one block that scans the
// tokens in chunks, so the compacted index lists are stable (ascending) without a second pass or a host sync.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/all.h>

#include <cuda_runtime.h>

#include <tuple>

namespace trm_fast {

void check_route_inputs(const at::Tensor& confidence, const at::Tensor& active, double threshold);
void check_route_rows_inputs(const at::Tensor& confidence, const at::Tensor& rows, const at::Tensor& exited_rows,
                             const at::Tensor& exit_step, const at::Tensor& counts, const at::Tensor& step,
                             double threshold);

namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

// Exclusive prefix sum of `value` over the block (ballot-free: warp shuffles, then over the warp totals); every
// thread gets its prefix and, in `total`, the block's sum. Ends with a barrier, so it can run in a loop.
__device__ int block_exclusive_scan(int value, int& total) {
  __shared__ int warp_totals[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int up = __shfl_up_sync(0xffffffff, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int sum = warp_totals[lane];  // kWarps == 32
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int up = __shfl_up_sync(0xffffffff, sum, offset);
      if (lane >= offset) sum += up;
    }
    warp_totals[lane] = sum;  // inclusive prefix over warps
  }
  __syncthreads();
  total = warp_totals[kWarps - 1];
  const int before = (warp == 0 ? 0 : warp_totals[warp - 1]) + inclusive - value;
  __syncthreads();
  return before;
}

__global__ void route_tokens_kernel(const float* __restrict__ confidence, const bool* __restrict__ active,
                                    float threshold, int64_t n, bool* __restrict__ exited,
                                    int64_t* __restrict__ index, int64_t* __restrict__ counts) {
  int64_t kept = 0, n_exited = 0;  // running totals, the same in every thread
  for (int64_t start = 0; start < n; start += kThreads) {
    const int64_t i = start + threadIdx.x;
    bool keep = false, exits = false;
    if (i < n) {
      const bool is_active = active[i];
      exits = is_active && confidence[i] >= threshold;
      exited[i] = exits;
      keep = is_active && !exits;
    }
    // Both counts in one scan: exits in the high half (at most kThreads per chunk each).
    int total;
    const int before = block_exclusive_scan((exits << 16) | keep, total);
    if (keep) index[kept + (before & 0xffff)] = i;
    kept += total & 0xffff;
    n_exited += total >> 16;
  }
  if (threadIdx.x == 0) {
    counts[0] = n_exited;
    counts[1] = kept;
  }
}

__global__ void route_rows_kernel(const float* __restrict__ confidence, int64_t* __restrict__ rows,
                                  int64_t* __restrict__ exited_rows, int64_t* __restrict__ exit_step,
                                  int64_t* __restrict__ counts, const int64_t* __restrict__ step, float threshold,
                                  int64_t m) {
  const int64_t step_value = *step;
  int64_t kept = 0, n_exited = 0;
  for (int64_t start = 0; start < m; start += kThreads) {
    const int64_t i = start + threadIdx.x;
    const int64_t id = i < m ? rows[i] : -1;
    const bool listed = id >= 0, exits = listed && confidence[i] >= threshold, keep = listed && !exits;
    int total;
    // The scan's barriers also order this chunk's reads of `rows` before its writes (at positions <= i).
    const int before = block_exclusive_scan((exits << 16) | keep, total);
    if (keep) rows[kept + (before & 0xffff)] = id;
    if (exits) {
      exited_rows[n_exited + (before >> 16)] = id;
      exit_step[id] = step_value;
    }
    kept += total & 0xffff;
    n_exited += total >> 16;
  }
  __syncthreads();
  for (int64_t i = kept + threadIdx.x; i < m; i += kThreads) rows[i] = -1;
  for (int64_t i = n_exited + threadIdx.x; i < m; i += kThreads) exited_rows[i] = -1;
  if (threadIdx.x == 0) {
    counts[0] = n_exited;
    counts[1] = kept;
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

void route_rows_cuda(const at::Tensor& confidence, at::Tensor& rows, at::Tensor& exited_rows, at::Tensor& exit_step,
                     at::Tensor& counts, const at::Tensor& step, double threshold) {
  check_route_rows_inputs(confidence, rows, exited_rows, exit_step, counts, step, threshold);
  TORCH_CHECK(confidence.is_cuda(), "route_rows_cuda: inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(confidence.device());
  const at::Tensor conf = confidence.contiguous();
  route_rows_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      conf.const_data_ptr<float>(), rows.data_ptr<int64_t>(), exited_rows.data_ptr<int64_t>(),
      exit_step.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), step.const_data_ptr<int64_t>(),
      static_cast<float>(threshold), rows.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(trm_fast, CUDA, m) {
  m.impl("route_tokens", &route_tokens_cuda);
  m.impl("route_rows", &route_rows_cuda);
}

}  // namespace trm_fast

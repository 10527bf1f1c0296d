// CUDA kernels for trm_fast::gather_rows / scatter_rows: one block per listed row, threads over its bytes
// in 4-byte words when the row width, pitch and addresses allow. -1 index entries are padding (a zero row
// when gathering). The compact side's rows may have any pitch (a column block of a wider tensor).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/all.h>

#include <cuda_runtime.h>

namespace trm_fast {

at::Tensor rows_view(const at::Tensor& src);  // trm_fast.cpp

namespace {

constexpr int kThreads = 128;

template <typename word_t>
__global__ void copy_rows_kernel(word_t* __restrict__ table, const int64_t* __restrict__ index,
                                 word_t* __restrict__ block, int64_t words, int64_t pitch, bool gather) {
  const int64_t row = index[blockIdx.x];
  word_t* b = block + static_cast<int64_t>(blockIdx.x) * pitch;
  for (int64_t w = threadIdx.x; w < words; w += kThreads) {
    if (row < 0) {
      if (gather) b[w] = word_t(0);
    } else if (gather) {
      b[w] = table[row * words + w];
    } else {
      table[row * words + w] = b[w];
    }
  }
}

void copy_rows_cuda(const at::Tensor& table, const at::Tensor& index, const at::Tensor& block, bool gather) {
  const int64_t rows = index.numel();
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "gather/scatter_rows: too many rows (", rows, ")");
  if (rows == 0 || table.size(1) == 0) return;
  const int64_t bytes = table.size(1) * table.element_size(), pitch = block.stride(0) * block.element_size();
  const bool words = bytes % 4 == 0 && pitch % 4 == 0 && reinterpret_cast<uintptr_t>(table.data_ptr()) % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(block.data_ptr()) % 4 == 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (words) {
    copy_rows_kernel<int32_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<int32_t*>(table.data_ptr()), index.const_data_ptr<int64_t>(),
        static_cast<int32_t*>(block.data_ptr()), bytes / 4, pitch / 4, gather);
  } else {
    copy_rows_kernel<int8_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<int8_t*>(table.data_ptr()), index.const_data_ptr<int64_t>(),
        static_cast<int8_t*>(block.data_ptr()), bytes, pitch, gather);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor gather_rows_cuda(const at::Tensor& src, const at::Tensor& index) {
  const c10::cuda::CUDAGuard guard(src.device());
  const at::Tensor table = src.contiguous(), idx = index.contiguous();
  at::Tensor out = at::empty({idx.size(0), table.size(1)}, table.options());
  copy_rows_cuda(table, idx, out, true);
  return out;
}

void scatter_rows_cuda(at::Tensor& dst, const at::Tensor& index, const at::Tensor& src) {
  TORCH_CHECK(dst.is_contiguous(), "scatter_rows: dst must be contiguous");
  const c10::cuda::CUDAGuard guard(dst.device());
  copy_rows_cuda(dst, index.contiguous(), rows_view(src), false);
}

TORCH_LIBRARY_IMPL(trm_fast, CUDA, m) {
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
}

}  // namespace trm_fast

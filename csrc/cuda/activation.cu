// CUDA silu_and_mul: a grid-stride elementwise kernel over (row, pack of output columns).
// Gate and up packs of one output pack sit I columns apart in the same row, so both loads and the
// store are 16-byte vectors whenever I and the pointers allow.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "activation.h"
#include "cuda/dependent_launch.cuh"
#include "cuda/element_types.cuh"
#include "cuda/layer_math.cuh"

namespace hippo {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
__global__ void silu_and_mul_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows,
                                    int64_t width) {
  wait_for_prior_kernels();  // HIPPO_PDL: see dependent_launch.cuh
  allow_dependent_kernels();
  using P = Pack<T, N>;
  const int64_t packs_per_row = width / N;
  const int64_t total = rows * packs_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / packs_per_row;
    const int64_t column = (i - row * packs_per_row) * N;
    const T* in_row = x + row * 2 * width;
    const P gate = *reinterpret_cast<const P*>(in_row + column);
    const P up = *reinterpret_cast<const P*>(in_row + width + column);
    P o;
#pragma unroll
    for (int j = 0; j < N; ++j) o.v[j] = gated<T>(to_float(gate.v[j]), to_float(up.v[j]));
    *reinterpret_cast<P*>(out + row * width + column) = o;
  }
}

template <typename T, int N>
void launch(const at::Tensor& x, const at::Tensor& out, const GatedShape& s) {
  const int64_t items = s.rows * (s.width / N);
  const int64_t max_blocks = 32LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks = static_cast<int>(std::min<int64_t>((items + kThreads - 1) / kThreads, max_blocks));
  launch_kernel(silu_and_mul_kernel<T, N>, dim3(blocks), dim3(kThreads), 0,
                at::cuda::getCurrentCUDAStream(), static_cast<const T*>(x.data_ptr()),
                static_cast<T*>(out.data_ptr()), s.rows, s.width);
}

at::Tensor silu_and_mul_cuda(const at::Tensor& x) {
  const GatedShape s = check_silu_and_mul_inputs(x);
  at::Tensor out = at::empty(silu_and_mul_output_shape(x), x.options());
  if (s.rows == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  dispatch_element_type(x.scalar_type(), "silu_and_mul", [&](auto element) {
    using T = decltype(element);
    constexpr int kPack = kPackOf16Bytes<T>;
    if (s.width % kPack == 0 && all_aligned(16, {x.data_ptr(), out.data_ptr()})) launch<T, kPack>(x, out, s);
    else launch<T, 1>(x, out, s);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CUDA, m) { m.impl("silu_and_mul", &silu_and_mul_cuda); }

}  // namespace hippo

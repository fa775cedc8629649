// CUDA rms_norm and add_rms_norm: one thread block per row.
//
// Each thread owns the same packs of the row in both passes: pass 1 forms the (rounded) residual
// sum, stores it and accumulates its squares in fp32; after a block reduction, pass 2 reads the
// packs back (its own writes: program order makes them visible) and scales them. The rounding
// points are HF's (see normalization.h), so a model run through this kernel matches PyTorch's
// eager arithmetic up to the order of the fp32 sum of squares.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "cuda/dependent_launch.cuh"
#include "cuda/element_types.cuh"
#include "cuda/layer_math.cuh"
#include "cuda/warp_reduce.cuh"
#include "normalization.h"

namespace hippo {
namespace {

constexpr int kMaxThreads = 1024;

template <typename T, int N, bool kAdd>
__global__ void rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                const T* __restrict__ weight, T* __restrict__ out, T* sum_out,
                                int64_t hidden, float eps) {
  wait_for_prior_kernels();  // HIPPO_PDL: see dependent_launch.cuh
  allow_dependent_kernels();
  using P = Pack<T, N>;
  const int64_t packs = hidden / N;
  const int64_t row_offset = static_cast<int64_t>(blockIdx.x) * hidden;
  const P* x_row = reinterpret_cast<const P*>(x + row_offset);
  // add_rms_norm normalises the sum it stores; rms_norm normalises x itself.
  const P* source_row = reinterpret_cast<const P*>(kAdd ? sum_out + row_offset : x + row_offset);

  float squares = 0.f;
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    P a = x_row[i];
    if constexpr (kAdd) {
      const P r = reinterpret_cast<const P*>(residual + row_offset)[i];
#pragma unroll
      for (int j = 0; j < N; ++j) a.v[j] = residual_sum<T>(to_float(a.v[j]), to_float(r.v[j]));
      reinterpret_cast<P*>(sum_out + row_offset)[i] = a;
    }
#pragma unroll
    for (int j = 0; j < N; ++j) squares += to_float(a.v[j]) * to_float(a.v[j]);
  }
  const float inverse = inverse_rms(block_sum(squares), hidden, eps);

  P* out_row = reinterpret_cast<P*>(out + row_offset);
  const P* weights = reinterpret_cast<const P*>(weight);
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    const P a = source_row[i];
    const P w = weights[i];
    P o;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      o.v[j] = rms_normed<T>(to_float(a.v[j]), to_float(w.v[j]), inverse);
    }
    out_row[i] = o;
  }
}

template <typename T, int N, bool kAdd>
void launch(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
            const at::Tensor& out, const at::Tensor* sum, const RmsNormShape& s, double eps) {
  const int64_t packs = s.hidden / N;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (packs + 31) / 32 * 32)));
  const auto cast = [](const at::Tensor* t) { return t ? static_cast<T*>(t->data_ptr()) : nullptr; };
  launch_kernel(rms_norm_kernel<T, N, kAdd>, dim3(static_cast<unsigned>(s.rows)), dim3(threads), 0,
                at::cuda::getCurrentCUDAStream(), static_cast<const T*>(x.data_ptr()), cast(residual),
                static_cast<const T*>(weight.data_ptr()), static_cast<T*>(out.data_ptr()), cast(sum),
                s.hidden, static_cast<float>(eps));
}

// 16-byte packs where the row length and every pointer allow, single elements otherwise.
template <bool kAdd>
void run(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
         const at::Tensor& out, const at::Tensor* sum, const RmsNormShape& s, double eps, const char* op) {
  if (s.rows == 0) return;
  // One block a row: the grid's x dimension holds at most 2^31 - 1 (wider would wrap).
  HIPPO_CHECK(s.rows <= std::numeric_limits<int32_t>::max(), op, "at most 2^31 - 1 rows on CUDA, got ",
              s.rows);
  const c10::cuda::CUDAGuard guard(x.device());
  dispatch_element_type(x.scalar_type(), op, [&](auto element) {
    using T = decltype(element);
    constexpr int kPack = kPackOf16Bytes<T>;
    const bool packed = s.hidden % kPack == 0 &&
                        all_aligned(16, {x.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                         residual ? residual->data_ptr() : nullptr,
                                         sum ? sum->data_ptr() : nullptr});
    if (packed) launch<T, kPack, kAdd>(x, residual, weight, out, sum, s, eps);
    else launch<T, 1, kAdd>(x, residual, weight, out, sum, s, eps);
  });
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const RmsNormShape s = check_rms_norm_inputs(x, weight, eps, "rms_norm");
  at::Tensor out = at::empty_like(x);
  run<false>(x, nullptr, weight, out, nullptr, s, eps, "rms_norm");
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  const RmsNormShape s = check_add_rms_norm_inputs(x, residual, weight, eps);
  at::Tensor out = at::empty_like(x);
  at::Tensor sum = at::empty_like(x);
  run<true>(x, &residual, weight, out, &sum, s, eps, "add_rms_norm");
  return {out, sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
}

}  // namespace hippo

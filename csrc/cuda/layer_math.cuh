// The elementwise arithmetic of a decoder layer's RMSNorm and SwiGLU gating, rounded where HF's
// modules round (normalization.h, activation.h). One definition, used by the standalone kernels
// (rms_norm, add_rms_norm, silu_and_mul) and by the GEMMs that fuse them into their input
// (add_rms_norm_linear, silu_and_mul_linear), so both paths compute the same values.
#pragma once

#include "cuda/element_types.cuh"

namespace hippo {

// The residual stream after an add: dtype(residual + x).
template <typename T>
__device__ __forceinline__ T residual_sum(float x, float residual) {
  return from_float<T>(residual + x);
}

// RMSNorm of one element of the (rounded) sum: dtype(weight * dtype(sum * inverse_rms)).
template <typename T>
__device__ __forceinline__ T rms_normed(float sum, float weight, float inverse_rms) {
  return from_float<T>(weight * product_rounded_to<T>(sum, inverse_rms));
}

// 1 / sqrt(mean of squares + eps), from the row's fp32 sum of squares.
__device__ __forceinline__ float inverse_rms(float sum_of_squares, int64_t hidden, float eps) {
  return rsqrtf(sum_of_squares / static_cast<float>(hidden) + eps);
}

// silu in fp32 as PyTorch's CUDA kernel computes it, x / (1 + exp(-x)), then rounded to T.
template <typename T>
__device__ __forceinline__ float silu_rounded(float x) {
  return round_to<T>(x / (1.f + expf(-x)));
}

// SwiGLU gating of one element: dtype(dtype(silu(gate)) * up).
template <typename T>
__device__ __forceinline__ T gated(float gate, float up) {
  return from_float<T>(silu_rounded<T>(gate) * up);
}

}  // namespace hippo

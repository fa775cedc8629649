// The elementwise arithmetic of a decoder layer's RMSNorm, SwiGLU gating and RoPE, rounded where
// HF's modules round (normalization.h, activation.h, rotary_embedding.h). One definition, used by
// the standalone kernels (rms_norm, add_rms_norm, silu_and_mul, rotary_kv_append) and by the
// GEMMs that fuse them (add_rms_norm_linear, silu_and_mul_linear, qkv_projection), so both paths
// compute the same elementwise values. A norm's row sum of squares is reduced in each kernel's
// own order (threads of a block differ), so the two paths may differ in its last bits.
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

// The cos and sin entries that rotate the pair (d, d + D/2) of one token's heads.
struct RopeFactors {
  float cos_first, sin_first, cos_second, sin_second;
};

// The factors at d and d + half of one token's cos and sin rows [D].
template <typename T>
__device__ __forceinline__ RopeFactors rope_factors(const T* cos, const T* sin, int d, int half) {
  return {to_float(cos[d]), to_float(sin[d]), to_float(cos[d + half]), to_float(sin[d + half])};
}

// RoPE of one rotated pair x1 = x[d], x2 = x[d + D/2] of a q or k head, HF's
// `x * cos + rotate_half(x) * sin` with its rounding (each product, then the sum, in T):
// first = x1 cos[d] - x2 sin[d], second = x2 cos[d + D/2] + x1 sin[d + D/2].
template <typename T>
__device__ __forceinline__ void rotate_pair(float x1, float x2, const RopeFactors& f, T& first,
                                            T& second) {
  first = from_float<T>(product_rounded_to<T>(x1, f.cos_first) +
                        product_rounded_to<T>(-x2, f.sin_first));
  second = from_float<T>(product_rounded_to<T>(x2, f.cos_second) +
                         product_rounded_to<T>(x1, f.sin_second));
}

// Where new token s (of S) of batch row b goes in one layer's keys or values [B, Hkv, S_max, D]:
// slot length[b] - S + s (length already counts the new tokens). A slot outside [0, S_max),
// possible only with unchecked lengths, is not valid: no length value makes a kernel write
// outside the cache.
struct CacheSlot {
  int64_t offset = 0;       // element offset of (b, kv head 0, slot, d = 0)
  int64_t head_stride = 0;  // elements from one kv head to the next: S_max * D
  bool valid = false;
};

__device__ __forceinline__ CacheSlot cache_slot(const void* length, bool length_is_64, int b, int s,
                                                int tokens, int kv_heads, int64_t max_seq, int head_dim) {
  const int64_t n = length_is_64 ? static_cast<const int64_t*>(length)[b]
                                 : static_cast<const int32_t*>(length)[b];
  const int64_t slot = n - tokens + s;
  CacheSlot c;
  c.valid = slot >= 0 && slot < max_seq;
  c.offset = (static_cast<int64_t>(b) * kv_heads * max_seq + slot) * head_dim;
  c.head_stride = max_seq * head_dim;
  return c;
}

}  // namespace hippo

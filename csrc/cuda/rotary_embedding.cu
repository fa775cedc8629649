// CUDA rotary_kv_append: one thread block per new token.
//
// A thread takes one (head, d) pair of a rotated head (q or k): it reads x[d] and x[d + D/2] once
// and writes both rotated halves, with HF's rounding (rotary_embedding.h). Query heads go to the
// output [B, S, Hq, D]; key heads and the value heads (copied) go to the token's cache slot
// length[b] - S + s. A slot outside [0, S_max) (possible only with unchecked lengths) is not
// written: no length value makes the kernel touch memory outside the cache.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "cuda/element_types.cuh"
#include "rotary_embedding.h"

namespace hippo {
namespace {

constexpr int kThreads = 128;

struct RotaryParams {
  const void* qkv;      // [B, S, (Hq + 2 Hkv) D]
  const void* cos;      // [B, S, D]
  const void* sin;      // [B, S, D]
  void* keys;           // cache[layer, 0]: [B, Hkv, S_max, D]
  void* values;         // cache[layer, 1]
  void* q_out;          // [B, S, Hq, D]
  const void* length;   // [B]
  bool length_is_64;
  int tokens, q_heads, kv_heads, head_dim;
  int64_t max_seq;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) rotary_kv_append_kernel(RotaryParams p) {
  const int64_t token = blockIdx.x;  // b * S + s
  const int b = static_cast<int>(token / p.tokens);
  const int s = static_cast<int>(token - static_cast<int64_t>(b) * p.tokens);
  const int D = p.head_dim, half = D / 2;
  const int total_heads = p.q_heads + 2 * p.kv_heads;
  const T* in = static_cast<const T*>(p.qkv) + token * total_heads * D;
  const T* cos = static_cast<const T*>(p.cos) + token * D;
  const T* sin = static_cast<const T*>(p.sin) + token * D;
  T* q_out = static_cast<T*>(p.q_out) + token * p.q_heads * D;

  const int64_t length = p.length_is_64 ? static_cast<const int64_t*>(p.length)[b]
                                        : static_cast<const int32_t*>(p.length)[b];
  const int64_t slot = length - p.tokens + s;
  const bool in_cache = slot >= 0 && slot < p.max_seq;
  // Row of (b, kv head 0, slot) in cache[layer, k/v]; kv head h adds h * S_max * D.
  const int64_t slot_offset = (static_cast<int64_t>(b) * p.kv_heads * p.max_seq + slot) * D;
  const int64_t head_stride = p.max_seq * D;

  const int rotated_pairs = (p.q_heads + p.kv_heads) * half;
  for (int i = threadIdx.x; i < rotated_pairs; i += blockDim.x) {
    const int head = i / half, d = i - head * half;
    const float x1 = to_float(in[head * D + d]), x2 = to_float(in[head * D + d + half]);
    const T first = from_float<T>(product_rounded_to<T>(x1, to_float(cos[d])) +
                                  product_rounded_to<T>(-x2, to_float(sin[d])));
    const T second = from_float<T>(product_rounded_to<T>(x2, to_float(cos[d + half])) +
                                   product_rounded_to<T>(x1, to_float(sin[d + half])));
    T* dst;
    if (head < p.q_heads) {
      dst = q_out + head * D;
    } else if (in_cache) {
      dst = static_cast<T*>(p.keys) + slot_offset + (head - p.q_heads) * head_stride;
    } else {
      continue;
    }
    dst[d] = first;
    dst[d + half] = second;
  }
  if (!in_cache) return;
  const T* value_in = in + (p.q_heads + p.kv_heads) * D;
  for (int i = threadIdx.x; i < p.kv_heads * D; i += blockDim.x) {
    const int head = i / D, d = i - head * D;
    static_cast<T*>(p.values)[slot_offset + head * head_stride + d] = value_in[i];
  }
}

at::Tensor rotary_kv_append_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                 const at::Tensor& cache, int64_t layer, const at::Tensor& length) {
  const RotaryShape s = check_rotary_kv_append_inputs(qkv, cos, sin, cache, layer, length);
  at::Tensor q = at::empty({s.batch, s.tokens, s.q_heads, s.head_dim}, qkv.options());
  const int64_t tokens = s.batch * s.tokens;
  if (tokens == 0) return q;
  const c10::cuda::CUDAGuard guard(qkv.device());
  RotaryParams p;
  p.qkv = qkv.data_ptr();
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.keys = cache[layer][0].data_ptr();
  p.values = cache[layer][1].data_ptr();
  p.q_out = q.data_ptr();
  p.length = length.data_ptr();
  p.length_is_64 = length.scalar_type() == at::kLong;
  p.tokens = static_cast<int>(s.tokens);
  p.q_heads = static_cast<int>(s.q_heads);
  p.kv_heads = static_cast<int>(s.kv_heads);
  p.head_dim = static_cast<int>(s.head_dim);
  p.max_seq = s.max_seq;
  dispatch_element_type(qkv.scalar_type(), kRotaryKvAppendOp, [&](auto element) {
    using T = decltype(element);
    rotary_kv_append_kernel<T><<<static_cast<unsigned>(tokens), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return q;
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CUDA, m) { m.impl("rotary_kv_append", &rotary_kv_append_cuda); }

}  // namespace hippo

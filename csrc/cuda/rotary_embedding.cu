// CUDA rotary_kv_append: grid (new token, slice of its work items), one item per thread.
//
// A token's items are its rotated pairs, then its value elements. A rotated pair is one (head, d)
// of a q or k head: the thread reads x[d] and x[d + D/2] once and writes both rotated halves, with
// HF's rounding (rotary_embedding.h). Query heads go to the output [B, S, Hq, D]; key heads and
// the value heads (copied) go to the token's cache slot length[b] - S + s. A slot outside
// [0, S_max) (possible only with unchecked lengths) is not written: no length value makes the
// kernel touch memory outside the cache.
//
// Why slices: a decode step has one token, and a block that walked all of its (Hq + Hkv) * D/2
// pairs in turn ran ~16 dependent load rounds (7 us for the 7B shape on an H200); spread over
// blocks each thread does one.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "cuda/dependent_launch.cuh"
#include "cuda/element_types.cuh"
#include "cuda/layer_math.cuh"
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
  wait_for_prior_kernels();  // HIPPO_PDL: see dependent_launch.cuh
  allow_dependent_kernels();
  const int64_t token = blockIdx.x;  // b * S + s
  const int item = blockIdx.y * kThreads + threadIdx.x;
  const int b = static_cast<int>(token / p.tokens);
  const int s = static_cast<int>(token - static_cast<int64_t>(b) * p.tokens);
  const int D = p.head_dim, half = D / 2;
  const int total_heads = p.q_heads + 2 * p.kv_heads;
  const T* in = static_cast<const T*>(p.qkv) + token * total_heads * D;
  const T* cos = static_cast<const T*>(p.cos) + token * D;
  const T* sin = static_cast<const T*>(p.sin) + token * D;
  T* q_out = static_cast<T*>(p.q_out) + token * p.q_heads * D;

  const CacheSlot slot = cache_slot(p.length, p.length_is_64, b, s, p.tokens, p.kv_heads, p.max_seq, D);

  const int rotated_pairs = (p.q_heads + p.kv_heads) * half;
  if (item < rotated_pairs) {
    const int head = item / half, d = item - head * half;
    T first, second;
    rotate_pair<T>(to_float(in[head * D + d]), to_float(in[head * D + d + half]),
                   rope_factors<T>(cos, sin, d, half), first, second);
    T* dst = nullptr;
    if (head < p.q_heads) {
      dst = q_out + head * D;
    } else if (slot.valid) {
      dst = static_cast<T*>(p.keys) + slot.offset + (head - p.q_heads) * slot.head_stride;
    }
    if (dst != nullptr) {
      dst[d] = first;
      dst[d + half] = second;
    }
  } else if (slot.valid && item < rotated_pairs + p.kv_heads * D) {
    const int i = item - rotated_pairs;  // value element
    const int head = i / D, d = i - head * D;
    const T* value_in = in + (p.q_heads + p.kv_heads) * D;
    static_cast<T*>(p.values)[slot.offset + head * slot.head_stride + d] = value_in[i];
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
  const int64_t items = (s.q_heads + s.kv_heads) * (s.head_dim / 2) + s.kv_heads * s.head_dim;
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(ceil_div(items, kThreads)));
  dispatch_element_type(qkv.scalar_type(), kRotaryKvAppendOp, [&](auto element) {
    using T = decltype(element);
    launch_kernel(rotary_kv_append_kernel<T>, grid, dim3(kThreads), 0, at::cuda::getCurrentCUDAStream(), p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return q;
}

// ---- rotary_tables: one thread per (token, frequency j); it writes columns j and j + D/2 ------

constexpr int kMaxSections = 8;  // M-RoPE uses 3; the component map is passed by value

struct TableParams {
  const int64_t* positions;  // [B, S] or [3, B, S]
  const float* inv_freq;     // [D/2]
  void* cos;                 // [B, S, D]
  void* sin;
  int64_t tokens;            // B * S: the stride of one position component
  int half;
  int num_sections;          // 0: 1-D RoPE
  int section_end[kMaxSections];  // exclusive end of each frequency section
  float scaling;
};

__device__ __forceinline__ int component_of(const TableParams& p, int j) {
  for (int i = 0; i < p.num_sections; ++i) {
    if (j < p.section_end[i]) return i % 3;
  }
  return 0;
}

template <typename T>
__global__ void rotary_tables_kernel(const TableParams p) {
  wait_for_prior_kernels();  // HIPPO_PDL: see dependent_launch.cuh
  allow_dependent_kernels();
  const int64_t total = p.tokens * p.half;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t token = i / p.half;
    const int j = static_cast<int>(i - token * p.half);
    const float id = static_cast<float>(p.positions[component_of(p, j) * p.tokens + token]);
    // HF: fp32 outer product (a K = 1 matmul: one rounded product), cos/sin, times the scaling.
    const float freq = __fmul_rn(p.inv_freq[j], id);
    const T c = from_float<T>(__fmul_rn(cosf(freq), p.scaling));
    const T s = from_float<T>(__fmul_rn(sinf(freq), p.scaling));
    const int64_t out = token * 2 * p.half + j;
    static_cast<T*>(p.cos)[out] = c;
    static_cast<T*>(p.cos)[out + p.half] = c;
    static_cast<T*>(p.sin)[out] = s;
    static_cast<T*>(p.sin)[out + p.half] = s;
  }
}

std::tuple<at::Tensor, at::Tensor> rotary_tables_cuda(const at::Tensor& positions_in, const at::Tensor& inv_freq,
                                                      at::IntArrayRef mrope_section, double scaling,
                                                      at::ScalarType dtype) {
  const RotaryTablesShape s = check_rotary_tables_inputs(positions_in, inv_freq, mrope_section, scaling, dtype);
  HIPPO_CHECK(static_cast<int64_t>(mrope_section.size()) <= kMaxSections, kRotaryTablesOp,
              "at most ", kMaxSections, " mrope sections on CUDA, got ", mrope_section.size());
  const auto options = inv_freq.options().dtype(dtype);
  at::Tensor cos = at::empty({s.batch, s.tokens, 2 * s.half}, options);
  at::Tensor sin = at::empty_like(cos);
  if (s.batch * s.tokens == 0) return {cos, sin};
  const c10::cuda::CUDAGuard guard(inv_freq.device());
  const at::Tensor positions = positions_in.contiguous();
  TableParams p;
  p.positions = positions.data_ptr<int64_t>();
  p.inv_freq = inv_freq.data_ptr<float>();
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.tokens = s.batch * s.tokens;
  p.half = static_cast<int>(s.half);
  p.num_sections = static_cast<int>(mrope_section.size());
  int64_t end = 0;
  for (int i = 0; i < p.num_sections; ++i) p.section_end[i] = static_cast<int>(end += mrope_section[i]);
  p.scaling = static_cast<float>(scaling);
  const int64_t items = p.tokens * p.half;
  const int blocks = static_cast<int>(std::min<int64_t>((items + 255) / 256, 4096));
  dispatch_element_type(dtype, kRotaryTablesOp, [&](auto element) {
    using T = decltype(element);
    launch_kernel(rotary_tables_kernel<T>, dim3(blocks), dim3(256), 0, at::cuda::getCurrentCUDAStream(), p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {cos, sin};
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CUDA, m) {
  m.impl("rotary_kv_append", &rotary_kv_append_cuda);
  m.impl("rotary_tables", &rotary_tables_cuda);
}

}  // namespace hippo

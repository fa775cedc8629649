// Element types of the CUDA kernels: conversions to and from float, a dispatch from the tensor's
// dtype, and a vector of N elements moved as one load or store.
// torch builds with __CUDA_NO_HALF_CONVERSIONS__ etc., so conversions are spelled out.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace hippo {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even, as PyTorch rounds every float32 -> bf16/fp16 result.
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// x rounded to T and back: the value PyTorch holds after an elementwise op in T.
template <typename T> __device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// a * b rounded to T, never contracted into an FMA by the compiler: PyTorch rounds every product
// of an eager elementwise op on its own, and so must a kernel that claims its arithmetic.
template <typename T> __device__ __forceinline__ float product_rounded_to(float a, float b) {
  return round_to<T>(__fmul_rn(a, b));
}

// Calls fn(T{}) with the CUDA element type of a float32/bf16/fp16 tensor; `op` names the caller in
// the error for any other dtype (the ops' checks normally reject those first).
template <typename Fn>
void dispatch_element_type(at::ScalarType type, const char* op, Fn&& fn) {
  switch (type) {
    case at::kFloat: return fn(float{});
    case at::kHalf: return fn(__half{});
    case at::kBFloat16: return fn(__nv_bfloat16{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", type);
  }
}

// N elements of T moved as one aligned load/store (N * sizeof(T) = 16 bytes at most).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per 16-byte vector of T.
template <typename T> constexpr int kPackOf16Bytes = 16 / static_cast<int>(sizeof(T));

// Whether every pointer is aligned to `bytes` (so Packs of that size may be used on it).
inline bool all_aligned(int bytes, std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0) return false;
  }
  return true;
}

}  // namespace hippo

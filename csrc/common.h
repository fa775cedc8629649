// Small helpers shared by the CPU and CUDA implementations of every op.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace hippo {

// All checks raise c10::Error (a RuntimeError in Python) that names the op and argument.
#define HIPPO_CHECK(cond, op, ...) TORCH_CHECK((cond), op, ": ", __VA_ARGS__)

// A double argument the kernels use as a float32 must be finite there (1e39 is inf in float32,
// and a NaN would be dropped by a running max instead of reaching the output).
inline bool finite_as_float(double value) { return std::isfinite(static_cast<float>(value)); }

inline void check_finite_as_float(double value, const char* op, const char* name) {
  HIPPO_CHECK(finite_as_float(value), op, name, " must be finite (as a float32), got ", value);
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  HIPPO_CHECK(t.dim() == dim, op, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op, const char* name) {
  HIPPO_CHECK(t.scalar_type() == dtype, op, name, " must be ", dtype, ", got ", t.scalar_type());
}

// fp32, bf16 or fp16: the dtypes of logits, probabilities and KV caches.
inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  HIPPO_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, op, name,
              " must be float32, bfloat16 or float16, got ", s);
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  HIPPO_CHECK(a.device() == b.device(), op, name_a, " is on ", a.device(), " but ", name_b,
              " is on ", b.device());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  HIPPO_CHECK(t.is_contiguous(), op, name, " must be contiguous");
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op,
                       const char* name) {
  HIPPO_CHECK(t.size(dim) == expected, op, name, ".size(", dim, ") must be ", expected,
              ", got shape ", t.sizes());
}

C10_HOST_DEVICE constexpr inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A static KV cache [layers, 2, B, Hkv, S, D] (0 = keys, 1 = values), of a KV dtype and
// contiguous: what every op that reads or writes the cache requires of it.
inline void check_kv_cache(const at::Tensor& t, const char* op, const char* name) {
  check_dim(t, 6, op, name);
  HIPPO_CHECK(t.size(1) == 2, op, name, " must be [layers, 2, B, Hkv, S, D] (keys and values), got shape ",
              t.sizes());
  check_floating(t, op, name);
  check_contiguous(t, op, name);
}

// The device-side valid lengths of a cache's sequences: [B] int32/int64, contiguous, on the cache's device
// (B is checked by each op, which knows its batch).
inline void check_cache_lengths(const at::Tensor& length, const at::Tensor& cache, const char* op) {
  check_dim(length, 1, op, "length");
  HIPPO_CHECK(length.scalar_type() == at::kInt || length.scalar_type() == at::kLong, op,
              "length must be int32 or int64, got ", length.scalar_type());
  check_same_device(length, cache, op, "length", "cache");
  check_contiguous(length, op, "length");  // CUDA kernels index it as a flat array
}

// Length values, checked on the host (the CPU path always; CUDA wrappers unless check=False):
// lower <= length[b] <= upper for every b. `lower_name` says what the lower bound is.
inline void check_length_values(const at::Tensor& length_cpu, int64_t lower, int64_t upper,
                                const char* lower_name, const char* op) {
  const at::Tensor lengths = length_cpu.to(at::kLong).contiguous();
  const int64_t* values = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < lengths.numel(); ++b) {
    HIPPO_CHECK(values[b] >= lower && values[b] <= upper, op, "length[", b, "] = ", values[b],
                " must lie in [", lower_name, ", S_max] = [", lower, ", ", upper, "]");
  }
}

}  // namespace hippo

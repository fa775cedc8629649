// rotary_kv_append: RoPE on the fused q/k/v projection, and the new keys and values appended to
// the static KV cache, in one op (what every layer of a decode, verify or prefill step does
// between its QKV projection and its attention).
//
// qkv [B, S, (Hq + 2 Hkv) D]: per token, Hq query heads, then Hkv key heads, then Hkv value heads
//     (the row layout of one concatenated q/k/v projection), contiguous;
// cos, sin [B, S, D]: the rotary tables per token (M-RoPE sections already merged, as HF's
//     rotary embedding returns them), contiguous, of qkv's dtype;
// cache [layers, 2, B, Hkv, S_max, D], contiguous, of qkv's dtype; `layer` selects the layer;
// length [B] int32/int64: the new S tokens occupy positions [length[b] - S, length[b]) (the
//     length already counts them, as decode_attention expects).
// Returns q [B, S, Hq, D]: rotated queries in decode_attention's layout. Keys (rotated) and values
// are written to cache[layer, 0/1, b, :, length[b] - S + s].
//
// Rounding is HF's `x * cos + rotate_half(x) * sin` in the tensor's dtype: each product rounded,
// then the sum rounded, with rotate_half(x) = (-x2, x1) over the two halves of the head dim.
//
// rotary_tables: the cos/sin tables that rotary_kv_append takes, from integer positions, in one
// op (HF's rotary embedding launches about ten kernels per step for them):
// positions [B, S] (1-D RoPE) or [3, B, S] (M-RoPE: temporal, height, width ids) int64;
// inv_freq [D/2] float32; mrope_section: empty for 1-D RoPE, else the sizes of the frequency
// sections (summing to D/2) whose ids come from components 0, 1, 2, 0, ... in turn.
// cos[b, s, j] = cos[b, s, j + D/2] = dtype(cos(inv_freq[j] * pos) * scaling), sin alike, with
// pos the id of j's component: HF's Qwen2 / Qwen2.5-VL rotary embedding, operation for operation.
#pragma once

#include <ATen/MemoryOverlap.h>

#include "common.h"

#include <vector>

namespace hippo {

inline constexpr const char* kRotaryKvAppendOp = "rotary_kv_append";

struct RotaryShape {
  int64_t batch = 0;
  int64_t tokens = 0;  // S
  int64_t q_heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_seq = 0;

  int64_t total_heads() const { return q_heads + 2 * kv_heads; }
};

// What rotary_kv_append needs of its q/k/v rows, described rather than given: a [B, S, width]
// tensor of `dtype` on `device`. An op that computes those rows itself (qkv_projection) checks
// its other operands with this before the rows exist.
struct QkvRows {
  int64_t batch = 0;
  int64_t tokens = 0;
  int64_t width = 0;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  const char* width_name = "qkv's last dimension";  // how errors name the width and the rows
  const char* rows_name = "qkv";
};

// The kernels read their inputs while they write the cache: none may share its memory (a qkv
// that views the cache would read values its own keys have overwritten).
inline void check_apart_from_cache(const at::Tensor& t, const at::Tensor& cache, const char* op,
                                   const char* name) {
  HIPPO_CHECK(at::get_overlap_status(t, cache) == at::MemOverlapStatus::No, op, name,
              " must not share memory with the cache");
}

inline RotaryShape check_rotary_operands(const QkvRows& qkv, const at::Tensor& cos,
                                         const at::Tensor& sin, const at::Tensor& cache,
                                         int64_t layer, const at::Tensor& length, const char* op) {
  check_kv_cache(cache, op, "cache");
  HIPPO_CHECK(cache.scalar_type() == qkv.dtype, op, "cache dtype ", cache.scalar_type(),
              " must match the ", qkv.rows_name, " dtype ", qkv.dtype);
  HIPPO_CHECK(cache.device() == qkv.device, op, qkv.rows_name, " is on ", qkv.device, " but cache is on ",
              cache.device());
  check_cache_lengths(length, cache, op);
  check_apart_from_cache(length, cache, op, "length");

  RotaryShape s;
  s.batch = qkv.batch;
  s.tokens = qkv.tokens;
  s.kv_heads = cache.size(3);
  s.max_seq = cache.size(4);
  s.head_dim = cache.size(5);
  HIPPO_CHECK(s.head_dim >= 2 && s.head_dim % 2 == 0, op, "the head dim (cache.size(5)) must be even, got ",
              s.head_dim);
  HIPPO_CHECK(s.kv_heads >= 1 && s.max_seq >= 1, op, "empty cache, shape ", cache.sizes());
  HIPPO_CHECK(qkv.width % s.head_dim == 0 && qkv.width / s.head_dim > 2 * s.kv_heads, op,
              qkv.width_name, " must be (Hq + 2 Hkv) * D with Hq >= 1, Hkv = ", s.kv_heads,
              " and D = ", s.head_dim, " (from the cache), got ", qkv.width);
  s.q_heads = qkv.width / s.head_dim - 2 * s.kv_heads;
  HIPPO_CHECK(cache.size(2) == s.batch, op, "cache batch size ", cache.size(2),
              " does not match the ", qkv.rows_name, " batch size ", s.batch);
  HIPPO_CHECK(layer >= 0 && layer < cache.size(0), op, "layer ", layer, " out of range [0, ", cache.size(0), ")");
  HIPPO_CHECK(length.size(0) == s.batch, op, "length must have one entry per batch row (", s.batch,
              "), got shape ", length.sizes());
  for (const auto& [table, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    check_dim(*table, 3, op, name);
    HIPPO_CHECK(table->size(0) == s.batch && table->size(1) == s.tokens && table->size(2) == s.head_dim, op,
                name, " must be [B, S, D] = [", s.batch, ", ", s.tokens, ", ", s.head_dim, "], got shape ",
                table->sizes());
    HIPPO_CHECK(table->scalar_type() == qkv.dtype, op, name, " dtype ", table->scalar_type(),
                " must match the ", qkv.rows_name, " dtype ", qkv.dtype);
    HIPPO_CHECK(table->device() == qkv.device, op, name, " is on ", table->device(), " but ", qkv.rows_name, " is on ",
                qkv.device);
    check_contiguous(*table, op, name);
    check_apart_from_cache(*table, cache, op, name);
  }
  return s;
}

inline RotaryShape check_rotary_kv_append_inputs(const at::Tensor& qkv, const at::Tensor& cos,
                                                 const at::Tensor& sin, const at::Tensor& cache,
                                                 int64_t layer, const at::Tensor& length) {
  const char* op = kRotaryKvAppendOp;
  check_dim(qkv, 3, op, "qkv");
  check_floating(qkv, op, "qkv");
  check_contiguous(qkv, op, "qkv");
  const RotaryShape s = check_rotary_operands(
      {qkv.size(0), qkv.size(1), qkv.size(2), qkv.scalar_type(), qkv.device()}, cos, sin, cache, layer,
      length, op);
  check_apart_from_cache(qkv, cache, op, "qkv");
  return s;
}

// Index values (on the CPU path always): S <= length[b] <= S_max, so every new token has a slot
// (the length counts the new tokens).
// `op`: the op the user called (qkv_projection checks its lengths before its GEMM runs).
inline void check_rotary_kv_append_lengths(const at::Tensor& length_cpu, const RotaryShape& s,
                                           const char* op = kRotaryKvAppendOp) {
  check_length_values(length_cpu, s.tokens, s.max_seq, "S", op);
}

inline constexpr const char* kRotaryTablesOp = "rotary_tables";

struct RotaryTablesShape {
  int64_t batch = 0;
  int64_t tokens = 0;
  int64_t half = 0;         // D / 2
  bool multimodal = false;  // positions [3, B, S]
};

inline RotaryTablesShape check_rotary_tables_inputs(const at::Tensor& positions, const at::Tensor& inv_freq,
                                                    at::IntArrayRef mrope_section, double scaling,
                                                    at::ScalarType dtype) {
  const char* op = kRotaryTablesOp;
  check_finite_as_float(scaling, op, "scaling");
  check_dtype(positions, at::kLong, op, "positions");
  check_dim(inv_freq, 1, op, "inv_freq");
  check_dtype(inv_freq, at::kFloat, op, "inv_freq");
  check_contiguous(inv_freq, op, "inv_freq");
  check_same_device(positions, inv_freq, op, "positions", "inv_freq");
  HIPPO_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              "dtype must be float32, bfloat16 or float16, got ", dtype);
  RotaryTablesShape s;
  s.half = inv_freq.size(0);
  HIPPO_CHECK(s.half >= 1, op, "inv_freq must not be empty");
  s.multimodal = !mrope_section.empty();
  if (s.multimodal) {
    HIPPO_CHECK(positions.dim() == 3 && positions.size(0) == 3, op,
                "with mrope_section, positions must be [3, B, S], got shape ", positions.sizes());
    int64_t total = 0;
    for (int64_t size : mrope_section) {  // bounded first: the sum must not wrap around
      HIPPO_CHECK(size >= 1 && size <= s.half, op, "mrope_section sizes must lie in [1, D/2 = ",
                  s.half, "], got ", mrope_section);
      total += size;
    }
    HIPPO_CHECK(total == s.half, op, "mrope_section ", mrope_section, " must sum to D/2 = ", s.half,
                " (the length of inv_freq)");
    s.batch = positions.size(1);
    s.tokens = positions.size(2);
  } else {
    HIPPO_CHECK(positions.dim() == 2, op, "without mrope_section, positions must be [B, S], got shape ",
                positions.sizes());
    s.batch = positions.size(0);
    s.tokens = positions.size(1);
  }
  return s;
}

// Which position component (0, 1 or 2) each frequency j < D/2 takes: 0 for 1-D RoPE.
inline std::vector<int8_t> rotary_components(at::IntArrayRef mrope_section, int64_t half) {
  std::vector<int8_t> component(half, 0);
  int64_t j = 0;
  for (size_t i = 0; i < mrope_section.size(); ++i) {
    for (int64_t k = 0; k < mrope_section[i]; ++k) component[j++] = static_cast<int8_t>(i % 3);
  }
  return component;
}

}  // namespace hippo

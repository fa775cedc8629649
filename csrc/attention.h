// decode_attention: input validation shared by the CPU and the CUDA implementation.
//
// query [B, Lq, Hq, D]; cache [layers, 2, B, Hkv, S_max, D] (0 = keys, 1 = values);
// length [B] int32/int64; tree_mask [Lq, Lq] or [B, Lq, Lq] bool (optional).
// Query row r of kv head h is token i = r / G of head h * G + r % G (G = Hq / Hkv): the
// G * Lq rows of one kv head share every key and value they read.
#pragma once

#include "common.h"

#include <c10/macros/Macros.h>

#include <optional>

namespace hippo {

inline constexpr const char* kDecodeAttentionOp = "decode_attention";
inline constexpr int64_t kDecodeAttentionMaxQueryLen = 64;  // one 64-bit mask word per query

struct DecodeAttentionShape {
  int64_t batch = 0;
  int64_t q_len = 0;
  int64_t q_heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t layers = 0;
  int64_t max_seq = 0;
  bool has_mask = false;
  bool mask_per_batch = false;  // tree_mask is [B, Lq, Lq] rather than [Lq, Lq]

  int64_t group() const { return q_heads / kv_heads; }
  int64_t rows_per_kv_head() const { return group() * q_len; }
};

// Shapes, dtypes, devices and layouts (no index values: those need a host sync on CUDA).
inline DecodeAttentionShape check_decode_attention_inputs(
    const at::Tensor& query, const at::Tensor& cache, int64_t layer, const at::Tensor& length,
    double scale, const std::optional<at::Tensor>& tree_mask) {
  const char* op = kDecodeAttentionOp;
  check_finite_as_float(scale, op, "scale");
  // The kernels fold log2(e) into the scale (scores go through exp2): it must stay finite too.
  HIPPO_CHECK(finite_as_float(scale * 1.4426950408889634), op,
              "scale times log2(e) must be finite as a float32 (|scale| below about 2.36e38), got ",
              scale);
  check_dim(query, 4, op, "query");
  check_kv_cache(cache, op, "cache");
  check_cache_lengths(length, cache, op);
  check_floating(query, op, "query");
  HIPPO_CHECK(cache.scalar_type() == query.scalar_type(), op, "cache dtype ", cache.scalar_type(),
              " must match the query dtype ", query.scalar_type());
  check_same_device(query, cache, op, "query", "cache");

  DecodeAttentionShape s;
  s.batch = query.size(0);
  s.q_len = query.size(1);
  s.q_heads = query.size(2);
  s.head_dim = query.size(3);
  s.layers = cache.size(0);
  s.kv_heads = cache.size(3);
  s.max_seq = cache.size(4);
  HIPPO_CHECK(cache.size(2) == s.batch, op, "cache batch size ", cache.size(2),
              " does not match the query batch size ", s.batch);
  HIPPO_CHECK(cache.size(5) == s.head_dim, op, "cache head dim ", cache.size(5),
              " does not match the query head dim ", s.head_dim);
  HIPPO_CHECK(s.q_len >= 1 && s.q_len <= kDecodeAttentionMaxQueryLen, op,
              "query length (query.size(1)) must be in [1, ", kDecodeAttentionMaxQueryLen, "], got ",
              s.q_len);
  HIPPO_CHECK(s.kv_heads >= 1 && s.q_heads >= 1 && s.q_heads % s.kv_heads == 0, op,
              "query heads (", s.q_heads, ") must be a multiple of the cache's kv heads (",
              s.kv_heads, ")");
  HIPPO_CHECK(s.head_dim >= 1 && s.max_seq >= 1, op, "empty head dim or cache, got cache shape ",
              cache.sizes());
  HIPPO_CHECK(layer >= 0 && layer < s.layers, op, "layer ", layer, " out of range [0, ", s.layers,
              ")");
  HIPPO_CHECK(length.size(0) == s.batch, op, "length must have one entry per batch row (",
              s.batch, "), got shape ", length.sizes());

  if (tree_mask.has_value()) {
    const at::Tensor& mask = *tree_mask;
    check_dtype(mask, at::kBool, op, "tree_mask");
    check_same_device(mask, cache, op, "tree_mask", "cache");
    const bool shared = mask.dim() == 2 && mask.size(0) == s.q_len && mask.size(1) == s.q_len;
    const bool per_batch = mask.dim() == 3 && mask.size(0) == s.batch && mask.size(1) == s.q_len &&
                           mask.size(2) == s.q_len;
    HIPPO_CHECK(shared || per_batch, op, "tree_mask must be [Lq, Lq] or [B, Lq, Lq] = [", s.batch,
                ", ", s.q_len, ", ", s.q_len, "], got shape ", mask.sizes());
    s.has_mask = true;
    s.mask_per_batch = per_batch;
  }
  return s;
}

// The optional workspace: int32 [>= B * Hkv] on the cache's device, zeros between calls (the
// CUDA kernel's fused merge counts finished splits on it and resets it).
inline void check_decode_attention_workspace(const std::optional<at::Tensor>& workspace,
                                             const at::Tensor& cache,
                                             const DecodeAttentionShape& s) {
  if (!workspace.has_value()) return;
  const char* op = kDecodeAttentionOp;
  check_dim(*workspace, 1, op, "workspace");  // as skinny_linear's: a flat list of semaphores
  check_dtype(*workspace, at::kInt, op, "workspace");
  check_same_device(*workspace, cache, op, "workspace", "cache");
  check_contiguous(*workspace, op, "workspace");
  HIPPO_CHECK(workspace->numel() >= s.batch * s.kv_heads, op, "workspace needs at least B * Hkv = ",
              s.batch * s.kv_heads, " int32 entries, got ", workspace->numel());
}

// What the CUDA kernel supports beyond the generic contract.
inline void check_decode_attention_cuda_support(const at::Tensor& query,
                                                const DecodeAttentionShape& s) {
  const char* op = kDecodeAttentionOp;
  HIPPO_CHECK(query.scalar_type() == at::kBFloat16 || query.scalar_type() == at::kHalf, op,
              "on CUDA, query and cache must be bfloat16 or float16, got ", query.scalar_type());
  HIPPO_CHECK(s.head_dim == 64 || s.head_dim == 80 || s.head_dim == 128, op,
              "on CUDA, the head dim must be 64, 80 or 128, got ", s.head_dim);
}

// Index values (on the CPU path always): Lq <= length[b] <= S_max for every b.
inline void check_decode_attention_lengths(const at::Tensor& length_cpu,
                                           const DecodeAttentionShape& s) {
  check_length_values(length_cpu, s.q_len, s.max_seq, "Lq", kDecodeAttentionOp);
}

// Causal rule as a mask word: query i sees block positions j <= i.
C10_HOST_DEVICE inline uint64_t causal_block_bits(int64_t i) {
  return i + 1 >= 64 ? ~uint64_t{0} : (uint64_t{1} << (i + 1)) - 1;
}

}  // namespace hippo

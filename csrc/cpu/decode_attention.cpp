// CPU reference of decode_attention: exact two-pass softmax per query row, fp32 accumulation.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"

namespace hippo {
namespace {

// Which block positions j (0 <= j < Lq) query i of batch row b may see.
struct BlockMask {
  const bool* tree = nullptr;  // [Lq, Lq] or [B, Lq, Lq], contiguous; null: causal
  int64_t batch_stride = 0;
  int64_t q_len = 0;

  uint64_t bits(int64_t b, int64_t i) const {
    if (tree == nullptr) return causal_block_bits(i);
    const bool* row = tree + b * batch_stride + i * q_len;
    uint64_t word = 0;
    for (int64_t j = 0; j < q_len; ++j) word |= uint64_t{row[j]} << j;
    return word;
  }
};

// Attention of the G * Lq query rows of one (batch row, kv head) over its visible keys.
template <typename scalar_t>
void attend_kv_head(const scalar_t* query, const scalar_t* keys, const scalar_t* values,
                    scalar_t* out, const DecodeAttentionShape& s, const BlockMask& mask,
                    int64_t b, int64_t kv_head, int64_t length, float scale) {
  const int64_t d_size = s.head_dim;
  const int64_t prefix = length - s.q_len;  // positions [0, prefix) are visible to every query
  std::vector<float> scores(length);
  std::vector<float> q_row(d_size);
  std::vector<float> acc(d_size);
  for (int64_t i = 0; i < s.q_len; ++i) {
    const uint64_t block_bits = mask.bits(b, i);
    for (int64_t g = 0; g < s.group(); ++g) {
      const int64_t head = kv_head * s.group() + g;
      const scalar_t* q = query + ((b * s.q_len + i) * s.q_heads + head) * d_size;
      scalar_t* o = out + ((b * s.q_len + i) * s.q_heads + head) * d_size;
      for (int64_t d = 0; d < d_size; ++d) q_row[d] = static_cast<float>(q[d]);

      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t pos = 0; pos < length; ++pos) {
        const bool visible = pos < prefix || ((block_bits >> (pos - prefix)) & 1);
        if (!visible) {
          scores[pos] = -std::numeric_limits<float>::infinity();
          continue;
        }
        const scalar_t* k = keys + pos * d_size;
        float dot = 0.f;
        for (int64_t d = 0; d < d_size; ++d) dot += q_row[d] * static_cast<float>(k[d]);
        scores[pos] = dot * scale;
        // A NaN score (NaN in the query or a key) must reach the output as SDPA's does;
        // std::max would drop it and leave zeros.
        max_score = std::isnan(scores[pos]) ? scores[pos] : std::max(max_score, scores[pos]);
      }

      std::fill(acc.begin(), acc.end(), 0.f);
      float denom = 0.f;
      if (max_score != -std::numeric_limits<float>::infinity()) {
        for (int64_t pos = 0; pos < length; ++pos) {
          if (scores[pos] == -std::numeric_limits<float>::infinity()) continue;
          const float p = std::exp(scores[pos] - max_score);
          denom += p;
          const scalar_t* v = values + pos * d_size;
          for (int64_t d = 0; d < d_size; ++d) acc[d] += p * static_cast<float>(v[d]);
        }
      }
      // No visible key (only possible with a tree mask row of zeros and no prefix): zeros.
      const float inv = denom > 0.f ? 1.f / denom : 0.f;
      for (int64_t d = 0; d < d_size; ++d) o[d] = static_cast<scalar_t>(acc[d] * inv);
    }
  }
}

// row_invariant needs nothing here: the reference computes every query row on its own; nor
// does the workspace (it serves the CUDA kernel's fused merge), which is only validated.
at::Tensor decode_attention_cpu(const at::Tensor& query_in, const at::Tensor& cache, int64_t layer,
                                const at::Tensor& length, double scale,
                                const std::optional<at::Tensor>& tree_mask, bool /*row_invariant*/,
                                const std::optional<at::Tensor>& workspace) {
  const DecodeAttentionShape s =
      check_decode_attention_inputs(query_in, cache, layer, length, scale, tree_mask);
  check_decode_attention_workspace(workspace, cache, s);
  check_decode_attention_lengths(length, s);

  const at::Tensor query = query_in.contiguous();
  const at::Tensor lengths = length.to(at::kLong).contiguous();
  at::Tensor mask_tensor;
  BlockMask mask;
  mask.q_len = s.q_len;
  if (s.has_mask) {
    mask_tensor = tree_mask->contiguous();
    mask.tree = mask_tensor.data_ptr<bool>();
    mask.batch_stride = s.mask_per_batch ? s.q_len * s.q_len : 0;
  }
  at::Tensor out = at::empty_like(query);

  const int64_t head_stride = s.max_seq * s.head_dim;
  const int64_t values_offset = s.batch * s.kv_heads * head_stride;  // cache[layer, 1] - cache[layer, 0]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "decode_attention_cpu", [&] {
    const scalar_t* q = query.data_ptr<scalar_t>();
    const scalar_t* layer_keys = cache.data_ptr<scalar_t>() + layer * 2 * values_offset;
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t* len = lengths.data_ptr<int64_t>();
    at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / s.kv_heads;
        const int64_t h = bh % s.kv_heads;
        const scalar_t* keys = layer_keys + bh * head_stride;
        attend_kv_head(q, keys, keys + values_offset, o, s, mask, b, h, len[b],
                       static_cast<float>(scale));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CPU, m) {
  m.impl("decode_attention", &decode_attention_cpu);
}

}  // namespace hippo

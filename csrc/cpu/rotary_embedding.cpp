// CPU reference of rotary_kv_append: HF's apply_rotary_pos_emb with ATen ops (bitwise the eager
// arithmetic), then plain copies into the cache.
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "rotary_embedding.h"

namespace hippo {
namespace {

// (x1, x2) -> (-x2, x1) over the last dimension.
at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

at::Tensor rotary_kv_append_cpu(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                const at::Tensor& cache, int64_t layer, const at::Tensor& length) {
  const RotaryShape s = check_rotary_kv_append_inputs(qkv, cos, sin, cache, layer, length);
  check_rotary_kv_append_lengths(length, s);
  const at::Tensor heads = qkv.view({s.batch, s.tokens, s.total_heads(), s.head_dim});
  const at::Tensor rotary = heads.narrow(2, 0, s.q_heads + s.kv_heads);
  const at::Tensor rotated = rotary * cos.unsqueeze(2) + rotate_half(rotary) * sin.unsqueeze(2);
  const at::Tensor keys = rotated.narrow(2, s.q_heads, s.kv_heads);
  const at::Tensor values = heads.narrow(2, s.q_heads + s.kv_heads, s.kv_heads);
  const at::Tensor lengths = length.to(at::kLong);
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t start = lengths[b].item<int64_t>() - s.tokens;
    // [S, Hkv, D] -> the [Hkv, S, D] slots of the cache.
    cache[layer][0][b].narrow(1, start, s.tokens).copy_(keys[b].transpose(0, 1));
    cache[layer][1][b].narrow(1, start, s.tokens).copy_(values[b].transpose(0, 1));
  }
  return rotated.narrow(2, 0, s.q_heads).contiguous();
}

// HF's rotary embedding forward with ATen ops: the outer product inv_freq x positions as a
// (K = 1) matmul in fp32, cos/sin, the scaling, the M-RoPE recomposition, the cast.
std::tuple<at::Tensor, at::Tensor> rotary_tables_cpu(const at::Tensor& positions, const at::Tensor& inv_freq,
                                                     at::IntArrayRef mrope_section, double scaling,
                                                     at::ScalarType dtype) {
  const RotaryTablesShape s = check_rotary_tables_inputs(positions, inv_freq, mrope_section, scaling, dtype);
  // [..., B, S] positions -> [..., B, S, D/2] frequencies.
  const at::Tensor ids = positions.to(at::kFloat).unsqueeze(-2);               // [..., B, 1, S]
  const at::Tensor inv = inv_freq.view({-1, 1}).expand({s.half, 1});           // [D/2, 1]
  const at::Tensor freqs = at::matmul(inv, ids).transpose(-1, -2);             // [..., B, S, D/2]
  auto finish = [&](const at::Tensor& wave) {
    at::Tensor table = wave * scaling;
    if (s.multimodal) {  // frequency section i takes its ids from component i % 3
      std::vector<at::Tensor> parts;
      int64_t start = 0;
      for (size_t i = 0; i < mrope_section.size(); ++i) {
        parts.push_back(table[i % 3].narrow(-1, start, mrope_section[i]));
        start += mrope_section[i];
      }
      table = at::cat(parts, -1);
    }
    return at::cat({table, table}, -1).to(dtype);
  };
  return {finish(freqs.cos()), finish(freqs.sin())};
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CPU, m) {
  m.impl("rotary_kv_append", &rotary_kv_append_cpu);
  m.impl("rotary_tables", &rotary_tables_cpu);
}

}  // namespace hippo

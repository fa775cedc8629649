// CPU reference of rotary_kv_append: HF's apply_rotary_pos_emb with ATen ops (bitwise the eager
// arithmetic), then plain copies into the cache.
#include <torch/library.h>

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

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CPU, m) { m.impl("rotary_kv_append", &rotary_kv_append_cpu); }

}  // namespace hippo

// select_visual_tokens: shapes, checks and the device-agnostic stages shared by the CPU and
// CUDA implementations (csrc/cpu/token_selection.cpp, csrc/cuda/token_selection.cu).
//
// The op runs in four stages:
//   1. global score  — device specific (a kernel per backend): mean over layers, query heads
//                      and queries of the causal softmax attention mass on each grid column;
//   2. pair dots     — device specific: per grid token its squared norm and its dot products
//                      with five "forward" neighbours (see pair_offset); every unordered
//                      neighbour pair is then computed exactly once;
//   3. local scores  — local_scores_at below, per token, called by both backends;
//   4. the rest      — shared ATen code (token_selection_topk.cpp): per-frame min-max
//                      normalisation, fusion, top-k.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "common.h"

namespace hippo {

inline constexpr const char* kSelectOp = "hippo_ext::select_visual_tokens";

// Forward neighbour directions of the pair-dot tensor [T, Hg, Wg, kNumPairDirections]:
// (dt, dy, dx) offsets such that every unordered pair of a token with a temporal neighbour
// (t+-1) or a spatial 8-neighbour is the forward pair of exactly one of the two tokens.
inline constexpr int kNumPairDirections = 5;
struct PairOffset {
  int dt, dy, dx;
};
C10_HOST_DEVICE constexpr PairOffset pair_offset(int direction) {
  switch (direction) {
    case 0: return {1, 0, 0};   // next frame, same place (temporal)
    case 1: return {0, 0, 1};   // right
    case 2: return {0, 1, -1};  // below left
    case 3: return {0, 1, 0};   // below
    default: return {0, 1, 1};  // below right
  }
}

// Sizes of one call, taken from the inputs once validated.
struct SelectionShape {
  int64_t layers, q_heads, kv_heads, num_queries, seq_len, head_dim;
  int64_t frames, grid_h, grid_w, channels;
  int64_t visual_start, num_visual, num_keep;
  int64_t group() const { return q_heads / kv_heads; }  // query heads per KV head
  int64_t grid_tokens() const { return frames * grid_h * grid_w; }
  int64_t num_kept() const { return num_keep + num_visual - grid_tokens(); }
};

// All shape/dtype/device checks of the op, for both backends.
inline SelectionShape check_selection_inputs(const at::Tensor& queries, const at::Tensor& keys,
                                             const at::Tensor& features, int64_t visual_start,
                                             int64_t num_visual, int64_t num_keep, double w_global,
                                             double w_temporal, double w_spatial, double scale) {
  const char* op = kSelectOp;
  // A NaN score would rank above every other (its bit pattern sorts above +inf). The scores
  // are fused and scaled in float32, so the weights, their sum and the scale must be finite
  // there (a weight of 1e39 is inf in float32, and 0 * inf is NaN).
  HIPPO_CHECK(finite_as_float(w_global) && finite_as_float(w_temporal) &&
                  finite_as_float(w_spatial) && finite_as_float(w_global + w_temporal + w_spatial),
              op, "the fusion weights and their sum must be finite (as float32), got (", w_global,
              ", ", w_temporal, ", ", w_spatial, ")");
  check_finite_as_float(scale, op, "scale");
  check_dim(queries, 4, op, "queries");
  check_dim(keys, 4, op, "keys");
  check_dim(features, 4, op, "features");
  check_floating(queries, op, "queries");
  check_floating(features, op, "features");
  HIPPO_CHECK(keys.scalar_type() == queries.scalar_type(), op, "keys must have the dtype of queries (",
              queries.scalar_type(), "), got ", keys.scalar_type());
  check_same_device(queries, keys, op, "queries", "keys");
  check_same_device(queries, features, op, "queries", "features");
  HIPPO_CHECK(keys.stride(3) == 1 || keys.size(3) == 1, op,
              "keys must be contiguous in its last dimension (a strided view of the cache is fine), "
              "got strides ", keys.strides());

  SelectionShape s{};
  s.layers = queries.size(0);
  s.q_heads = queries.size(1);
  s.num_queries = queries.size(2);
  s.head_dim = queries.size(3);
  s.kv_heads = keys.size(1);
  s.seq_len = keys.size(2);
  s.frames = features.size(0);
  s.grid_h = features.size(1);
  s.grid_w = features.size(2);
  s.channels = features.size(3);
  s.visual_start = visual_start;
  s.num_visual = num_visual;
  s.num_keep = num_keep;

  check_size(keys, 0, s.layers, op, "keys");
  check_size(keys, 3, s.head_dim, op, "keys");
  HIPPO_CHECK(s.layers > 0 && s.q_heads > 0 && s.num_queries > 0 && s.head_dim > 0, op,
              "queries must be non-empty, got shape ", queries.sizes());
  HIPPO_CHECK(s.kv_heads > 0 && s.q_heads % s.kv_heads == 0, op,
              "the query heads (", s.q_heads, ") must be a multiple of the KV heads (", s.kv_heads,
              ") (GQA)");
  HIPPO_CHECK(s.num_queries <= s.seq_len, op, "queries has ", s.num_queries,
              " positions but keys only ", s.seq_len, " (the queries are the last Lq positions)");
  HIPPO_CHECK(s.frames > 0 && s.grid_h > 0 && s.grid_w > 0 && s.channels > 0, op,
              "features must be non-empty, got shape ", features.sizes());
  HIPPO_CHECK(visual_start >= 0 && num_visual >= 0 && visual_start <= s.seq_len &&
                  num_visual <= s.seq_len - visual_start,  // no sum: it could wrap around
              op,
              "the visual span [", visual_start, ", ", visual_start + num_visual,
              ") must lie inside the ", s.seq_len, " key positions");
  HIPPO_CHECK(num_visual >= s.grid_tokens(), op, "num_visual (", num_visual,
              ") must cover the T*Hg*Wg = ", s.grid_tokens(), " grid tokens of features ",
              features.sizes());
  HIPPO_CHECK(num_keep >= 0 && num_keep <= s.grid_tokens(), op, "num_keep must lie in [0, ",
              s.grid_tokens(), "], got ", num_keep);
  HIPPO_CHECK(s.grid_tokens() < (int64_t{1} << 31), op, "at most 2^31 - 1 grid tokens are supported");
  return s;
}

// Temporal novelty and spatial complexity of one grid token from the pair-dot stage's outputs:
// norms_sq [N] and dots [N, kNumPairDirections] (float32, (t, y, x) order). The same code runs in
// the CPU loop and in the CUDA kernel, so both backends share these semantics exactly.
struct LocalScores {
  float temporal, spatial;
};

// sqrt of the product in double: for two identical vectors (dot == norm_sq_a == norm_sq_b, as
// the pair-dot stage sums both in one order) it is exactly the norm, so the cosine is exactly 1
// and a static video's novelty exactly 0, not rounding noise that the per-frame min-max
// normalisation would stretch over [0, 1]. (sqrtf(a) * sqrtf(b) misses by an ulp.)
C10_HOST_DEVICE inline float pair_cosine(float dot, float norm_sq_a, float norm_sq_b) {
  const double norms = sqrt(static_cast<double>(norm_sq_a) * static_cast<double>(norm_sq_b));
  return dot / fmaxf(static_cast<float>(norms), 1e-8f);
}

// 1 - cos, at least 0 (rounding can put a cosine an ulp above 1). A NaN cosine (from a NaN or
// infinite feature) stays NaN, as fmaxf alone would turn it into 0 and hide it.
C10_HOST_DEVICE inline float novelty_of(float cosine) {
  return cosine != cosine ? cosine : fmaxf(1.f - cosine, 0.f);
}

C10_HOST_DEVICE inline LocalScores local_scores_at(int64_t token, const float* norms_sq,
                                                   const float* dots, int64_t frames,
                                                   int64_t grid_h, int64_t grid_w) {
  const int64_t per_frame = grid_h * grid_w;
  const int64_t t = token / per_frame, y = (token / grid_w) % grid_h, x = token % grid_w;

  // Temporal: 1 - cos with the previous and the next frame, averaged over those that exist.
  float novelty = 0.f;
  int temporal_count = 0;
  if (t + 1 < frames) {  // pair (token, token + per_frame) is token's forward pair 0
    novelty += novelty_of(pair_cosine(dots[token * kNumPairDirections], norms_sq[token],
                                      norms_sq[token + per_frame]));
    ++temporal_count;
  }
  if (t > 0) {  // ... and the previous frame's forward pair 0
    const int64_t previous = token - per_frame;
    novelty += novelty_of(pair_cosine(dots[previous * kNumPairDirections], norms_sq[previous],
                                      norms_sq[token]));
    ++temporal_count;
  }

  // Spatial: cosines with the existing 8-neighbours, in a fixed (dy, dx) order.
  float cosines[8];
  int count = 0;
  for (int dy = -1; dy <= 1; ++dy) {
    for (int dx = -1; dx <= 1; ++dx) {
      const int64_t ny = y + dy, nx = x + dx;
      if ((dy == 0 && dx == 0) || ny < 0 || ny >= grid_h || nx < 0 || nx >= grid_w) continue;
      const int64_t neighbour = token + dy * grid_w + dx;
      // The pair is the forward pair of whichever token comes first in (y, x) order; forward
      // directions: (0, 1) -> 1, (1, -1) -> 2, (1, 0) -> 3, (1, 1) -> 4 (see pair_offset).
      const bool forward = dy > 0 || (dy == 0 && dx > 0);
      const int64_t origin = forward ? token : neighbour;
      const int fdy = forward ? dy : -dy, fdx = forward ? dx : -dx;
      const int direction = fdy == 0 ? 1 : 3 + fdx;
      cosines[count++] = pair_cosine(dots[origin * kNumPairDirections + direction],
                                     norms_sq[token], norms_sq[neighbour]);
    }
  }
  // Population variance, two-pass and shifted by the first cosine: identical cosines (a flat
  // region) give exactly 0 instead of rounding noise, which the per-frame min-max
  // normalisation would otherwise blow up.
  float variance = 0.f;
  if (count > 0) {
    float shifted_sum = 0.f;
    for (int i = 0; i < count; ++i) shifted_sum += cosines[i] - cosines[0];
    const float mean = shifted_sum / count;
    for (int i = 0; i < count; ++i) {
      const float deviation = cosines[i] - cosines[0] - mean;
      variance += deviation * deviation;
    }
    variance /= count;
  }
  return {temporal_count > 0 ? novelty / temporal_count : 0.f, variance};
}

// Normalise, fuse and select: returns the op's five outputs from the three raw scores.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fuse_and_select(
    const SelectionShape& shape, const at::Tensor& global_score, const at::Tensor& temporal_score,
    const at::Tensor& spatial_score, bool per_frame, double w_global, double w_temporal,
    double w_spatial);

}  // namespace hippo

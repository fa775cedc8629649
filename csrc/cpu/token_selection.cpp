// select_visual_tokens on the CPU: the reference implementation.
// Stages 1 (global score), 2 (pair dots) and 3 (local scores, via local_scores_at) are plain
// loops here; stage 4 is shared ATen code (csrc/token_selection_topk.cpp). All arithmetic is float32, as on CUDA.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "token_selection.h"

namespace hippo {
namespace {

template <typename scalar_t>
float dot_fp32(const scalar_t* a, const scalar_t* b, int64_t n) {
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  return acc;
}

// Attention mass on the grid columns, summed over the G*Lq query rows of each (layer, KV head):
// columns[lh, n]. Each query row's softmax is exact (max, then sum of exponentials) and only one
// row of scores exists at a time per thread. Summing per (layer, KV head) and then over them in
// a fixed order keeps the result independent of the thread count.
template <typename scalar_t>
void grid_attention_columns(const at::Tensor& queries, const at::Tensor& keys,
                            const SelectionShape& s, float scale, float* columns) {
  const scalar_t* q = queries.data_ptr<scalar_t>();
  const scalar_t* k = keys.data_ptr<scalar_t>();
  const int64_t key_stride_layer = keys.stride(0), key_stride_head = keys.stride(1),
                key_stride_pos = keys.stride(2);
  const int64_t n_grid = s.grid_tokens(), D = s.head_dim, G = s.group();

  at::parallel_for(0, s.layers * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row_scores(s.seq_len);
    for (int64_t lh = begin; lh < end; ++lh) {
      const int64_t layer = lh / s.kv_heads, kv_head = lh % s.kv_heads;
      const scalar_t* head_keys = k + layer * key_stride_layer + kv_head * key_stride_head;
      float* col = columns + lh * n_grid;
      std::fill(col, col + n_grid, 0.f);
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t i = 0; i < s.num_queries; ++i) {
          const int64_t head = kv_head * G + g;
          const scalar_t* query = q + ((layer * s.q_heads + head) * s.num_queries + i) * D;
          const int64_t last_visible = s.seq_len - s.num_queries + i;  // causal, inclusive
          float row_max = -std::numeric_limits<float>::infinity();
          for (int64_t j = 0; j <= last_visible; ++j) {
            row_scores[j] = dot_fp32(query, head_keys + j * key_stride_pos, D) * scale;
            row_max = std::max(row_max, row_scores[j]);
          }
          float row_sum = 0.f;
          for (int64_t j = 0; j <= last_visible; ++j) row_sum += std::exp(row_scores[j] - row_max);
          const float inv_sum = 1.f / row_sum;
          for (int64_t n = 0; n < n_grid && s.visual_start + n <= last_visible; ++n) {
            col[n] += std::exp(row_scores[s.visual_start + n] - row_max) * inv_sum;
          }
        }
      }
    }
  });
}

at::Tensor global_score_cpu(const at::Tensor& queries, const at::Tensor& keys,
                            const SelectionShape& s, double scale) {
  at::Tensor columns = at::empty({s.layers * s.kv_heads, s.grid_tokens()},
                                 queries.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, queries.scalar_type(),
                                  "select_visual_tokens_global_cpu", [&] {
    grid_attention_columns<scalar_t>(queries, keys, s, static_cast<float>(scale),
                                     columns.data_ptr<float>());
  });
  const double rows = static_cast<double>(s.layers * s.q_heads * s.num_queries);
  return columns.sum(0).div_(rows).view({s.frames, s.grid_h, s.grid_w});
}

// Stage 2: squared norm of every grid token and its dots with the pair_offset neighbours
// (0 where the neighbour does not exist).
template <typename scalar_t>
void pair_dots_kernel(const at::Tensor& features, const SelectionShape& s, float* norms_sq,
                      float* dots) {
  const scalar_t* f = features.data_ptr<scalar_t>();
  const int64_t C = s.channels;
  at::parallel_for(0, s.grid_tokens(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t t = p / (s.grid_h * s.grid_w), y = (p / s.grid_w) % s.grid_h,
                    x = p % s.grid_w;
      const scalar_t* row = f + p * C;
      norms_sq[p] = dot_fp32(row, row, C);
      for (int k = 0; k < kNumPairDirections; ++k) {
        const PairOffset o = pair_offset(k);
        const int64_t nt = t + o.dt, ny = y + o.dy, nx = x + o.dx;
        const bool exists = nt < s.frames && ny < s.grid_h && nx >= 0 && nx < s.grid_w;
        const int64_t neighbour = (nt * s.grid_h + ny) * s.grid_w + nx;
        dots[p * kNumPairDirections + k] = exists ? dot_fp32(row, f + neighbour * C, C) : 0.f;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> local_scores_cpu(const at::Tensor& features,
                                                     const SelectionShape& s) {
  const auto options = features.options().dtype(at::kFloat);
  at::Tensor norms_sq = at::empty({s.frames, s.grid_h, s.grid_w}, options);
  at::Tensor dots = at::empty({s.frames, s.grid_h, s.grid_w, kNumPairDirections}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(),
                                  "select_visual_tokens_local_cpu", [&] {
    pair_dots_kernel<scalar_t>(features, s, norms_sq.data_ptr<float>(), dots.data_ptr<float>());
  });
  at::Tensor temporal = at::empty_like(norms_sq), spatial = at::empty_like(norms_sq);
  const float* norms_ptr = norms_sq.data_ptr<float>();
  const float* dots_ptr = dots.data_ptr<float>();
  float* temporal_ptr = temporal.data_ptr<float>();
  float* spatial_ptr = spatial.data_ptr<float>();
  at::parallel_for(0, s.grid_tokens(), 256, [&](int64_t begin, int64_t end) {
    for (int64_t token = begin; token < end; ++token) {
      const LocalScores scores =
          local_scores_at(token, norms_ptr, dots_ptr, s.frames, s.grid_h, s.grid_w);
      temporal_ptr[token] = scores.temporal;
      spatial_ptr[token] = scores.spatial;
    }
  });
  return {temporal, spatial};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_visual_tokens_cpu(
    const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& features,
    int64_t visual_start, int64_t num_visual, int64_t num_keep, bool per_frame, double w_global,
    double w_temporal, double w_spatial, double scale) {
  const SelectionShape s =
      check_selection_inputs(queries, keys, features, visual_start, num_visual, num_keep,
                             w_global, w_temporal, w_spatial, scale);
  const at::Tensor global = global_score_cpu(queries.contiguous(), keys, s, scale);
  const auto [temporal, spatial] = local_scores_cpu(features.contiguous(), s);
  return fuse_and_select(s, global, temporal, spatial, per_frame, w_global, w_temporal, w_spatial);
}

}  // namespace
}  // namespace hippo

TORCH_LIBRARY_IMPL(hippo_ext, CPU, m) {
  m.impl("select_visual_tokens", &hippo::select_visual_tokens_cpu);
}

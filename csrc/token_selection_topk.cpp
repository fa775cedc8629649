// select_visual_tokens, stage 4: device-agnostic ATen code shared by the CPU and CUDA paths.
// Everything here works on a few thousand float32 values per call, so plain ATen ops are cheap;
// all of them have static shapes and none synchronises with the host.
#include <limits>

#include "token_selection.h"

namespace hippo {
namespace {

// Per-frame min-max normalisation of stacked scores [3, T, Hg*Wg]: (s - min_t) / (max_t - min_t),
// and 0 for a frame whose scores are all equal. One set of kernels for all three scores. A frame
// with a NaN score (amin and amax propagate it) normalises to NaN throughout, so NaN inputs show
// in the fused score instead of silently dropping that score's term.
at::Tensor normalise_per_frame(const at::Tensor& scores) {
  const at::Tensor lo = scores.amin(-1, /*keepdim=*/true);
  const at::Tensor range = scores.amax(-1, /*keepdim=*/true) - lo;
  const at::Tensor has_range = (range > 0).logical_or(range.isnan());
  return at::where(has_range, (scores - lo) / at::where(has_range, range, 1), 0);
}

// A unique int64 ranking key per grid token: higher score first, ties to the lower index.
// High 32 bits: the float's bit pattern mapped to an order-preserving signed int32; low 32 bits:
// the inverted index. Identical on every device, so CPU and CUDA select the same tokens. NaN
// ranks above every number, as in torch.topk (any NaN becomes the one positive quiet NaN).
at::Tensor ranking_keys(const at::Tensor& score_flat) {
  const at::Tensor canonical = at::where(score_flat.isnan(), std::numeric_limits<float>::quiet_NaN(),
                                         at::where(score_flat == 0, 0, score_flat));
  const at::Tensor bits = canonical.contiguous().view(at::kInt);  // -0.0 became +0.0 above
  const at::Tensor ordered =
      at::where(bits < 0, at::bitwise_xor(bits, 0x7FFFFFFF), bits).to(at::kLong);
  const int64_t n = score_flat.numel();
  const at::Tensor inverted_index =
      at::arange(n - 1, -1, -1, score_flat.options().dtype(at::kLong)).view_as(score_flat);
  return ordered * (int64_t{1} << 32) + inverted_index;
}

// Grid indices (ascending) of the num_keep best tokens over the whole grid.
at::Tensor select_global(const at::Tensor& keys, int64_t num_keep) {
  const at::Tensor best = std::get<1>(at::topk(keys.flatten(), num_keep, 0, true, false));
  return std::get<0>(at::sort(best));
}

// Grid indices (ascending) with a per-frame quota: frame t keeps num_keep / T tokens, plus one
// for the first num_keep % T frames. The quota pattern depends on shapes only, so the positions
// to take from each frame's top-k are computed arithmetically (static shapes, no host sync).
at::Tensor select_per_frame(const at::Tensor& keys, int64_t num_keep) {
  const int64_t frames = keys.size(0), per_frame = keys.size(1);
  const int64_t base = num_keep / frames, extra = num_keep % frames;
  const int64_t max_quota = base + (extra > 0 ? 1 : 0);
  const at::Tensor frame_local = std::get<1>(at::topk(keys, max_quota, 1, true, true));
  const at::Tensor frame_offset =
      at::arange(frames, keys.options()).mul(per_frame).unsqueeze(1);
  const at::Tensor grid_index = (frame_local + frame_offset).flatten();  // [frames * max_quota]

  // Output position p -> (frame t, rank j): the first `extra` frames hold base + 1 each.
  const at::Tensor p = at::arange(num_keep, keys.options());
  const int64_t head = extra * (base + 1);
  const at::Tensor in_head = p < head;
  const at::Tensor tail = p - head;
  const int64_t tail_quota = std::max<int64_t>(base, 1);  // unused when base == 0
  const at::Tensor frame = at::where(in_head, at::div(p, base + 1, "floor"),
                                     at::div(tail, tail_quota, "floor") + extra);
  const at::Tensor rank = at::where(in_head, at::remainder(p, base + 1),
                                    at::remainder(tail, tail_quota));
  const at::Tensor chosen = grid_index.index_select(0, frame * max_quota + rank);
  return std::get<0>(at::sort(chosen));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fuse_and_select(
    const SelectionShape& shape, const at::Tensor& global_score, const at::Tensor& temporal_score,
    const at::Tensor& spatial_score, bool per_frame, double w_global, double w_temporal,
    double w_spatial) {
  const at::Tensor normalised = normalise_per_frame(
      at::stack({global_score, temporal_score, spatial_score}).view({3, shape.frames, -1}));
  // A term of weight 0 is left out, not multiplied by 0: a NaN in a score the weights switch
  // off (the attention-only ablation's local scores) must not reach the fused score. For
  // finite scores the sum is the same.
  at::Tensor fused_flat = at::zeros_like(normalised[0]);
  const double weights[3] = {w_global, w_temporal, w_spatial};
  for (int64_t term = 0; term < 3; ++term) {
    if (weights[term] != 0.0) fused_flat = fused_flat + normalised[term] * weights[term];
  }
  const at::Tensor fused = fused_flat.view_as(global_score);
  const at::Tensor keys = ranking_keys(fused_flat);
  // num_keep == 0 is decided on the host from an int argument: no top-k of size 0 on any backend.
  const at::Tensor grid_kept = shape.num_keep == 0 ? at::empty({0}, keys.options())
                               : per_frame        ? select_per_frame(keys, shape.num_keep)
                                                  : select_global(keys, shape.num_keep);
  const at::Tensor out_of_grid =
      at::arange(shape.grid_tokens(), shape.num_visual, grid_kept.options());
  return {at::cat({grid_kept, out_of_grid}), fused, global_score, temporal_score, spatial_score};
}

}  // namespace hippo

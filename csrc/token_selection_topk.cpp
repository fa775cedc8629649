// select_visual_tokens, stage 3: device-agnostic ATen code shared by the CPU and CUDA paths.
// Everything here works on a few thousand float32 values per call, so plain ATen ops are cheap;
// all of them have static shapes and none synchronises with the host.
#include "token_selection.h"

namespace hippo {
namespace {

constexpr double kCosineEps = 1e-8;

// y[t, h, w] = x[t + dt, h + dy, w + dx], zero where that position lies outside the grid.
at::Tensor shifted(const at::Tensor& x, int64_t dt, int64_t dy, int64_t dx) {
  const int64_t offsets[3] = {dt, dy, dx};
  // constant_pad_nd takes (low, high) pairs from the last dimension backwards.
  std::vector<int64_t> pad;
  for (int dim = 2; dim >= 0; --dim) {
    pad.push_back(std::max<int64_t>(-offsets[dim], 0));
    pad.push_back(std::max<int64_t>(offsets[dim], 0));
  }
  at::Tensor y = at::constant_pad_nd(x, pad, 0);
  for (int dim = 0; dim < 3; ++dim) {
    y = y.narrow(dim, std::max<int64_t>(offsets[dim], 0), x.size(dim));
  }
  return y;
}

// Cosine of every token with its neighbour in one direction (at each direction's origin token)
// and whether that neighbour exists.
struct DirectionalCosines {
  at::Tensor forward_cos, forward_valid;    // pair (p, p + offset), stored at p
  at::Tensor backward_cos, backward_valid;  // pair (p, p - offset), stored at p
};

DirectionalCosines directional_cosines(const at::Tensor& norms, const at::Tensor& dots,
                                       PairOffset offset) {
  const int64_t dt = offset.dt, dy = offset.dy, dx = offset.dx;
  DirectionalCosines c;
  const at::Tensor ones = at::ones_like(norms);
  c.forward_valid = shifted(ones, dt, dy, dx) > 0;
  c.backward_valid = shifted(ones, -dt, -dy, -dx) > 0;
  const at::Tensor denominator = (norms * shifted(norms, dt, dy, dx)).clamp_min(kCosineEps);
  c.forward_cos = at::where(c.forward_valid, dots / denominator, at::zeros_like(dots));
  c.backward_cos = shifted(c.forward_cos, -dt, -dy, -dx);
  return c;
}

// Per-frame min-max normalisation of a [T, Hg, Wg] score: (s - min_t) / (max_t - min_t), and 0 for
// a frame whose scores are all equal.
at::Tensor normalise_per_frame(const at::Tensor& score) {
  const at::Tensor flat = score.reshape({score.size(0), -1});
  const at::Tensor lo = flat.amin(1, /*keepdim=*/true);
  const at::Tensor range = flat.amax(1, /*keepdim=*/true) - lo;
  const at::Tensor has_range = range > 0;
  const at::Tensor safe_range = at::where(has_range, range, at::ones_like(range));
  return at::where(has_range, (flat - lo) / safe_range, at::zeros_like(flat)).view_as(score);
}

// A unique int64 ranking key per grid token: higher score first, ties to the lower index.
// High 32 bits: the float's bit pattern mapped to an order-preserving signed int32; low 32 bits:
// the inverted index. Identical on every device, so CPU and CUDA select the same tokens.
at::Tensor ranking_keys(const at::Tensor& score_flat) {
  const at::Tensor canonical = at::where(score_flat == 0, at::zeros_like(score_flat), score_flat);
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

std::tuple<at::Tensor, at::Tensor> local_scores_from_pair_dots(const at::Tensor& norms_sq,
                                                                const at::Tensor& pair_dots) {
  const at::Tensor norms = norms_sq.sqrt();
  at::Tensor temporal_sum = at::zeros_like(norms), temporal_count = at::zeros_like(norms);
  at::Tensor spatial_count = at::zeros_like(norms);
  std::vector<at::Tensor> spatial_cos, spatial_valid;
  for (int k = 0; k < kNumPairDirections; ++k) {
    const DirectionalCosines c =
        directional_cosines(norms, pair_dots.select(3, k), pair_offset(k));
    const bool temporal = pair_offset(k).dt != 0;
    for (const auto& [cos, valid] : {std::pair{c.forward_cos, c.forward_valid},
                                     std::pair{c.backward_cos, c.backward_valid}}) {
      const at::Tensor v = valid.to(at::kFloat);
      if (temporal) {
        temporal_sum += (1 - cos) * v;
        temporal_count += v;
      } else {
        spatial_count += v;
        spatial_cos.push_back(cos);
        spatial_valid.push_back(v);
      }
    }
  }
  const at::Tensor temporal = temporal_sum / temporal_count.clamp_min(1);

  // Variance of the spatial cosines, two-pass and shifted by the first existing neighbour's
  // cosine: identical cosines (a flat region) then give exactly 0 rather than rounding noise,
  // which the per-frame min-max normalisation would otherwise blow up.
  at::Tensor shift = at::zeros_like(norms), shift_found = at::zeros_like(norms, at::kBool);
  for (size_t i = 0; i < spatial_cos.size(); ++i) {
    const at::Tensor take = spatial_valid[i].to(at::kBool) & shift_found.logical_not();
    shift = at::where(take, spatial_cos[i], shift);
    shift_found = shift_found | take;
  }
  const at::Tensor spatial_divisor = spatial_count.clamp_min(1);
  at::Tensor shifted_sum = at::zeros_like(norms);
  for (size_t i = 0; i < spatial_cos.size(); ++i) {
    shifted_sum += (spatial_cos[i] - shift) * spatial_valid[i];
  }
  const at::Tensor mean = shifted_sum / spatial_divisor;  // mean of (cos - shift)
  at::Tensor squared_deviation = at::zeros_like(norms);
  for (size_t i = 0; i < spatial_cos.size(); ++i) {
    squared_deviation += (spatial_cos[i] - shift - mean).square() * spatial_valid[i];
  }
  return {temporal, squared_deviation / spatial_divisor};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fuse_and_select(
    const SelectionShape& shape, const at::Tensor& global_score, const at::Tensor& temporal_score,
    const at::Tensor& spatial_score, bool per_frame, double w_global, double w_temporal,
    double w_spatial) {
  const at::Tensor fused = normalise_per_frame(global_score).mul(w_global) +
                           normalise_per_frame(temporal_score).mul(w_temporal) +
                           normalise_per_frame(spatial_score).mul(w_spatial);
  const at::Tensor keys = ranking_keys(fused.reshape({shape.frames, -1}));
  const at::Tensor grid_kept = per_frame ? select_per_frame(keys, shape.num_keep)
                                         : select_global(keys, shape.num_keep);
  const at::Tensor out_of_grid =
      at::arange(shape.grid_tokens(), shape.num_visual, grid_kept.options());
  return {at::cat({grid_kept, out_of_grid}), fused, global_score, temporal_score, spatial_score};
}

}  // namespace hippo

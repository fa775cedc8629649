"""Semantic-aware token preservation: hippo_ext::select_visual_tokens (HIPPO's token selection)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from hippo_ext._fake import fake_error, register_fake
from hippo_ext._validation import as_int, default_scale

OP_NAME = "hippo_ext::select_visual_tokens"


class SelectedTokens(NamedTuple):
    """Outputs of select_visual_tokens. Scores are float32 [T, Hg, Wg]; components are raw."""

    kept: torch.Tensor  # int64 [num_keep + num_visual - T*Hg*Wg], span-relative, ascending
    fused_score: torch.Tensor
    global_score: torch.Tensor
    temporal_score: torch.Tensor
    spatial_score: torch.Tensor


def kept_count(grid_tokens: int, keep_ratio: float) -> int:
    """How many grid tokens a keep ratio keeps: round(ratio * N), Python's rounding (a half
    goes to the even neighbour: 0.25 of 10 keeps 2, of 14 keeps 4)."""
    return min(grid_tokens, round(keep_ratio * grid_tokens))


def per_frame_quotas(frames: int, num_keep: int) -> list[int]:
    """The per-frame quota rule: frame t keeps num_keep // T tokens, plus one while
    t < num_keep % T."""
    return [num_keep // frames + (1 if t < num_keep % frames else 0) for t in range(frames)]


def _resolve_num_keep(grid_tokens: int, num_keep: int | None, keep_ratio: float | None) -> int:
    if (num_keep is None) == (keep_ratio is None):
        raise ValueError("select_visual_tokens: give exactly one of num_keep and keep_ratio")
    if keep_ratio is not None:
        if not 0.0 <= keep_ratio <= 1.0:
            raise ValueError(f"select_visual_tokens: keep_ratio must lie in [0, 1], got {keep_ratio}")
        return kept_count(grid_tokens, keep_ratio)
    return as_int(num_keep, "select_visual_tokens", "num_keep")


def select_visual_tokens(
    queries: torch.Tensor,
    keys: torch.Tensor,
    features: torch.Tensor,
    visual_start: int,
    num_visual: int,
    num_keep: int | None = None,
    *,
    keep_ratio: float | None = None,
    per_frame: bool = False,
    weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
    scale: float | None = None,
) -> SelectedTokens:
    """Score the visual tokens of a prompt and keep the best ones (HIPPO's token preservation).

    Args:
        queries: [layers, Hq, Lq, D] post-RoPE queries of the last Lq prompt positions
            (fp32/bf16/fp16; recomputed at a few chosen layers).
        keys: [layers, Hkv, S, D] post-RoPE cached keys of the whole prompt, same dtype; Hq must be
            a multiple of Hkv (GQA: query head h uses KV head h // (Hq / Hkv)). Any strides with a
            contiguous last dimension, e.g. ``cache[:, 0, b, :, :S]`` of a
            [layers, 2, B, Hkv, S_max, D] cache: it is read in place, never copied.
        features: [T, Hg, Wg, C] visual features of the grid tokens in (t, y, x) order.
        visual_start, num_visual: the visual span is prompt positions
            [visual_start, visual_start + num_visual); its first N = T*Hg*Wg tokens are the grid
            in (t, y, x) order, the rest (e.g. LLaVA-OneVision's newline) are always kept.
        num_keep / keep_ratio: how many grid tokens to keep (exactly one of them;
            a ratio keeps round(ratio * N)). 0 <= num_keep <= N.
        per_frame: False: top num_keep over the whole grid. True: a quota per frame; frame t keeps
            num_keep // T tokens, plus one if t < num_keep % T.
        weights: (w_global, w_temporal, w_spatial) of the fusion; equal by default.
        scale: softmax scale of q.k, 1/sqrt(D) by default.

    Scores (all math in float32):
        global[n]: query i sits at position S - Lq + i and attends causally to keys
            [0, S - Lq + i] (visual and text). global[n] is the mean over layers, query heads and
            queries of softmax(scale * q.k)[visual_start + n]. The softmax is computed per query
            row with running statistics (flash-style), never as a full attention matrix.
        temporal[t, y, x] = mean over the existing frames t' = t +- 1 of
            max(0, 1 - cos(f[t, y, x], f[t', y, x])); 0 when T == 1 (and exactly 0 between
            identical features: a static video has no novelty, not rounding noise).
        spatial[t, y, x] = population variance of cos(f[t, y, x], f[t, y', x']) over the existing
            8-neighbours in its 3x3 neighbourhood; 0 when it has none.
        cos(a, b) = a.b / max(sqrt(|a|^2 |b|^2), 1e-8).
        fused = w_g * g' + w_t * t' + w_s * s' where each raw score s is min-max normalised per
            frame: s' = (s - min_t) / (max_t - min_t), and 0 for a frame whose scores are equal;
            a term whose weight is 0 is left out (so NaN in it cannot reach the fused score).

    Selection: the num_keep highest fused scores (globally or per frame); ties go to the lower
    grid index, identically on CPU and CUDA (ranking by an int64 key made of the score's
    order-preserving bit pattern and the inverted index; -0.0 ranks as +0.0). NaN inputs are
    not refused (that would need a host sync on CUDA) but show: a NaN query or key makes every
    global score NaN, a NaN feature makes its tokens' local scores NaN, a frame holding a NaN
    score normalises to NaN throughout (and so does its fused score unless that score's weight
    is 0), and NaN fused scores rank above every number (as in torch.topk).

    Returns:
        SelectedTokens(kept, fused_score, global_score, temporal_score, spatial_score): kept holds
        the selected grid indices n (span-relative) ascending, followed by the out-of-grid tokens
        N .. num_visual - 1; its size num_keep + num_visual - N is static. The four scores are
        float32 [T, Hg, Wg]; the three components are the raw (unnormalised) scores.

    No index tensors come in, so there is nothing to validate on the host: the op never
    synchronises and can be captured in a CUDA graph.
    """
    grid_tokens = features.shape[0] * features.shape[1] * features.shape[2] if features.dim() == 4 else 0
    keep = _resolve_num_keep(grid_tokens, num_keep, keep_ratio)
    if scale is None:
        scale = default_scale(queries)
    if len(weights) != 3:
        raise ValueError("select_visual_tokens: weights must be (w_global, w_temporal, w_spatial), "
                         f"got {tuple(weights)!r}")
    w_global, w_temporal, w_spatial = (float(w) for w in weights)
    outputs = torch.ops.hippo_ext.select_visual_tokens(
        queries, keys, features, as_int(visual_start, OP_NAME, "visual_start"),
        as_int(num_visual, OP_NAME, "num_visual"), keep, per_frame,
        w_global, w_temporal, w_spatial, float(scale))
    return SelectedTokens(*outputs)


@register_fake("select_visual_tokens", dims={"queries": 4, "keys": 4, "features": 4})
def _select_visual_tokens_fake(queries, keys, features, visual_start, num_visual, num_keep,
                               per_frame, w_global, w_temporal, w_spatial, scale):
    frames, grid_h, grid_w = features.shape[0], features.shape[1], features.shape[2]
    grid = frames * grid_h * grid_w
    if not 0 <= num_keep <= grid:
        raise fake_error("select_visual_tokens", f"num_keep must lie in [0, {grid}], got {num_keep}")
    if num_visual < grid:  # the kept count below would be short of the span's extra tokens
        raise fake_error("select_visual_tokens",
                         f"num_visual ({num_visual}) must cover the T*Hg*Wg = {grid} grid tokens "
                         f"of features {list(features.shape)}")
    kept = features.new_empty((num_keep + num_visual - grid,), dtype=torch.int64)
    scores = [features.new_empty((frames, grid_h, grid_w), dtype=torch.float32) for _ in range(4)]
    return (kept, *scores)


# ---- eager PyTorch reference (tests and benchmarks) ----------------------------------------------


def reference_global_score(queries: torch.Tensor, keys: torch.Tensor, visual_start: int,
                           grid_shape: tuple[int, int, int], scale: float,
                           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Global score by materialising one layer's causal attention at a time.

    dtype=None: q.k in the input dtype and softmax in float32 (what eager code does);
    dtype=torch.float64: everything in float64 (the test reference)."""
    layers, q_heads, num_queries, _ = queries.shape
    kv_heads, seq_len = keys.shape[1], keys.shape[2]
    grid_tokens = grid_shape[0] * grid_shape[1] * grid_shape[2]
    positions = torch.arange(seq_len, device=keys.device)
    query_positions = seq_len - num_queries + torch.arange(num_queries, device=keys.device)
    hidden = positions[None, :] > query_positions[:, None]  # [Lq, S]: causal mask
    total = torch.zeros(grid_tokens, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                        device=queries.device)
    for layer in range(layers):
        q, k = queries[layer], keys[layer]
        if dtype is not None:
            q, k = q.to(dtype), k.to(dtype)
        k = k.repeat_interleave(q_heads // kv_heads, dim=0)
        scores = (q @ k.transpose(-1, -2)).to(total.dtype) * scale  # [Hq, Lq, S]
        probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
        total += probs[..., visual_start:visual_start + grid_tokens].sum(dim=(0, 1))
    return (total / (layers * q_heads * num_queries)).view(grid_shape)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # As the op: the product of the squared norms under one square root, so that identical
    # vectors give exactly 1 (the dot and both squared norms are the same sum).
    dot = (a * b).sum(-1)
    return dot / ((a * a).sum(-1) * (b * b).sum(-1)).sqrt().clamp_min(1e-8)


def reference_local_scores(features: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(temporal novelty, spatial complexity) of [T, Hg, Wg, C] features, eagerly."""
    f = features.to(dtype)
    frames, grid_h, grid_w, _ = f.shape
    novelty = torch.zeros(frames, grid_h, grid_w, dtype=dtype, device=f.device)
    count = torch.zeros_like(novelty)
    if frames > 1:
        change = (1 - _cosine(f[1:], f[:-1])).clamp_min(0)
        novelty[1:] += change
        novelty[:-1] += change
        count[1:] += 1
        count[:-1] += 1
    temporal = novelty / count.clamp_min(1)

    cosines, valid = [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            here_y = slice(max(0, -dy), grid_h - max(0, dy))
            here_x = slice(max(0, -dx), grid_w - max(0, dx))
            there_y = slice(max(0, dy), grid_h + min(0, dy))
            there_x = slice(max(0, dx), grid_w + min(0, dx))
            c, v = torch.zeros_like(novelty), torch.zeros_like(novelty)
            c[:, here_y, here_x] = _cosine(f[:, here_y, here_x], f[:, there_y, there_x])
            v[:, here_y, here_x] = 1
            cosines.append(c)
            valid.append(v)
    cos, v = torch.stack(cosines), torch.stack(valid)
    n = v.sum(0).clamp_min(1)
    mean = (cos * v).sum(0) / n
    spatial = (((cos - mean) ** 2) * v).sum(0) / n
    return temporal, spatial


def reference_normalise_per_frame(score: torch.Tensor) -> torch.Tensor:
    flat = score.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = hi - lo
    has_range = (span > 0) | span.isnan()  # a frame with a NaN score normalises to NaN, as the op
    normalised = torch.where(has_range, (flat - lo) / torch.where(has_range, span, 1), 0)
    return normalised.view_as(score)


def reference_fuse(global_score: torch.Tensor, temporal_score: torch.Tensor,
                   spatial_score: torch.Tensor, weights: tuple[float, float, float]) -> torch.Tensor:
    fused = torch.zeros_like(global_score)
    for score, weight in zip((global_score, temporal_score, spatial_score), weights):
        if weight != 0:  # left out, as the op does: a NaN in a switched-off score stays out
            fused = fused + reference_normalise_per_frame(score) * weight
    return fused


def _ranked(scores: torch.Tensor) -> torch.Tensor:
    """Indices of 1-D scores, best first: NaN above every number (as the op and torch.topk),
    ties to the lower index."""
    order = torch.sort(-scores, stable=True).indices  # NaN last
    return order[torch.sort((~scores[order].isnan()).to(torch.uint8), stable=True).indices]


def reference_top_k(fused: torch.Tensor, num_keep: int, num_visual: int,
                    per_frame: bool) -> torch.Tensor:
    """kept indices: best fused scores first, ties to the lower index; then the out-of-grid ones."""
    frames = fused.shape[0]
    flat = fused.reshape(frames, -1)
    grid_tokens = flat.numel()
    if per_frame:
        chosen = []
        for t, quota in enumerate(per_frame_quotas(frames, num_keep)):
            order = _ranked(flat[t])[:quota]
            chosen.append(order + t * flat.shape[1])
        selected = torch.cat(chosen)
    else:
        selected = _ranked(flat.flatten())[:num_keep]
    out_of_grid = torch.arange(grid_tokens, num_visual, device=fused.device)
    return torch.cat([selected.sort().values, out_of_grid])


def reference_select_visual_tokens(queries: torch.Tensor, keys: torch.Tensor,
                                   features: torch.Tensor, visual_start: int, num_visual: int,
                                   num_keep: int, per_frame: bool = False,
                                   weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
                                   scale: float | None = None,
                                   dtype: torch.dtype | None = None) -> SelectedTokens:
    """The whole op in eager PyTorch (dtype=None: eager mixed precision; float64: test reference)."""
    if scale is None:
        scale = 1.0 / math.sqrt(queries.shape[-1])
    grid_shape = tuple(features.shape[:3])
    global_score = reference_global_score(queries, keys, visual_start, grid_shape, scale, dtype)
    temporal, spatial = reference_local_scores(features, dtype or torch.float32)
    fused = reference_fuse(global_score, temporal, spatial, weights)
    kept = reference_top_k(fused, num_keep, num_visual, per_frame)
    return SelectedTokens(kept, fused, global_score, temporal, spatial)

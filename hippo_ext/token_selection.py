"""Semantic-aware token preservation: hippo_ext::select_visual_tokens (HIPPO's token selection)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

OP_NAME = "hippo_ext::select_visual_tokens"


class SelectedTokens(NamedTuple):
    """Outputs of select_visual_tokens. Scores are float32 [T, Hg, Wg]; components are raw."""

    kept: torch.Tensor  # int64 [num_keep + num_visual - T*Hg*Wg], span-relative, ascending
    fused_score: torch.Tensor
    global_score: torch.Tensor
    temporal_score: torch.Tensor
    spatial_score: torch.Tensor


def _resolve_num_keep(grid_tokens: int, num_keep: int | None, keep_ratio: float | None) -> int:
    if (num_keep is None) == (keep_ratio is None):
        raise ValueError("select_visual_tokens: give exactly one of num_keep and keep_ratio")
    if keep_ratio is not None:
        if not 0.0 <= keep_ratio <= 1.0:
            raise ValueError(f"select_visual_tokens: keep_ratio must lie in [0, 1], got {keep_ratio}")
        return min(grid_tokens, round(keep_ratio * grid_tokens))
    return int(num_keep)


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
            1 - cos(f[t, y, x], f[t', y, x]); 0 when T == 1.
        spatial[t, y, x] = population variance of cos(f[t, y, x], f[t, y', x']) over the existing
            8-neighbours in its 3x3 neighbourhood; 0 when it has none.
        cos(a, b) = a.b / max(|a| |b|, 1e-8).
        fused = w_g * g' + w_t * t' + w_s * s' where each raw score s is min-max normalised per
            frame: s' = (s - min_t) / (max_t - min_t), and 0 for a frame whose scores are equal.

    Selection: the num_keep highest fused scores (globally or per frame); ties go to the lower
    grid index, identically on CPU and CUDA (ranking by an int64 key made of the score's
    order-preserving bit pattern and the inverted index; -0.0 ranks as +0.0).

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
        scale = 1.0 / math.sqrt(queries.shape[-1])
    w_global, w_temporal, w_spatial = (float(w) for w in weights)
    outputs = torch.ops.hippo_ext.select_visual_tokens(
        queries, keys, features, visual_start, num_visual, keep, per_frame,
        w_global, w_temporal, w_spatial, float(scale))
    return SelectedTokens(*outputs)


@torch.library.register_fake(OP_NAME)
def _select_visual_tokens_fake(queries, keys, features, visual_start, num_visual, num_keep,
                               per_frame, w_global, w_temporal, w_spatial, scale):
    frames, grid_h, grid_w = features.shape[0], features.shape[1], features.shape[2]
    kept = features.new_empty((num_keep + num_visual - frames * grid_h * grid_w,), dtype=torch.int64)
    scores = [features.new_empty((frames, grid_h, grid_w), dtype=torch.float32) for _ in range(4)]
    return (kept, *scores)

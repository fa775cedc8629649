"""RoPE on a fused q/k/v projection, with the new keys and values appended to the static cache."""
from __future__ import annotations

import torch

from hippo_ext._validation import check_index_range, wants_value_check

__all__ = ["rotary_kv_append"]


def rotary_kv_append(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     cache: torch.Tensor, layer: int, length: torch.Tensor, *,
                     check: bool = True) -> torch.Tensor:
    """Rotate queries and keys of S new tokens, store keys and values in the cache.

    Args:
        qkv: [B, S, (Hq + 2 Hkv) D] contiguous: per token Hq query heads, Hkv key heads, Hkv
            value heads (one concatenated q/k/v projection's output).
        cos, sin: [B, S, D] rotary tables of qkv's dtype (HF's ``rotary_emb`` output; for
            M-RoPE the sections are already merged).
        cache: [layers, 2, B, Hkv, S_max, D] static cache of qkv's dtype; Hkv and D are read
            from it.
        layer: the layer whose slots receive the keys (index 0) and values (index 1).
        length: [B] int32/int64 on the cache's device, already counting the new tokens: they
            occupy positions [length[b] - S, length[b]). Read on the device, so one captured
            CUDA graph serves every length.
        check: on CUDA, verify S <= length[b] <= S_max first (a host sync); pass False inside
            CUDA graphs. Unchecked out-of-range slots are skipped, never written.

    Returns:
        q [B, S, Hq, D]: the rotated queries, in the layout decode_attention takes.

    The rotation is HF's ``x * cos + rotate_half(x) * sin`` with its rounding in the dtype.
    """
    if wants_value_check(length, check) and qkv.dim() == 3 and cache.dim() == 6 \
            and length.dtype in (torch.int32, torch.int64):
        check_index_range(length, cache.size(4) + 1, "rotary_kv_append", "length",
                          lower=qkv.size(1))
    return torch.ops.hippo_ext.rotary_kv_append.default(qkv, cos, sin, cache, int(layer), length)


@torch.library.register_fake("hippo_ext::rotary_kv_append")
def _rotary_kv_append_fake(qkv, cos, sin, cache, layer, length):
    head_dim = cache.size(5)
    q_heads = qkv.size(2) // head_dim - 2 * cache.size(3)
    return qkv.new_empty(qkv.size(0), qkv.size(1), q_heads, head_dim)

"""Decode attention: Lq query tokens against one layer of the static KV cache (flash decoding)."""
from __future__ import annotations

import torch

from hippo_ext._fake import register_fake
from hippo_ext._validation import as_int, check_index_range, default_scale, wants_value_check
from hippo_ext._workspace import shared_workspace, zeroed_int32

__all__ = ["decode_attention", "decode_attention_workspace"]


def decode_attention_workspace(batch: int, kv_heads: int,
                               device: torch.device | str) -> torch.Tensor:
    """Zeroed int32 semaphores for decode_attention's fused merge over a cache of `batch` rows
    and `kv_heads` kv heads. The kernel leaves them zeroed; one workspace per stream."""
    return zeroed_int32(batch * kv_heads, device)


def decode_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    layer: int,
    length: torch.Tensor,
    *,
    scale: float | None = None,
    tree_mask: torch.Tensor | None = None,
    row_invariant: bool = False,
    workspace: torch.Tensor | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Attention of the last Lq tokens of each sequence against one layer of the static cache.

    Args:
        query: [B, Lq, Hq, D] (Lq in 1..64), post-RoPE queries of the newest Lq tokens.
        cache: [layers, 2, B, Hkv, S_max, D], contiguous; index 0 holds keys, 1 values. The
            Lq new tokens' keys and values must already be written at positions
            [length - Lq, length).
        layer: which layer of the cache to read.
        length: [B] int32/int64 on the cache's device: positions [0, length[b]) are valid.
            Read on the device, so one captured CUDA graph serves every length.
        scale: softmax scale, default 1 / sqrt(D).
        tree_mask: optional bool [Lq, Lq] or [B, Lq, Lq]. Without it query i sees positions
            [0, length - Lq + i] (causal); with it, the prefix [0, length - Lq) plus block
            position length - Lq + j iff tree_mask[..., i, j].
        row_invariant: make each query row's result bitwise independent of Lq, so that a verify
            step's rows equal what single-token steps give (the CUDA kernel then keeps its
            verify work layout for every Lq, which costs decode steps some speed). The CPU
            reference is row-invariant always.
        workspace: int32 zeros from :func:`decode_attention_workspace`, one per stream. With
            it, and HIPPO_DECODE_ATTENTION_FUSED_MERGE=1 (opt-in; measured slower: a 0.5B
            decode step 1.11 against 0.98 ms on an H200, 2026-11-28), a CUDA step with at most
            16 query rows per kv head (G * Lq) merges its KV splits in the same launch rather
            than in a second kernel. Default: a shared one per device and stream, except inside
            a CUDA-graph capture that finds none (then two kernels run).
        check: on CUDA, verify Lq <= length[b] <= S_max first (a host sync); pass False inside
            CUDA graphs and in code compiled with torch.compile(fullgraph=True), which cannot
            trace the check. The kernel clamps lengths whatever their values; a query row that
            sees no key yields zeros.

    Returns:
        [B, Lq, Hq, D] in the query's dtype (accumulated in fp32). GQA: Hq % Hkv == 0, query
        head h uses kv head h // (Hq // Hkv).

    On CUDA the kernel takes bfloat16 or float16 and head dims 64, 80 and 128 (the CPU
    reference any floating dtype and head dim), and the cache must start at a 16-byte aligned
    address; anything else raises a clear error.

    Non-finite values: a NaN query or a NaN key a row sees makes that row NaN everywhere. A
    non-finite *value* of a block token that a row does not see (a later draft, masked by
    causality or the tree) leaves the row finite on the CPU, but on CUDA the tensor-core kernel
    multiplies it by a zero weight, which gives NaN in that row's column, as SDPA does.
    """
    if scale is None:
        scale = default_scale(query)
    if wants_value_check(length, check) and _shapes_plausible(query, cache, length):
        check_index_range(length, cache.size(4) + 1, "decode_attention", "length",
                          lower=query.size(1))
    # Always a workspace, on the CPU too (where only its shape is checked): torch.compile's
    # Inductor fails on an optional mutable argument left None (torch 2.14).
    if workspace is None and cache.dim() == 6:
        workspace = shared_workspace("decode_attention", cache.size(2) * cache.size(3),
                                     cache.device)
    return torch.ops.hippo_ext.decode_attention.default(
        query, cache, as_int(layer, "decode_attention", "layer"), length, float(scale), tree_mask,
        bool(row_invariant), workspace)


def _shapes_plausible(query: torch.Tensor, cache: torch.Tensor, length: torch.Tensor) -> bool:
    """Whether the value check can read its bounds; otherwise the op reports the shape error."""
    return (query.dim() == 4 and cache.dim() == 6
            and length.dtype in (torch.int32, torch.int64))


@register_fake("decode_attention")
def _decode_attention_fake(query, cache, layer, length, scale, tree_mask, row_invariant=False,
                           workspace=None):
    return query.new_empty(query.shape)

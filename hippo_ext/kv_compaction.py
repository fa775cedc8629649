"""KV compaction: move the kept token slots of a static KV cache to its front.

The cache is one tensor per model, ``[layers, 2, B, Hkv, S, D]`` (keys and values of every layer),
contiguous, in float32, bfloat16 or float16. ``index`` is ``[B, K]`` int64: the positions to keep
for each batch element. Both ops move every layer, key and value at once (one launch on CUDA) and
write only slots ``[0, K)`` of each row; slots ``>= K`` keep their contents.

As a shorthand, a 1-D ``index [K]`` is accepted when ``B == 1``. Rows that keep different
numbers of slots share K = the largest count: pad a shorter row's index with any further
ascending positions below S (slots past its new length, which the caller then sets per row).
"""
from __future__ import annotations

import torch

from hippo_ext._fake import register_fake
from hippo_ext._validation import check_index_range, check_strictly_ascending, wants_value_check

__all__ = ["kv_compact_", "kv_gather"]


def _batched(index: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """[K] -> [1, K] when the cache has a single batch element; anything else is left to the op."""
    if (isinstance(index, torch.Tensor) and isinstance(cache, torch.Tensor) and index.dim() == 1
            and cache.dim() == 6 and cache.size(2) == 1):
        return index.unsqueeze(0)
    return index


def _checkable(index: torch.Tensor, cache: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the value checks apply: only once the shapes and dtype are right, so that a bad
    shape is reported by the op itself, with the same message as on the CPU."""
    return (index.dtype == torch.int64 and index.dim() == 2 and cache.dim() == 6 and out.dim() == 6
            and index.size(0) == cache.size(2) and index.size(1) <= out.size(4))


def kv_gather(src: torch.Tensor, index: torch.Tensor, dst: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """``dst[l, c, b, h, k] = src[l, c, b, h, index[b, k]]`` for ``k < K``; returns ``dst``.

    src ``[L, 2, B, Hkv, S, D]`` and dst ``[L, 2, B, Hkv, S2, D]`` (``S2 >= K``) must be contiguous,
    of one dtype and device, and must not share memory (use :func:`kv_compact_` for that).
    ``index [B, K]`` int64 holds positions in ``[0, S)``, in any order, repeats allowed.

    On CUDA, ``check=True`` verifies the range of the index values first (a host synchronisation);
    pass ``check=False`` inside CUDA graphs and in code compiled with
    ``torch.compile(fullgraph=True)``, which cannot trace the check. Unchecked out-of-range entries
    are skipped (their destination slot keeps its contents); memory outside the tensors is never
    touched.
    The CPU path always checks.
    """
    index = _batched(index, src)
    if wants_value_check(index, check) and _checkable(index, src, dst):
        check_index_range(index, src.size(4), "kv_gather", "index")
    torch.ops.hippo_ext.kv_gather(src, index, dst)
    return dst


def kv_compact_(cache: torch.Tensor, index: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """In place: ``cache[l, c, b, h, k] = cache[l, c, b, h, index[b, k]]`` for ``k < K``; returns ``cache``.

    ``index [B, K]`` int64 must be strictly ascending per row with values in ``[0, S)``; then
    ``index[b, k] >= k`` and every kept slot moves towards the front, read before it is overwritten.
    Slots where ``index[b, k] == k`` (an untouched prefix, e.g. the text before a video) are not copied.

    On CUDA, ``check=True`` verifies range and ascent first (a host synchronisation); pass
    ``check=False`` inside CUDA graphs. Unchecked entries with ``index[b, k] < k`` or ``>= S`` are
    skipped (the slot keeps its contents); memory outside the cache is never touched.
    The CPU path always checks.
    """
    index = _batched(index, cache)
    if wants_value_check(index, check) and _checkable(index, cache, cache):
        check_index_range(index, cache.size(4), "kv_compact_", "index")
        check_strictly_ascending(index, "kv_compact_", "index")
    torch.ops.hippo_ext.kv_compact_(cache, index)
    return cache


# Fakes for torch.compile: both ops only mutate an argument and return nothing.
@register_fake("kv_gather")
def _kv_gather_fake(src: torch.Tensor, index: torch.Tensor, dst: torch.Tensor) -> None:
    return None


@register_fake("kv_compact_")
def _kv_compact_fake(cache: torch.Tensor, index: torch.Tensor) -> None:
    return None

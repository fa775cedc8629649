"""RoPE on a fused q/k/v projection, with the new keys and values appended to the static cache."""
from __future__ import annotations

import torch

from hippo_ext._fake import fake_error, register_fake
from hippo_ext._validation import as_int, check_index_range, wants_value_check

__all__ = ["rotary_kv_append", "rotary_tables"]


def rotary_kv_append(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     cache: torch.Tensor, layer: int, length: torch.Tensor, *,
                     check: bool = True) -> torch.Tensor:
    """Rotate queries and keys of S new tokens, store keys and values in the cache.

    Args:
        qkv: [B, S, (Hq + 2 Hkv) D] contiguous: per token Hq query heads, Hkv key heads, Hkv
            value heads (one concatenated q/k/v projection's output).
        cos, sin: [B, S, D] contiguous rotary tables of qkv's dtype (HF's ``rotary_emb``
            output; for M-RoPE the sections are already merged). B is not broadcast: a
            [1, S, D] table (position ids shared by the batch) must be expanded and made
            contiguous. The positions they encode are independent of ``length`` (after
            kv_compact_ they differ).
        cache: [layers, 2, B, Hkv, S_max, D] static cache of qkv's dtype; Hkv and D are read
            from it.
        layer: the layer whose slots receive the keys (index 0) and values (index 1).
        length: [B] int32/int64 on the cache's device, already counting the new tokens: they
            occupy positions [length[b] - S, length[b]). Read on the device, so one captured
            CUDA graph serves every length.
        check: on CUDA, verify S <= length[b] <= S_max first (a host sync); pass False inside
            CUDA graphs and in code compiled with torch.compile(fullgraph=True), which cannot
            trace the check. Unchecked out-of-range slots are skipped, never written.

    Returns:
        q [B, S, Hq, D]: the rotated queries, in the layout decode_attention takes.

    The rotation is HF's ``x * cos + rotate_half(x) * sin`` with its rounding in the dtype.
    """
    if wants_value_check(length, check) and qkv.dim() == 3 and cache.dim() == 6 \
            and length.dtype in (torch.int32, torch.int64):
        check_index_range(length, cache.size(4) + 1, "rotary_kv_append", "length",
                          lower=qkv.size(1))
    return torch.ops.hippo_ext.rotary_kv_append.default(
        qkv, cos, sin, cache, as_int(layer, "rotary_kv_append", "layer"), length)


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor,
                  mrope_section: list[int] | tuple[int, ...] = (), scaling: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, D] (D = 2 * len(inv_freq)) for rotary_kv_append, in one kernel.

    Args:
        positions: [B, S] int64 ids (1-D RoPE), or [3, B, S] (M-RoPE: temporal, height, width)
            with ``mrope_section``.
        inv_freq: [D/2] inverse frequencies (HF's ``rotary_emb.inv_freq``; converted to float32
            as HF does before use).
        mrope_section: M-RoPE frequency sections (summing to D/2): section i takes its ids
            from component i % 3. Empty for 1-D RoPE. At most 8 sections on CUDA (M-RoPE
            uses 3).
        scaling: HF's ``attention_scaling`` (1.0 for default RoPE).
        dtype: of the tables (the model's dtype).

    The arithmetic is HF's Qwen2 / Qwen2.5-VL rotary embedding, operation for operation (fp32
    product, cos/sin, scaling, cast), so the tables equal HF's bit for bit.
    """
    return torch.ops.hippo_ext.rotary_tables.default(
        positions, inv_freq.float().contiguous(),
        [as_int(n, "rotary_tables", "mrope_section") for n in mrope_section], float(scaling), dtype)


@register_fake("rotary_tables", dims={"positions": (2, 3), "inv_freq": 1})
def _rotary_tables_fake(positions, inv_freq, mrope_section, scaling, dtype):
    batch, tokens = positions.shape[-2:]
    table = positions.new_empty(batch, tokens, 2 * inv_freq.size(0), dtype=dtype,
                                device=inv_freq.device)
    return table, torch.empty_like(table)


def query_heads_of(op: str, width: int, cache: torch.Tensor) -> int:
    """Hq of a fused q/k/v row of `width` = (Hq + 2 Hkv) D, Hkv and D read from the cache (for
    the fakes of the ops that take one; the C++ checks say the same)."""
    kv_heads, head_dim = cache.size(3), cache.size(5)
    if head_dim < 2 or head_dim % 2 or width % head_dim or width // head_dim <= 2 * kv_heads:
        raise fake_error(op, f"the q/k/v width must be (Hq + 2 Hkv) * D with Hq >= 1, "
                             f"Hkv = {kv_heads} and an even D = {head_dim} (from the cache), "
                             f"got {width}")
    return width // head_dim - 2 * kv_heads


@register_fake("rotary_kv_append", dims={"qkv": 3, "cache": 6})
def _rotary_kv_append_fake(qkv, cos, sin, cache, layer, length):
    q_heads = query_heads_of("rotary_kv_append", qkv.size(2), cache)
    return qkv.new_empty(qkv.size(0), qkv.size(1), q_heads, cache.size(5))

"""Draft construction: the draft's KV cache holds only the kept visual tokens (and all text).

Three ways to get there, each leaving every kept token at its *original* position id (new tokens
continue from the target's positions, never from the compacted length):

* "pruned": the draft prefills only the kept tokens. Cheapest; deeper layers of the draft see
  only the kept context.
* "full+compact": the draft prefills the whole prompt (overlapped with the target's prefill on
  its own stream), then hippo_ext.kv_compact_ moves the kept positions to the front of its
  cache once selection is done. Its kept keys and values saw the full context.
* self-speculative: the target itself drafts, on a second runtime over the same weights whose
  cache is hippo_ext.kv_gather's copy of the target's kept positions.
"""
from __future__ import annotations

import torch

import hippo_ext
from hippo.models.base import PreparedPrompt
from hippo.runtime.decoder import LanguageModelRuntime

DRAFT_PREFILLS = ("pruned", "full+compact")


def prefill_pruned(draft: LanguageModelRuntime, prompt: PreparedPrompt,
                   kept_positions: torch.Tensor) -> None:
    """Prefill the draft's cache with the kept prompt positions only, at their positions."""
    kept = kept_positions.to(prompt.inputs_embeds.device)
    embeds = prompt.inputs_embeds.index_select(1, kept)
    positions = prompt.position_ids.index_select(-1, kept.to(prompt.position_ids.device))
    draft.reset()
    draft.prefill(embeds, positions)


def prefill_full(draft: LanguageModelRuntime, prompt: PreparedPrompt) -> None:
    """Prefill the draft's cache with the whole prompt (to be compacted later)."""
    draft.reset()
    draft.prefill(prompt.inputs_embeds, prompt.position_ids)


def compact_to_kept(draft: LanguageModelRuntime, kept_positions: torch.Tensor) -> None:
    """Move the kept positions of a fully prefilled draft cache to its front, in place."""
    kept = kept_positions.to(draft.device)
    hippo_ext.kv_compact_(draft.cache.tensor, kept[None])
    draft.rollback(int(kept.numel()))


def copy_kept_cache(target: LanguageModelRuntime, draft: LanguageModelRuntime,
                    kept_positions: torch.Tensor) -> None:
    """Self-speculation: the draft's cache becomes the target's kept positions."""
    kept = kept_positions.to(target.device)
    hippo_ext.kv_gather(target.cache.tensor, kept[None], draft.cache.tensor)
    draft.cache.fill_to(int(kept.numel()))

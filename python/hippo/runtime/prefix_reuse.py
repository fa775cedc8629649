"""Prefix reuse: several questions about one video share the prompt up to the video's end (the
chat text before it, then the video's tokens), which is nearly all of a video prompt. A runtime
whose cache still holds that prefix from the previous question prefills only the text after it.

The prefix is prefilled on its own the first time (then the rest at its end), and both the
target's AR decoding and speculative decoding prefill through here, split alike whatever
queries token selection asks for, so that their outputs stay equal token for token. A split
prefill rounds as a prefill of the whole prompt need not (BLAS and SDPA pick their kernels by
the rows), so a near-tie of the target's top logits may go the other way than in a whole
prefill: a prompt without a prefix_source is prefilled whole.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hippo.errors import HippoError, is_int
from hippo.models.base import PreparedPrompt
from hippo.runtime.decoder import LanguageModelRuntime, PrefillResult, tensor_version

# The longest text after the video that is prefilled at a kept prefix's end: that prefill runs
# SDPA with a mask (on CUDA with GQA its math kernel, which materialises the scores: heads x
# text x (prefix + text) floats, 3.7 GB for a 7B model at 1024 x 32k); a longer text makes the
# prompt prefilled whole (one causal SDPA), its prefix then neither reused nor kept.
MAX_TEXT_AFTER_PREFIX = 1024


@dataclass
class PromptPrefill:
    """result: the prefill's (logits of the last prompt token, and the queries asked for).
    reused: prompt tokens whose keys and values the cache held from an earlier prompt."""

    result: PrefillResult
    reused: int


def prefill_prompt(runtime: LanguageModelRuntime, prompt: PreparedPrompt, *,
                   query_layers: Sequence[int] = (), query_len: int = 0) -> PromptPrefill:
    """Prefill `prompt` from an empty cache, or after the prefix of its video that the cache
    still holds. A prompt with a prefix is always split at the prefix's end, whatever the
    queries asked for, so that AR and speculative decoding round alike; queries reaching into
    the prefix (more than the text after the video) make it prefilled again, for them."""
    layers = tuple(query_layers)
    if layers and (not is_int(query_len) or not 1 <= query_len <= prompt.length):
        raise HippoError(f"query_len must be in 1..{prompt.length} (the prompt), got "
                         f"{query_len!r}")
    split = split_length(prompt)
    # Queries of prefix tokens are not kept with the prefix: they need its prefill again.
    in_prefix = max(query_len - (prompt.length - split), 0) if split and layers else 0
    reused, head = 0, None
    stamp = _prefix_stamp(runtime, prompt) if split else None
    if split and not in_prefix and runtime.cache.holds_prefix(prompt.prefix_source, split, stamp):
        runtime.rollback(split)  # what the last generation appended after it
        reused = split
    else:
        runtime.reset()
        if split:
            head = runtime.prefill(prompt.inputs_embeds[:, :split], prompt.position_ids[..., :split],
                                   query_layers=layers if in_prefix else (), query_len=in_prefix)
            runtime.cache.hold_prefix(prompt.prefix_source, split, stamp)
    result = runtime.prefill(prompt.inputs_embeds[:, split:], prompt.position_ids[..., split:],
                             query_layers=layers, query_len=query_len - in_prefix)
    if in_prefix:
        result = PrefillResult(result.logits, torch.cat([head.queries, result.queries], dim=2))
    return PromptPrefill(result, reused)


def split_length(prompt: PreparedPrompt) -> int:
    """Where a prompt about a video is split: the prefix's end (0: prefilled whole, without a
    prefix_source, when nothing follows the video or more than MAX_TEXT_AFTER_PREFIX does)."""
    after = prompt.length - prompt.prefix_length
    if prompt.prefix_source is None or not 0 < after <= MAX_TEXT_AFTER_PREFIX:
        return 0
    return prompt.prefix_length


def _prefix_stamp(runtime: LanguageModelRuntime, prompt: PreparedPrompt) -> tuple:
    """What the prefix's keys and values were computed from besides its video embedding: the
    weights and the embedding's values (an in-place write to either keeps the runtime and the
    embedding object, and must not leave a stale prefix held), and the chat text before the
    video (its adapter's prompt_prefix_ids, public and mutable)."""
    video = prompt.prefix_source
    return (runtime.weights_version(), tensor_version(video.embeddings),
            tuple(video.adapter.prompt_prefix_ids) if video.adapter is not None else None)

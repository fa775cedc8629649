"""Prefix reuse: several questions about one video share the prompt up to the video's end (the
chat text before it, then the video's tokens), which is nearly all of a video prompt. A runtime
whose cache still holds that prefix from the previous question prefills only the text after it.

The prefix is prefilled on its own the first time (then the rest at its end), and both the
target's AR decoding and speculative decoding prefill through here, so that their outputs stay
equal token for token. A split prefill rounds as a prefill of the whole prompt need not (BLAS
and SDPA pick their kernels by the rows), so a near-tie of the target's top logits may go the
other way than in a whole prefill: a prompt without a prefix_source is prefilled whole.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hippo.models.base import PreparedPrompt
from hippo.runtime.decoder import LanguageModelRuntime, PrefillResult


@dataclass
class PromptPrefill:
    """result: the prefill's (logits of the last prompt token, and the queries asked for).
    reused: prompt tokens whose keys and values the cache held from an earlier prompt."""

    result: PrefillResult
    reused: int


def prefill_prompt(runtime: LanguageModelRuntime, prompt: PreparedPrompt, *,
                   query_layers: Sequence[int] = (), query_len: int = 0) -> PromptPrefill:
    """Prefill `prompt` from an empty cache, or after the prefix of its video that the cache
    still holds. The queries asked for must lie after the prefix (the text after the video,
    token selection's default) for it to be reused; otherwise the prompt is prefilled whole."""
    split = reusable_prefix_length(prompt, query_len)
    source = prompt.prefix_source
    reused = 0
    if split and runtime.cache.holds_prefix(source, split):
        runtime.rollback(split)  # what the last generation appended after it
        reused = split
    else:
        runtime.reset()
        if split:
            runtime.prefill(prompt.inputs_embeds[:, :split], prompt.position_ids[..., :split])
            runtime.cache.hold_prefix(source, split)
    result = runtime.prefill(prompt.inputs_embeds[:, split:], prompt.position_ids[..., split:],
                             query_layers=query_layers, query_len=query_len)
    return PromptPrefill(result, reused)


def reusable_prefix_length(prompt: PreparedPrompt, query_len: int = 0) -> int:
    """The prefix a runtime may keep for the next prompt about the same video: 0 without a
    prefix_source, or when nothing follows the video or the queries reach into it."""
    if prompt.prefix_source is None:
        return 0
    split = prompt.prefix_length
    after = prompt.length - split
    return split if after >= max(query_len, 1) else 0

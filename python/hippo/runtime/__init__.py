"""hippo's language-model runtime: static KV cache, graph-captured decoder, AR baseline."""
from __future__ import annotations

from hippo.runtime.autoregressive import (
    GenerationResult, SamplingOptions, choose_next_token, generate_autoregressive, warp_logits)
from hippo.runtime.decoder import LanguageModelRuntime, PrefillResult, find_text_model
from hippo.runtime.prefix_reuse import PromptPrefill, prefill_prompt
from hippo.runtime.static_cache import StaticKVCache

__all__ = [
    "GenerationResult",
    "LanguageModelRuntime",
    "PrefillResult",
    "PromptPrefill",
    "SamplingOptions",
    "StaticKVCache",
    "choose_next_token",
    "find_text_model",
    "generate_autoregressive",
    "prefill_prompt",
    "warp_logits",
]

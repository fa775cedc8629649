"""Whether a target and a draft form a speculative pair: one family, one tokenizer, the same
special ids and the same chat-format ids around a prompt."""
from __future__ import annotations

from hippo.errors import HippoError
from hippo.models.base import VideoLLMAdapter
from hippo.models.tokenizer import PromptTokenizer


def check_compatible(target: VideoLLMAdapter, draft: VideoLLMAdapter) -> int:
    """Target and draft must be of one family and share a tokenizer and its special ids. Returns
    the shared vocabulary size (the smaller logits width: checkpoints of one family may pad their
    embedding tables differently, e.g. Qwen2.5-VL 7B 152064 vs 3B 151936, and the tokenizer never
    emits ids beyond either)."""
    # A draft of another family differs in everything below; listing it all would bury the cause.
    if type(target) is not type(draft):
        raise HippoError(f"target is {target.family} but draft is {draft.family}: a draft must be "
                         "of the target's family")
    problems = []
    tokenizers = tokenizer_difference(target.tokenizer, draft.tokenizer)
    if tokenizers is not None:
        problems.append(tokenizers)
    t_ids, d_ids = target.special_token_ids(), draft.special_token_ids()
    for name in t_ids:
        if t_ids[name] != d_ids[name]:
            problems.append(f"{name} {t_ids[name]} vs {d_ids[name]}")
    shared = min(target.vocab_size, draft.vocab_size)
    t_tok = target.tokenizer
    tokens = t_tok.vocab_size if t_tok is not None else max(target.vocab_size, draft.vocab_size)
    if shared < tokens:
        problems.append(f"vocab size {target.vocab_size} vs {draft.vocab_size}")
    if target.prompt_prefix_ids != draft.prompt_prefix_ids or target.prompt_suffix_ids != draft.prompt_suffix_ids:
        problems.append("chat-format ids around the prompt (their chat templates differ: give "
                        "the draft the target's chat template)")
    elif tokenizers is None and target.tokenizer is not None:
        text = _text_ids_difference(target, draft)
        if text is not None:
            problems.append(text)
    if problems:
        raise HippoError("target and draft are not a compatible pair: " + "; ".join(problems))
    return shared


# Text prompts on which chat templates that agree around a prompt may still differ: the text
# between the video and the prompt, the prompt trimmed or not, characters merging across it.
PROBE_PROMPTS = ("What moves?", "  Is it spaced?\n ")


def _text_ids_difference(target: VideoLLMAdapter, draft: VideoLLMAdapter) -> str | None:
    """Why the two chat formats make other ids of a text prompt (None if they agree on the probe
    prompts): both prompts must hold the same ids, which speculative decoding would otherwise
    only find out after both models have embedded the video."""
    for probe in PROBE_PROMPTS:
        try:
            same = target.ids_after_video(probe) == draft.ids_after_video(probe)
        except HippoError:  # a template refusing a probe: prepare() compares the user's prompt
            continue
        if not same:
            return (f"chat templates (they make different ids of a text prompt such as {probe!r}: "
                    "give the draft the target's chat template)")
    return None


def tokenizer_difference(target: PromptTokenizer | None, draft: PromptTokenizer | None) -> str | None:
    """Why the target's and the draft's tokenizers are not interchangeable; None if they are."""
    if target is None and draft is None:
        return None
    if target is None or draft is None:
        missing, present = ("target", "draft") if target is None else ("draft", "target")
        return f"the {missing} has no tokenizer but the {present} has one"
    t_parts, d_parts = dict(target.fingerprint()), dict(draft.fingerprint())
    if t_parts.keys() != d_parts.keys():  # tokenizers of different kinds (a preset's and a file's)
        return "tokenizers differ (of different kinds)"
    for what, value in t_parts.items():
        if value != d_parts[what]:
            if what == "size":
                return f"tokenizers differ ({target.vocab_size} vs {draft.vocab_size} ids)"
            if what == "eos id":
                return f"tokenizers differ (eos id {target.eos_token_id} vs {draft.eos_token_id})"
            return f"tokenizers differ (same size, different {what})"
    return None

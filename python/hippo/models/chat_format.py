"""The chat text around a video prompt: what comes before the video, between the video and the
user's text, and after it (the generation prompt).

Each family has its official format written in (Qwen2.5-VL's template; llava-hf's for
LLaVA-OneVision / LLaVA-Video). A checkpoint that ships its own chat template (a fine-tune with
its own system prompt, a LLaVA-Video conversion with another layout) is rendered once for a user
turn of [video, text] and cut at the family's video placeholder and at the text, so that its
prompts are the ones HF's processor would build from that template.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

from hippo.models.base import HFPromptTokenizer, PromptTokenizer

# Stands for the user's text while rendering: any string the template copies through unchanged.
_TEXT_MARK = "HIPPOUSERTEXTMARK"


@dataclass(frozen=True)
class ChatFormat:
    prefix: str  # the turn's opening up to the video placeholder (system prompt included)
    separator: str  # between the video and the user's text
    suffix: str  # closing the user's turn and opening the assistant's


def checkpoint_chat_format(path: str, tokenizer: PromptTokenizer | None, video_placeholder: str,
                           builtin: ChatFormat) -> ChatFormat:
    """The chat format of the checkpoint's own template where it has one that renders a video
    turn with `video_placeholder` (the text the family's template writes for a video), else the
    family's built-in format (with a warning when a template was there but could not be used)."""
    template = _find_template(path, tokenizer)
    if template is None or not isinstance(tokenizer, HFPromptTokenizer):
        return builtin
    try:
        rendered = tokenizer.hf.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": _TEXT_MARK}]}],
            chat_template=template, tokenize=False, add_generation_prompt=True)
        return _cut(str(rendered), video_placeholder)
    except Exception as err:  # noqa: BLE001  a template may fail in jinja or in its own raise
        warnings.warn(f"{path}: its chat template does not render a video turn as this family's "
                      f"({type(err).__name__}: {err}); prompts use the family's built-in chat "
                      "format", stacklevel=2)
        return builtin


def _cut(rendered: str, video_placeholder: str) -> ChatFormat:
    if rendered.count(video_placeholder) != 1 or rendered.count(_TEXT_MARK) != 1:
        raise ValueError(f"expected one {video_placeholder!r} and the text once, got {rendered!r}")
    prefix, after = rendered.split(video_placeholder)
    if _TEXT_MARK not in after:
        raise ValueError(f"the text comes before the video: {rendered!r}")
    separator, suffix = after.split(_TEXT_MARK)
    return ChatFormat(prefix, separator, suffix)


def _find_template(path: str, tokenizer: PromptTokenizer | None) -> str | None:
    """The processor's template (chat_template.jinja, or chat_template.json's), which knows
    videos, before the tokenizer's (tokenizer_config.json's), which may be text only."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as file:
            return file.read()
    stored = os.path.join(path, "chat_template.json")
    if os.path.isfile(stored):
        try:
            with open(stored, encoding="utf-8") as file:
                template = json.load(file).get("chat_template")
        except (OSError, ValueError, AttributeError):
            template = None
        if isinstance(template, str):
            return template
    template = getattr(getattr(tokenizer, "hf", None), "chat_template", None)
    return template if isinstance(template, str) else None

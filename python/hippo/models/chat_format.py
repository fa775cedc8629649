"""The chat text around a video prompt: what comes before the video, between the video and the
user's text, and after it (the generation prompt).

Each family has its official format written in (Qwen2.5-VL's template; llava-hf's for
LLaVA-OneVision / LLaVA-Video). A checkpoint that ships its own chat template (a fine-tune with
its own system prompt, a LLaVA-Video conversion with another layout) is rendered for a user turn
of [video, text]: once with a stand-in text, cut at the family's video placeholder and at the
text (the chat ids around a prompt given as ids, and a check that it renders a video turn at
all), then for each text prompt, whose text after the video is tokenized whole, so that its
prompts are the ones HF's processor builds from that template (which renders it per prompt: a
template may `| trim` the text).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from hippo.errors import HippoError
from hippo.models.checkpoint import read_json_object
from hippo.models.tokenizer import HFPromptTokenizer, PromptTokenizer

# Stands for the user's text while rendering: any string the template copies through unchanged.
_TEXT_MARK = "HIPPOUSERTEXTMARK"


@dataclass(frozen=True)
class ChatFormat:
    prefix: str  # the turn's opening up to the video placeholder (system prompt included)
    separator: str  # between the video and the user's text
    suffix: str  # closing the user's turn and opening the assistant's
    # The template's rendering of what follows the video for a given text (HF's processor renders
    # the template for each prompt: a template may change the text, e.g. `| trim` it); None: the
    # separator, the text and the suffix as they are.
    render_after_video: Callable[[str], str] | None = field(default=None, compare=False)

    def after_video(self, text: str) -> str:
        """The chat text after the video for the user's text: tokenized as one string, as HF's
        processor tokenizes the whole prompt (the text's last characters may merge with the
        suffix's first ones, e.g. '?' and '\\n' into one token)."""
        if self.render_after_video is None:
            return self.separator + text + self.suffix
        return self.render_after_video(text)


def checkpoint_chat_format(path: str, tokenizer: PromptTokenizer | None, video_placeholder: str,
                           builtin: ChatFormat) -> ChatFormat:
    """The chat format of the checkpoint's own template where it has one that renders a video
    turn with `video_placeholder` (the text the family's template writes for a video), else the
    family's built-in format (with a warning when a template was there but could not be used)."""
    template = _find_template(path, tokenizer)
    if template is None or not isinstance(tokenizer, HFPromptTokenizer):
        return builtin
    hf = tokenizer.hf

    def render(text: str) -> str:
        return str(hf.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}],
            chat_template=template, tokenize=False, add_generation_prompt=True))

    def render_after_video(text: str) -> str:
        # The template's video comes before the text (checked by _cut): a placeholder the user's
        # text holds stays in it, for the adapter to refuse.
        try:
            return render(text).partition(video_placeholder)[2]
        except Exception as err:  # noqa: BLE001  a template may raise for one prompt only
            raise HippoError(f"{path}: its chat template failed on this prompt "
                             f"({type(err).__name__}: {err})") from err

    try:
        cut = _cut(render(_TEXT_MARK), video_placeholder)
        return ChatFormat(cut.prefix, cut.separator, cut.suffix, render_after_video)
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
    """The processor's template, which knows videos, in the order transformers' processor reads
    it (ProcessorMixin.get_processor_dict): processor_config.json's (processors saved before
    templates had their own file), chat_template.json's (the legacy file, taken before a
    chat_template.jinja beside it), chat_template.jinja; then the tokenizer's
    (tokenizer_config.json's), which may be text only."""
    for name in ("processor_config.json", "chat_template.json"):
        template = _json_entry(os.path.join(path, name))
        if template is not None:
            return template
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as file:
            return file.read()
    template = getattr(getattr(tokenizer, "hf", None), "chat_template", None)
    return template if isinstance(template, str) else None


def _json_entry(file: str) -> str | None:
    """The "chat_template" string of a JSON file, None where there is none; a file that is not
    a JSON object is an error naming it, as every checkpoint JSON file hippo reads."""
    if not os.path.isfile(file):
        return None
    template = read_json_object(file).get("chat_template")
    return template if isinstance(template, str) else None

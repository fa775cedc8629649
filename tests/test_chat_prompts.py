"""Text prompts of checkpoints with a byte-level BPE tokenizer (Qwen2's pre-tokenizer, as every
Qwen2.5-VL and LLaVA-OneVision checkpoint has) become the ids HF's processor makes: it renders the
checkpoint's chat template for each prompt and tokenizes the whole text, so the user's text may
merge with the template's text after it ("?" and "\\n" are one token) and a template may change
the text (`| trim`). Without a template, the family's built-in format is the official template's.

The word-level tokenizer of test_checkpoints.py splits on whitespace and cannot show these."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hippo.models import load_adapter

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", "<image>", "<video>"]
QWEN_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
              r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
CORPUS = ["You are a helpful assistant.", "system\n", "user\n", "assistant\n", "user ",
          "What moves?\n", "Question?\nAnswer briefly.", "  spaced out  \n", "?\n", ".\n"] * 4

# Qwen2.5-VL-Instruct's template (add_vision_id branches left out), and llava-hf's for
# LLaVA-OneVision: transformers' own test pins the latter's output for
# llava-hf/llava-onevision-qwen2-7b-ov-hf as "<|im_start|>user <image>\n...<|im_end|><|im_start|>assistant\n".
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PLACEHOLDER = {"qwen2_5_vl": "<|video_pad|>", "llava_onevision": "<video>"}


def _tokenizer():
    from tokenizers import (
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import Qwen2Tokenizer

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})
    assert tokenizer.tokenize("Question?\nAnswer") == ["Question", "?Ċ", "Answer"]  # "?\n" is one
    return tokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Qwen2.5-VL and LLaVA-OneVision checkpoint with the BPE tokenizer, no template."""
    tokenizer = _tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    made = {}
    for family, preset in (("qwen2_5_vl", "tiny-qwen2.5-vl"), ("llava_onevision", "tiny-llava-onevision")):
        adapter = load_adapter(preset, seed=0)
        config = adapter.model.config
        config.video_token_id, config.image_token_id = ids(PLACEHOLDER[family]), ids("<|image_pad|>")
        if family == "qwen2_5_vl":
            config.vision_start_token_id, config.vision_end_token_id = ids("<|vision_start|>"), ids("<|vision_end|>")
        else:
            config.video_token_index, config.image_token_index = ids("<video>"), ids("<image>")
        adapter.model.generation_config.eos_token_id = ids("<|im_end|>")
        adapter.model.generation_config.pad_token_id = ids("<|endoftext|>")
        directory = tmp_path_factory.mktemp(family)
        adapter.model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        made[family] = directory
    return made, tokenizer


def _with(source: Path, destination: Path, files: dict[str, str]) -> str:
    shutil.copytree(source, destination)
    for name, content in files.items():
        (destination / name).write_text(content)
    return str(destination)


def _hf_ids(tokenizer, template: str, prompt: str, placeholder: str, num_visual: int) -> list[int]:
    """What HF's processor makes of the prompt: the template rendered for it, the placeholder
    expanded, the whole text tokenized."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}],
        chat_template=template, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text.replace(placeholder, placeholder * num_visual), add_special_tokens=False)


TRIMS = QWEN_TEMPLATE.replace("{{ content['text'] }}", "{{ content['text'] | trim }}")
ASKS_AFTER = QWEN_TEMPLATE.replace("{{ content['text'] }}", "{{ content['text'] }}\nAnswer briefly.")


@pytest.mark.parametrize("template", [QWEN_TEMPLATE, TRIMS, ASKS_AFTER],
                         ids=["official", "trims-the-text", "text-before-template-text"])
@pytest.mark.parametrize("prompt", ["What moves?", "Question?", "  spaced out  \n", ""])
def test_text_prompts_are_the_ids_hf_makes(checkpoints, tmp_path, template, prompt):
    made, tokenizer = checkpoints
    path = _with(made["qwen2_5_vl"], tmp_path / "qwen", {"chat_template.jinja": template})
    adapter = load_adapter(path)
    assert adapter.prompt_ids(3, prompt) == _hf_ids(tokenizer, template, prompt, "<|video_pad|>", 3)


@pytest.mark.parametrize("family,template", [("qwen2_5_vl", QWEN_TEMPLATE),
                                             ("llava_onevision", LLAVA_TEMPLATE)])
def test_the_builtin_format_is_the_official_template(checkpoints, family, template):
    made, tokenizer = checkpoints
    adapter = load_adapter(str(made[family]))  # the checkpoint has no template
    assert adapter.prompt_ids(5, "What moves?") == _hf_ids(tokenizer, template, "What moves?",
                                                           PLACEHOLDER[family], 5)


def test_a_template_in_processor_config_comes_first_as_in_transformers(checkpoints, tmp_path):
    """Processors saved before templates had their own file keep it in processor_config.json,
    which transformers reads before chat_template.jinja."""
    made, tokenizer = checkpoints
    pirate = QWEN_TEMPLATE.replace("a helpful assistant", "a pirate")
    path = _with(made["qwen2_5_vl"], tmp_path / "qwen", {
        "chat_template.jinja": QWEN_TEMPLATE,
        "processor_config.json": json.dumps({"processor_class": "Qwen2_5_VLProcessor",
                                             "chat_template": pirate})})
    adapter = load_adapter(path)
    assert adapter.prompt_ids(2, "What moves?") == _hf_ids(tokenizer, pirate, "What moves?",
                                                           "<|video_pad|>", 2)


@pytest.mark.parametrize("prompt", ["a <video> b", "<|vision_start|><|video_pad|><|vision_end|>"])
def test_a_text_holding_the_placeholder_is_still_refused(checkpoints, tmp_path, prompt):
    from hippo.models.base import HippoError

    made, _ = checkpoints
    for family, template in (("qwen2_5_vl", QWEN_TEMPLATE), ("llava_onevision", LLAVA_TEMPLATE)):
        path = _with(made[family], tmp_path / family, {"chat_template.jinja": template})
        adapter = load_adapter(path)
        if PLACEHOLDER[family] in prompt:
            with pytest.raises(HippoError, match="must not contain video or image placeholder"):
                adapter.prompt_ids(2, prompt)


def test_a_template_failing_on_one_prompt_is_a_clear_error(checkpoints, tmp_path):
    """A template may refuse some prompts (raise_exception): that is one HippoError naming the
    checkpoint, at prepare time, not a jinja exception from inside the adapter."""
    from hippo.models.base import HippoError

    made, _ = checkpoints
    picky = QWEN_TEMPLATE.replace(
        "{{ content['text'] }}",
        "{% if 'forbidden' in content['text'] %}{{ raise_exception('not that word') }}{% endif %}"
        "{{ content['text'] }}")
    path = _with(made["qwen2_5_vl"], tmp_path / "qwen", {"chat_template.jinja": picky})
    adapter = load_adapter(path)
    assert adapter.prompt_ids(2, "What moves?")
    with pytest.raises(HippoError, match="chat template failed on this prompt .*not that word"):
        adapter.prompt_ids(2, "a forbidden word")

"""Text prompts of checkpoints with a byte-level BPE tokenizer (Qwen2's pre-tokenizer, as every
Qwen2.5-VL and LLaVA-OneVision checkpoint has) become the ids HF's processor makes: it renders the
checkpoint's chat template for each prompt and tokenizes the whole text, so the user's text may
merge with the template's text after it ("?" and "\\n" are one token) and a template may change
the text (`| trim`). Without a template, the family's built-in format is the official template's.

The word-level tokenizer of test_checkpoints.py splits on whitespace and cannot show these."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from hippo.models import load_adapter
from hippo_testing import bpe_tokenizer

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


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Qwen2.5-VL and LLaVA-OneVision checkpoint with the BPE tokenizer, no template."""
    tokenizer = bpe_tokenizer()
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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = load_adapter(str(made[family]))  # the checkpoint has no template
    # no template is no fault of the checkpoint's: nothing to warn about
    assert not [w for w in caught if "chat template" in str(w.message)], caught
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
    from hippo.errors import HippoError

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
    from hippo.errors import HippoError

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


def _edited_json(directory: str, name: str, edit) -> None:
    file = Path(directory) / name
    content = json.loads(file.read_text())
    edit(content)
    file.write_text(json.dumps(content))


@pytest.mark.parametrize("family,draft_template", [
    ("qwen2_5_vl", TRIMS),  # the same text around the prompt, but the prompt trimmed
    ("llava_onevision", LLAVA_TEMPLATE.replace("'\n' + content['text']", "' ' + content['text']"))],
    ids=["trims-the-text", "other-separator"])
def test_a_draft_whose_template_makes_other_text_ids_is_refused_up_front(checkpoints, tmp_path,
                                                                         family, draft_template):
    """Chat-format ids around the prompt that agree do not make the prompts agree: refused when
    the pair is made, not after both models have embedded the video (with a message blaming
    the vision preprocessing)."""
    from hippo.errors import HippoError
    from hippo.pipeline import HippoPipeline

    made, _ = checkpoints
    template = QWEN_TEMPLATE if family == "qwen2_5_vl" else LLAVA_TEMPLATE
    target = load_adapter(_with(made[family], tmp_path / "target", {"chat_template.jinja": template}))
    draft = load_adapter(_with(made[family], tmp_path / "draft", {"chat_template.jinja": draft_template}))
    with pytest.raises(HippoError, match="^target and draft are not a compatible pair: chat templates "
                                         r"\(they make different ids of a text prompt"):
        HippoPipeline(target, draft)


def test_a_prompt_the_two_templates_tokenize_differently_is_refused_before_the_video(checkpoints, tmp_path):
    from hippo.errors import HippoError
    from hippo.pipeline import HippoPipeline

    made, _ = checkpoints
    renames = QWEN_TEMPLATE.replace("{{ content['text'] }}", "{{ content['text'] | replace('cat', 'dog') }}")
    target = load_adapter(_with(made["qwen2_5_vl"], tmp_path / "target", {"chat_template.jinja": QWEN_TEMPLATE}))
    draft = load_adapter(_with(made["qwen2_5_vl"], tmp_path / "draft", {"chat_template.jinja": renames}))
    pipeline = HippoPipeline(target, draft)  # the probe prompts hold no 'cat'
    with pytest.raises(HippoError, match="^target and draft make different token ids of this prompt's text"):
        pipeline.prepare(str(tmp_path / "no-such-video.mp4"), "a cat?")  # never read


def test_tokenizers_with_one_vocabulary_but_other_merges_are_refused(checkpoints, tmp_path):
    from hippo.errors import HippoError
    from hippo.pipeline import HippoPipeline

    made, _ = checkpoints
    other = _with(made["qwen2_5_vl"], tmp_path / "draft", {})
    _edited_json(other, "tokenizer.json", lambda t: t["model"].update(merges=t["model"]["merges"][::-1]))
    target, draft = load_adapter(str(made["qwen2_5_vl"])), load_adapter(other)
    assert draft.tokenizer.hf.get_vocab() == target.tokenizer.hf.get_vocab()
    assert draft.tokenizer.encode("Question?") != target.tokenizer.encode("Question?")
    with pytest.raises(HippoError, match=r"^target and draft are not a compatible pair: tokenizers "
                                         r"differ \(same size, different merges or model "
                                         r"options\)$"):
        HippoPipeline(target, draft)


def test_harmless_tokenizer_differences_make_a_lossless_pair(checkpoints, tmp_path):
    """Another model_max_length, tokenizer class name or pad token, a generation_config eos list:
    the prompts' ids are the same, the pair is accepted and decodes as the target alone."""
    from hippo.assets import sample_video_path
    from hippo.pipeline import HippoPipeline
    from hippo.preserve import PreservationOptions

    made, tokenizer = checkpoints
    other = _with(made["qwen2_5_vl"], tmp_path / "draft", {})
    _edited_json(other, "tokenizer_config.json", lambda c: c.update(
        model_max_length=1234, tokenizer_class="PreTrainedTokenizerFast", pad_token="<|im_end|>"))
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    _edited_json(other, "generation_config.json", lambda c: c.update(eos_token_id=eos))
    target, draft = load_adapter(str(made["qwen2_5_vl"]), dtype=torch.float32), \
        load_adapter(other, dtype=torch.bfloat16)
    assert draft.tokenizer.pad_token_id != target.tokenizer.pad_token_id
    pipeline = HippoPipeline(target, draft, mode="sequential", gamma=3,
                             preservation=PreservationOptions(keep_ratio=1.0))
    run = lambda mode: pipeline.with_options(mode=mode).generate(  # noqa: E731
        sample_video_path(), "What moves?", 12, num_frames=4, eos_token_id=None)
    baseline = run("ar").tokens
    for mode in ("sequential", "parallel"):
        output = run(mode)
        assert output.tokens == baseline
        assert output.stats.target_steps < len(baseline) - 1  # the bf16 copy's tokens were accepted


@pytest.mark.parametrize("files", [
    ("chat_template.jinja",), ("chat_template.json",), ("chat_template.jinja", "chat_template.json"),
    ("processor_config.json", "chat_template.jinja", "chat_template.json")])
def test_the_template_is_the_one_transformers_processor_loads(checkpoints, tmp_path, files):
    """Where a checkpoint holds its template in several files, the one HF's processor renders
    (transformers' own lookup is asked): a legacy chat_template.json comes before a
    chat_template.jinja beside it."""
    from transformers.processing_utils import ProcessorMixin

    made, tokenizer = checkpoints
    templates = {name: QWEN_TEMPLATE.replace("a helpful assistant", f"the {name} assistant")
                 for name in files}
    contents = {name: template if name.endswith(".jinja") else json.dumps({"chat_template": template})
                for name, template in templates.items()}
    path = _with(made["qwen2_5_vl"], tmp_path / "qwen", contents)
    expected = ProcessorMixin.get_processor_dict(path, local_files_only=True)[0]["chat_template"]
    assert expected in templates.values()
    adapter = load_adapter(path)
    assert adapter.prompt_ids(2, "What moves?") == _hf_ids(tokenizer, expected, "What moves?",
                                                           "<|video_pad|>", 2)

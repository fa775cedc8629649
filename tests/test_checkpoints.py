"""`hippo generate` on checkpoint directories, the way a user runs real models: config.json picks
the family, the weights load with from_pretrained (local files only), the checkpoint's own HF
tokenizer encodes the prompt and the chat template, its preprocessing config sizes the frames.

The checkpoints are tiny random models saved by the test, with a word-level HF tokenizer built
offline (no download anywhere)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from hippo.assets import sample_video_path
from hippo.cli import EXIT_USER_ERROR, main
from hippo.models import load_adapter

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|video_pad|>", "<|image_pad|>", "<video>", "<image>"]
WORDS = ["[UNK]", "system", "user", "assistant", "you", "are", "a", "helpful", ".", "what",
         "moves", "?", "the", "square", "describe", "\n"]


def _save_tokenizer(directory: Path, extra_words: tuple[str, ...] = ()) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(WORDS + list(extra_words) + SPECIAL)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL)
    tokenizer.save_pretrained(directory)


def _save_checkpoint(directory: Path, preset: str, seed: int,
                     extra_words: tuple[str, ...] = ()) -> Path:
    adapter = load_adapter(preset, seed=seed)
    adapter.model.save_pretrained(directory)
    _save_tokenizer(directory, extra_words)
    if adapter.family == "qwen2_5_vl":  # small frames keep the tiny model's prompt short
        (directory / "video_preprocessor_config.json").write_text(json.dumps(
            {"min_pixels": 56 * 56, "max_pixels": 112 * 112}))
    return directory


def test_load_adapter_s_default_dtypes(tmp_path):
    """As documented: a checkpoint loads in bf16 unless a dtype is given, a preset in fp32."""
    directory = _save_checkpoint(tmp_path / "qwen", "tiny-qwen2.5-vl", 0)
    assert load_adapter(str(directory)).model.dtype == torch.bfloat16
    assert load_adapter(directory, dtype=torch.float32).model.dtype == torch.float32
    assert load_adapter("tiny-qwen2.5-vl").model.dtype == torch.float32
    assert load_adapter("tiny-qwen2.5-vl", dtype=torch.bfloat16).model.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}
    for name, preset, seed, words in [
            ("qwen", "tiny-qwen2.5-vl", 0, ()), ("qwen-draft", "tiny-qwen2.5-vl-draft", 1, ()),
            ("qwen-other-vocab", "tiny-qwen2.5-vl-draft", 1, ("extra",)),
            ("llava", "tiny-llava-onevision", 0, ()),
            ("llava-draft", "tiny-llava-onevision-draft", 1, ())]:
        made[name] = str(_save_checkpoint(root / name, preset, seed, words))
    return made


def _generate(target: str, draft: str | None, *extra: str) -> list[str]:
    argv = ["generate", "--target", target, "--video", str(sample_video_path()), "--prompt",
            "what moves ?", "--frames", "4", "--max-new-tokens", "8", "--dtype", "float32",
            "--device", "cpu", "--json", *extra]
    return argv + (["--draft", draft] if draft else [])


@pytest.mark.parametrize("family", ["qwen", "llava"])
def test_generate_on_checkpoint_directories(capsys, checkpoints, family):
    target, draft = checkpoints[family], checkpoints[f"{family}-draft"]
    assert main(_generate(target, None, "--mode", "ar")) == 0
    ar = json.loads(capsys.readouterr().out)
    for mode in ("sequential", "parallel"):
        assert main(_generate(target, draft, "--mode", mode, "--gamma", "3")) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["tokens"] == ar["tokens"], mode
        assert isinstance(out["text"], str)
    assert main(_generate(target, None, "--mode", "parallel")) == 0  # self-speculation
    assert json.loads(capsys.readouterr().out)["tokens"] == ar["tokens"]


def test_the_checkpoint_tokenizer_and_chat_template_are_used(checkpoints):
    adapter = load_adapter(checkpoints["qwen"])
    assert adapter.tokenizer is not None and adapter.tokenizer.vocab_size == len(WORDS) + len(
        SPECIAL)
    im_start = adapter.tokenizer.encode("<|im_start|>")
    assert adapter.prompt_prefix_ids[:1] == im_start  # the chat template opens the turn
    assert adapter.eos_token_id == adapter.tokenizer.encode("<|im_end|>")[0]
    assert adapter.preprocess.max_pixels == 112 * 112  # from video_preprocessor_config.json


# A fine-tune's own template: another system prompt (Qwen), a space between video and text (LLaVA).
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nyou are a square .<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAVA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] if content['type'] == 'video' %}<video>{% endfor %}"
    "{% for content in message['content'] if content['type'] == 'text' %} {{ content['text'] }}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")
# A text-only template (tokenizer_config.json's of a language model): it prints the content list.
TEXT_ONLY_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                      "{{ message['content'] }}<|im_end|>\n{% endfor %}")


def _with_template(source: str, destination: Path, template: str, where: str) -> str:
    shutil.copytree(source, destination)
    if where == "chat_template.jinja":
        (destination / where).write_text(template)
    elif where == "chat_template.json":
        (destination / where).write_text(json.dumps({"chat_template": template}))
    else:  # the tokenizer's own
        _edit_json(destination / "tokenizer_config.json", _set("chat_template", template))
    return str(destination)


@pytest.mark.parametrize("where", ["chat_template.jinja", "chat_template.json", "tokenizer"])
def test_a_checkpoints_own_chat_template_builds_its_prompts(checkpoints, tmp_path, where):
    """The text around the video and the prompt comes from the checkpoint's template, cut at the
    video placeholder and the user's text, as HF's processor would render it."""
    path = _with_template(checkpoints["qwen"], tmp_path / "qwen", QWEN_TEMPLATE, where)
    adapter = load_adapter(path)
    tokenizer = adapter.tokenizer
    assert adapter.prompt_prefix_ids == tokenizer.encode(
        "<|im_start|>system\nyou are a square .<|im_end|>\n<|im_start|>user\n")
    assert adapter.prompt_suffix_ids == tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n")
    ids = adapter.prompt_ids(3, "what moves ?")
    video, vision = adapter.model.config.video_token_id, adapter.model.config.vision_start_token_id
    assert ids == (adapter.prompt_prefix_ids + [vision] + [video] * 3
                   + [adapter.model.config.vision_end_token_id] + tokenizer.encode("what moves ?")
                   + adapter.prompt_suffix_ids)


def test_a_llava_template_sets_the_text_between_video_and_prompt(checkpoints, tmp_path, capsys):
    path = _with_template(checkpoints["llava"], tmp_path / "llava", LLAVA_TEMPLATE,
                          "chat_template.jinja")
    adapter = load_adapter(path)
    assert adapter.text_separator == " "
    assert adapter.prompt_prefix_ids == adapter.tokenizer.encode("<|im_start|>user\n")
    # and it decodes: the draft (another template) only has to agree on the tokenizer
    assert main(_generate(path, checkpoints["llava-draft"], "--mode", "sequential")) == 0
    assert json.loads(capsys.readouterr().out)["tokens"]


def test_a_template_that_cannot_render_a_video_turn_leaves_the_builtin_format(checkpoints, tmp_path):
    builtin = load_adapter(checkpoints["qwen"])
    path = _with_template(checkpoints["qwen"], tmp_path / "qwen", TEXT_ONLY_TEMPLATE, "tokenizer")
    with pytest.warns(UserWarning, match="its chat template does not render a video turn"):
        adapter = load_adapter(path)
    assert adapter.prompt_prefix_ids == builtin.prompt_prefix_ids
    assert adapter.prompt_suffix_ids == builtin.prompt_suffix_ids


QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"  # what Qwen's template writes for it
VIDEO_TURN = "{% if content['type'] == 'video' %}" + QWEN_VIDEO
NOT_ONCE = f"expected one {QWEN_VIDEO!r} and the text once"
UNCUTTABLE_TEMPLATES = {  # a video turn the prefix / separator / suffix cut cannot represent
    "two-videos": (QWEN_TEMPLATE.replace(QWEN_VIDEO, QWEN_VIDEO * 2), NOT_ONCE),
    # the question before the video as well as after it: the prefix would hold the stand-in text
    "text-twice": (QWEN_TEMPLATE.replace(
        VIDEO_TURN, "{% if content['type'] == 'video' %}{{ message['content'][1]['text'] }}"
                    + QWEN_VIDEO), NOT_ONCE),
    "text-before-video": (QWEN_TEMPLATE.replace("in message['content'] %}",
                                                "in message['content'] | reverse %}"),
                          "the text comes before the video"),
}


@pytest.mark.parametrize("case", list(UNCUTTABLE_TEMPLATES))
def test_a_template_whose_video_turn_cannot_be_cut_leaves_the_builtin_format(checkpoints, tmp_path,
                                                                            case):
    """The warning says why the template was not used; the prompts are the family's format
    (never the stand-in text of the user's prompt)."""
    template, reason = UNCUTTABLE_TEMPLATES[case]
    builtin = load_adapter(checkpoints["qwen"])
    path = _with_template(checkpoints["qwen"], tmp_path / "qwen", template, "chat_template.jinja")
    with pytest.warns(UserWarning, match=re.escape(reason)):
        adapter = load_adapter(path)
    assert adapter.prompt_prefix_ids == builtin.prompt_prefix_ids
    assert adapter.prompt_suffix_ids == builtin.prompt_suffix_ids
    assert adapter.prompt_ids(2, "what moves ?") == builtin.prompt_ids(2, "what moves ?")


def test_a_checkpoint_without_a_tokenizer_loads_beside_a_chat_template(checkpoints, tmp_path):
    """No tokenizer: prompts are given as ids, in the family's format; a chat template there
    cannot be rendered without one and is left unused, not an AttributeError at load."""
    bare = load_adapter(_broken_copy(checkpoints["qwen"], tmp_path / "bare", "tokenizer*", None))
    path = _broken_copy(checkpoints["qwen"], tmp_path / "templated", "tokenizer*", None)
    (Path(path) / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    adapter = load_adapter(path)
    assert adapter.tokenizer is None
    assert adapter.prompt_ids(2, [5, 6]) == bare.prompt_ids(2, [5, 6])


def test_checkpoints_with_different_tokenizers_are_a_clear_error(capsys, checkpoints):
    argv = _generate(checkpoints["qwen"], checkpoints["qwen-other-vocab"])
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()  # no loading progress bars before it: one line
    assert len(err.splitlines()) == 1, err
    assert err.startswith("hippo generate: error: target and draft are not a compatible pair:")
    assert "tokenizers differ" in err, err


def test_a_draft_of_another_family_is_named_as_such(capsys, checkpoints):
    assert main(_generate(checkpoints["qwen"], checkpoints["llava-draft"])) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err == ("hippo generate: error: target is qwen2_5_vl but draft is llava_onevision: "
                   "a draft must be of the target's family"), err


def test_loading_a_checkpoint_shows_no_progress_bars(capfd, checkpoints):
    """transformers draws "Loading weights: 0%|...|" on stderr; hippo's errors and output must
    stand alone there. The user's own setting is kept for their later loads."""
    from transformers.utils import logging as hf_logging

    capfd.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    load_adapter(checkpoints["qwen"])
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err, err
    assert hf_logging.is_progress_bar_enabled()


def _broken_copy(source: str, destination: Path, file: str, content: bytes | None) -> str:
    """A copy of a checkpoint directory with `file` replaced by `content` (None: removed)."""
    shutil.copytree(source, destination)
    if content is None:
        for path in destination.glob(file):
            path.unlink()
    else:
        (destination / file).write_bytes(content)
    return str(destination)


BROKEN_CHECKPOINTS = {  # (family, file, content, what the error names)
    "config_not_an_object": ("qwen", "config.json", b"[1, 2]", "JSON object"),
    "config_not_json": ("qwen", "config.json", b"{'model_type': 1}", "config.json"),
    "config_not_utf8": ("llava", "config.json", b"\xff\xfe", "config.json"),
    "config_nested_too_deeply": ("qwen", "config.json", b"[" * 100_000,
                                 "config.json: its JSON is nested too deeply"),
    "preprocessing_nested_too_deeply": ("llava", "preprocessor_config.json",
                                        b'{"a": ' * 100_000, "nested too deeply"),
    "weights_truncated": ("qwen", "model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{",
                          "cannot load"),
    "weights_empty": ("llava", "model.safetensors", b"", "cannot load"),
    "preprocessing_not_an_object": ("qwen", "video_preprocessor_config.json", b"[1]",
                                    "JSON object"),
    "zero_patch_size": ("qwen", "video_preprocessor_config.json", b'{"patch_size": 0}',
                        "patch_size must be a positive integer"),
    "bad_min_pixels": ("qwen", "video_preprocessor_config.json", b'{"min_pixels": "abc"}',
                       "min_pixels must be a positive integer"),
    "two_channel_mean": ("llava", "preprocessor_config.json", b'{"image_mean": [0.5, 0.5]}',
                         "image_mean must be three finite numbers"),
    "zero_std": ("qwen", "video_preprocessor_config.json", b'{"image_std": [0, 1, 1]}',
                 "image_std must not contain 0"),
    "no_tokenizer": ("qwen", "tokenizer*", None, "has no tokenizer"),
    "tokenizer_without_added_tokens": ("qwen", "tokenizer.json", b'{"model": 5}',
                                       "cannot load the tokenizer"),
    "tokenizer_null": ("llava", "tokenizer.json", b"null", "cannot load the tokenizer"),
    "patch_size_of_another_tower": ("qwen", "video_preprocessor_config.json",
                                    b'{"patch_size": 16}', "patch_size 16 vs patch_size 14"),
    "merge_size_of_another_tower": ("qwen", "video_preprocessor_config.json",
                                    b'{"merge_size": 3}', "merge_size 3 vs spatial_merge_size 2"),
    # transformers skips an unreadable generation_config.json in silence (and its eos ids)
    "generation_config_not_json": ("qwen", "generation_config.json", b'{"eos_token_id": [1,',
                                   "generation_config.json"),
    "chat_template_json_not_json": ("llava", "chat_template.json", b"{'chat_template': 1}",
                                    "chat_template.json"),
    # transformers' defaults fill the size fields: a 72B-sized model that must fail before it
    # is allocated, not exhaust memory.
    "config_without_sizes": ("qwen", "config.json", b'{"model_type": "qwen2_5_vl"}',
                             "does not fit the weights"),
}


@pytest.mark.parametrize("case", list(BROKEN_CHECKPOINTS))
def test_broken_checkpoints_are_one_line_errors(capsys, checkpoints, tmp_path, case):
    """A checkpoint directory whose files are corrupt or out of range: one line naming what is
    wrong, exit status 2, no traceback (whatever library the failure starts in)."""
    family, file, content, needle = BROKEN_CHECKPOINTS[case]
    target = _broken_copy(checkpoints[family], tmp_path / case, file, content)
    assert main(_generate(target, None, "--mode", "ar")) == EXIT_USER_ERROR
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("hippo generate: error:") and needle in last, last


def _edited_config(source: str, destination: Path, edit) -> str:
    """A copy of a checkpoint directory whose config.json `edit` changed (in place, as a dict)."""
    shutil.copytree(source, destination)
    _edit_config(destination, edit)
    return str(destination)


def _edit_config(directory: Path, edit) -> None:
    """Rewrite the checkpoint's config.json as `edit` changes it (in place, as a dict)."""
    _edit_json(directory / "config.json", edit)


def _edit_json(file: Path, edit) -> None:
    content = json.loads(file.read_text())
    edit(content)
    file.write_text(json.dumps(content))


def _set(*keys_and_value):
    """An edit setting config[k1][k2]... = value; the value None removes the entry."""
    *keys, value = keys_and_value

    def edit(config: dict) -> None:
        for key in keys[:-1]:
            config = config[key]
        if value is None:
            config.pop(keys[-1])
        else:
            config[keys[-1]] = value
    return edit


OUT_OF_RANGE_CONFIGS = {  # (family, edit, what the error says)
    "model_type_a_list": ("qwen", _set("model_type", ["qwen2_5_vl"]),
                          "model_type must be a string naming the model family"),
    "qwen_video_token_beyond_vocabulary": (
        "qwen", _set("video_token_id", 100000),
        "video_token_id is 100000, not a token id of this model (its vocabulary holds ids 0 to"),
    "qwen_negative_vision_start": ("qwen", _set("vision_start_token_id", -1),
                                   "vision_start_token_id is -1, not a token id"),
    "llava_video_token_beyond_vocabulary": ("llava", _set("video_token_index", 100000),
                                            "video_token_index is 100000, not a token id"),
    "llava_image_token_beyond_vocabulary": ("llava", _set("image_token_index", 4096),
                                            "image_token_index is 4096, not a token id"),
    "llava_feature_layer_beyond_the_tower": (
        "llava", _set("vision_feature_layer", -50),
        "vision_feature_layer -50 does not index the vision tower's hidden states: with 2 layers"),
    # One layer in a list: the projector keeps its size, so the weights still fit.
    "llava_feature_layer_list_beyond_the_tower": ("llava", _set("vision_feature_layer", [3]),
                                                  "vision_feature_layer [3] does not index"),
    "qwen_mrope_section_of_another_head_dim": (
        "qwen", _set("text_config", "rope_parameters", "mrope_section", [1, 1, 1]),
        "mrope_section [1, 1, 1] does not fit head_dim 16"),
    # transformers then takes [16, 24, 24], Qwen2.5-VL's sections for head_dim 128.
    "qwen_mrope_section_missing": (
        "qwen", _set("text_config", "rope_parameters", "mrope_section", None),
        "gives no mrope_section"),
    # Grouped-query attention needs the kv heads to divide the query heads (4 in both presets).
    "qwen_heads_not_a_multiple_of_kv_heads": (
        "qwen", _set("text_config", "num_key_value_heads", 3),
        "num_attention_heads (4) must be a positive multiple of num_key_value_heads (3)"),
    # transformers' model construction divided by it (a ZeroDivisionError quoted).
    "llava_no_kv_heads": ("llava", _set("text_config", "num_key_value_heads", 0),
                          "num_attention_heads (4) must be a positive multiple of "
                          "num_key_value_heads (0)"),
    "qwen_context_of_no_position": ("qwen", _set("text_config", "max_position_embeddings", 0),
                                    "max_position_embeddings must be a positive integer"),
    # transformers' own error is a bare KeyError: 'nonsense'.
    "qwen_unknown_text_activation": ("qwen", _set("text_config", "hidden_act", "nonsense"),
                                     "text_config.hidden_act 'nonsense' is not an activation"),
    "llava_unknown_vision_activation": ("llava", _set("vision_config", "hidden_act", "swishy"),
                                        "vision_config.hidden_act 'swishy' is not an activation"),
    # hippo_ext's rms_norm refused it with a RuntimeError traceback in the first prefill.
    "qwen_negative_rms_norm_eps": ("qwen", _set("text_config", "rms_norm_eps", -1.0),
                                   "rms_norm_eps must be a finite number >= 0, got -1.0"),
    # HF's window indexing divides by window_size // spatial_merge_size // patch_size (0 here).
    "qwen_vision_window_smaller_than_a_merged_patch": (
        "qwen", _set("vision_config", "window_size", 14),
        "vision_config.window_size must be an integer of at least patch_size x spatial_merge_size "
        "(28), got 14"),
    # transformers asked for the quantization library; with it installed, hippo's runtime would
    # have met packed weights it has no kernels for.
    "qwen_awq_quantized": ("qwen", _set("quantization_config", {
        "quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}),
        "config.json: quantization_config (awq): quantized checkpoints are not supported"),
    "llava_bitsandbytes_quantized": ("llava", _set("quantization_config", {
        "quant_method": "bitsandbytes", "load_in_4bit": True}),
        "quantization_config (bitsandbytes): quantized checkpoints are not supported"),
    "qwen_fp8_text_model": ("qwen", _set("text_config", "quantization_config", {
        "quant_method": "fp8", "activation_scheme": "dynamic"}),
        "config.json: text_config.quantization_config (fp8): quantized checkpoints"),
    "llava_heads_not_a_multiple_of_kv_heads": (
        "llava", _set("text_config", "num_key_value_heads", 3),
        "num_attention_heads (4) must be a positive multiple of num_key_value_heads (3)"),
}


@pytest.mark.parametrize("family,edit,needle", [
    ("llava", _set("vision_feature_select_strategy", 5),
     "cannot read the LLaVA-OneVision config.json in"),
    ("qwen", _set("model_type", "llava_onevision"), "cannot read the LLaVA-OneVision config.json"),
], ids=["field_transformers_refuses", "model_type_of_the_other_family"])
def test_a_config_transformers_refuses_is_named_as_the_config(capsys, checkpoints, tmp_path,
                                                              family, edit, needle):
    """The tokenizer's loader parses config.json too: its faults were reported as "cannot load
    the tokenizer". config.json is read first, and its error names it."""
    target = _edited_config(checkpoints[family], tmp_path / family, edit)
    assert main(_generate(target, None, "--mode", "ar")) == EXIT_USER_ERROR
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert needle in last and "tokenizer" not in last, last


@pytest.fixture
def weights_never_load(monkeypatch):
    """Fails the test if a checkpoint's weights load: errors found in the checkpoint's small
    files must come before the weights (minutes for a real model)."""
    from transformers import PreTrainedModel

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_weights))


@pytest.mark.parametrize("case", list(OUT_OF_RANGE_CONFIGS))
def test_config_values_that_do_not_fit_the_model_are_one_line_errors(capsys, checkpoints,
                                                                      tmp_path, case,
                                                                      weights_never_load):
    """Values that load but would fail in the first prompt (an IndexError in an embedding or
    hidden-state lookup, a RuntimeError in the rotary kernel) are refused from config.json and a
    weightless skeleton, before the weights load (minutes for a real model)."""
    family, edit, needle = OUT_OF_RANGE_CONFIGS[case]
    target = _edited_config(checkpoints[family], tmp_path / case, edit)
    assert main(_generate(target, None, "--mode", "ar")) == EXIT_USER_ERROR
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("hippo generate: error:") and needle in last, last
    assert last.startswith(f"hippo generate: error: {target}: ") or "model_type" in case, \
        "a model check's error names the checkpoint (a target's or a draft's)"


def _weights_as_pickle(directory: Path) -> None:
    """The checkpoint with its weights in pytorch_model.bin instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()


def _config_without_sizes(directory: Path) -> None:
    """config.json reduced to its model_type: every size takes transformers' defaults (a
    Qwen2.5-VL of some 75 billion parameters)."""
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({"model_type": config["model_type"]}))


def _sharded_without_its_last_shard(directory: Path) -> None:
    from hippo.models import load_adapter

    (directory / "model.safetensors").unlink()
    load_adapter("tiny-qwen2.5-vl", seed=0).model.save_pretrained(directory, max_shard_size="100KB")
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()


WEIGHT_FILE_ERRORS = {  # how the copy of the qwen checkpoint is broken, what the error says
    # Without the bound a pickled checkpoint loaded (and allocated) the 75B-sized model.
    "pickled_weights_of_a_config_without_sizes": (
        lambda d: (_weights_as_pickle(d), _config_without_sizes(d)),
        "parameters but the weights hold"),
    "a_shard_missing": (_sharded_without_its_last_shard,
                        "lacks 1 of the"),
    # Smaller than the weights: the count passes, the shapes do not (named, not "see the
    # report above", which is not shown).
    "a_config_narrower_than_its_weights": (
        lambda d: _edit_config(d, _set("text_config", "intermediate_size", 64)),
        "mlp.down_proj.weight is [64, 128] in the checkpoint, [64, 64] by the config"),
    # transformers warns about the config on stderr before the model refuses to build.
    "a_pad_token_beyond_the_vocabulary": (
        lambda d: _edit_config(d, _set("text_config", "vocab_size", 505)),
        "cannot load the Qwen2.5-VL checkpoint"),
}


@pytest.mark.parametrize("case", list(WEIGHT_FILE_ERRORS))
def test_weight_files_that_do_not_fit_are_one_line_errors(capfd, checkpoints, tmp_path, case):
    """Errors in the weight files or their fit to config.json: one line on stderr (nothing of
    transformers' own before it), naming what is wrong; pickled weights are bounded too."""
    breaks, needle = WEIGHT_FILE_ERRORS[case]
    target = tmp_path / case
    shutil.copytree(checkpoints["qwen"], target)
    breaks(target)
    capfd.readouterr()  # what making the broken copy printed
    assert main(_generate(str(target), None, "--mode", "ar")) == EXIT_USER_ERROR
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hippo generate: error:"), err
    assert needle in err, err


def _rewrite_weights(directory: Path, source: str | None = None, drop: str | None = None,
                     rename: str | None = None) -> None:
    """Replace the checkpoint's weights by another checkpoint's, or drop or rename one tensor
    (a renamed one keeps the parameter count: only the names tell that it is missing)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(Path(source or directory) / "model.safetensors")
    for suffix, new_name in ((drop, None), (rename, "unknown.weight")):
        if suffix is not None:
            tensor = weights.pop(next(name for name in weights if name.endswith(suffix)))
            if new_name is not None:
                weights[new_name] = tensor
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("case", ["one_tensor_missing", "one_tensor_renamed",
                                  "weights_of_the_other_family"])
def test_weights_that_do_not_fill_the_model_are_one_line_errors(capsys, checkpoints, tmp_path,
                                                                 case):
    """transformers initialises parameters the weights lack at random and goes on: hippo must
    refuse instead of generating from a partly random model."""
    target = tmp_path / case
    shutil.copytree(checkpoints["qwen"], target)
    if case == "one_tensor_missing":
        _rewrite_weights(target, drop="layers.1.mlp.down_proj.weight")
    elif case == "one_tensor_renamed":
        _rewrite_weights(target, rename="layers.1.mlp.down_proj.weight")
    else:
        _rewrite_weights(target, source=checkpoints["llava"])
    assert main(_generate(str(target), None, "--mode", "ar")) == EXIT_USER_ERROR
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("hippo generate: error:") and "does not fit" in last, last


@pytest.mark.parametrize("family", ["qwen", "llava"])
def test_a_tokenizer_of_a_larger_vocabulary_is_refused_before_the_weights(
        capsys, checkpoints, tmp_path, family, weights_never_load):
    """The tiny models embed 512 ids; this tokenizer puts its special tokens (the chat
    template's <|im_start|>, eos) beyond them, which would fail in the embedding lookup of the
    first prompt (an IndexError) if not refused."""
    target = tmp_path / family
    shutil.copytree(checkpoints[family], target)
    _save_tokenizer(target, extra_words=tuple(f"word{index}" for index in range(600)))
    assert main(_generate(str(target), None, "--mode", "ar")) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"hippo generate: error: {target}:"), err
    assert "tokenizer and weights seem to come from different models" in err, err


PREPROCESSING_ERRORS = {  # family -> (file, content, what the error says after the file name)
    "qwen": ("video_preprocessor_config.json", b'{"min_pixels": 100000, "max_pixels": 100}',
             "min_pixels 100000 exceeds max_pixels 100"),
    "llava": ("preprocessor_config.json", b'{"image_std": [0.5, 0, 0.5]}',
              "image_std must not contain 0"),
}


def test_qwen_preprocessing_that_does_not_fit_the_vision_tower_is_named_before_the_weights_load(
        capsys, checkpoints, tmp_path, weights_never_load):
    """Settings valid on their own (16-pixel patches) but not the vision tower's (14): judged on
    the weightless skeleton, the error naming the checkpoint."""
    target = _broken_copy(checkpoints["qwen"], tmp_path / "qwen", "video_preprocessor_config.json",
                          b'{"patch_size": 16}')
    assert main(_generate(target, None, "--mode", "ar")) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"hippo generate: error: {target}: ") and "do not fit the vision tower" in err, err


@pytest.mark.parametrize("family", list(PREPROCESSING_ERRORS))
def test_preprocessing_errors_name_the_checkpoint_file_before_the_weights_load(
        capsys, checkpoints, tmp_path, family, weights_never_load):
    """With a target and a draft, the user must be told which checkpoint's file is wrong."""
    file, content, needle = PREPROCESSING_ERRORS[family]
    target = _broken_copy(checkpoints[family], tmp_path / family, file, content)
    assert main(_generate(target, None, "--mode", "ar")) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"hippo generate: error: {Path(target) / file}: ") and needle in err, err

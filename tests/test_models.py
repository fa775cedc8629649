"""Model adapters against the HF models they wrap (CPU, fp32, tiny random presets, synthetic frames).

Here hippo's preprocessing is checked against hand-computed arithmetic (smart_resize sizes, patch
layout, padding); tests/test_preprocess_vs_hf.py compares it with HF's own video processors."""
from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from hippo.models import HippoError, adapter_class, check_compatible, load_adapter
from hippo.models.checkpoint import check_token_ids_in_vocabulary
from hippo.models.llava_onevision import check_feature_layers
from hippo.models.preprocess import (QwenVideoPreprocess, SiglipVideoPreprocess, preprocess_qwen_video,
                                     preprocess_siglip_video, qwen_patchify, qwen_video_tokens,
                                     smart_resize)
from hippo.models.qwen2_5_vl import check_mrope_section
from hippo.models.presets import PRESETS

QWEN_PRESETS = ["tiny-qwen2.5-vl", "tiny-qwen2.5-vl-mha"]
LLAVA_PRESETS = ["tiny-llava-onevision", "tiny-llava-onevision-mha"]
PROMPT_IDS = [72, 105, 33, 7]


def make_frames(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), generator=g, dtype=torch.uint8)


_ADAPTERS: dict[str, object] = {}


def adapter(name: str):
    """One adapter per preset for the whole module (building is the slow part)."""
    if name not in _ADAPTERS:
        _ADAPTERS[name] = load_adapter(name, seed=1)
    return _ADAPTERS[name]


def adapter_logits(a, prepared) -> torch.Tensor:
    out = a.text_model(inputs_embeds=prepared.inputs_embeds, position_ids=prepared.position_ids, use_cache=False)
    return a.lm_head(out.last_hidden_state)


# -- exactness against the HF forward ---------------------------------------------------------------

@pytest.mark.parametrize("name,frames_shape", [
    (QWEN_PRESETS[0], (4, 56, 84)), (QWEN_PRESETS[1], (3, 50, 70)),
    (LLAVA_PRESETS[0], (2, 40, 60)), (LLAVA_PRESETS[1], (3, 56, 56))])
@torch.no_grad()
def test_prepared_logits_match_hf_forward(name, frames_shape):
    a = adapter(name)
    frames = make_frames(*frames_shape)
    prepared = a.prepare(frames, PROMPT_IDS)
    ref = a.model(**a.hf_inputs(frames, PROMPT_IDS), use_cache=False).logits
    got = adapter_logits(a, prepared)
    assert got.shape == ref.shape == (1, prepared.length, a.vocab_size)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", QWEN_PRESETS + LLAVA_PRESETS)
@torch.no_grad()
def test_generated_positions_continue_like_hf(name):
    """A token appended after the prompt, run at generated_positions(0, 1) over a cache of the prompt,
    gives the logits of HF's full forward on the longer sequence (this pins rope_delta)."""
    from transformers import DynamicCache

    a = adapter(name)
    frames = make_frames(3, 56, 56, seed=2)
    prepared = a.prepare(frames, PROMPT_IDS)
    cache = DynamicCache(config=a.text_model.config)
    a.text_model(inputs_embeds=prepared.inputs_embeds, position_ids=prepared.position_ids,
                 past_key_values=cache, use_cache=True)
    token = 42
    step_embeds = a.text_model.embed_tokens(torch.tensor([[token]]))
    step = a.text_model(inputs_embeds=step_embeds, position_ids=prepared.generated_positions(0, 1),
                        past_key_values=cache, use_cache=True)
    step_logits = a.lm_head(step.last_hidden_state)[:, -1]
    longer = a.hf_inputs(frames, PROMPT_IDS + [token])
    # The appended id sits after the suffix in the HF run: rebuild its input_ids to match the cache order.
    ids = torch.cat([prepared.input_ids, torch.tensor([[token]])], dim=1)
    longer["input_ids"] = ids
    longer["attention_mask"] = torch.ones_like(ids)
    if "mm_token_type_ids" in longer:
        longer["mm_token_type_ids"] = (ids == a.model.config.video_token_id).to(torch.int32) * 2
    ref = a.model(**longer, use_cache=False).logits[:, -1]
    torch.testing.assert_close(step_logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", QWEN_PRESETS)
@torch.no_grad()
def test_qwen_positions_equal_hf_generation_positions(name):
    a = adapter(name)
    frames = make_frames(5, 60, 90, seed=3)
    for fps in (None, 2.0, 0.5):
        prepared = a.prepare(frames, PROMPT_IDS, fps=fps)
        kwargs = a.generate_kwargs(frames, PROMPT_IDS, fps=fps)
        input_ids = kwargs["input_ids"]
        # The path HF generate takes: [text positions; 3-D positions], rope_deltas stored on the model.
        hf = a.model._prepare_position_ids_for_generation(input_ids, dict(kwargs))
        torch.testing.assert_close(prepared.position_ids, hf[1:])
        # generate then extends position_ids by one per token from the last prompt token (not
        # from the largest position, which its rope_deltas count from).
        following = hf[1:, :, -1:] + 1 + torch.arange(3)
        torch.testing.assert_close(prepared.generated_positions(0, 3), following)


@torch.no_grad()
def test_qwen_positions_by_hand():
    """prefix 1 token, vision_start, video grid (t=2, 2x2), vision_end, 4 text ids, suffix 1 token."""
    a = adapter(QWEN_PRESETS[0])
    prepared = a.prepare(make_frames(4, 56, 56), PROMPT_IDS)  # fps None: 1 s per grid, tokens_per_second 2
    assert prepared.grid == (2, 2, 2)
    t_ids = [0, 1] + [2] * 4 + [4] * 4 + [4, 5, 6, 7, 8, 9]
    h_ids = [0, 1] + [2, 2, 3, 3] * 2 + [4, 5, 6, 7, 8, 9]
    w_ids = [0, 1] + [2, 3, 2, 3] * 2 + [4, 5, 6, 7, 8, 9]
    assert prepared.position_ids[:, 0].tolist() == [t_ids, h_ids, w_ids]
    assert prepared.rope_delta == 10 - prepared.length
    assert prepared.generated_positions(0, 2)[:, 0].tolist() == [[10, 11]] * 3


# -- spans, grids, features --------------------------------------------------------------------------

@pytest.mark.parametrize("name", QWEN_PRESETS)
@torch.no_grad()
def test_qwen_visual_span_grid_features(name):
    a = adapter(name)
    cfg = a.model.config
    prepared = a.prepare(make_frames(3, 50, 70), PROMPT_IDS)  # 3 frames -> 4; 50x70 -> 56x56
    t, hg, wg = prepared.grid
    assert (t, hg, wg) == (2, 2, 2)
    ids = prepared.input_ids[0]
    start, n = prepared.visual_start, prepared.num_visual
    assert n == t * hg * wg
    assert (ids[start:start + n] == cfg.video_token_id).all()
    assert int((ids == cfg.video_token_id).sum()) == n
    assert int(ids[start - 1]) == cfg.vision_start_token_id and int(ids[start + n]) == cfg.vision_end_token_id
    hidden = cfg.text_config.hidden_size
    assert prepared.visual_features.shape == (t, hg, wg, hidden)
    torch.testing.assert_close(prepared.inputs_embeds[0, start:start + n], prepared.visual_features.reshape(n, -1))
    assert prepared.inputs_embeds.shape == (1, prepared.length, hidden)
    assert prepared.position_ids.shape == (3, 1, prepared.length)


@torch.no_grad()
def test_qwen_grid_of_wide_frames_is_hfs_rows_by_columns():
    """56x112 frames make a grid of 2 rows by 4 columns: prepared.grid, the features laid out in
    it and the M-RoPE height and width positions all follow HF's video_grid_thw (t, h, w)."""
    a = adapter(QWEN_PRESETS[0])
    frames = make_frames(4, 56, 112)
    prepared = a.prepare(frames, PROMPT_IDS)
    inputs = a.hf_inputs(frames, PROMPT_IDS)
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 8]]  # patches; merged 2x2 to tokens
    assert prepared.grid == (2, 2, 4)
    features = a.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    torch.testing.assert_close(prepared.visual_features, torch.cat(features.pooler_output).reshape(2, 2, 4, -1))
    start, n = prepared.visual_start, prepared.num_visual
    span = prepared.position_ids[:, 0, start:start + n].reshape(3, 2, 2, 4) - start
    assert span[1, 1].tolist() == [[0] * 4, [1] * 4] and span[2, 1].tolist() == [[0, 1, 2, 3]] * 2


@pytest.mark.parametrize("name,side", [(LLAVA_PRESETS[0], 2), (LLAVA_PRESETS[1], 3)])
@torch.no_grad()
def test_llava_visual_span_grid_features(name, side):
    a = adapter(name)
    frames = make_frames(3, 33, 47)
    prepared = a.prepare(frames, PROMPT_IDS)
    assert prepared.grid == (3, side, side)
    ids = prepared.input_ids[0]
    start, n = prepared.visual_start, prepared.num_visual
    assert n == 3 * side * side + 1  # + the newline
    assert (ids[start:start + n] == a.model.config.video_token_id).all()
    assert int((ids == a.model.config.video_token_id).sum()) == n
    hidden = a.model.config.text_config.hidden_size
    assert prepared.visual_features.shape == (3, side, side, hidden)
    grid_tokens = 3 * side * side
    torch.testing.assert_close(prepared.inputs_embeds[0, start:start + grid_tokens],
                               prepared.visual_features.reshape(grid_tokens, -1))
    torch.testing.assert_close(prepared.inputs_embeds[0, start + grid_tokens], a.model.model.image_newline)
    assert prepared.position_ids.tolist() == [list(range(prepared.length))]
    assert prepared.rope_delta == 0


@pytest.mark.parametrize("newline_from", ["forward", "get_video_features"])
@torch.no_grad()
def test_llava_video_newline_whichever_transformers_adds_it(newline_from, monkeypatch):
    """transformers up to 5.17 appends the video's newline embedding in the forward, 5.18 on in
    get_video_features: prepare() places exactly one either way."""
    a = adapter(LLAVA_PRESETS[0])
    frames = make_frames(2, 56, 56, seed=3)
    expected = a.prepare(frames, PROMPT_IDS)
    vlm, grid_tokens = a.model.model, math.prod(expected.grid)
    plain, calls = vlm.get_video_features, []

    def features(*args, **kwargs):
        out = plain(*args, **kwargs)
        calls.append(out.pooler_output.shape[1])
        if newline_from == "get_video_features" and out.pooler_output.shape[1] == grid_tokens:
            newline = vlm.image_newline[None, None, :].repeat(out.pooler_output.shape[0], 1, 1)
            out.pooler_output = torch.cat((out.pooler_output, newline), dim=1)
        return out

    monkeypatch.setattr(vlm, "get_video_features", features)
    prepared = a.prepare(frames, PROMPT_IDS)
    assert calls, "prepare() did not ask get_video_features"
    assert torch.equal(prepared.inputs_embeds, expected.inputs_embeds)
    assert torch.equal(prepared.visual_features, expected.visual_features)


# -- HF generate with the adapter's kwargs -----------------------------------------------------------

@pytest.mark.parametrize("name", [QWEN_PRESETS[0], LLAVA_PRESETS[0]])
@torch.no_grad()
def test_hf_generate_runs_and_is_deterministic(name):
    a = adapter(name)
    frames = make_frames(2, 56, 56, seed=4)
    kwargs = a.generate_kwargs(frames, "hi")
    runs = [a.model.generate(**a.generate_kwargs(frames, "hi"), max_new_tokens=6, do_sample=False)
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    prompt_len = kwargs["input_ids"].shape[1]
    assert runs[0].shape[1] > prompt_len
    # Its first token is the argmax of the adapter's last-position logits.
    first = adapter_logits(a, a.prepare(frames, "hi"))[0, -1].argmax()
    assert int(runs[0][0, prompt_len]) == int(first)


# -- preprocessing arithmetic ------------------------------------------------------------------------

@pytest.mark.parametrize("hw,expected", [
    ((56, 84), (56, 84)),      # already multiples of 28
    ((50, 70), (56, 56)),      # round(2.5) == 2 (round half to even, as Python and HF)
    ((300, 200), (112, 84)),   # over max_pixels 112*112: beta = sqrt(60000 / 12544)
    ((10, 30), (56, 112)),     # under min_pixels 56*56: beta = sqrt(3136 / 300), ceil
    ((1, 150), (28, 700)),     # one pixel high is a frame (HF's size too)
    ((150, 1), (700, 28)),
])
def test_smart_resize_by_hand(hw, expected):
    assert smart_resize(*hw, factor=28, min_pixels=56 * 56, max_pixels=112 * 112) == expected


def test_smart_resize_limits_are_inclusive():
    """HF's bounds: a rounded size of exactly max_pixels stays (not shrunk to 84x140), an aspect
    ratio of exactly 200 is allowed."""
    assert smart_resize(100, 130, factor=28, min_pixels=56 * 56, max_pixels=112 * 140) == (112, 140)
    assert smart_resize(28, 5600, factor=28, min_pixels=28 * 28, max_pixels=28 * 5600) == (28, 5600)
    with pytest.raises(HippoError, match="aspect ratio must be below 200"):
        smart_resize(28, 5628, factor=28, min_pixels=28 * 28, max_pixels=28 * 5628)


def test_smart_resize_rejects_extreme_aspect():
    with pytest.raises(HippoError):
        smart_resize(1, 300, factor=28, min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.mark.parametrize("height, width", [(0, 0), (0, 56), (56, -3), (56, 0)])
def test_frame_sizes_that_are_not_positive_are_refused(height, width):
    """A damaged video may report frames of 0x0: a clear error, not a ZeroDivisionError."""
    with pytest.raises(HippoError, match=f"positive height and width, got {height}x{width}"):
        smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=112 * 112)
    with pytest.raises(HippoError, match="positive height and width"):
        qwen_video_tokens(4, height, width, QwenVideoPreprocess())
    with pytest.raises(HippoError, match="positive height and width"):
        adapter(QWEN_PRESETS[0]).visual_tokens(4, height, width)


def test_a_video_of_no_frames_has_no_token_count():
    with pytest.raises(HippoError, match="at least one frame, got 0"):
        qwen_video_tokens(0, 56, 56, QwenVideoPreprocess())


def test_qwen_patchify_layout_by_hand():
    p, m, tp = 2, 2, 2
    video = torch.arange(4 * 3 * 8 * 4, dtype=torch.float32).reshape(4, 3, 8, 4)  # T C H W
    flat, grid = qwen_patchify(video, p, m, tp)
    assert grid == (2, 4, 2)
    assert flat.shape == (2 * 4 * 2, 3 * tp * p * p)
    for t in range(2):
        for hb in range(2):
            for wb in range(1):
                for my in range(m):
                    for mx in range(m):
                        row = ((t * 2 + hb) * 1 + wb) * m * m + my * m + mx
                        y0, x0 = (hb * m + my) * p, (wb * m + mx) * p
                        expect = video[t * tp:(t + 1) * tp, :, y0:y0 + p, x0:x0 + p].permute(1, 0, 2, 3)
                        assert torch.equal(flat[row], expect.reshape(-1))


@pytest.mark.parametrize("frames,grid_t", [(1, 1), (2, 1), (5, 3), (6, 3)])
def test_qwen_odd_frame_counts_repeat_last_frame(frames, grid_t):
    cfg = QwenVideoPreprocess(min_pixels=56 * 56, max_pixels=112 * 112)
    video = make_frames(frames, 56, 56)
    pixels, grid_thw = preprocess_qwen_video(video, cfg)
    assert grid_thw.tolist() == [[grid_t, 4, 4]]
    assert pixels.shape == (grid_t * 16, 3 * 2 * 14 * 14)
    if frames % 2:
        # The last temporal patch holds the last frame twice.
        last = pixels[-16:].reshape(16, 3, 2, 14 * 14)
        assert torch.equal(last[:, :, 0], last[:, :, 1])


def test_normalisation_without_resize_is_exact():
    cfg = QwenVideoPreprocess(min_pixels=56 * 56, max_pixels=112 * 112)
    video = make_frames(2, 28 * 2, 28 * 2)
    pixels, _ = preprocess_qwen_video(video, cfg)
    # Row 0, channel 0, first frame, top-left patch pixel (0, 0).
    expected = (video[0, 0, 0, 0].item() / 255 - cfg.mean[0]) / cfg.std[0]
    assert abs(pixels[0, 0].item() - expected) < 1e-6
    siglip = preprocess_siglip_video(video, SiglipVideoPreprocess(size=56))
    assert siglip.shape == (1, 2, 3, 56, 56)
    assert abs(siglip[0, 1, 2, 5, 7].item() - (video[1, 5, 7, 2].item() / 255 - 0.5) / 0.5) < 1e-6


def test_resize_keeps_constant_frames_and_rounds():
    frame = torch.full((1, 37, 53, 3), 200, dtype=torch.uint8)
    pixels = preprocess_siglip_video(frame, SiglipVideoPreprocess(size=70))
    torch.testing.assert_close(pixels, torch.full_like(pixels, (200 / 255 - 0.5) / 0.5))
    for level in (0, 255):  # black and white stay exactly so (the clamp's bounds), up and down
        for size in (70, 20):
            flat = torch.full((1, 37, 53, 3), level, dtype=torch.uint8)
            values = preprocess_siglip_video(flat, SiglipVideoPreprocess(size=size, mean=(0, 0, 0),
                                                                         std=(1, 1, 1))) * 255
            torch.testing.assert_close(values, torch.full_like(values, float(level)), rtol=0, atol=1e-4)
    noisy = preprocess_siglip_video(make_frames(1, 37, 53), SiglipVideoPreprocess(size=70, mean=(0, 0, 0),
                                                                                      std=(1, 1, 1)))
    values = noisy * 255
    assert values.min() >= 0 and values.max() <= 255
    torch.testing.assert_close(values, values.round(), rtol=0, atol=1e-4)


def test_bad_frames_raise():
    a = adapter(QWEN_PRESETS[0])
    with pytest.raises(HippoError, match="uint8"):
        a.prepare(torch.zeros(2, 56, 56, 3), PROMPT_IDS)
    with pytest.raises(HippoError, match=r"\[T, H, W, 3\]"):
        a.prepare(torch.zeros(56, 56, 3, dtype=torch.uint8), PROMPT_IDS)
    with pytest.raises(HippoError, match="token ids"):
        a.prepare(make_frames(2, 56, 56), [10_000])
    with pytest.raises(HippoError, match="placeholder"):
        a.prepare(make_frames(2, 56, 56), [1, a.model.config.video_token_id])


# -- registry and compatibility ----------------------------------------------------------------------

def test_string_prompts_use_the_byte_tokenizer():
    a = adapter(QWEN_PRESETS[0])
    prepared = a.prepare(make_frames(2, 56, 56), "Hi!")
    assert prepared.input_ids[0, -4:-1].tolist() == list(b"Hi!")
    assert a.tokenizer.decode(list(b"Hi!") + [a.eos_token_id]) == "Hi!"


def test_unknown_sources_raise(tmp_path):
    with pytest.raises(HippoError, match="neither a preset"):
        load_adapter("no-such-model-anywhere")
    with pytest.raises(HippoError, match="neither a preset"):
        load_adapter(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(HippoError, match="unsupported model type 'bert'; supported: "
                                         "qwen2_5_vl, llava_onevision$"):
        load_adapter(str(tmp_path))
    # A near miss says what to use instead (the original LLaVA-Video release format).
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_qwen"}))
    with pytest.raises(HippoError, match="'llava_qwen'.*Hugging Face conversion.*llava_onevision"):
        load_adapter(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({}))
    with pytest.raises(HippoError, match="model_type"):
        load_adapter(str(tmp_path))


def test_a_quantization_config_object_is_named_by_its_method():
    """config.json gives quantization_config as a dict; a config built in Python may hold
    transformers' object instead (quant_method an attribute): refused and named alike."""
    from transformers import Qwen2Config

    from hippo.models.checkpoint import check_not_quantized

    config = Qwen2Config()
    config.quantization_config = SimpleNamespace(quant_method="gptq", bits=4)
    with pytest.raises(HippoError, match=r"^config.json: quantization_config \(gptq\): "
                                         r"quantized checkpoints are not supported"):
        check_not_quantized(config)


def test_a_bad_device_or_dtype_is_named_before_building():
    with pytest.raises(HippoError, match="device 'cuda:99'"):
        load_adapter(QWEN_PRESETS[0], device="cuda:99")
    with pytest.raises(HippoError, match=r"^dtype must be one of float32, bfloat16, float16, got "
                                         r"'bfloat16'$"):
        load_adapter(QWEN_PRESETS[0], dtype="bfloat16")
    # Floating point, but not what hippo's kernels take: the first prefill's rotary_tables
    # raised a bare RuntimeError.
    for dtype in (torch.float64, torch.float8_e4m3fn):
        with pytest.raises(HippoError, match=f"dtype must be one of .*, got {dtype}$"):
            load_adapter(QWEN_PRESETS[0], dtype=dtype)


@pytest.mark.parametrize("model_type", [["qwen2_5_vl"], {"name": "qwen2_5_vl"}, 5, True])
def test_a_model_type_that_is_not_a_string_is_refused(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(HippoError, match=r"config.json: model_type must be a string naming the "
                                         r"model family \(qwen2_5_vl, llava_onevision\), got "):
        load_adapter(str(tmp_path))
    with pytest.raises(HippoError, match="model_type must be a string"):
        adapter_class(model_type)


def test_broken_checkpoint_directory_raises(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(HippoError):
        load_adapter(str(tmp_path))


def test_check_compatible():
    assert check_compatible(adapter(QWEN_PRESETS[0]), adapter(QWEN_PRESETS[1])) == 512
    assert check_compatible(adapter(LLAVA_PRESETS[1]), adapter(LLAVA_PRESETS[0])) == 512
    with pytest.raises(HippoError, match="^target and draft are not a compatible pair: tokenizers differ"):
        check_compatible(adapter(QWEN_PRESETS[0]), load_adapter("tiny-qwen2.5-vl-v640"))


def test_a_draft_of_another_family_is_reported_alone():
    with pytest.raises(HippoError) as raised:
        check_compatible(adapter(QWEN_PRESETS[0]), adapter(LLAVA_PRESETS[0]))
    assert str(raised.value) == ("target is qwen2_5_vl but draft is llava_onevision: a draft must be "
                                 "of the target's family")


@pytest.mark.parametrize("without", ["target", "draft"])
def test_a_tokenizer_on_one_side_only_names_the_side_without(without):
    pair = {"target": load_adapter(QWEN_PRESETS[0]), "draft": load_adapter(QWEN_PRESETS[1])}
    pair[without].tokenizer = None
    with_one = "draft" if without == "target" else "target"
    with pytest.raises(HippoError, match=f"^target and draft are not a compatible pair: the {without} "
                                         f"has no tokenizer but the {with_one} has one"):
        check_compatible(pair["target"], pair["draft"])


def test_a_draft_whose_logits_do_not_cover_the_tokenizer_is_refused():
    """The pair shares the smaller logits width: a draft wider than the tokenizer (a padded
    embedding table, as Qwen2.5-VL 7B's 152064 vs 3B's 151936) is a pair of that width, one
    narrower could never propose some of the tokenizer's ids. Without tokenizers the widths
    must be equal."""
    target, draft = load_adapter(QWEN_PRESETS[0]), load_adapter(QWEN_PRESETS[1])
    hidden = draft.lm_head.in_features
    draft.model.lm_head = torch.nn.Linear(hidden, 520, bias=False)
    assert check_compatible(target, draft) == 512
    assert check_compatible(draft, target) == 512
    draft.model.lm_head = torch.nn.Linear(hidden, 500, bias=False)
    with pytest.raises(HippoError, match=r"^target and draft are not a compatible pair: vocab size 512 vs 500$"):
        check_compatible(target, draft)
    target.tokenizer = draft.tokenizer = None  # prompts are token ids then
    draft.model.lm_head = torch.nn.Linear(hidden, 512, bias=False)
    assert check_compatible(target, draft) == 512
    draft.model.lm_head = torch.nn.Linear(hidden, 520, bias=False)
    with pytest.raises(HippoError, match=r"^target and draft are not a compatible pair: vocab size 512 vs 520$"):
        check_compatible(target, draft)


@pytest.mark.parametrize("differs", ["video_token_id", "vision_end_token_id", "prefix", "suffix"])
def test_a_draft_with_other_special_or_chat_ids_is_refused(differs):
    """Each special id the adapters place in a prompt, and the chat-format ids on either side of
    the user's text, must be the target's: otherwise the two prompts differ."""
    target, draft = load_adapter(QWEN_PRESETS[0]), load_adapter(QWEN_PRESETS[1])
    if differs == "prefix":
        draft.prompt_prefix_ids = draft.prompt_prefix_ids + [7]
        message = "chat-format ids around the prompt"
    elif differs == "suffix":
        draft.prompt_suffix_ids = [7] + draft.prompt_suffix_ids
        message = "chat-format ids around the prompt"
    else:
        value = getattr(target.model.config, differs)
        setattr(draft.model.config, differs, value + 9)
        message = f"{differs} {value} vs {value + 9}$"
    with pytest.raises(HippoError, match=f"^target and draft are not a compatible pair: {message}"):
        check_compatible(target, draft)


def test_tokenizer_differences_name_what_differs():
    """What a user must fix: the size, the eos id or the kind; the pad id alone is no difference
    (no prompt holds it)."""
    from hippo.models.pairing import tokenizer_difference
    from hippo.models.tokenizer import PromptTokenizer
    from hippo.models.presets import ByteTokenizer

    class Other(PromptTokenizer):
        vocab_size, eos_token_id, pad_token_id = 512, 504, 505

    assert tokenizer_difference(None, None) is None
    assert tokenizer_difference(ByteTokenizer(512), ByteTokenizer(512, pad_token_id=7)) is None
    assert tokenizer_difference(ByteTokenizer(512), ByteTokenizer(640)) == \
        "tokenizers differ (512 vs 640 ids)"
    assert tokenizer_difference(ByteTokenizer(512, eos_token_id=504),
                                ByteTokenizer(512, eos_token_id=505)) == \
        "tokenizers differ (eos id 504 vs 505)"
    assert tokenizer_difference(ByteTokenizer(512), Other()) == \
        "tokenizers differ (of different kinds)"


def test_eos_ids_are_the_tokenizers_then_the_generation_configs():
    """As HF generate stops: the tokenizer's eos first, then generation_config.json's (an id or
    a list), each once; without a tokenizer the generation config's first id is the eos."""
    a = load_adapter(QWEN_PRESETS[0])
    eos = a.tokenizer.eos_token_id
    for configured, expected in (([7, eos, 9], [eos, 7, 9]), (7, [eos, 7]), (eos, [eos]),
                                 (None, [eos]), ([], [eos])):
        a.model.generation_config.eos_token_id = configured
        assert (a.eos_token_id, a.eos_token_ids) == (eos, expected), configured
    a.tokenizer.eos_token_id = None  # a tokenizer without an eos token
    a.model.generation_config.eos_token_id = [7, 9]
    assert (a.eos_token_id, a.eos_token_ids) == (7, [7, 9])
    a.tokenizer = None
    for configured, first, expected in (([7, 9, 7], 7, [7, 9]), ((9,), 9, [9]), (9, 9, [9]),
                                        ([], None, []), (None, None, [])):
        a.model.generation_config.eos_token_id = configured
        assert (a.eos_token_id, a.eos_token_ids) == (first, expected), configured


def test_prompt_ids_are_checked_at_the_vocabulary_bounds():
    import numpy as np

    a = adapter(QWEN_PRESETS[0])
    assert a.encode_prompt([0, a.vocab_size - 1]) == [0, a.vocab_size - 1]
    assert a.encode_prompt((np.int64(3), 4)) == [3, 4]
    assert a.encode_prompt("Hi") == list(b"Hi")
    for bad in ([-1], [a.vocab_size], [3, a.vocab_size + 7]):
        with pytest.raises(HippoError, match=r"^prompt token ids must lie in \[0, 512\)$"):
            a.encode_prompt(bad)
    for bad in ([True], [1.0], ["3"]):
        with pytest.raises(HippoError, match="^a prompt given as a list must hold integer token ids$"):
            a.encode_prompt(bad)
    for placeholder in (a.model.config.video_token_id, a.model.config.image_token_id):
        with pytest.raises(HippoError, match="must not contain video or image placeholder tokens"):
            a.encode_prompt([3, placeholder])
    with pytest.raises(HippoError, match="^prompt must be a str or a list of token ids, got int$"):
        a.encode_prompt(3)
    without = load_adapter(QWEN_PRESETS[0])
    without.tokenizer = None
    assert without.encode_prompt([72, 105]) == [72, 105]
    with pytest.raises(HippoError, match="^qwen2_5_vl model has no tokenizer: pass the prompt as token ids$"):
        without.encode_prompt("Hi")


def test_presets_are_named_and_buildable():
    assert sum(p.family == "qwen2_5_vl" for p in PRESETS.values()) >= 2
    assert sum(p.family == "llava_onevision" for p in PRESETS.values()) >= 2
    gqa = adapter(QWEN_PRESETS[0]).model.config.text_config
    assert gqa.num_key_value_heads < gqa.num_attention_heads
    mha = adapter(QWEN_PRESETS[1]).model.config.text_config
    assert mha.num_key_value_heads == mha.num_attention_heads
    a = adapter(LLAVA_PRESETS[0])
    assert hasattr(a.text_model, "embed_tokens") and hasattr(a.text_model, "rotary_emb")
    assert a.eos_token_id == 504 and a.vocab_size == 512


def test_the_tiny_vocabularies_special_ids_are_distinct_and_above_the_bytes():
    from hippo.models import presets

    ids = [presets.VIDEO_TOKEN_ID, presets.IMAGE_TOKEN_ID, presets.VISION_START_TOKEN_ID,
           presets.VISION_END_TOKEN_ID, presets.EOS_TOKEN_ID, presets.PAD_TOKEN_ID,
           presets.USER_TURN_ID, presets.ASSISTANT_TURN_ID]
    assert len(set(ids)) == len(ids) and all(256 <= i < 512 for i in ids)


def test_an_unknown_preset_lists_the_known_ones():
    from hippo.models.presets import get_preset

    assert get_preset("tiny-qwen2.5-vl") is PRESETS["tiny-qwen2.5-vl"]
    with pytest.raises(HippoError, match="unknown preset 'tiny'; known: demo-qwen2.5-vl, "):
        get_preset("tiny")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_is_what_its_notes_say(name):
    """The notes document a preset: its heads (GQA/MHA q/kv), layers, head_dim and LLaVA patch
    grid are the config's; one 512-id vocabulary per family but for the -v640 presets, which are
    their base preset with another vocabulary (a mismatched pair on purpose)."""
    preset = PRESETS[name]
    config = preset.qwen_config() if preset.family == "qwen2_5_vl" else preset.llava_config()
    text = config.text_config
    head_dim, rest = divmod(text.hidden_size, text.num_attention_heads)
    assert rest == 0 and text.num_attention_heads % text.num_key_value_heads == 0
    assert text.vocab_size == preset.tokenizer().vocab_size == (640 if name.endswith("-v640") else 512)
    if name.endswith("-v640"):
        base = PRESETS[name.removesuffix("-v640")]
        assert (preset.family, preset.vision_image_size) == (base.family, base.vision_image_size)
        assert preset.text.__class__(**{**vars(base.text), "vocab_size": 640}) == preset.text
    notes = preset.notes
    if heads := re.search(r"(GQA|MHA) (\d+)/(\d+)", notes):
        q, kv = int(heads[2]), int(heads[3])
        assert (text.num_attention_heads, text.num_key_value_heads) == (q, kv)
        assert (heads[1] == "MHA") == (q == kv)
    if dim := re.search(r"head_dim (\d+)", notes):
        assert head_dim == int(dim[1])
    if layers := re.search(r"(\d+) layers?\b", notes):
        assert text.num_hidden_layers == int(layers[1])
    if grid := re.search(r"(\d+)x\1 patches pooled to (\d+)x\2", notes):
        side = preset.vision_image_size // config.vision_config.patch_size
        assert (side, math.ceil(side / 2)) == (int(grid[1]), int(grid[2]))
    if "same 56-px frames" in notes:
        assert preset.vision_image_size == PRESETS["tiny-llava-onevision"].vision_image_size == 56
    if preset.family == "qwen2_5_vl":  # mrope_section sums to head_dim / 2
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
        # Tiny videos stay at a handful of tokens: 56x56 .. 112x112 pixels per frame.
        assert (preset.qwen_preprocess().min_pixels, preset.qwen_preprocess().max_pixels) == (
            56 * 56, 112 * 112)


@pytest.mark.parametrize("name", QWEN_PRESETS + LLAVA_PRESETS)
@pytest.mark.parametrize("t,h,w", [(1, 56, 56), (3, 57, 75), (4, 30, 200), (5, 112, 84)])
def test_visual_tokens_are_known_before_decoding(name, t, h, w):
    """The count the pipeline checks against the context before decoding a video is the one
    prepare() produces (awkward sizes, one frame, odd frame counts)."""
    a = adapter(name)
    prepared = a.prepare(make_frames(t, h, w), PROMPT_IDS)
    assert a.visual_tokens(t, h, w) == prepared.num_visual
    assert a.max_positions == a.text_model.config.max_position_embeddings



# -- config values checked when a model is loaded ----------------------------------------------------

@pytest.mark.parametrize("value", [512, -1, 10**6, None, "500"])
def test_special_token_ids_must_index_the_embeddings(value):
    """An id beyond the vocabulary would only fail in the embedding lookup of the first prompt."""
    model = adapter(QWEN_PRESETS[0]).model
    fake = SimpleNamespace(config=SimpleNamespace(video_token_index=value),
                           get_input_embeddings=model.get_input_embeddings)
    with pytest.raises(HippoError, match=r"config.json: video_token_index is .*, not a token id "
                                         r"of this model \(its vocabulary holds ids 0 to 511\)"):
        check_token_ids_in_vocabulary(fake, {"video_token_index": "video_token_index"})
    fake.config.video_token_index = 511
    check_token_ids_in_vocabulary(fake, {"video_token_index": "video_token_index"})


def _text_config(**values):
    base = {"max_position_embeddings": 128, "rms_norm_eps": 1e-6, "num_attention_heads": 4,
            "num_key_value_heads": 2}
    base.update(values)
    config = SimpleNamespace(**{k: v for k, v in base.items() if v is not None})
    return SimpleNamespace(model=SimpleNamespace(language_model=SimpleNamespace(config=config)))


@pytest.mark.parametrize("values, message", [
    ({}, None), ({"max_position_embeddings": 1}, None), ({"max_position_embeddings": None}, None),
    ({"rms_norm_eps": 0.0}, None), ({"rms_norm_eps": None}, None), ({"rms_norm_eps": 1}, None),
    ({"num_key_value_heads": None}, None), ({"num_key_value_heads": 4}, None),
    ({"num_key_value_heads": 1}, None),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
    ({"max_position_embeddings": -5}, "max_position_embeddings must be a positive integer"),
    ({"max_position_embeddings": 128.0}, "max_position_embeddings must be a positive integer"),
    ({"max_position_embeddings": True}, "max_position_embeddings must be a positive integer"),
    ({"rms_norm_eps": -1e-9}, "rms_norm_eps must be a finite number >= 0"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number >= 0"),
    ({"rms_norm_eps": float("inf")}, "rms_norm_eps must be a finite number >= 0"),
    ({"rms_norm_eps": True}, "rms_norm_eps must be a finite number >= 0"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a finite number >= 0"),
    ({"num_key_value_heads": 3}, (r"num_attention_heads \(4\) must be a positive multiple of "
                                  r"num_key_value_heads \(3\)")),
    ({"num_key_value_heads": 8}, r"num_attention_heads \(4\) must be a positive multiple"),
    ({"num_attention_heads": -4}, r"num_attention_heads \(-4\) must be"),
    ({"num_key_value_heads": -2}, r"num_attention_heads \(4\) must be .* \(-2\)"),
    ({"num_key_value_heads": 0}, r"num_attention_heads \(4\) must be .* \(0\)"),
    ({"num_attention_heads": 4.0}, r"num_attention_heads \(4.0\) must be"),
    ({"num_key_value_heads": 2.0}, r"num_attention_heads \(4\) must be .* \(2.0\)"),
    ({"num_attention_heads": None, "num_key_value_heads": None}, r"num_attention_heads \(None\) must be"),
], ids=lambda v: str(v).replace(" ", ""))
def test_text_config_values_at_their_bounds(values, message):
    """One position is a context; eps 0 is a valid RMSNorm; kv heads default to the query
    heads (transformers' rule) and must divide them."""
    from hippo.models.checkpoint import check_text_config

    if message is None:
        check_text_config(_text_config(**values))
        return
    with pytest.raises(HippoError, match=f"^config.json: {message}"):
        check_text_config(_text_config(**values))


def test_the_tokenizers_own_ids_must_index_the_embeddings():
    """The chat-format ids and eos that the adapter feeds the model itself: ids 0 .. rows-1
    pass, the largest one beyond is named; no tokenizer (prompts of ids) checks nothing."""
    from hippo.models.checkpoint import check_tokenizer_fits_embeddings
    from hippo.models.presets import ByteTokenizer

    model = adapter(QWEN_PRESETS[0]).model  # 512 rows
    check_tokenizer_fits_embeddings(model, "ckpt", ByteTokenizer(512, eos_token_id=511), [0, 511])
    check_tokenizer_fits_embeddings(model, "ckpt", ByteTokenizer(512, eos_token_id=None), [5])
    check_tokenizer_fits_embeddings(model, "ckpt", None, [9999])
    for ids, eos, role, shown in (([3, 600, 512], 5, "the chat template", 600), ([-1], 5, "the chat template", -1),
                                  ([3], 512, "eos", 512)):
        with pytest.raises(HippoError, match=rf"^ckpt: the tokenizer gives {role} token id {shown}, but "
                                             r"the weights embed ids 0 to 511 only: tokenizer and "
                                             r"weights seem to come from different models$"):
            check_tokenizer_fits_embeddings(model, "ckpt", ByteTokenizer(512, eos_token_id=eos), ids)


@pytest.mark.parametrize("layer, valid", [
    (-1, True), (-3, True), (2, True), (0, True), ([-1, -2], True),
    (-4, False), (3, False), (-50, False), ([-1, 7], False), ([], False), (True, False),
    ("-1", False), (1.0, False)])
def test_vision_feature_layer_must_index_the_hidden_states(layer, valid):
    """A 2-layer vision tower has 3 hidden states (the embeddings first): indices -3 .. 2."""
    config = SimpleNamespace(vision_config=SimpleNamespace(num_hidden_layers=2),
                             vision_feature_layer=layer)
    if valid:
        check_feature_layers(config)
        return
    with pytest.raises(HippoError, match=r"vision_feature_layer .* with 2 layers it must be an "
                                         r"integer from -3 to 2"):
        check_feature_layers(config)


@pytest.mark.parametrize("sections, message", [
    ([1, 1, 1], r"mrope_section \[1, 1, 1\] does not fit head_dim 16: .* summing to 8"),
    ([0, 4, 4], r"mrope_section \[0, 4, 4\] does not fit head_dim 16"),
    (None, r"gives no mrope_section .* default \[16, 24, 24\] does not fit head_dim 16"),
    # transformers splits the rotary frequencies by them: whole sizes only, in a list.
    ([2.0, 3, 3], r"mrope_section \[2.0, 3, 3\] does not fit head_dim 16"),
    (8, r"mrope_section 8 does not fit head_dim 16")])
def test_mrope_sections_must_fit_the_head_dim(monkeypatch, sections, message):
    """tiny-qwen2.5-vl has head_dim 16: its sections (2, 3, 3) sum to 8; others would fail in
    the rotary kernel of the first prefill. Missing, transformers takes its default."""
    model = adapter(QWEN_PRESETS[0]).model
    check_mrope_section(model)
    rope = model.config.text_config.rope_parameters
    if sections is None:
        monkeypatch.delitem(rope, "mrope_section")
        sections = [16, 24, 24]  # what transformers then builds the rotary module with
    else:
        monkeypatch.setitem(rope, "mrope_section", sections)
    monkeypatch.setattr(model.model.language_model.rotary_emb, "mrope_section", sections)
    with pytest.raises(HippoError, match=message):
        check_mrope_section(model)


@torch.no_grad()
def test_an_fps_too_low_for_mrope_positions_is_refused():
    """Seconds per temporal patch (2 / fps) times tokens_per_second (2) spaces the patches'
    temporal positions; beyond 32-bit positions transformers overflows. 0.001 fps (36 frames of
    ten hours) is fine: patches 4000 positions apart."""
    a = adapter(QWEN_PRESETS[0])
    frames = make_frames(4, 56, 56)
    for fps in (1e-25, 1e-300, 5e-324):
        with pytest.raises(HippoError, match=r"fps .* is too low: .* sample at fps >= "):
            a.prepare(frames, PROMPT_IDS, fps=fps)
    with pytest.raises(HippoError, match="too low"):  # one patch alone is spaced as well
        a.prepare(frames[:1], PROMPT_IDS, fps=1e-25)
    prepared = a.prepare(frames, PROMPT_IDS, fps=0.001)
    start, tokens_per_patch = prepared.visual_start, prepared.num_visual // 2
    temporal = prepared.position_ids[0, 0]
    assert int(temporal[start + tokens_per_patch] - temporal[start]) == 4000


@pytest.mark.parametrize("sections", [[1, 3, 4], (2, 3, 3), [8]])
def test_mrope_sections_of_one_frequency_fit(monkeypatch, sections):
    model = adapter(QWEN_PRESETS[0]).model
    monkeypatch.setitem(model.config.text_config.rope_parameters, "mrope_section", sections)
    monkeypatch.setattr(model.model.language_model.rotary_emb, "mrope_section", sections)
    check_mrope_section(model)


def test_mrope_sections_that_do_not_fit_a_config_without_rope_parameters(monkeypatch):
    model = adapter(QWEN_PRESETS[0]).model
    monkeypatch.setattr(model.config.text_config, "rope_parameters", None)
    check_mrope_section(model)  # the rotary module's own sections fit
    monkeypatch.setattr(model.model.language_model.rotary_emb, "mrope_section", [16, 24, 24])
    with pytest.raises(HippoError, match=r"gives no mrope_section .* \[16, 24, 24\] does not fit head_dim 16"):
        check_mrope_section(model)


@pytest.mark.parametrize("window, patch, merge, valid", [
    (28, 14, 2, True), (112, 14, 2, True), (2, 1, 2, True), (14, 14, 1, True),
    (27, 14, 2, False), (1, 1, 2, False), (13, 14, 1, False), (None, 14, 2, False),
    ("112", 14, 2, False), (112.0, 14, 2, False),
    # No patch or merge size: check_preprocess_fits_vision names those, not the window.
    (None, 0, 2, True), (None, 14, 0, True), (None, -14, 2, True), (None, None, 2, True),
    (None, 14, None, True), (None, 14.0, 2, True)])
def test_the_vision_window_must_hold_a_merged_patch(window, patch, merge, valid):
    from hippo.models.qwen2_5_vl import check_vision_window

    model = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(
        window_size=window, patch_size=patch, spatial_merge_size=merge)))
    if valid:
        check_vision_window(model)
        return
    with pytest.raises(HippoError, match=rf"^config.json: vision_config.window_size must be an integer of "
                                         rf"at least patch_size x spatial_merge_size \({patch * merge}\), "
                                         rf"got {window!r}$"):
        check_vision_window(model)


def test_a_qwen_adapter_built_from_a_model_checks_it_and_its_preprocessing(monkeypatch):
    from dataclasses import replace

    from hippo.models.qwen2_5_vl import Qwen2_5_VLAdapter

    a = adapter(QWEN_PRESETS[0])
    ids = (a.prompt_prefix_ids, a.prompt_suffix_ids)
    with pytest.raises(HippoError, match=r"do not fit the vision tower: patch_size 16 vs patch_size 14$"):
        Qwen2_5_VLAdapter(a.model, a.tokenizer, replace(a.preprocess, patch_size=16), *ids)
    monkeypatch.setattr(a.model.config.vision_config, "window_size", 14)
    with pytest.raises(HippoError, match="window_size must be an integer of at least"):
        Qwen2_5_VLAdapter(a.model, a.tokenizer, a.preprocess, *ids)


@pytest.mark.parametrize("num_frames", [2, 4, 8])
@torch.no_grad()
def test_the_lowest_fps_for_mrope_positions_is_exact(num_frames):
    """The video's last temporal patch may sit 2**31 - 1 positions after its first, not one
    more: (temporal patches - 1, or 1 for one patch) x 2 frames a patch / fps x tokens_per_second
    2. The error names the lowest rate for this video (56x56: 4x4 patches, unlike its 1, 2, 4
    temporal patches)."""
    a = adapter(QWEN_PRESETS[0])
    frames = make_frames(num_frames, 56, 56)
    spacing = max(num_frames // 2 - 1, 1) * 2 * 2
    lowest, below = spacing / (2**31 - 1), spacing / 2**31
    a.prepare(frames, PROMPT_IDS, fps=lowest)
    message = (f"fps {below:g} is too low: the video's temporal positions would reach about 2.15e+09, "
               f"beyond the model's 2,147,483,647: sample at fps >= ")
    with pytest.raises(HippoError, match=f"^{re.escape(message)}") as refused:
        a.prepare(frames, PROMPT_IDS, fps=below)
    suggested = str(refused.value).rsplit(">= ", 1)[1]
    # three digits, rounded up (rounded down they were refused themselves), and taken
    assert len(suggested.split("e")[0].replace(".", "")) <= 3
    assert lowest <= float(suggested) < lowest * 1.01
    a.prepare(frames, PROMPT_IDS, fps=float(suggested))


def test_a_llava_adapter_built_from_a_model_checks_it_and_its_preprocessing(monkeypatch):
    from dataclasses import replace

    from hippo.models.llava_onevision import LlavaOnevisionAdapter

    a = adapter(LLAVA_PRESETS[0])
    ids = (a.prompt_prefix_ids, a.prompt_suffix_ids)
    with pytest.raises(HippoError, match="^frames are resized to 70 px but the vision tower takes 56 px$"):
        LlavaOnevisionAdapter(a.model, a.tokenizer, replace(a.preprocess, size=70), *ids)
    monkeypatch.setattr(a.model.config, "vision_feature_layer", 7)
    with pytest.raises(HippoError, match="vision_feature_layer 7 does not index"):
        LlavaOnevisionAdapter(a.model, a.tokenizer, a.preprocess, *ids)


@pytest.mark.parametrize("name", [QWEN_PRESETS[0], LLAVA_PRESETS[0]])
def test_a_preset_built_by_its_class_has_load_adapters_default_weights(name):
    built = adapter_class(PRESETS[name].family).from_preset(name)
    loaded = load_adapter(name)
    for (key, mine), theirs in zip(built.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(mine, theirs), key

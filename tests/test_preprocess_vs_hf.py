"""hippo's frame preprocessing against the HF video processors it stands in for (transformers 5.17).

HF's `Qwen2VLVideoProcessor` (Qwen2.5-VL) and `LlavaOnevisionVideoProcessor` import torchvision, a
test-only dependency: without it this module is skipped. Both sides get the same uint8 frames.

Tolerance. Shapes, grids and token counts must be equal. Pixel values are compared in grey levels: a
difference d after normalisation is d * std_c * 255 levels of channel c (one level is 1 / (255 * std_c):
0.0150 for CLIP's smallest std 0.2613, 0.0078 for SigLIP's 0.5). HF resizes uint8 frames on the CPU with
torchvision's uint8 kernel, which weighs pixels with fixed-point integer weights in each of its two
passes; hippo does the same passes in float32. Each pass can then round a value to the neighbouring
level, and a level moved by the first pass is spread by the second pass's weights (sum of |w| about 1.3
for bicubic), so a value can end up to 2 levels off (1 is the common case; 2 is seen in a few cases, mostly
when upscaling). The bounds: at most 2 levels anywhere, a mean under 0.05 levels and under 5% of values
differing at all (seen over these cases: mostly about 1%, at worst 3.3% of values one level off, for smooth
frames shrunk 300x200 -> 70x70), and every difference a whole number of levels, which pins
the rescale/normalise arithmetic, its order and the channel order to float rounding. Frames that need no
resize must match to float rounding. A resize done in one float pass (no rounding between the width and
the height pass) is off by up to ~25 levels on noisy frames, so these bounds catch it.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torchvision")

from transformers import (LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,  # noqa: E402
                          LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, PreTrainedTokenizerFast,
                          Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

from hippo.models import load_adapter  # noqa: E402
from hippo.models.presets import build_random_model  # noqa: E402
from hippo_testing import requires_cuda  # noqa: E402
from hippo.models.llava_onevision import LlavaOnevisionAdapter  # noqa: E402
from hippo.models.preprocess import (SIGLIP_MEAN, SIGLIP_STD, QwenVideoPreprocess,  # noqa: E402
                                     SiglipVideoPreprocess, preprocess_qwen_video, preprocess_siglip_video)
from hippo.models.presets import PRESETS, Preset  # noqa: E402
from hippo.models.qwen2_5_vl import Qwen2_5_VLAdapter  # noqa: E402

MAX_LEVELS = 2.0
MAX_MEAN_LEVELS = 0.05
MAX_DIFFERING_FRACTION = 0.05
PROMPT_IDS = [72, 105, 33, 7]

# Qwen2.5-VL settings: the tiny presets', Qwen2VLVideoProcessor's class defaults, and the pixel bounds of the
# released checkpoints' preprocessor_config.json (min 4 * 28 * 28, max 16384 * 28 * 28).
QWEN_SETTINGS = {
    "preset": PRESETS["tiny-qwen2.5-vl"].qwen_preprocess(),
    "hf-defaults": QwenVideoPreprocess(),
    "checkpoint": QwenVideoPreprocess(min_pixels=3136, max_pixels=12845056),
}
# LLaVA-OneVision: the presets' SigLIP sizes and the released 384 px; mean/std 0.5 as in the checkpoints.
SIGLIP_SIZES = [PRESETS["tiny-llava-onevision"].vision_image_size,
                PRESETS["tiny-llava-onevision-mha"].vision_image_size, 384]


# -- frames ------------------------------------------------------------------------------------------

def random_frames(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), generator=g, dtype=torch.uint8)


def smooth_frames(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Gradients and low-frequency waves, different per channel and frame: like natural video."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, h).view(1, h, 1, 1)
    x = torch.linspace(0, 1, w).view(1, 1, w, 1)
    k = torch.arange(t, dtype=torch.float32).view(t, 1, 1, 1)
    phase = torch.rand(1, 1, 1, 3, generator=g) * 6.28
    value = 128 + 90 * torch.sin(3 * x + 2 * y + phase + 0.3 * k) + 30 * (x - y)
    return value.clamp(0, 255).round().to(torch.uint8)


FRAME_KINDS = {"random": random_frames, "smooth": smooth_frames}


# -- HF processors ------------------------------------------------------------------------------------

def hf_qwen_video_processor(cfg: QwenVideoPreprocess) -> Qwen2VLVideoProcessor:
    return Qwen2VLVideoProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, patch_size=cfg.patch_size,
                                 merge_size=cfg.merge_size, temporal_patch_size=cfg.temporal_patch_size,
                                 image_mean=list(cfg.mean), image_std=list(cfg.std), resample=3)  # 3: bicubic


def hf_siglip_video_processor(size: int) -> LlavaOnevisionVideoProcessor:
    # The checkpoints' video_preprocessor_config.json: square size, bicubic, mean/std 0.5, no crop.
    return LlavaOnevisionVideoProcessor(size={"height": size, "width": size}, image_mean=list(SIGLIP_MEAN),
                                        image_std=list(SIGLIP_STD), resample=3, do_center_crop=False)


def run_hf_qwen(frames: torch.Tensor, cfg: QwenVideoPreprocess) -> dict:
    return hf_qwen_video_processor(cfg)(videos=[frames], return_tensors="pt", cap_pixels_per_frame=False)


def run_hf_siglip(frames: torch.Tensor, size: int) -> torch.Tensor:
    return hf_siglip_video_processor(size)(videos=[frames], return_tensors="pt")["pixel_values_videos"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer that knows the placeholder tokens: enough for the HF processors
    to expand video placeholders offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<|video_pad|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<video>", "<image>"]
    vocab = {token: i for i, token in enumerate(specials + ["[UNK]"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", additional_special_tokens=specials)


# -- comparison --------------------------------------------------------------------------------------

def grey_level_differences(got: torch.Tensor, ref: torch.Tensor, std: tuple[float, ...],
                           channel_dim: int) -> torch.Tensor:
    """(got - ref) in grey levels of each value's channel."""
    shape = [1] * got.dim()
    shape[channel_dim] = 3
    scale = torch.tensor(std, dtype=torch.float64).view(shape) * 255
    return (got.double() - ref.double()) * scale


def assert_within_rounding(got: torch.Tensor, ref: torch.Tensor, std: tuple[float, ...], channel_dim: int) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype == torch.float32
    levels = grey_level_differences(got, ref, std, channel_dim)
    off = levels.abs()
    assert off.max() <= MAX_LEVELS + 1e-3, f"max {off.max():.3f} grey levels"
    assert off.mean() < MAX_MEAN_LEVELS, f"mean {off.mean():.4f} grey levels"
    assert (off > 0.5).double().mean() < MAX_DIFFERING_FRACTION, f"{(off > 0.5).double().mean():.3%} differ"
    assert (levels - levels.round()).abs().max() < 1e-3, "a difference that is not whole grey levels"


def qwen_channel_view(pixels: torch.Tensor) -> torch.Tensor:
    """[N, C * tp * p * p] -> [N, C, tp * p * p]: channel on dim 1."""
    return pixels.reshape(pixels.shape[0], 3, -1)


# -- Qwen2.5-VL ------------------------------------------------------------------------------------

QWEN_CASES = [
    # (settings, frames, height, width)
    ("preset", 1, 56, 56),     # no resize: exact
    ("preset", 3, 50, 70),     # odd T; 50x70 -> 56x56 (up in height, down in width)
    ("preset", 5, 37, 101),    # odd T; not multiples of 28
    ("preset", 2, 300, 200),   # over max_pixels
    ("preset", 4, 10, 30),     # under min_pixels: upscaled
    ("hf-defaults", 3, 120, 160),
    ("hf-defaults", 1, 45, 61),
    ("checkpoint", 2, 90, 130),
    ("checkpoint", 1, 240, 320),
]


@pytest.mark.parametrize("kind", sorted(FRAME_KINDS))
@pytest.mark.parametrize("settings,t,h,w", QWEN_CASES)
def test_qwen_pixels_and_grid_match_hf(settings, t, h, w, kind):
    cfg = QWEN_SETTINGS[settings]
    frames = FRAME_KINDS[kind](t, h, w, seed=t * 1000 + h)
    ref = run_hf_qwen(frames, cfg)
    pixels, grid_thw = preprocess_qwen_video(frames, cfg)
    assert grid_thw.dtype == torch.long
    assert grid_thw.tolist() == ref["video_grid_thw"].tolist()
    assert grid_thw[0, 0] == math.ceil(t / cfg.temporal_patch_size)
    assert pixels.shape == ref["pixel_values_videos"].shape
    assert_within_rounding(qwen_channel_view(pixels), qwen_channel_view(ref["pixel_values_videos"]),
                           cfg.std, channel_dim=1)


def test_qwen_without_resize_matches_hf_to_float_rounding():
    cfg = QWEN_SETTINGS["preset"]
    for t in (1, 3, 4):
        frames = random_frames(t, 84, 112, seed=t)  # multiples of 28, 84 * 112 within [56 * 56, 112 * 112]
        ref = run_hf_qwen(frames, cfg)
        pixels, grid_thw = preprocess_qwen_video(frames, cfg)
        assert grid_thw.tolist() == ref["video_grid_thw"].tolist() == [[math.ceil(t / 2), 6, 8]]
        torch.testing.assert_close(pixels, ref["pixel_values_videos"], rtol=0, atol=2e-6)


# -- LLaVA-OneVision --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(FRAME_KINDS))
@pytest.mark.parametrize("size", SIGLIP_SIZES)
@pytest.mark.parametrize("t,h,w", [(1, 50, 70), (3, 37, 101), (2, 300, 200), (1, 480, 640)])
def test_siglip_pixels_match_hf(t, h, w, size, kind):
    frames = FRAME_KINDS[kind](t, h, w, seed=h + w)
    ref = run_hf_siglip(frames, size)
    pixels = preprocess_siglip_video(frames, SiglipVideoPreprocess(size=size))
    assert pixels.shape == ref.shape == (1, t, 3, size, size)
    assert_within_rounding(pixels, ref, SIGLIP_STD, channel_dim=2)


def test_siglip_preset_settings_are_the_checkpoint_settings():
    for name in ("tiny-llava-onevision", "tiny-llava-onevision-mha"):
        cfg = PRESETS[name].llava_preprocess()
        assert (cfg.mean, cfg.std, cfg.resample) == (SIGLIP_MEAN, SIGLIP_STD, "bicubic")


def test_siglip_without_resize_matches_hf_to_float_rounding():
    frames = random_frames(2, 56, 56, seed=5)
    ref = run_hf_siglip(frames, 56)
    torch.testing.assert_close(preprocess_siglip_video(frames, SiglipVideoPreprocess(size=56)), ref,
                               rtol=0, atol=1e-6)


@requires_cuda
@pytest.mark.cuda
def test_gpu_preprocessing_matches_hf_cpu():
    frames = random_frames(3, 50, 70, seed=9)
    cfg = QWEN_SETTINGS["preset"]
    pixels, grid_thw = preprocess_qwen_video(frames, cfg, device="cuda")
    ref = run_hf_qwen(frames, cfg)
    assert grid_thw.tolist() == ref["video_grid_thw"].tolist()
    assert_within_rounding(qwen_channel_view(pixels.cpu()), qwen_channel_view(ref["pixel_values_videos"]),
                           cfg.std, channel_dim=1)
    siglip = preprocess_siglip_video(frames, SiglipVideoPreprocess(size=384), device="cuda").cpu()
    assert_within_rounding(siglip, run_hf_siglip(frames, 384), SIGLIP_STD, channel_dim=2)


# -- token counts in the prompt against the HF processors' placeholder expansion ------------------

_ADAPTERS: dict[str, object] = {}


def preset_adapter(name: str):
    if name not in _ADAPTERS:
        _ADAPTERS[name] = load_adapter(name, seed=1)
    return _ADAPTERS[name]


def hf_qwen_video_token_count(frames: torch.Tensor, cfg: QwenVideoPreprocess) -> tuple[int, list]:
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=word_tokenizer(),
                                    video_processor=hf_qwen_video_processor(cfg))
    out = processor(text="<|vision_start|><|video_pad|><|vision_end|>", videos=[frames], return_tensors="pt",
                    videos_kwargs={"cap_pixels_per_frame": False})
    return int((out["input_ids"] == processor.video_token_id).sum()), out["video_grid_thw"].tolist()


def hf_llava_video_token_count(frames: torch.Tensor, size: int, patch_size: int) -> int:
    processor = LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessor(), tokenizer=word_tokenizer(),
                                        video_processor=hf_siglip_video_processor(size),
                                        num_image_tokens=(size // patch_size) ** 2,
                                        vision_feature_select_strategy="full")
    out = processor(text="<video>", videos=[frames], return_tensors="pt")
    return int((out["input_ids"] == processor.video_token_id).sum())


def adapter_video_token_count(adapter, frames: torch.Tensor) -> int:
    ids = adapter.hf_inputs(frames, PROMPT_IDS)["input_ids"]
    return int((ids == adapter.model.config.video_token_id).sum())


@pytest.mark.parametrize("settings,t,h,w", [("preset", 1, 56, 56), ("preset", 5, 37, 101),
                                            ("preset", 4, 300, 200), ("hf-defaults", 3, 120, 160),
                                            ("checkpoint", 2, 90, 130)])
def test_qwen_prompt_token_count_matches_hf_processor(settings, t, h, w):
    preset = preset_adapter("tiny-qwen2.5-vl")
    cfg = QWEN_SETTINGS[settings]
    adapter = Qwen2_5_VLAdapter(preset.model, preset.tokenizer, cfg, preset.prompt_prefix_ids,
                                preset.prompt_suffix_ids)
    frames = smooth_frames(t, h, w)
    count, grid = hf_qwen_video_token_count(frames, cfg)
    assert adapter_video_token_count(adapter, frames) == count
    assert adapter.hf_inputs(frames, PROMPT_IDS)["video_grid_thw"].tolist() == grid
    if settings == "preset":
        assert adapter.prepare(frames, PROMPT_IDS).num_visual == count


@pytest.mark.parametrize("name", ["tiny-llava-onevision", "tiny-llava-onevision-mha"])
@pytest.mark.parametrize("t", [1, 3])
def test_llava_preset_prompt_token_count_matches_hf_processor(name, t):
    adapter = preset_adapter(name)
    vision = adapter.model.config.vision_config
    frames = smooth_frames(t, 50, 70)
    count = hf_llava_video_token_count(frames, vision.image_size, vision.patch_size)
    assert adapter_video_token_count(adapter, frames) == count
    assert adapter.prepare(frames, PROMPT_IDS).num_visual == count


def llava_adapter_of_size(size: int) -> LlavaOnevisionAdapter:
    base = PRESETS["tiny-llava-onevision"]
    preset = Preset(f"tiny-llava-{size}", "llava_onevision", base.text, vision_image_size=size)
    tokenizer = preset.tokenizer()
    model = build_random_model(LlavaOnevisionForConditionalGeneration, preset.llava_config(), tokenizer,
                               torch.float32, "cpu", seed=0)
    return LlavaOnevisionAdapter(model, tokenizer, preset.llava_preprocess(), list(preset.prompt_prefix_ids),
                                 list(preset.prompt_suffix_ids))


def test_llava_384px_prompt_token_count_matches_hf_processor():
    """The released checkpoints' SigLIP (384 px, patch 14): 196 tokens a frame + 1 newline."""
    adapter = llava_adapter_of_size(384)
    frames = smooth_frames(2, 240, 320)
    count = hf_llava_video_token_count(frames, 384, 14)
    assert count == 2 * 196 + 1
    assert adapter_video_token_count(adapter, frames) == count


@torch.no_grad()
def test_llava_frames_of_a_size_beyond_whole_patches_match_hf():
    """60 px in 14 px patches: SigLIP sees 4 x 4 patches (the 4 px left over are dropped), pooled
    to 2 x 2, not to ceil(60 / 14 / 2) = 3 a side (384 px rounds alike either way)."""
    adapter = llava_adapter_of_size(60)
    frames = smooth_frames(2, 50, 70)
    count = hf_llava_video_token_count(frames, 60, 14)
    assert count == 2 * 4 + 1
    assert adapter_video_token_count(adapter, frames) == count
    prepared = adapter.prepare(frames, PROMPT_IDS)
    assert prepared.grid == (2, 2, 2) and prepared.num_visual == count
    reference = adapter.model(**adapter.hf_inputs(frames, PROMPT_IDS), use_cache=False).logits
    logits = adapter.lm_head(adapter.text_model(inputs_embeds=prepared.inputs_embeds,
                                                position_ids=prepared.position_ids).last_hidden_state)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)

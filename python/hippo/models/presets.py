"""Tiny random-weight presets, named in code: they build offline from configs (transformers 5.17), for
tests and the embedded default. Each has a ByteTokenizer, since no tokenizer file exists offline.

Every preset of one family uses the same 512-id vocabulary and special ids, so any two presets of a
family form a valid target/draft pair; the "-v640" presets use another vocabulary on purpose (a
mismatched pair for tests).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hippo.errors import HippoError
from hippo.models.preprocess import SIGLIP_MEAN, SIGLIP_STD, QwenVideoPreprocess, SiglipVideoPreprocess
from hippo.models.tokenizer import PromptTokenizer

if TYPE_CHECKING:
    from transformers import LlavaOnevisionConfig, PretrainedConfig, Qwen2_5_VLConfig

# Special ids of the tiny vocabularies (bytes are ids 0..255).
VIDEO_TOKEN_ID = 500
IMAGE_TOKEN_ID = 501
VISION_START_TOKEN_ID = 502
VISION_END_TOKEN_ID = 503
EOS_TOKEN_ID = 504  # plays <|im_end|>
PAD_TOKEN_ID = 505
USER_TURN_ID = 506  # plays "<|im_start|>user\n"
ASSISTANT_TURN_ID = 507  # plays "<|im_end|>\n<|im_start|>assistant\n"


class ByteTokenizer(PromptTokenizer):
    """UTF-8 bytes as ids 0..255; ids above are special and decode to nothing. Enough to give tiny
    models string prompts and readable (if random) output."""

    def __init__(self, vocab_size: int, eos_token_id: int = EOS_TOKEN_ID, pad_token_id: int = PAD_TOKEN_ID) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> tuple[tuple[str, object], ...]:
        return (("kind", "bytes"),) + super().fingerprint()


@dataclass(frozen=True)
class TextShape:
    """The Qwen2-family language model of a preset."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int = 512
    mrope_section: tuple[int, int, int] | None = None  # Qwen2.5-VL only; sums to head_dim / 2


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "qwen2_5_vl" or "llava_onevision"
    text: TextShape
    vision_image_size: int = 56  # LLaVA-OneVision: the SigLIP input size
    prompt_prefix_ids: tuple[int, ...] = (USER_TURN_ID,)
    prompt_suffix_ids: tuple[int, ...] = (ASSISTANT_TURN_ID,)
    notes: str = field(default="", compare=False)

    def tokenizer(self) -> ByteTokenizer:
        return ByteTokenizer(self.text.vocab_size)

    def qwen_config(self) -> Qwen2_5_VLConfig:
        from transformers import Qwen2_5_VLConfig

        t = self.text
        return Qwen2_5_VLConfig(
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                               temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                               out_hidden_size=t.hidden_size, fullatt_block_indexes=[1], tokens_per_second=2),
            text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                             intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                             num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                             eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, bos_token_id=None,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                              "mrope_section": list(t.mrope_section)}),
            video_token_id=VIDEO_TOKEN_ID, image_token_id=IMAGE_TOKEN_ID,
            vision_start_token_id=VISION_START_TOKEN_ID, vision_end_token_id=VISION_END_TOKEN_ID)

    def qwen_preprocess(self) -> QwenVideoPreprocess:
        # Small pixel bounds keep tiny videos at a handful of tokens: 56x56 .. 112x112 per frame.
        return QwenVideoPreprocess(min_pixels=56 * 56, max_pixels=112 * 112)

    def llava_config(self) -> LlavaOnevisionConfig:
        from transformers import LlavaOnevisionConfig

        t = self.text
        return LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, image_size=self.vision_image_size,
                               patch_size=14, vision_use_head=False),
            text_config=dict(model_type="qwen2", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                             intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                             num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                             eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, bos_token_id=None),
            vision_feature_layer=-1, vision_feature_select_strategy="full",
            video_token_id=VIDEO_TOKEN_ID, image_token_id=IMAGE_TOKEN_ID)

    def llava_preprocess(self) -> SiglipVideoPreprocess:
        return SiglipVideoPreprocess(size=self.vision_image_size, mean=SIGLIP_MEAN, std=SIGLIP_STD)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("tiny-qwen2.5-vl", "qwen2_5_vl",
           TextShape(64, 2, 4, 2, 128, mrope_section=(2, 3, 3)), notes="GQA 4/2 heads, head_dim 16"),
    Preset("tiny-qwen2.5-vl-mha", "qwen2_5_vl",
           TextShape(96, 3, 4, 4, 192, mrope_section=(4, 4, 4)), notes="MHA 4/4 heads, head_dim 24"),
    Preset("tiny-qwen2.5-vl-draft", "qwen2_5_vl",
           TextShape(32, 1, 2, 1, 64, mrope_section=(2, 3, 3)),
           notes="a draft for the other Qwen presets: 1 layer, GQA 2/1 heads, head_dim 16"),
    Preset("demo-qwen2.5-vl", "qwen2_5_vl",
           TextShape(256, 6, 8, 2, 1024, mrope_section=(4, 6, 6)),
           notes="the demo's target: heavy enough on a CPU that a tiny draft pays off"),
    Preset("tiny-qwen2.5-vl-v640", "qwen2_5_vl",
           TextShape(64, 2, 4, 2, 128, vocab_size=640, mrope_section=(2, 3, 3)), notes="other vocabulary"),
    Preset("tiny-llava-onevision", "llava_onevision",
           TextShape(64, 2, 4, 2, 128), vision_image_size=56, notes="GQA 4/2, 4x4 patches pooled to 2x2"),
    Preset("tiny-llava-onevision-mha", "llava_onevision",
           TextShape(96, 3, 4, 4, 192), vision_image_size=70, notes="MHA 4/4, 5x5 patches pooled to 3x3"),
    Preset("tiny-llava-onevision-draft", "llava_onevision",
           TextShape(32, 1, 2, 1, 64), vision_image_size=56,
           notes="a draft for tiny-llava-onevision (same 56-px frames): 1 layer, GQA 2/1"),
    Preset("tiny-llava-onevision-v640", "llava_onevision",
           TextShape(64, 2, 4, 2, 128, vocab_size=640), vision_image_size=56, notes="other vocabulary"),
]}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise HippoError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def preset_for_family(name: str, family: str) -> Preset:
    """The named tiny preset, which must belong to `family`."""
    preset = get_preset(name)
    if preset.family != family:
        raise HippoError(f"preset {name!r} is a {preset.family} model, not {family}")
    return preset


def build_random_model(model_class: type[torch.nn.Module], config: PretrainedConfig,
                       tokenizer: PromptTokenizer, dtype: torch.dtype,
                       device: str | torch.device, seed: int) -> torch.nn.Module:
    """A randomly initialised HF model (seeded), generating with the tokenizer's eos/pad ids.
    The weights depend on `seed` alone: they are drawn in float32 on the CPU from a forked
    generator, whatever the caller's global RNG state, torch.set_default_dtype and
    torch.set_default_device (which gave other weights, or a model on meta that cannot be
    moved), and the caller's random stream goes on as if nothing had been drawn."""
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float32)
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(seed)
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device=device, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model

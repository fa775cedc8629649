"""Qwen2.5-VL adapter: (frames, prompt) -> PreparedPrompt with M-RoPE position ids.

Prompt layout: prefix ids, <|vision_start|>, video tokens x (T'/2)(H/28)(W/28), <|vision_end|>, the user's
text, suffix ids (T' = T rounded up to even by repeating the last frame; H, W after smart_resize).
Real checkpoints use their own chat template (Qwen's format where they ship none or it cannot
render a video turn; chat_format.py); tiny presets use one stand-in id each for the turn markers.
"""
from __future__ import annotations

import math
from decimal import Decimal
from typing import TYPE_CHECKING

import torch

from hippo.errors import HippoError, check_positive_rate, is_int
from hippo.models.base import VideoEmbedding, VideoLLMAdapter
from hippo.models.checkpoint import check_text_config, check_token_ids_in_vocabulary, load_local_checkpoint
from hippo.models.presets import build_random_model, preset_for_family
from hippo.models.tokenizer import PromptTokenizer
from hippo.models.chat_format import ChatFormat
from hippo.models.preprocess import (QwenVideoPreprocess, preprocess_qwen_video, qwen_video_tokens,
                                     settings_from_checkpoint, settings_value)
from hippo.runtime.decoder import autocast_off

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Qwen2.5-VL's chat format for a user turn of [video, text] (a checkpoint's own template wins).
CHAT_FORMAT = ChatFormat(
    prefix="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    separator="", suffix="<|im_end|>\n<|im_start|>assistant\n")
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"  # what its template writes
VIDEO_MM_TYPE = 2  # mm_token_type_ids: text 0, image 1, video 2
# The special ids the adapter puts in prompts (or refuses in them); config.json names them alike.
TOKEN_ID_FIELDS = ("video_token_id", "image_token_id", "vision_start_token_id", "vision_end_token_id")
# The largest M-RoPE position hippo admits: far past any trained context, and past what float32
# RoPE angles resolve (transformers itself overflows only at 2**63, fps around 1e-19).
MAX_POSITION = 2**31 - 1


class Qwen2_5_VLAdapter(VideoLLMAdapter):
    family = "qwen2_5_vl"

    def __init__(self, model: torch.nn.Module, tokenizer: PromptTokenizer | None, preprocess: QwenVideoPreprocess,
                 prompt_prefix_ids: list[int], prompt_suffix_ids: list[int],
                 chat: ChatFormat | None = None) -> None:
        super().__init__(model, tokenizer, prompt_prefix_ids, prompt_suffix_ids, chat)
        self.preprocess = preprocess
        check_preprocess_fits_vision(preprocess, model.config.vision_config)
        self.check_model(model)

    @staticmethod
    def check_model(model: torch.nn.Module) -> None:
        """What a config.json can get wrong that would fail only in the first prepare or prefill;
        also run on the weightless skeleton before a checkpoint's weights load."""
        check_text_config(model)
        check_token_ids_in_vocabulary(model, {field: field for field in TOKEN_ID_FIELDS})
        check_mrope_section(model)
        check_vision_window(model)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    seed: int = 0) -> "Qwen2_5_VLAdapter":
        from transformers import Qwen2_5_VLForConditionalGeneration

        preset = preset_for_family(name, cls.family)
        tokenizer = preset.tokenizer()
        model = build_random_model(Qwen2_5_VLForConditionalGeneration, preset.qwen_config(), tokenizer, dtype, device, seed)
        return cls(model, tokenizer, preset.qwen_preprocess(), list(preset.prompt_prefix_ids),
                   list(preset.prompt_suffix_ids))

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device = "cpu") -> "Qwen2_5_VLAdapter":
        from transformers import Qwen2_5_VLForConditionalGeneration

        preprocess = preprocess_from_checkpoint(path)  # a small file: judged before the weights load

        def check_skeleton(skeleton: torch.nn.Module) -> None:
            cls.check_model(skeleton)
            check_preprocess_fits_vision(preprocess, skeleton.config.vision_config)

        loaded = load_local_checkpoint(Qwen2_5_VLForConditionalGeneration, path, dtype, "Qwen2.5-VL",
                                       CHAT_FORMAT, VIDEO_PLACEHOLDER, check_model=check_skeleton)
        return cls(loaded.model.to(device), loaded.tokenizer, preprocess, loaded.prompt_prefix_ids,
                   loaded.prompt_suffix_ids, loaded.chat)

    # -- prompts -----------------------------------------------------------------------------------
    def visual_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Frames are resized by smart_resize, grouped temporal_patch_size at a time (the last
        repeated to fill a group) and merged merge_size^2 patches to a token."""
        return qwen_video_tokens(num_frames, height, width, self.preprocess)

    def prompt_ids(self, num_visual: int, prompt: str | list[int]) -> list[int]:
        cfg = self.model.config
        return (self.prompt_prefix_ids + [cfg.vision_start_token_id] + [cfg.video_token_id] * num_visual
                + [cfg.vision_end_token_id] + self.ids_after_video(prompt))

    def hf_inputs(self, frames: torch.Tensor, prompt: str | list[int], fps: float | None = None) -> dict:
        """The HF model's own inputs for (frames, prompt): what its processor would have produced."""
        pixels, video = self._video_inputs(frames, fps)
        ids = self.prompt_ids(self.visual_tokens(*frames.shape[:3]), prompt)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values_videos": pixels, "mm_token_type_ids": self._token_types(input_ids),
                **video}

    def _video_inputs(self, frames: torch.Tensor, fps: float | None) -> tuple[torch.Tensor, dict]:
        """(patchified pixels, {video_grid_thw, second_per_grid_ts when fps is given})."""
        pixels, grid_thw = preprocess_qwen_video(frames, self.preprocess, device=self.device, dtype=self.dtype)
        video = {"video_grid_thw": grid_thw}
        if fps is not None:
            self.check_temporal_positions(fps, int(grid_thw[0, 0]))
            # As the HF processor: seconds covered by one temporal patch of sampled frames.
            video["second_per_grid_ts"] = torch.tensor([self.preprocess.temporal_patch_size / fps],
                                                       device=self.device)
        return pixels, video

    def _token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """mm_token_type_ids: which tokens are video placeholders."""
        return (input_ids == self.model.config.video_token_id).to(torch.int32) * VIDEO_MM_TYPE

    def check_temporal_positions(self, fps: float, groups: int) -> None:
        """M-RoPE spaces the video's temporal patches tokens_per_second * seconds-per-patch
        positions apart: an absurdly low fps (1e-25) puts them beyond 32-bit positions, where
        transformers overflows mid-prefill. A sparse but real rate (0.001 over ten hours) is far
        below the limit. One patch counts even alone: transformers multiplies by the spacing."""
        check_positive_rate("fps", fps)
        per_second = self.model.config.vision_config.tokens_per_second
        seconds_per_patch = self.preprocess.temporal_patch_size / fps
        extent = max(groups - 1, 1) * seconds_per_patch * per_second
        if math.isfinite(extent) and extent <= MAX_POSITION:
            return
        lowest = max(groups - 1, 1) * self.preprocess.temporal_patch_size * per_second / MAX_POSITION
        raise HippoError(f"fps {fps:g} is too low: the video's temporal positions would reach "
                         f"about {extent:.3g}, beyond the model's {MAX_POSITION:,}: sample at "
                         f"fps >= {_rounded_up(lowest)}")

    def generate_kwargs(self, frames: torch.Tensor, prompt: str | list[int], fps: float | None = None) -> dict:
        return self.hf_inputs(frames, prompt, fps)

    @torch.no_grad()
    @autocast_off
    def embed_video(self, frames: torch.Tensor, fps: float | None = None) -> VideoEmbedding:
        """fps: the rate the frames were sampled at (sets the temporal M-RoPE spacing as the HF processor
        does); None keeps get_rope_index's default of one second per temporal patch (2 frames
        per second, as qwen-vl-utils assumes for a list of frames; HF's processor assumes 24)."""
        pixels, video = self._video_inputs(frames, fps)
        vlm = self.model.model
        table = vlm.get_input_embeddings().weight
        grid_thw = video["video_grid_thw"]
        embeddings = torch.cat(vlm.get_video_features(pixels, grid_thw).pooler_output, dim=0)
        embeddings = embeddings.to(table.device, table.dtype)
        merge = self.preprocess.merge_size
        grid = (int(grid_thw[0, 0]), int(grid_thw[0, 1]) // merge, int(grid_thw[0, 2]) // merge)
        return VideoEmbedding(embeddings=embeddings, grid=grid,
                              visual_features=embeddings.reshape(*grid, -1),
                              frames=tuple(frames.shape[:3]), position_inputs=video, adapter=self)

    def positions(self, input_ids: torch.Tensor, video: VideoEmbedding) -> tuple[torch.Tensor, int]:
        """M-RoPE positions from the model's own get_rope_index. Generated tokens continue from
        the last prompt token's position, as HF `generate` does (it extends position_ids by one
        per token). get_rope_index's rope_deltas count from the largest position instead, which
        differs once the video's temporal positions run past the text after it (few frames per
        second, a short suffix)."""
        inputs = {name: value.to(input_ids.device) for name, value in video.position_inputs.items()}
        position_ids, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=self._token_types(input_ids), **inputs)
        last_position = int(position_ids[0, 0, -1])  # a text token: its components are equal
        return position_ids, last_position + 1 - input_ids.shape[1]


def preprocess_from_checkpoint(path: str) -> QwenVideoPreprocess:
    """The checkpoint's video preprocessing settings (video_preprocessor_config.json, else
    preprocessor_config.json), defaulting to Qwen2VLVideoProcessor's class defaults."""
    return settings_from_checkpoint(path, qwen_preprocess_settings)


def qwen_preprocess_settings(raw: dict) -> QwenVideoPreprocess:
    """Qwen2VLVideoProcessor's settings from its JSON: pixel bounds given on their own or in 'size'."""
    base = QwenVideoPreprocess()
    size = raw.get("size") or {}
    if not isinstance(size, dict):
        raise HippoError(f"the preprocessing 'size' entry must be an object, got {size!r}")
    min_pixels = raw.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or base.min_pixels
    max_pixels = raw.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or base.max_pixels
    return QwenVideoPreprocess(
        patch_size=settings_value(raw.get("patch_size", base.patch_size)),
        temporal_patch_size=settings_value(raw.get("temporal_patch_size", base.temporal_patch_size)),
        merge_size=settings_value(raw.get("merge_size", base.merge_size)),
        min_pixels=settings_value(min_pixels), max_pixels=settings_value(max_pixels),
        mean=settings_value(raw.get("image_mean", base.mean)),
        std=settings_value(raw.get("image_std", base.std)))


def check_mrope_section(model: torch.nn.Module) -> None:
    """M-RoPE splits each head's head_dim / 2 rotary frequencies into sections (temporal, height,
    width): positive sizes summing to head_dim / 2, or the first prefill fails deep in the rotary
    kernel. transformers 5 reads them from text_config.rope_parameters (where it also moves an
    older config's rope_scaling) and, where they are missing, takes [16, 24, 24]: Qwen2.5-VL's
    own, which fit head_dim 128 only."""
    rotary = model.model.language_model.rotary_emb
    half = int(rotary.inv_freq.numel())
    sections = rotary.mrope_section
    if (isinstance(sections, (list, tuple)) and sections
            and all(is_int(size) and size >= 1 for size in sections) and sum(sections) == half):
        return
    given = (getattr(model.config.text_config, "rope_parameters", None) or {}).get("mrope_section")
    if given is None:
        raise HippoError(f"config.json gives no mrope_section (text_config.rope_parameters, or "
                         f"rope_scaling in older configs), and transformers' default "
                         f"{list(sections)} does not fit head_dim {2 * half}: add one, positive "
                         f"sizes summing to {half}")
    raise HippoError(f"config.json: mrope_section {given!r} does not fit head_dim {2 * half}: "
                     f"it must hold positive integers summing to {half} (head_dim / 2)")


def check_vision_window(model: torch.nn.Module) -> None:
    """The vision tower's attention windows hold window_size // spatial_merge_size // patch_size
    merged patches a side: a window_size below patch_size x spatial_merge_size makes that 0,
    and HF's window indexing fails with a ZeroDivisionError in the first prepare."""
    vision = model.config.vision_config
    window, patch, merge = (getattr(vision, name, None)
                            for name in ("window_size", "patch_size", "spatial_merge_size"))
    if not (is_int(patch) and is_int(merge) and patch > 0 and merge > 0):
        return  # check_preprocess_fits_vision names these
    if not (is_int(window) and window >= patch * merge):
        raise HippoError(f"config.json: vision_config.window_size must be an integer of at least "
                         f"patch_size x spatial_merge_size ({patch * merge}), got {window!r}")


def check_preprocess_fits_vision(preprocess: QwenVideoPreprocess, vision: PretrainedConfig) -> None:
    """The patchified frames must have the layout the vision tower was built for."""
    pairs = (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
             ("merge_size", "spatial_merge_size"))
    wrong = [f"{mine} {getattr(preprocess, mine)} vs {theirs} {getattr(vision, theirs)}"
             for mine, theirs in pairs if getattr(preprocess, mine) != getattr(vision, theirs)]
    if wrong:
        raise HippoError("the video preprocessing settings do not fit the vision tower: "
                         + "; ".join(wrong))


def _rounded_up(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant digits, rounded up where rounding went down: a lower bound
    rounded down would itself be refused."""
    shown = f"{value:.{digits}g}"
    if float(shown) < value:  # one unit more in the last digit shown
        last = Decimal(shown)
        shown = f"{float(last + Decimal(1).scaleb(last.adjusted() - digits + 1)):.{digits}g}"
    return shown

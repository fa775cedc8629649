"""LLaVA-OneVision adapter (LLaVA-Video checkpoints use the same class): (frames, prompt) ->
PreparedPrompt with 1-D positions.

Prompt layout: prefix ids, <video> x (T * ceil(n/2)^2 + 1), the user's text, suffix ids, where n =
image_size / patch_size: each frame's n x n SigLIP patches are projected and bilinearly pooled to
ceil(n/2) x ceil(n/2), and one learned newline embedding ends the video (HF appends it: in
get_video_features from transformers 5.18, in its forward before).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from hippo.errors import HippoError, check_positive_rate, is_int
from hippo.models.base import VideoEmbedding, VideoLLMAdapter
from hippo.models.checkpoint import check_text_config, check_token_ids_in_vocabulary, load_local_checkpoint
from hippo.models.presets import build_random_model, preset_for_family
from hippo.models.tokenizer import PromptTokenizer
from hippo.models.chat_format import ChatFormat
from hippo.models.preprocess import (SIGLIP_MEAN, SIGLIP_STD, SiglipVideoPreprocess, preprocess_siglip_video,
                                     settings_from_checkpoint, settings_value)
from hippo.runtime.decoder import autocast_off

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# llava-hf's chat format for a user turn of [video, text] (a checkpoint's own template wins).
# Its template closes the turn with <|im_end|> and no newline before <|im_start|>assistant.
CHAT_FORMAT = ChatFormat(prefix="<|im_start|>user ", separator="\n",
                         suffix="<|im_end|><|im_start|>assistant\n")
VIDEO_PLACEHOLDER = "<video>"  # what llava-hf's template writes for a video
# The placeholder ids the adapter puts in prompts (or refuses in them), as config.json names them.
TOKEN_ID_FIELDS = {"video_token_id": "video_token_index", "image_token_id": "image_token_index"}


class LlavaOnevisionAdapter(VideoLLMAdapter):
    family = "llava_onevision"

    def __init__(self, model: torch.nn.Module, tokenizer: PromptTokenizer | None, preprocess: SiglipVideoPreprocess,
                 prompt_prefix_ids: list[int], prompt_suffix_ids: list[int],
                 chat: ChatFormat | None = None) -> None:
        super().__init__(model, tokenizer, prompt_prefix_ids, prompt_suffix_ids, chat)
        self.preprocess = preprocess
        vision = model.config.vision_config
        if vision.image_size != preprocess.size:
            raise HippoError(f"frames are resized to {preprocess.size} px but the vision tower takes "
                             f"{vision.image_size} px")
        self.check_model(model)

    @staticmethod
    def check_model(model: torch.nn.Module) -> None:
        """What a config.json can get wrong that would fail only in the first prepare; also run
        on the weightless skeleton before a checkpoint's weights load."""
        check_text_config(model)
        check_token_ids_in_vocabulary(model, TOKEN_ID_FIELDS)
        check_feature_layers(model.config)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    seed: int = 0) -> "LlavaOnevisionAdapter":
        from transformers import LlavaOnevisionForConditionalGeneration

        preset = preset_for_family(name, cls.family)
        tokenizer = preset.tokenizer()
        model = build_random_model(LlavaOnevisionForConditionalGeneration, preset.llava_config(), tokenizer, dtype, device, seed)
        return cls(model, tokenizer, preset.llava_preprocess(), list(preset.prompt_prefix_ids),
                   list(preset.prompt_suffix_ids))

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device = "cpu") -> "LlavaOnevisionAdapter":
        from transformers import LlavaOnevisionForConditionalGeneration

        preprocess = preprocess_from_checkpoint(path)  # a small file: judged before the weights load
        loaded = load_local_checkpoint(LlavaOnevisionForConditionalGeneration, path, dtype, "LLaVA-OneVision",
                                       CHAT_FORMAT, VIDEO_PLACEHOLDER, check_model=cls.check_model)
        model = loaded.model.to(device)
        preprocess = replace(preprocess, size=model.config.vision_config.image_size)
        return cls(model, loaded.tokenizer, preprocess, loaded.prompt_prefix_ids, loaded.prompt_suffix_ids,
                   loaded.chat)

    # -- prompts -----------------------------------------------------------------------------------
    @property
    def pooled_side(self) -> int:
        vision = self.model.config.vision_config
        return math.ceil((vision.image_size // vision.patch_size) / 2)

    def visual_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Every frame is resized to one size and pooled to pooled_side^2 tokens; one newline
        token follows the video."""
        return num_frames * self.pooled_side ** 2 + 1

    def prompt_ids(self, num_visual: int, prompt: str | list[int]) -> list[int]:
        return (self.prompt_prefix_ids + [self.model.config.video_token_id] * num_visual
                + self.ids_after_video(prompt))

    def hf_inputs(self, frames: torch.Tensor, prompt: str | list[int]) -> dict:
        """The HF model's own inputs for (frames, prompt): what its processor would have produced."""
        pixels = preprocess_siglip_video(frames, self.preprocess, device=self.device, dtype=self.dtype)
        ids = self.prompt_ids(self.visual_tokens(pixels.shape[1], *pixels.shape[-2:]), prompt)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values_videos": pixels}

    def generate_kwargs(self, frames: torch.Tensor, prompt: str | list[int], fps: float | None = None) -> dict:
        """fps is accepted for a uniform interface, as in prepare()."""
        if fps is not None:
            check_positive_rate("fps", fps)
        return self.hf_inputs(frames, prompt)

    @torch.no_grad()
    @autocast_off
    def embed_video(self, frames: torch.Tensor, fps: float | None = None) -> VideoEmbedding:
        """fps is accepted for a uniform interface (and checked, as Qwen2.5-VL's is); 1-D
        positions do not depend on it."""
        if fps is not None:
            check_positive_rate("fps", fps)
        pixels = preprocess_siglip_video(frames, self.preprocess, device=self.device, dtype=self.dtype)
        vlm = self.model.model
        table = vlm.get_input_embeddings().weight
        grid = (int(pixels.shape[1]), self.pooled_side, self.pooled_side)
        video = _video_embeddings(vlm, pixels, self.model.config, grid)  # [1, T*side^2 + 1, C]
        embeddings = video.flatten(0, 1).to(table.device, table.dtype)
        # The newline closes the video; token selection scores the rest.
        return VideoEmbedding(embeddings=embeddings, grid=grid,
                              visual_features=embeddings[:-1].reshape(*grid, -1),
                              frames=tuple(frames.shape[:3]), adapter=self)

    def positions(self, input_ids: torch.Tensor, video: VideoEmbedding) -> tuple[torch.Tensor, int]:
        """1-D positions 0 .. S-1; generated tokens continue from S."""
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None], 0


def _video_embeddings(vlm: torch.nn.Module, pixels: torch.Tensor, cfg: PretrainedConfig,
                      grid: tuple[int, int, int]) -> torch.Tensor:
    """The video's embeddings as the HF forward places them: T * side^2 pooled patch features,
    then one newline embedding after the whole video. transformers 5.18 moved that newline into
    get_video_features; before, the forward appended it, so it is added here only if missing."""
    features = vlm.get_video_features(pixels, vision_feature_layer=cfg.vision_feature_layer,
                                      vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                      return_dict=True).pooler_output
    if features.shape[1] == grid[0] * grid[1] * grid[2]:
        newline = vlm.image_newline[None, None, :].repeat(features.shape[0], 1, 1)
        features = torch.cat((features, newline.to(features.device)), dim=1)
    return features


def check_feature_layers(config: PretrainedConfig) -> None:
    """vision_feature_layer indexes the vision tower's hidden states (the embeddings, then one per
    layer: layers + 1 of them), as an int or a list of ints; one beyond them would fail only in
    the first prepare."""
    layers = config.vision_config.num_hidden_layers
    value = config.vision_feature_layer
    indices = list(value) if isinstance(value, (list, tuple)) else [value]
    if indices and all(is_int(index) and -(layers + 1) <= index <= layers for index in indices):
        return
    raise HippoError(f"config.json: vision_feature_layer {value!r} does not index the vision "
                     f"tower's hidden states: with {layers} layers it must be an integer from "
                     f"{-(layers + 1)} to {layers}, or a non-empty list of them")


def preprocess_from_checkpoint(path: str) -> SiglipVideoPreprocess:
    """The checkpoint's video preprocessing (video_preprocessor_config.json, else
    preprocessor_config.json), read before the weights load; its size stays the default until the
    caller sets the vision tower's image_size, where frames always go."""
    return settings_from_checkpoint(path, lambda raw: SiglipVideoPreprocess(
        mean=settings_value(raw.get("image_mean", SIGLIP_MEAN)),
        std=settings_value(raw.get("image_std", SIGLIP_STD))))

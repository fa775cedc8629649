"""hippo's own frame preprocessing in torch (no torchvision, so it runs on any install and on the GPU).

It follows the arithmetic of the HF video processors of transformers 5.17 as they run by default (on the CPU):
- resize: torchvision resizes uint8 frames on the CPU with its native uint8 kernel (PIL's algorithm): a
  separable antialiased filter, the width pass first, its result clamped and rounded to uint8, then the
  height pass, clamped and rounded again. hippo does the same two passes with
  `torch.nn.functional.interpolate(..., antialias=True, align_corners=False)` in float32, rounding between
  them. One float interpolate over both axes (torchvision's path on the GPU) skips the intermediate
  clamp, and bicubic overshoot then moves pixels by up to ~25 grey levels when upscaling noisy frames. The
  remaining difference is the uint8 kernel's fixed-point weights: at most +-1 grey level (2 seen at
  7x upscaling), on under 1% of values (tests/test_preprocess_vs_hf.py).
- rescale (1/255) and normalisation (mean, std) after the resize, in float32.
- Qwen2-VL: `smart_resize` to multiples of patch_size * merge_size (28) within [min_pixels, max_pixels],
  the last frame repeated to a multiple of temporal_patch_size, and the patchified layout of
  `Qwen2VLVideoProcessor.patchify` (rows of C * tp * p * p values, ordered t, h-block, w-block, my, mx).
- SigLIP (LLaVA-OneVision): a fixed square resize to the vision tower's image_size, no crop.
The HF video processors themselves import torchvision; hippo does not. tests/test_preprocess_vs_hf.py
compares against them where torchvision is installed.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

from hippo.errors import HippoError, errors_prefixed
from hippo.models.checkpoint import find_checkpoint_file, read_json_object

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class QwenVideoPreprocess:
    """Qwen2-VL / Qwen2.5-VL video preprocessing settings (Qwen2VLVideoProcessor's defaults)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 28 * 28 * 768
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: str = "bicubic"

    def __post_init__(self) -> None:  # settings may come from a checkpoint's JSON
        check_settings("Qwen video preprocessing", dict(
            patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
            merge_size=self.merge_size, min_pixels=self.min_pixels, max_pixels=self.max_pixels),
            self.mean, self.std)
        if self.min_pixels > self.max_pixels:
            raise HippoError(f"Qwen video preprocessing: min_pixels {self.min_pixels} exceeds "
                             f"max_pixels {self.max_pixels}")


@dataclass(frozen=True)
class SiglipVideoPreprocess:
    """LLaVA-OneVision video preprocessing: every frame resized to size x size."""

    size: int = 384
    mean: tuple[float, float, float] = SIGLIP_MEAN
    std: tuple[float, float, float] = SIGLIP_STD
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        check_settings("SigLIP video preprocessing", dict(size=self.size), self.mean, self.std)


def check_settings(owner: str, sizes: dict[str, object], mean: object, std: object) -> None:
    """Preprocessing settings: sizes are positive ints, mean and std three finite numbers (std
    nonzero). A bad checkpoint JSON then fails here with its entry named, not deep in a resize."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HippoError(f"{owner}: {name} must be a positive integer, got {value!r}")
    for name, values in (("image_mean", mean), ("image_std", std)):
        if (not isinstance(values, tuple) or len(values) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in values)):
            raise HippoError(f"{owner}: {name} must be three finite numbers, got {values!r}")
    if 0 in std:
        raise HippoError(f"{owner}: image_std must not contain 0, got {std!r}")


# Where a checkpoint keeps its video preprocessing settings, in transformers' order: the
# "video_processor" entry of processor_config.json (what processors saved by transformers 5
# write, and their only copy), else the first of these files present.
PROCESSOR_FILE = "processor_config.json"
PREPROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")
Settings = TypeVar("Settings")


def settings_from_checkpoint(path: str, build: Callable[[dict], Settings]) -> Settings:
    """build(the checkpoint's preprocessing JSON, {} where it has none), its errors naming the
    file: a target and a draft each have one, and the user must know which one to correct."""
    nested = find_checkpoint_file(path, PROCESSOR_FILE)
    if nested is not None:
        video = read_json_object(nested).get("video_processor")
        if video is not None:
            with errors_prefixed(f"{nested} (video_processor)"):
                if not isinstance(video, dict):
                    raise HippoError(f"the video_processor entry must be an object, got {video!r}")
                return build(video)
    file = find_checkpoint_file(path, *PREPROCESSOR_FILES)
    raw = read_json_object(file) if file is not None else {}
    with errors_prefixed(file or path):
        return build(raw)


def settings_value(value: object) -> object:
    """A value of a checkpoint's preprocessing JSON as the settings take it: JSON lists as
    tuples, whole floats (3136.0) as ints; anything else as is, for check_settings to judge."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def check_frames(frames: torch.Tensor) -> None:
    """Frames must be a uint8 tensor [T, H, W, 3] with T >= 1."""
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise HippoError(f"frames must be a uint8 tensor [T, H, W, 3], got {shape}")
    if frames.dtype != torch.uint8:
        raise HippoError(f"frames must be uint8, got {frames.dtype}")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise HippoError(f"frames must not be empty, got shape {tuple(frames.shape)}")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of `factor`, pixel count within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible (same arithmetic as the HF processor)."""
    # The sizes may come from a reader's report before any frame is decoded (a request is
    # sized early): a damaged file's 0x0 must not surface as a ZeroDivisionError below.
    if height <= 0 or width <= 0:
        raise HippoError(f"frames must have a positive height and width, got {height}x{width} "
                         "(is the video damaged?)")
    if max(height, width) / min(height, width) > 200:
        raise HippoError(f"frame aspect ratio must be below 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_frames(frames: torch.Tensor, height: int, width: int, resample: str) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, height, width] holding rounded uint8 values (0..255)."""
    if resample not in ("bicubic", "bilinear"):
        raise HippoError(f"unsupported resample mode {resample!r} (bicubic or bilinear)")
    video = frames.permute(0, 3, 1, 2).to(torch.float32)
    # Width first, then height, each pass rounded to uint8 values: the order and rounding of
    # torchvision's (and PIL's) uint8 resize, which the HF processors use on the CPU.
    video = resize_axis_to_uint8_values(video, (video.shape[-2], width), resample)
    video = resize_axis_to_uint8_values(video, (height, width), resample)
    return video.contiguous()


def resize_axis_to_uint8_values(video: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    """One antialiased resize pass of float [T, C, H, W] holding uint8 values; a no-op at the same size.
    Bicubic overshoots, so the result is clamped to 0..255 before rounding, as a uint8 result would be."""
    if (video.shape[-2], video.shape[-1]) == size:
        return video
    video = F.interpolate(video, size=size, mode=resample, align_corners=False, antialias=True)
    return video.clamp_(0, 255).round_()


def rescale_and_normalize(video: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[T, 3, H, W] values in 0..255 -> (x / 255 - mean) / std per channel."""
    mean_t = torch.tensor(mean, dtype=video.dtype, device=video.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=video.dtype, device=video.device).view(1, 3, 1, 1)
    return (video * (1.0 / 255.0) - mean_t) / std_t


def pad_to_temporal_multiple(video: torch.Tensor, temporal_patch_size: int) -> torch.Tensor:
    """Repeat the last frame until T is a multiple of temporal_patch_size (as the HF processor does)."""
    pad = -video.shape[0] % temporal_patch_size
    if pad == 0:
        return video
    return torch.cat([video, video[-1:].expand(pad, *video.shape[1:])], dim=0)


def qwen_patchify(video: torch.Tensor, patch_size: int, merge_size: int,
                  temporal_patch_size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[T, C, H, W] (T a multiple of temporal_patch_size, H and W of patch_size * merge_size) ->
    pixel_values_videos [grid_t * grid_h * grid_w, C * tp * p * p] and (grid_t, grid_h, grid_w) in patches."""
    frames, channels, height, width = video.shape
    grid_t, grid_h, grid_w = frames // temporal_patch_size, height // patch_size, width // patch_size
    patches = video.reshape(grid_t, temporal_patch_size, channels, grid_h // merge_size, merge_size, patch_size,
                            grid_w // merge_size, merge_size, patch_size)
    # -> (t, h-block, w-block, my, mx, C, tp, py, px): merge groups of 4 patches sit next to each other.
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return flat, (grid_t, grid_h, grid_w)


def preprocess_qwen_video(frames: torch.Tensor, cfg: QwenVideoPreprocess, device: torch.device | str | None = None,
                          dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames [T, H, W, 3] -> (pixel_values_videos [N, C*tp*p*p], video_grid_thw [1, 3] int64)."""
    check_frames(frames)
    frames = frames.to(device) if device is not None else frames
    grid = qwen_video_grid(*frames.shape[:3], cfg)
    video = resize_frames(frames, grid[1] * cfg.patch_size, grid[2] * cfg.patch_size, cfg.resample)
    video = rescale_and_normalize(video, cfg.mean, cfg.std)
    video = pad_to_temporal_multiple(video, cfg.temporal_patch_size)
    pixels, _ = qwen_patchify(video, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)
    grid_thw = torch.tensor([grid], dtype=torch.long, device=pixels.device)
    return pixels.to(dtype), grid_thw


def qwen_video_grid(num_frames: int, height: int, width: int,
                    cfg: QwenVideoPreprocess) -> tuple[int, int, int]:
    """(T, H, W) in patches of what preprocess_qwen_video makes of num_frames frames of height x
    width: smart_resize to multiples of patch * merge, frames in groups of temporal_patch_size
    (the last group filled by repeating the last frame)."""
    if num_frames < 1:
        raise HippoError(f"a video needs at least one frame, got {num_frames}")
    factor = cfg.patch_size * cfg.merge_size
    resized_height, resized_width = smart_resize(height, width, factor, cfg.min_pixels, cfg.max_pixels)
    return (-(-num_frames // cfg.temporal_patch_size), resized_height // cfg.patch_size,
            resized_width // cfg.patch_size)


def qwen_video_tokens(num_frames: int, height: int, width: int, cfg: QwenVideoPreprocess) -> int:
    """The visual tokens of that grid: merge_size^2 patches make a token."""
    groups, rows, cols = qwen_video_grid(num_frames, height, width, cfg)
    return groups * (rows // cfg.merge_size) * (cols // cfg.merge_size)


def preprocess_siglip_video(frames: torch.Tensor, cfg: SiglipVideoPreprocess,
                            device: torch.device | str | None = None,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> pixel_values_videos [1, T, 3, size, size]."""
    check_frames(frames)
    frames = frames.to(device) if device is not None else frames
    video = resize_frames(frames, cfg.size, cfg.size, cfg.resample)
    video = rescale_and_normalize(video, cfg.mean, cfg.std)
    return video[None].to(dtype)

"""A synthetic sample video, generated on first use (nothing to download or ship): the embedded
default for `hippo demo` and the clip the tests decode. Also writers for test clips."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from hippo.errors import HippoError

# Qwen2.5-VL wants H, W multiples of 28 and an even frame count; a moving square on a static
# background gives temporal novelty something to find.
SAMPLE_FRAMES, SAMPLE_HEIGHT, SAMPLE_WIDTH, SAMPLE_FPS = 16, 112, 112, 4.0
_SAMPLE_VERSION = 1  # bump when the content changes, so stale cached copies are not reused


def sample_video_path() -> Path:
    """Path of the sample clip (16 frames, 112x112, 4 fps, mp4v), written once into the cache."""
    name = f"sample_v{_SAMPLE_VERSION}_{SAMPLE_FRAMES}x{SAMPLE_HEIGHT}x{SAMPLE_WIDTH}.mp4"
    path = _cache_dir() / name
    try:
        if not path.is_file() or path.stat().st_size == 0:
            make_synthetic_video(path, SAMPLE_FRAMES, SAMPLE_HEIGHT, SAMPLE_WIDTH, SAMPLE_FPS)
    except OSError as error:  # the cache folder cannot be made, searched or written to
        raise HippoError(f"cannot write the sample video {path} ({error.strerror or error}): "
                         f"point $HIPPO_CACHE_DIR at a writable folder") from None
    return path


def synthetic_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Deterministic uint8 RGB frames [T, H, W, 3]: a smooth static colour texture with a bright
    square moving from the top-left to the bottom-right corner."""
    y = np.arange(height, dtype=np.float32)[:, None, None]
    x = np.arange(width, dtype=np.float32)[None, :, None]
    phase = np.array([0.0, 2.1, 4.2], dtype=np.float32)  # one per channel: a coloured pattern
    background = 100 + 50 * np.sin(x / 6 + phase) * np.cos(y / 9 - phase)
    frames = np.repeat(background.astype(np.uint8)[None], num_frames, axis=0)
    side = max(1, min(height, width) // 5)
    for t in range(num_frames):
        progress = t / (num_frames - 1) if num_frames > 1 else 0.0
        top, left = round(progress * (height - side)), round(progress * (width - side))
        frames[t, top : top + side, left : left + side] = 245
    return frames


def make_synthetic_video(path: str | Path, num_frames: int, height: int, width: int, fps: float) -> Path:
    """Write synthetic_frames(num_frames, height, width) as a video at `fps`."""
    return write_video(path, synthetic_frames(num_frames, height, width), fps)


def write_video(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Write uint8 RGB frames [T, H, W, 3] with OpenCV (mp4v for .mp4; the codec follows the suffix).

    Written to a temporary name and renamed, so a concurrent reader never sees half a file. mp4v
    stores even sizes only: an odd height or width loses its last row or column."""
    import cv2

    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise HippoError(f"frames must be a non-empty uint8 array [T, H, W, 3], got {frames.dtype} "
                         f"{frames.shape}")
    codec = {".mp4": "mp4v", ".avi": "MJPG"}.get(path.suffix.lower(), "mp4v")
    path.parent.mkdir(parents=True, exist_ok=True)
    # The partial file keeps the suffix: OpenCV picks the container from it.
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*codec), float(fps), (width, height))
    if not writer.isOpened():
        raise HippoError(f"OpenCV cannot write a {width}x{height} {codec} video to {path}")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    os.replace(partial, path)
    return path


def _cache_dir() -> Path:
    """$HIPPO_CACHE_DIR, else ~/.cache/hippo, else the temp dir when home is not writable."""
    if "HIPPO_CACHE_DIR" in os.environ:
        return Path(os.environ["HIPPO_CACHE_DIR"])
    home_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hippo"
    try:
        home_cache.mkdir(parents=True, exist_ok=True)
        if os.access(home_cache, os.W_OK):
            return home_cache
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / "hippo"

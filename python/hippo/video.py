"""Video decoding and frame sampling: a file in, uint8 RGB frames [T, H, W, 3] out.

decord decodes when it is importable (it has no aarch64 / macOS-arm64 wheels); OpenCV is the
fallback. A directory of image files is read as a video's frames in file-name order (some
benchmarks ship clips that way, e.g. MVBench's TVQA frames); it records no frame rate (the caller
may state one), and Pillow decodes it. Sampling may be restricted to a time window of the clip
(benchmarks such as MVBench ask about a segment of a longer video). Every failure
a user can cause (missing, empty, corrupt file, too few frames, a bad request) raises HippoError
with one clear message.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, TypeVar

import numpy as np
import torch

from hippo.errors import HippoError, check_positive_rate, is_int, short_repr

BACKENDS = ("decord", "opencv")
_PACKAGES = {"decord": "decord", "opencv": "OpenCV (opencv-python-headless)"}
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# How num_frames frames are spread over a clip: "uniform" (first and last included, each index
# rounded to the nearest frame as qwen-vl-utils does; lmms-eval's LLaVA loaders truncate instead,
# which moves some indices down by one) or "segment_midpoints" (the middle of num_frames equal
# segments: MVBench's).
FRAME_SAMPLINGS = ("uniform", "segment_midpoints")
_Result = TypeVar("_Result")


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float  # the container's average frame rate; 0.0 when it reports none
    height: int
    width: int

    @property
    def duration(self) -> float:
        """Seconds (0.0 when the frame rate is unknown)."""
        return self.num_frames / self.fps if self.fps > 0 else 0.0


class _DecodeFailure(Exception):
    """A backend could not open or decode the file; the next backend may still succeed."""


def _checked_info(count: int, fps: float, height: int, width: int) -> VideoInfo:
    """What a reader reports, as VideoInfo (an unknown or nonsensical frame rate as 0.0). A
    damaged file (a truncated mp4) may still open yet report no frames or frames of 0x0 (OpenCV
    does): that is a decode failure of this backend, not a video, since sampling and resizing
    need frames that exist and have a size."""
    if count < 1:
        raise _DecodeFailure("it reports no frames")
    if height <= 0 or width <= 0:
        raise _DecodeFailure(f"it reports frames of {width}x{height} pixels")
    return VideoInfo(count, fps if math.isfinite(fps) and fps > 0 else 0.0, height, width)


class _Reader(Protocol):
    info: VideoInfo

    def frames(self, indices: list[int]) -> np.ndarray:
        """uint8 RGB [len(indices), H, W, 3] in the order given."""
        ...


def probe_video(path: str | Path, backend: str | None = None) -> VideoInfo:
    """Frame count, frame rate and size of a video, without decoding all of it."""
    path = _checked_source(path)
    return _run_with_backends(path, backend, lambda reader: reader.info)


def load_video(
    path: str | Path,
    num_frames: int | None = None,
    fps: float | None = None,
    backend: str | None = None,
    *,
    start: float | None = None,
    end: float | None = None,
    assumed_fps: float | None = None,
    admit: Callable[[int, int, int], None] | None = None,
    repeat_frames: bool = False,
    sampling: str = "uniform",
    on_info: Callable[[VideoInfo], None] | None = None,
) -> torch.Tensor:
    """Decode sampled frames of a video as a uint8 tensor [T, H, W, 3] (RGB).

    Exactly one of:
      num_frames: N frames spread uniformly over the clip (first and last included);
        asking for more frames than the clip has is an error.
      fps: frames at this rate, at times start, start + 1/fps, ... < end (0 and the clip's
        duration by default); a rate above the clip's own frame rate gives every frame.
    start, end: seconds; the clip is then the frames on screen from start up to end (either
      may be left out: the video's start or end). Needs a known frame rate.
    assumed_fps: the frame rate of a source that records none (a folder of frames); a source
      that records its own is read at that.
    admit: called with (frames, height, width) of the request before any frame is decoded;
      it raises HippoError to refuse it (a model whose context the frames would not fit).
    on_info: called with the source's VideoInfo (its frame rate assumed_fps where it records
      none) before any frame is decoded: the rate fps sampling really gives is min(fps, its fps).
    repeat_frames: when the clip holds fewer frames than num_frames, spread num_frames indices
      over it anyway, repeating frames (as benchmark harnesses do), instead of refusing.
    sampling: how num_frames frames are spread: "uniform" (first and last included) or
      "segment_midpoints" (the middle of num_frames equal segments, MVBench's rule).
    backend: "decord" or "opencv" to force one; None tries decord first, then OpenCV. (A
      directory of frames is read with Pillow whatever the backend.)
    """
    _check_request(num_frames, fps)
    _check_sampling(sampling, num_frames)
    window = _checked_window(start, end)
    if assumed_fps is not None:
        check_positive_rate("assumed_fps", assumed_fps)
    path = _checked_source(path)

    def decode(reader: _Reader) -> torch.Tensor:
        info = reader.info
        if info.fps <= 0 and assumed_fps is not None:
            info = dataclasses.replace(info, fps=float(assumed_fps))
        if on_info is not None:
            on_info(info)
        indices = sample_indices(info, num_frames=num_frames, fps=fps, window=window,
                                 repeat_frames=repeat_frames, sampling=sampling)
        _check_frames_fit_in_memory(len(indices), info)
        if admit is not None:
            admit(len(indices), info.height, info.width)
        return torch.from_numpy(np.ascontiguousarray(reader.frames(indices)))

    return _run_with_backends(path, backend, decode)


def sample_indices(info: VideoInfo, num_frames: int | None = None, fps: float | None = None,
                   window: tuple[float, float | None] | None = None, *,
                   repeat_frames: bool = False, sampling: str = "uniform") -> list[int]:
    """Frame indices to decode for a request (see load_video; window is (start, end) seconds,
    end None for the video's end), in increasing order."""
    _check_request(num_frames, fps)
    _check_sampling(sampling, num_frames)
    if window is not None:
        window = _checked_window(*window)
    total = info.num_frames
    if total < 1:
        raise HippoError("video has no frames")
    first, last = _window_frames(info, window) if window is not None else (0, total - 1)
    if num_frames is not None:
        span = last - first + 1
        if num_frames > span and not repeat_frames:
            where = "video has" if window is None else f"{_describe(window)} holds"
            raise HippoError(f"{where} {span} frame{'s' if span != 1 else ''}, {num_frames} "
                             f"requested: ask for at most {span} (num_frames) or sample by fps")
        if sampling == "segment_midpoints":
            return _segment_midpoints(first, last, num_frames)
        return np.linspace(first, last, num_frames).round().astype(int).tolist()
    if info.fps <= 0:
        raise HippoError("video reports no frame rate: sample it with num_frames instead of fps")
    rate = min(fps, info.fps)  # a rate above the source's gives every frame once
    start = window[0] if window is not None else 0.0
    end = info.duration if window is None or window[1] is None else min(window[1], info.duration)
    count = max(1, math.ceil((end - start) * rate - 1e-6))
    # The frame on screen at each time start + k / rate before end (the first one always); the
    # epsilon keeps exact multiples from rounding down.
    return [min(last, int((start + k / rate) * info.fps + 1e-6)) for k in range(count)]


def _segment_midpoints(first: int, last: int, count: int) -> list[int]:
    """MVBench's rule (get_index in its evaluation code): [first, last] cut into `count` equal
    segments, the frame at each one's middle, with that code's rounding (half to even, then
    truncation), so that accuracies compare with published ones."""
    segment = (last - first) / count
    return [min(last, int(first + segment / 2 + np.round(segment * i))) for i in range(count)]


def _check_sampling(sampling: str, num_frames: int | None) -> None:
    if sampling not in FRAME_SAMPLINGS:
        raise HippoError(f"unknown frame sampling {sampling!r}; choose one of {', '.join(FRAME_SAMPLINGS)}")
    if sampling != "uniform" and num_frames is None:
        raise HippoError(f"{sampling} sampling spreads num_frames frames: give num_frames, not fps")


def _window_frames(info: VideoInfo, window: tuple[float, float | None]) -> tuple[int, int]:
    """(first, last) indices of the frames on screen during the window [start, end)."""
    if info.fps <= 0:
        raise HippoError("video reports no frame rate, so a time window cannot be placed in it")
    start, end = window
    # Compared as floats before any int(): a finite start or end far past the video (1e308 s)
    # times the frame rate overflows to inf, which int() and math.ceil() refuse.
    first_position = start * info.fps + 1e-6
    if first_position >= info.num_frames:
        raise HippoError(f"{_describe(window)} starts after the video ends ({info.duration:.3g} s)")
    first = int(first_position)
    if end is None:
        return first, info.num_frames - 1
    # Frame i is on screen during [i / fps, (i + 1) / fps); a window shorter than one frame
    # still holds the frame on screen at its start.
    last = math.ceil(min(end * info.fps, info.num_frames) - 1e-6) - 1
    return first, max(first, min(last, info.num_frames - 1))


def _describe(window: tuple[float, float | None]) -> str:
    start, end = window
    return f"the window {start:g}-{'end' if end is None else f'{end:g}'} s"


def _check_frames_fit_in_memory(count: int, info: VideoInfo) -> None:
    """Refuse a request whose decoded frames cannot fit in the memory left (an hour at fps=1 is
    3,600 frames: 22 GB at 1080p), rather than let the OS kill the process mid-decode. The
    decoders hold about two copies of the batch at once."""
    needed = 2 * count * info.height * info.width * 3
    available = _available_memory_bytes()
    if available is not None and needed > available:
        raise HippoError(
            f"decoding {count} frames of {info.width}x{info.height} needs about "
            f"{_size(needed)}, more than the {_size(available)} of memory available: ask for "
            "fewer frames (num_frames, a lower fps or a time window)")


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def _available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _checked_window(start: float | None, end: float | None) -> tuple[float, float | None] | None:
    if start is None and end is None:
        return None
    for name, value in (("start", start), ("end", end)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not math.isfinite(value) or value < 0):
            raise HippoError(f"{name} must be a number of seconds >= 0, got {value!r}")
    start = 0.0 if start is None else float(start)
    if end is not None and end < start:
        raise HippoError(f"the window ends ({end:g} s) before it starts ({start:g} s)")
    return start, None if end is None else float(end)


def _check_request(num_frames: int | None, fps: float | None) -> None:
    if (num_frames is None) == (fps is None):
        raise HippoError("give exactly one of num_frames and fps")
    if num_frames is not None:
        if not is_int(num_frames):
            raise HippoError(f"num_frames must be an integer, got {num_frames!r}")
        if num_frames < 1:
            raise HippoError(f"num_frames must be at least 1, got {num_frames}")
    if fps is not None:
        check_positive_rate("fps", fps)


def check_video_request(path: str | Path, num_frames: int | None = None, fps: float | None = None,
                        *, start: float | None = None, end: float | None = None) -> None:
    """Refuse what load_video refuses before it opens the file (a bad frame count, rate or
    window; a path that is missing, empty or unreadable): for callers with slow work to do
    before decoding, such as loading a model."""
    _check_request(num_frames, fps)
    _checked_window(start, end)
    _checked_source(path)


def _checked_source(path: str | Path) -> Path:
    """A video file or a directory of frames that exists, is not empty and can be read."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise HippoError(f"the video must be a path to a video file or a folder of frames, "
                         f"got {type(path).__name__} {short_repr(path)}")
    if not os.fspath(path):  # Path("") would read as the current directory
        raise HippoError("the video path is empty: give a video file or a folder of frames")
    if "://" in os.fspath(path):  # Path() would fold the // and report no such file
        raise HippoError(f"the video must be a local file or folder of frames, got the URL "
                         f"{os.fspath(path)}: download it first (hippo downloads nothing)")
    path = Path(path)
    if not path.exists():
        raise HippoError(f"video file not found: {path}")
    if path.is_dir():
        if not _frame_files(path):
            raise HippoError(f"{path} is a directory with no image frames "
                             f"({', '.join(FRAME_EXTENSIONS)})")
        return path
    if not path.is_file():
        raise HippoError(f"not a video file (a special file): {path}")
    if path.stat().st_size == 0:
        raise HippoError(f"video file is empty: {path}")
    _check_readable(path)
    return path


def _check_readable(path: Path) -> None:
    """Open the file once: one without read permission would otherwise fail in every backend
    and read as a corrupt video."""
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise HippoError(f"cannot read the video file {path}: {error.strerror or error}") from None


def available_backends() -> list[str]:
    """The video decoders this installation can use, in the order they are tried: decord, then
    OpenCV (decord has no wheels beyond x86_64; either may be missing or fail to import)."""
    return [name for name, available in (("decord", _decord_available), ("opencv", _opencv_available))
            if available()]


def _backend_order(backend: str | None) -> list[str]:
    """The backends to try, in order: a forced one alone, else every available one."""
    available = available_backends()
    if backend is not None:
        if backend not in BACKENDS:
            raise HippoError(f"unknown video backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if backend not in available:
            raise HippoError(f"video backend {backend!r} requested but {_PACKAGES[backend]} is not "
                             "installed (or fails to import)")
        return [backend]
    if not available:
        raise HippoError("no video decoder is installed: pip install decord (x86_64) or "
                         "opencv-python-headless, or pass decoded frames")
    return available


def _run_with_backends(path: Path, backend: str | None, work: Callable[[_Reader], _Result]) -> _Result:
    # decord 0.6 fails on some valid files (frames 16, 24, 48 or 72 px wide: a row-stride bug), so a
    # decode failure falls through to the next backend. HippoErrors (bad requests) do not.
    if path.is_dir():
        try:
            return work(_FrameFolderReader(path))
        except _DecodeFailure as failure:
            raise HippoError(f"cannot read the frames in {path}: {failure}") from None
    failures = []
    for name in _backend_order(backend):
        try:
            return work(_OPENERS[name](path))
        except _DecodeFailure as failure:
            failures.append(f"{name}: {failure}")
    raise HippoError(f"cannot decode video {path}: the file is corrupt or not a supported video "
                     f"({'; '.join(failures)})")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _decord_available() -> bool:
    return _importable("decord")


def _opencv_available() -> bool:
    return _importable("cv2")


class _DecordReader:
    def __init__(self, path: Path):
        import decord

        # FFmpeg inside decord logs to stderr on its own; hippo reports every failure itself.
        decord.logging.set_level(decord.logging.QUIET)
        self._errors = (RuntimeError, decord.DECORDError)
        try:
            with _native_stderr_silenced():  # decord's C++ logger writes to fd 2 regardless
                self._reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
            count = len(self._reader)
            height, width = self._reader[0].shape[:2] if count else (0, 0)
            fps = float(self._reader.get_avg_fps())
        except self._errors as error:
            raise _DecodeFailure(_decord_reason(error)) from None
        self.info = _checked_info(count, fps, int(height), int(width))

    def frames(self, indices: list[int]) -> np.ndarray:
        try:
            with _native_stderr_silenced():
                return self._reader.get_batch(indices).asnumpy()
        except self._errors as error:
            raise _DecodeFailure(_decord_reason(error)) from None


def _decord_reason(error: Exception) -> str:
    """decord's message; an internal assertion ("Check failed: avcodec_send_packet(...": FFmpeg
    refusing a packet of a corrupt stream) tells a user nothing, so it is said in words."""
    reason = _first_line(error)
    return "its decoder rejects the stream" if "Check failed" in reason else reason


# fd 2 is one per process: threads decoding at once (prepare() runs outside a pipeline's lock)
# share one redirection, made by the first to enter and undone by the last to leave. Each saving
# and restoring fd 2 on its own, interleaved calls restored each other's /dev/null: the process's
# stderr stayed silenced for good (every later log line and traceback lost).
_SILENCE_LOCK = threading.Lock()
_silence = {"depth": 0, "saved": None}


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null for the duration: for native libraries that log
    failures to it themselves (decord), which hippo reports as one line of its own. Native code
    writes to the descriptor whatever sys.stderr is; nothing happens where it is closed. Safe
    across threads and nested calls: fd 2 comes back once the last of them is done."""
    fd = 2
    with _SILENCE_LOCK:
        if _silence["depth"] == 0:
            if sys.stderr is not None:
                sys.stderr.flush()  # what Python has buffered still goes out
            _silence["saved"] = _point_stderr_at_devnull(fd)
        _silence["depth"] += 1
    try:
        yield
    finally:
        with _SILENCE_LOCK:
            _silence["depth"] -= 1
            saved = _silence["saved"]
            if _silence["depth"] == 0 and saved is not None:
                _silence["saved"] = None
                os.dup2(saved, fd)
                os.close(saved)


def _point_stderr_at_devnull(fd: int) -> int | None:
    """fd pointed at /dev/null; returns a duplicate of what it was (None where it could not be
    redirected: the decoder then runs unsilenced, and no descriptor is left open)."""
    try:
        saved = os.dup(fd)
    except OSError:
        return None
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
    except OSError:  # out of descriptors: the duplicate would leak, one per decode
        os.close(saved)
        return None
    return saved


class _OpenCVReader:
    def __init__(self, path: Path):
        import cv2

        # Likewise OpenCV's FFmpeg ("moov atom not found", ...), unless the user set a level.
        # The variable only counts if it is set before OpenCV first opens a file, so the open
        # also runs with fd 2 silenced (cv2 may have been imported and used before hippo).
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
        self._cv2, self._path = cv2, path
        with _native_stderr_silenced():
            capture = cv2.VideoCapture(str(path))
        try:
            if not capture.isOpened():
                raise _DecodeFailure("OpenCV cannot open it")
            fps = float(capture.get(cv2.CAP_PROP_FPS))
            height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
            width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
            count = _opencv_frame_count(cv2, capture)
        finally:
            capture.release()
        self.info = _checked_info(count, fps, height, width)

    def frames(self, indices: list[int]) -> np.ndarray:
        # Decode sequentially rather than seek: seeking by frame index is inexact for some codecs.
        wanted, decoded = set(indices), {}
        with _native_stderr_silenced():
            capture = self._cv2.VideoCapture(str(self._path))
        try:
            for index in range(max(indices) + 1):
                if not capture.grab():
                    raise _DecodeFailure(f"stream ends at frame {index} of {self.info.num_frames}")
                if index in wanted:
                    ok, bgr = capture.retrieve()
                    if not ok:
                        raise _DecodeFailure(f"cannot decode frame {index}")
                    decoded[index] = self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB)
        finally:
            capture.release()
        return np.stack([decoded[index] for index in indices])


def _opencv_frame_count(cv2, capture) -> int:
    """The stream's frame count, from its packets. CAP_PROP_FRAME_COUNT is the container's count
    where it has one (mp4, avi) but duration x frame rate where it has none (mkv, webm): for a
    variable-rate clip (phones, screen and browser recordings) that estimate is off either way,
    and sampling then fails at a frame that does not exist or never reaches the clip's end. In
    raw mode (CAP_PROP_FORMAT -1) grab() reads packets without decoding them, as decord counts.
    Where raw mode is refused, the estimate stands, and a missing one is counted by decoding."""
    if capture.set(cv2.CAP_PROP_FORMAT, -1):
        count = 0
        while capture.grab():
            count += 1
        return count
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    if count <= 0:  # some containers carry no frame count: count by grabbing
        count = 0
        while capture.grab():
            count += 1
    return count


def _frame_files(folder: Path) -> list[Path]:
    """The folder's image files in natural name order (frame_2 before frame_10)."""
    files = [path for path in folder.iterdir()
             if path.is_file() and path.suffix.lower() in FRAME_EXTENSIONS]
    return sorted(files, key=lambda path: [int(part) if part.isdigit() else part
                                           for part in re.split(r"(\d+)", path.name)])


class _FrameFolderReader:
    """A directory of image files as a video without a frame rate (sample it by num_frames,
    or state its rate: load_video's assumed_fps). Pillow decodes them: once decord is loaded,
    OpenCV's PNG decoder fails in the same process (seen with decord 0.6 and opencv 5.0:
    "libpng error: bad parameters to zlib")."""

    def __init__(self, folder: Path):
        self._files = _frame_files(folder)
        height, width = self._read(0).shape[:2]
        self.info = _checked_info(len(self._files), 0.0, height, width)

    def _read(self, index: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        name = self._files[index].name
        try:
            with Image.open(self._files[index]) as image:
                return np.asarray(image.convert("RGB"))
        except Image.DecompressionBombError as error:
            # Not an OSError: Pillow refuses images far beyond its pixel limit before decoding.
            raise _DecodeFailure(_too_large(name, error)) from None
        except (OSError, UnidentifiedImageError, ValueError):
            raise _DecodeFailure(f"cannot decode the image {name}") from None

    def frames(self, indices: list[int]) -> np.ndarray:
        frames = [self._read(index) for index in indices]
        sizes = {frame.shape for frame in frames}
        if len(sizes) > 1:
            raise _DecodeFailure(f"the frames differ in size: {sorted(sizes)}")
        return np.stack(frames)


def _too_large(name: str, error: Exception) -> str:
    """Why Pillow refused an image: its pixel count against Pillow's limit, both taken from
    Pillow's message ("Image size (N pixels) exceeds limit of M pixels, ...") where it has them."""
    numbers_in_message = re.findall(r"\d+", str(error))
    if len(numbers_in_message) < 2:
        return f"the image {name} is too large to decode: {_first_line(error)}"
    pixels, limit = (int(number) for number in numbers_in_message[:2])
    return (f"the image {name} is too large to decode: {pixels:,} pixels, over Pillow's limit "
            f"of {limit:,}")


# Native libraries' log prefixes in their messages: decord's C++ ones open with
# "[16:01:30] /github/workspace/src/.../file.cc:292: ", once for each time the error was re-thrown.
_NATIVE_LOG_PREFIX = re.compile(r"\[\d{2}:\d{2}:\d{2}\] \S+:\d+: ")


def _first_line(error: Exception) -> str:
    """The error's first line, without native log prefixes, cut at 200 characters."""
    text = _NATIVE_LOG_PREFIX.sub("", str(error))
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__


_OPENERS = {"decord": _DecordReader, "opencv": _OpenCVReader}

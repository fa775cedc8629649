"""hippo.video and hippo.assets: decoding with both backends, frame sampling, the generated sample
clip, and a clear HippoError for every bad file or request."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

import hippo.video as video
from hippo.assets import SAMPLE_FPS, SAMPLE_FRAMES, SAMPLE_HEIGHT, SAMPLE_WIDTH
from hippo.assets import make_synthetic_video, sample_video_path, synthetic_frames, write_video
from hippo.errors import HippoError
from hippo.video import VideoInfo, load_video, probe_video, sample_indices

HAS_DECORD = video._decord_available()
requires_decord = pytest.mark.skipif(not HAS_DECORD, reason="decord is not installed")
BACKENDS = ["opencv", pytest.param("decord", marks=requires_decord)]

LEVEL_BASE, LEVEL_STEP = 10, 12  # frame i is uniform grey LEVEL_BASE + LEVEL_STEP * i


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HIPPO_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hippo-cache"))


def indexed_video(path, num_frames: int, fps: float = 8.0):
    """A clip whose frame i is a flat grey encoding i, so decoded frames reveal their index."""
    levels = LEVEL_BASE + LEVEL_STEP * np.arange(num_frames)
    frames = np.broadcast_to(levels[:, None, None, None], (num_frames, 32, 32, 3)).astype(np.uint8)
    return write_video(path, frames, fps)


def decoded_indices(frames: torch.Tensor) -> list[int]:
    """The index each decoded frame encodes (nearest grey level; mp4v shifts levels by ~3)."""
    means = frames.double().mean(dim=(1, 2, 3))
    return ((means - LEVEL_BASE) / LEVEL_STEP).round().long().tolist()


# --- the sample clip -------------------------------------------------------------------------

def test_sample_clip_metadata_and_content(backend):
    path = sample_video_path()
    expected_info = VideoInfo(SAMPLE_FRAMES, SAMPLE_FPS, SAMPLE_HEIGHT, SAMPLE_WIDTH)
    assert probe_video(path, backend=backend) == expected_info
    frames = load_video(path, num_frames=SAMPLE_FRAMES, backend=backend)
    assert frames.shape == (SAMPLE_FRAMES, SAMPLE_HEIGHT, SAMPLE_WIDTH, 3) and frames.dtype == torch.uint8
    # Close to what was encoded (lossy codec), and the bright square really moves.
    expected = torch.from_numpy(synthetic_frames(SAMPLE_FRAMES, SAMPLE_HEIGHT, SAMPLE_WIDTH))
    assert (frames.float() - expected.float()).abs().mean() < 6
    assert frames[0, :10, :10].float().mean() > 200 and frames[-1, :10, :10].float().mean() < 200
    assert frames[-1, -10:, -10:].float().mean() > 200


def test_sample_clip_is_cached_and_deterministic(tmp_path):
    path = sample_video_path()
    mtime = path.stat().st_mtime_ns
    assert sample_video_path() == path and path.stat().st_mtime_ns == mtime
    again = make_synthetic_video(tmp_path / "again.mp4", SAMPLE_FRAMES, SAMPLE_HEIGHT, SAMPLE_WIDTH, SAMPLE_FPS)
    decoded = load_video(path, num_frames=SAMPLE_FRAMES)
    assert torch.equal(load_video(again, num_frames=SAMPLE_FRAMES), decoded)


@requires_decord
def test_backends_decode_the_same_frames():
    path = sample_video_path()
    by_decord = load_video(path, num_frames=SAMPLE_FRAMES, backend="decord")
    by_opencv = load_video(path, num_frames=SAMPLE_FRAMES, backend="opencv")
    assert by_decord.shape == by_opencv.shape
    assert (by_decord.float() - by_opencv.float()).abs().mean() < 1.0


# --- sampling --------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [1, 2, 5, 7, 20])
def test_uniform_sampling_picks_linspace_indices(tmp_path, backend, count):
    path = indexed_video(tmp_path / "indexed.mp4", 20)
    frames = load_video(path, num_frames=count, backend=backend)
    assert decoded_indices(frames) == np.linspace(0, 19, count).round().astype(int).tolist()


@pytest.mark.parametrize(
    "rate, expected",
    [
        (2.0, [0, 4, 8, 12, 16]),  # every 4th frame of an 8 fps clip
        (3.0, [0, 2, 5, 8, 10, 13, 16, 18]),  # times k/3 s < 2.5 s
        (8.0, list(range(20))),  # the clip's own rate: every frame
        (100.0, list(range(20))),  # above it: every frame, none repeated
        (0.1, [0]),  # slower than the clip is long: its first frame
    ],
)
def test_fps_sampling(tmp_path, backend, rate, expected):
    path = indexed_video(tmp_path / "indexed.mp4", 20, fps=8.0)
    assert decoded_indices(load_video(path, fps=rate, backend=backend)) == expected


def test_sample_indices_without_a_file():
    info = VideoInfo(num_frames=10, fps=30.0, height=1, width=1)
    assert sample_indices(info, num_frames=4) == [0, 3, 6, 9]
    assert sample_indices(info, fps=10.0) == [0, 3, 6, 9]
    with pytest.raises(HippoError, match="no frame rate"):
        sample_indices(VideoInfo(10, 0.0, 1, 1), fps=1.0)
    with pytest.raises(HippoError, match="no frames"):
        sample_indices(VideoInfo(0, 30.0, 1, 1), num_frames=1)


@pytest.mark.parametrize(
    "request_kwargs, expected",
    [
        (dict(num_frames=4, window=(2.0, 5.0)), [20, 30, 39, 49]),  # frames 20 .. 49 on screen
        (dict(fps=2.0, window=(2.0, 5.0)), [20, 25, 30, 35, 40, 45]),
        (dict(num_frames=3, window=(2.0, None)), [20, 60, 99]),  # to the end
        (dict(num_frames=2, window=(5.0, 100.0)), [50, 99]),  # an end past the video's
        (dict(num_frames=1, window=(2.05, 2.05)), [20]),  # the frame on screen at that time
        (dict(num_frames=1, window=(0.0, 0.05)), [0]),
        (dict(fps=100.0, window=(9.75, None)), [97, 98, 99]),
        # Ends whose frame position overflows a float (1e308 s x 10 fps): the video's end.
        (dict(num_frames=2, window=(5.0, 1e308)), [50, 99]),
        (dict(fps=2.0, window=(8.0, 1e308)), [80, 85, 90, 95]),
    ],
)
def test_sampling_inside_a_time_window(request_kwargs, expected):
    info = VideoInfo(num_frames=100, fps=10.0, height=1, width=1)
    assert sample_indices(info, **request_kwargs) == expected


def _mvbench_get_index(max_frame: int, num_segments: int) -> list[int]:
    """MVBench's get_index for an unbounded clip (start_idx 0, end_idx max_frame), restated."""
    seg_size = float(max_frame) / num_segments
    return [int(seg_size / 2 + np.round(seg_size * idx)) for idx in range(num_segments)]


@pytest.mark.parametrize("total, count", [(100, 16), (97, 8), (300, 32), (16, 16), (5, 8), (1, 4),
                                          (61, 7)])
def test_segment_midpoints_follow_mvbench(total, count):
    info = VideoInfo(num_frames=total, fps=30.0, height=1, width=1)
    indices = sample_indices(info, num_frames=count, sampling="segment_midpoints", repeat_frames=True)
    assert indices == _mvbench_get_index(total - 1, count)
    assert indices == sorted(indices) and 0 <= indices[0] and indices[-1] <= total - 1


def test_segment_midpoints_by_hand():
    # 100 frames in 8 segments of 99 / 8 = 12.375: 6.1875 + round(12.375 i) (half to even),
    # truncated.
    info = VideoInfo(num_frames=100, fps=30.0, height=1, width=1)
    assert sample_indices(info, num_frames=8, sampling="segment_midpoints") \
        == [6, 18, 31, 43, 56, 68, 80, 93]  # i = 4: 49.5 rounds to 50


def test_segment_midpoints_inside_a_window_and_bad_requests():
    info = VideoInfo(num_frames=100, fps=10.0, height=1, width=1)
    # Frames 20 .. 49 on screen: 4 segments of 7.25 frames, their middles.
    assert sample_indices(info, num_frames=4, window=(2.0, 5.0), sampling="segment_midpoints") \
        == [23, 30, 37, 45]  # 20 + 3.625 + round(7.25 i), half to even: 14.5 -> 14
    with pytest.raises(HippoError, match="unknown frame sampling 'middle'"):
        sample_indices(info, num_frames=4, sampling="middle")
    with pytest.raises(HippoError, match="give num_frames, not fps"):
        sample_indices(info, fps=1.0, sampling="segment_midpoints")
    with pytest.raises(HippoError, match="unknown frame sampling"):
        load_video("/nowhere.mp4", num_frames=4, sampling="middle")  # before the file is opened


def test_rate_sampling_in_a_window_follows_its_times():
    """Samples at start + k / fps before end, not counted over the frames on screen."""
    ntsc = VideoInfo(num_frames=300, fps=30000 / 1001, height=1, width=1)
    assert sample_indices(ntsc, fps=1.0, window=(1.0, 2.0)) == [29]  # one second, one sample
    info = VideoInfo(num_frames=100, fps=10.0, height=1, width=1)
    assert sample_indices(info, fps=4.0, window=(2.05, 3.0)) == [20, 23, 25, 28]
    # An end past the video's: the samples stop with the video, no repeats of its last frame.
    assert sample_indices(info, fps=2.0, window=(8.0, 100.0)) == [80, 85, 90, 95]


def test_repeated_frames_fill_a_short_window_when_asked():
    info = VideoInfo(num_frames=100, fps=10.0, height=1, width=1)
    assert sample_indices(info, num_frames=4, window=(2.0, 2.2), repeat_frames=True) == [20, 20, 21, 21]


def test_sampling_at_float_boundaries():
    """Times that land on a frame boundary up to float error: 29 / 7 * 7 is 29.000000000000004
    (no 30th sample past the clip's end), 0.28 * 25 is 7.000000000000001 (the window ends with
    frame 6, not 7), 0.29 * 100 is 28.999999999999996 (the window starts with frame 29)."""
    assert sample_indices(VideoInfo(29, 7.0, 1, 1), fps=7.0) == list(range(29))
    assert sample_indices(VideoInfo(100, 25.0, 1, 1), num_frames=7, window=(0.0, 0.28)) \
        == list(range(7))
    assert sample_indices(VideoInfo(100, 100.0, 1, 1), fps=10.0, window=(0.29, 0.5)) == [29, 39, 49]


def test_slow_frame_rates_and_an_empty_window_are_sampled():
    """A clip of 1 fps or less still has a frame rate (fps sampling and windows work), and a
    window of no length sampled by fps gives the frame on screen at its time."""
    assert sample_indices(VideoInfo(10, 1.0, 1, 1), fps=1.0, window=(2.0, 5.0)) == [2, 3, 4]
    assert sample_indices(VideoInfo(10, 0.5, 1, 1), fps=1.0) == list(range(10))
    assert video._checked_info(10, 0.5, 2, 3) == VideoInfo(10, 0.5, 2, 3)
    assert sample_indices(VideoInfo(100, 10.0, 1, 1), fps=2.0, window=(2.0, 2.0)) == [20]
    assert VideoInfo(10, 0.0, 1, 1).duration == 0.0 and VideoInfo(10, 0.5, 1, 1).duration == 20.0


def test_bad_time_windows():
    info = VideoInfo(num_frames=100, fps=10.0, height=1, width=1)
    with pytest.raises(HippoError, match="ends \\(2 s\\) before it starts"):
        sample_indices(info, num_frames=1, window=(5.0, 2.0))
    with pytest.raises(HippoError, match="start must be a number of seconds >= 0"):
        sample_indices(info, num_frames=1, window=(-1.0, 2.0))
    with pytest.raises(HippoError, match="start must be a number of seconds >= 0"):
        sample_indices(info, num_frames=1, window=(float("nan"), None))
    # Just before the end, within rounding of the last frame's end: no frame is left.
    with pytest.raises(HippoError, match="starts after the video ends"):
        sample_indices(info, num_frames=1, window=(9.9999999999, None))
    with pytest.raises(HippoError, match="window 0-0.05 s holds 1 frame, 2 requested"):
        sample_indices(info, num_frames=2, window=(0.0, 0.05))
    with pytest.raises(HippoError, match="window 5-5.3 s holds 3 frames, 4 requested"):
        sample_indices(info, num_frames=4, window=(5.0, 5.3))  # a window that starts late
    with pytest.raises(HippoError, match="starts after the video ends"):
        sample_indices(info, num_frames=1, window=(10.0, None))
    with pytest.raises(HippoError, match="starts after the video ends"):  # was an OverflowError
        sample_indices(info, fps=1.0, window=(1e308, 1e308))
    with pytest.raises(HippoError, match="no frame rate, so a time window"):
        sample_indices(VideoInfo(100, 0.0, 1, 1), num_frames=1, window=(1.0, 2.0))


def test_load_video_cuts_a_window(tmp_path, backend):
    path = indexed_video(tmp_path / "indexed.mp4", 20, fps=8.0)  # 2.5 s
    frames = load_video(path, num_frames=4, start=0.5, end=1.0, backend=backend)
    assert decoded_indices(frames) == [4, 5, 6, 7]
    assert decoded_indices(load_video(path, fps=4.0, start=1.5, backend=backend)) == [12, 14, 16, 18]
    # A file's own frame rate wins over an assumed one.
    assert decoded_indices(load_video(path, fps=4.0, end=0.5, assumed_fps=1.0,
                                      backend=backend)) == [0, 2]


# --- awkward clips ---------------------------------------------------------------------------

def test_one_frame_video(tmp_path, backend):
    path = make_synthetic_video(tmp_path / "one.mp4", 1, 56, 56, 4.0)
    assert probe_video(path, backend=backend).num_frames == 1
    assert load_video(path, num_frames=1, backend=backend).shape == (1, 56, 56, 3)
    assert load_video(path, fps=1.0, backend=backend).shape == (1, 56, 56, 3)
    with pytest.raises(HippoError, match="video has 1 frame, 2 requested: ask for at most 1"):
        load_video(path, num_frames=2, backend=backend)


@pytest.mark.parametrize("height, width", [(57, 75), (30, 44), (84, 140)])
def test_odd_sizes_decode_at_the_stored_size(tmp_path, backend, height, width):
    # mp4v stores even sizes only (57x75 becomes 56x74); the loader returns what the file holds.
    path = make_synthetic_video(tmp_path / "odd.mp4", 4, height, width, 4.0)
    info = probe_video(path, backend=backend)
    assert (info.height, info.width) == (height // 2 * 2, width // 2 * 2)
    assert load_video(path, num_frames=4, backend=backend).shape == (4, info.height, info.width, 3)


@requires_decord
def test_auto_backend_survives_decords_narrow_frame_bug(tmp_path):
    # decord 0.6 fails on some narrow frames (16 px wide: a row-stride mismatch); auto falls back.
    path = make_synthetic_video(tmp_path / "narrow.mp4", 4, 16, 16, 4.0)
    frames = load_video(path, num_frames=4)
    assert torch.equal(frames, load_video(path, num_frames=4, backend="opencv"))
    with pytest.raises(HippoError, match="cannot decode video"):
        load_video(path, num_frames=4, backend="decord")


def test_without_decord_opencv_decodes(monkeypatch):
    monkeypatch.setattr(video, "_decord_available", lambda: False)
    frames = load_video(sample_video_path(), num_frames=4)
    assert torch.equal(frames, load_video(sample_video_path(), num_frames=4, backend="opencv"))
    with pytest.raises(HippoError, match="decord is not installed"):
        load_video(sample_video_path(), num_frames=4, backend="decord")


@pytest.mark.parametrize("estimate", [10, 40])
def test_opencv_counts_frames_when_the_container_only_estimates(tmp_path, monkeypatch, estimate):
    # mkv and webm carry no frame count: OpenCV then reports duration x frame rate, which a
    # variable-rate clip does not match (a phone's 30 fps clip with a 60 fps burst). Too high, every
    # request failed at a frame that does not exist; too low, sampling never reached the clip's end.
    import cv2  # a declared dependency (the fallback decoder)
    path = indexed_video(tmp_path / "indexed.mp4", 20)

    real_capture = cv2.VideoCapture

    class EstimatingCapture:  # a wrapper: subclasses of cv2.VideoCapture crash on retrieve()
        def __init__(self, *args):
            self._capture = real_capture(*args)

        def __getattr__(self, name):
            return getattr(self._capture, name)

        def get(self, prop):
            return float(estimate) if prop == cv2.CAP_PROP_FRAME_COUNT else self._capture.get(prop)

    monkeypatch.setattr(cv2, "VideoCapture", EstimatingCapture)
    assert probe_video(path, backend="opencv").num_frames == 20
    assert decoded_indices(load_video(path, num_frames=3, backend="opencv")) == [0, 10, 19]


# --- a directory of frames ---------------------------------------------------------------------

def frame_folder(folder, num_frames: int, size=(32, 32), ext=".png", name="frame_{}"):
    """Grey frames encoding their index (as indexed_video), one lossless image each, named with
    unpadded numbers so that only a natural sort orders them."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(num_frames):
        level = LEVEL_BASE + LEVEL_STEP * index
        Image.fromarray(np.full((*size, 3), level, dtype=np.uint8)).save(
            folder / (name.format(index + 1) + ext))
    return folder


def test_a_folder_of_frames_is_a_video_in_natural_name_order(tmp_path):
    folder = frame_folder(tmp_path / "clip", 12)
    (folder / "notes.txt").write_text("not a frame")  # ignored
    assert probe_video(folder) == VideoInfo(12, 0.0, 32, 32)
    frames = load_video(folder, num_frames=5)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == torch.uint8
    assert decoded_indices(frames) == [0, 3, 6, 8, 11]  # linspace over frame_1 .. frame_12
    assert decoded_indices(load_video(folder, num_frames=12)) == list(range(12))
    with pytest.raises(HippoError, match="no frame rate"):
        load_video(folder, fps=1.0)
    # With a stated rate (MVBench's TVQA frames are 3 per second) rates and windows work.
    assert decoded_indices(load_video(folder, fps=1.5, assumed_fps=3.0)) == [0, 2, 4, 6, 8, 10]
    assert decoded_indices(load_video(folder, num_frames=6, start=1.0, end=3.0,
                                      assumed_fps=3.0)) == [3, 4, 5, 6, 7, 8]
    with pytest.raises(HippoError, match="no frame rate, so a time window"):
        load_video(folder, num_frames=2, start=1.0)


def test_bad_frame_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no frames here")
    with pytest.raises(HippoError, match="directory with no image frames"):
        load_video(empty, num_frames=1)
    mixed = frame_folder(tmp_path / "mixed", 3)
    frame_folder(mixed, 1, size=(16, 32), name="frame_9")
    with pytest.raises(HippoError, match="differ in size"):
        load_video(mixed, num_frames=4)
    corrupt = frame_folder(tmp_path / "corrupt", 3)
    (corrupt / "frame_2.png").write_bytes(b"not an image")
    with pytest.raises(HippoError, match="cannot decode the image frame_2.png"):
        load_video(corrupt, num_frames=3)
    with pytest.raises(HippoError, match="video has 3 frames, 4 requested"):
        load_video(frame_folder(tmp_path / "short", 3), num_frames=4)


def test_a_frame_beyond_pillows_pixel_limit_is_a_clear_error(tmp_path, monkeypatch):
    """Pillow raises DecompressionBombError (not an OSError) for an image far beyond its pixel
    limit (a 20000x10000 PNG); the limit is lowered here so that 32x32 frames trip it."""
    from PIL import Image

    folder = frame_folder(tmp_path / "huge", 2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # refused beyond twice that: 200
    for read in (probe_video, lambda path: load_video(path, num_frames=2)):
        with pytest.raises(HippoError, match=r"cannot read the frames in .*: the image frame_1.png "
                                             r"is too large to decode: 1,024 pixels, over "
                                             r"Pillow's limit of 200$"):
            read(folder)


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend_choice", [None, "opencv", pytest.param("decord", marks=requires_decord)])
def test_bad_files(tmp_path, backend_choice):
    empty = tmp_path / "empty.mp4"
    empty.touch()
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 100)
    cases = [
        (tmp_path / "missing.mp4", "not found"),
        (tmp_path, "directory"),
        (empty, "empty"),
        (garbage, "cannot decode video"),
        (text, "cannot decode video"),
    ]
    for path, message in cases:
        with pytest.raises(HippoError, match=message):
            load_video(path, num_frames=1, backend=backend_choice)
        with pytest.raises(HippoError, match=message):
            probe_video(path, backend=backend_choice)


@pytest.mark.parametrize("backend_choice", [None, "opencv", pytest.param("decord", marks=requires_decord)])
def test_a_truncated_file_is_a_decode_failure(tmp_path, backend_choice):
    """The sample clip cut short: decord cannot open it and OpenCV opens it but reports frames
    of 0x0, which must not reach the resize arithmetic (a ZeroDivisionError there)."""
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(sample_video_path().read_bytes()[:8000])
    with pytest.raises(HippoError, match="cannot decode video"):
        probe_video(truncated, backend=backend_choice)
    with pytest.raises(HippoError, match="cannot decode video"):
        load_video(truncated, num_frames=4, backend=backend_choice)


def test_a_file_that_cannot_be_read_is_not_called_corrupt(tmp_path, monkeypatch):
    """No read permission (the tests may run as root, who has it anyway: open is made to fail)."""
    path = indexed_video(tmp_path / "clip.mp4", 4)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(video, "open", denied, raising=False)
    with pytest.raises(HippoError, match=r"^cannot read the video file .*clip\.mp4: Permission denied$"):
        load_video(path, num_frames=2)


@pytest.mark.parametrize("backend_choice", [None, pytest.param("decord", marks=requires_decord)])
def test_a_garbled_stream_is_reported_in_words(tmp_path, backend_choice):
    """An MJPG clip with bytes overwritten: decord's message is an assertion of its C++ code
    behind log prefixes ("[16:01:30] .../threaded_decoder.cc:292: ... Check failed:
    avcodec_send_packet(..."), which must not reach the user."""
    path = make_synthetic_video(tmp_path / "garbled.avi", 16, 112, 112, 4.0)
    data = bytearray(path.read_bytes())
    for offset in range(2001, len(data), 97):
        data[offset] = 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(HippoError) as error:
        load_video(path, num_frames=4, backend=backend_choice)
    message = str(error.value)
    assert message.startswith(f"cannot decode video {path}: the file is corrupt or not a "
                              "supported video ("), message
    assert not re.search(r"\[\d\d:\d\d:\d\d\]|\.cc:\d+|Check failed", message), message


@pytest.mark.parametrize("count, height, width, message", [
    (16, 0, 0, "frames of 0x0 pixels"), (16, 32, -1, "frames of -1x32 pixels"),
    (16, 0, 32, "frames of 32x0 pixels"),
    (0, 32, 32, "no frames")])
def test_a_reader_reporting_no_frames_or_no_size_fails_to_decode(count, height, width, message):
    with pytest.raises(video._DecodeFailure, match=message):
        video._checked_info(count, 8.0, height, width)
    assert video._checked_info(1, float("nan"), 2, 3) == VideoInfo(1, 0.0, 2, 3)


@pytest.mark.parametrize("source, message", [
    ("", "the video path is empty"),
    (None, "the video must be a path .* got NoneType None"),
    (5, "the video must be a path .* got int 5"),
    (b"clip.mp4", "the video must be a path .* got bytes"),
])
def test_a_video_that_is_not_a_path_is_refused(source, message):
    """"" is not the current directory, and a non-path is no pathlib TypeError."""
    with pytest.raises(HippoError, match=message):
        load_video(source, num_frames=1)
    with pytest.raises(HippoError, match=message):
        probe_video(source)


@pytest.mark.parametrize(
    "request_kwargs, message",
    [
        (dict(num_frames=17), "video has 16 frames, 17 requested"),
        (dict(num_frames=0), "at least 1"),
        (dict(num_frames=-3), "at least 1"),
        (dict(num_frames=2.5), "must be an integer"),
        (dict(num_frames=True), "must be an integer"),
        (dict(), "exactly one of num_frames and fps"),
        (dict(num_frames=4, fps=2.0), "exactly one of num_frames and fps"),
        (dict(fps=0.0), "positive"),
        (dict(fps=-1.0), "positive"),
        (dict(fps=float("nan")), "positive"),
        (dict(num_frames=4, backend="pyav"), "unknown video backend"),
        (dict(num_frames=4, start=-1.0), "start must be a number of seconds >= 0"),
        (dict(num_frames=4, end=float("nan")), "end must be a number of seconds >= 0"),
        (dict(num_frames=4, start=True), "start must be a number of seconds"),
        (dict(num_frames=4, start="1"), "start must be a number of seconds"),
        (dict(num_frames=4, start=3.0, end=2.0), r"ends \(2 s\) before it starts \(3 s\)"),
        (dict(num_frames=4, start=1000.0), "starts after the video ends"),
        (dict(num_frames=4, assumed_fps=0.0), "assumed_fps must be a positive number"),
    ],
)
def test_bad_requests(request_kwargs, message):
    with pytest.raises(HippoError, match=message):
        load_video(sample_video_path(), **request_kwargs)


def test_a_request_beyond_the_free_memory_is_refused_before_decoding(monkeypatch):
    """16 frames of 112x112 need ~1.1 MiB (two copies): with 1 MiB free the request is refused
    before any frame is decoded; 8 frames fit; with the memory unknown it goes ahead."""
    monkeypatch.setattr(video, "_available_memory_bytes", lambda: 2**20)
    with monkeypatch.context() as patch:
        def no_decoding(*args):
            raise AssertionError("decoded although the frames cannot fit")

        patch.setattr(video._OpenCVReader, "frames", no_decoding)
        patch.setattr(video._DecordReader, "frames", no_decoding)
        with pytest.raises(HippoError, match=r"decoding 16 frames of 112x112 needs about 1.1 MiB, "
                                             r"more than the 1.0 MiB of memory available: ask "
                                             r"for fewer frames"):
            load_video(sample_video_path(), num_frames=16)
    assert load_video(sample_video_path(), num_frames=8).shape[0] == 8
    monkeypatch.setattr(video, "_available_memory_bytes", lambda: None)
    assert load_video(sample_video_path(), num_frames=16).shape[0] == 16


def test_free_memory_is_read_on_linux():
    """MemAvailable, in bytes (/proc/meminfo gives kB); None only where there is no such file."""
    available = video._available_memory_bytes()
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            line = next(line for line in meminfo if line.startswith("MemAvailable:"))
    except OSError:
        assert available is None
        return
    assert available is not None
    assert abs(available - int(line.split()[1]) * 1024) < 2**30  # it moves between the reads


def test_bad_request_is_reported_before_touching_the_file(tmp_path):
    with pytest.raises(HippoError, match="at least 1"):
        load_video(tmp_path / "missing.mp4", num_frames=0)


def test_threads_decoding_at_once_leave_stderr_as_it_was():
    """Decoders silence fd 2 while they open and read a file. prepare() decodes outside a
    pipeline's lock, so a server's threads decode at once: each saving and restoring fd 2 on its
    own, a thread leaving after another had entered restored that one's /dev/null, and the
    process's stderr stayed silenced for good (every later log line and traceback lost)."""
    import os
    import threading

    def silenced() -> bool:
        return os.path.samestat(os.fstat(2), os.stat(os.devnull))

    original = os.dup(2)
    try:
        assert not silenced()
        first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def first():
            with video._native_stderr_silenced():
                first_in.set()
                second_in.wait(10)
            first_out.set()

        def second():
            first_in.wait(10)
            with video._native_stderr_silenced():
                second_in.set()
                first_out.wait(10)
                seen["inside, after the first left"] = silenced()

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert seen == {"inside, after the first left": True}
        assert not silenced()
        assert os.path.samestat(os.fstat(2), os.fstat(original))
    finally:
        os.dup2(original, 2)
        os.close(original)


def test_synthetic_frames_by_hand():
    """A static background in 50..150 and a bright square of side min(H, W) // 5 moving from the
    top-left corner (first frame) to the bottom-right one (last frame) in rounded steps."""
    frames = synthetic_frames(3, 10, 15)
    assert frames.shape == (3, 10, 15, 3) and frames.dtype == np.uint8
    square = [np.argwhere(frame.min(axis=-1) == 245) for frame in frames]
    corners = [(tuple(s.min(axis=0)), tuple(s.max(axis=0)), len(s)) for s in square]
    assert corners == [((0, 0), (1, 1), 4), ((4, 6), (5, 7), 4), ((8, 13), (9, 14), 4)]
    still = (frames.min(axis=-1) != 245).all(axis=0)  # pixels no square covers
    assert (frames[:, still] == frames[0, still]).all()  # a static background
    assert 50 <= frames[:, still].min() and frames[:, still].max() <= 150
    one = synthetic_frames(1, 4, 4).min(axis=-1) == 245  # one frame: a 1-pixel square, top-left
    assert one.sum() == 1 and one[0, 0, 0]


def test_the_sample_clip_is_pinned_to_its_version():
    """Cached clips are reused by their file name: content that changes without a bump of
    _SAMPLE_VERSION (part of the name) would leave every existing cache on the old clip."""
    from hippo import assets

    # Per-channel statistics, not a hash: float32 sin may differ by a rounding step across CPUs.
    pixels = synthetic_frames(SAMPLE_FRAMES, SAMPLE_HEIGHT, SAMPLE_WIDTH).reshape(-1, 3) / 1.0
    assert assets._SAMPLE_VERSION == 1
    assert pixels.mean(axis=0).tolist() == pytest.approx([105.113, 105.048, 105.169], abs=0.01)
    assert pixels.std(axis=0).tolist() == pytest.approx([37.238, 37.199, 37.26], abs=0.01)
    assert sample_video_path().name == "sample_v1_16x112x112.mp4"
    # As documented: 16 frames, 112x112, 4 fps (the demo's --frames default is 16).
    assert (SAMPLE_FRAMES, SAMPLE_HEIGHT, SAMPLE_WIDTH, SAMPLE_FPS) == (16, 112, 112, 4.0)


def test_the_cache_folder_is_hippo_s_else_xdg_s_else_the_temp_dir(tmp_path, monkeypatch):
    import tempfile
    from pathlib import Path

    from hippo.assets import _cache_dir

    monkeypatch.setenv("HIPPO_CACHE_DIR", str(tmp_path / "mine"))
    assert _cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("HIPPO_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cache_dir() == tmp_path / "xdg" / "hippo" and (tmp_path / "xdg" / "hippo").is_dir()
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file"))  # cannot hold a folder
    assert _cache_dir() == Path(tempfile.gettempdir()) / "hippo"


def test_write_video_takes_a_string_path_and_names_a_container_it_cannot_write(tmp_path):
    frames = synthetic_frames(2, 16, 16)
    written = write_video(str(tmp_path / "clip.avi"), frames, 4.0)
    assert written == tmp_path / "clip.avi" and probe_video(written).num_frames == 2
    with pytest.raises(HippoError, match="OpenCV cannot write a 16x16 mp4v video to .*clip.xyz"):
        write_video(tmp_path / "clip.xyz", frames, 4.0)


def test_write_video_rejects_bad_frames(tmp_path):
    with pytest.raises(HippoError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32), 4.0)
    with pytest.raises(HippoError, match="non-empty"):
        write_video(tmp_path / "x.mp4", np.zeros((0, 8, 8, 3), np.uint8), 4.0)


def test_without_any_decoder_a_video_file_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(video, "_decord_available", lambda: False)
    monkeypatch.setattr(video, "_opencv_available", lambda: False)
    assert video.available_backends() == []
    with pytest.raises(HippoError, match="no video decoder is installed: pip install decord"):
        load_video(sample_video_path(), num_frames=4)
    with pytest.raises(HippoError, match=r"'opencv' requested but OpenCV \(opencv-python-headless\) "
                                         "is not installed"):
        load_video(sample_video_path(), num_frames=4, backend="opencv")


def test_available_backends_lists_what_imports_in_the_order_tried(monkeypatch):
    monkeypatch.setattr(video, "_decord_available", lambda: True)
    monkeypatch.setattr(video, "_opencv_available", lambda: True)
    assert video.available_backends() == ["decord", "opencv"]
    monkeypatch.setattr(video, "_decord_available", lambda: False)
    assert video.available_backends() == ["opencv"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_stderr_silencing_that_cannot_open_devnull_leaks_no_descriptor(monkeypatch):
    """Out of descriptors (EMFILE), the duplicate of fd 2 stayed open and the decode failed:
    one descriptor more lost per video. It now decodes unsilenced."""
    import builtins

    def no_devnull(path, *args, **kwargs):
        if path == os.devnull:
            raise OSError(24, "Too many open files")
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(video, "open", no_devnull, raising=False)
    before = len(os.listdir("/proc/self/fd"))
    with video._native_stderr_silenced():
        pass
    assert len(os.listdir("/proc/self/fd")) == before

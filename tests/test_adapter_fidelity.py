"""The adapters read a checkpoint as transformers 5.17 does: preprocessing saved in the v5
processor_config.json, every eos id of generation_config.json, and Qwen2.5-VL's temporal
positions spaced at the rate the frames were sampled at (HF's VideoMetadata.sampled_fps)."""
from __future__ import annotations

import json

import pytest
import torch

from hippo.assets import make_synthetic_video
from hippo.models import load_adapter
from hippo.errors import HippoError
from hippo.models.llava_onevision import preprocess_from_checkpoint as llava_preprocess
from hippo.models.qwen2_5_vl import preprocess_from_checkpoint as qwen_preprocess
from hippo.pipeline import HippoPipeline
from hippo.video import load_video

PROMPT_IDS = [72, 105, 33, 7]


def _write(directory, name: str, content: dict) -> None:
    (directory / name).write_text(json.dumps(content))


def test_preprocessing_saved_by_transformers_5_is_read(tmp_path):
    """processor.save_pretrained in transformers 5 writes processor_config.json alone, the video
    processor's settings nested under "video_processor"; transformers reads them first."""
    _write(tmp_path, "processor_config.json", {
        "processor_class": "Qwen2_5_VLProcessor",
        "image_processor": {"size": {"shortest_edge": 3136, "longest_edge": 1003520}},
        "video_processor": {"size": {"shortest_edge": 3136, "longest_edge": 12544},
                            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}})
    # An older file beside it loses, as in transformers.
    _write(tmp_path, "preprocessor_config.json", {"min_pixels": 100352, "max_pixels": 602112})
    settings = qwen_preprocess(str(tmp_path))
    assert (settings.min_pixels, settings.max_pixels) == (3136, 12544)
    assert settings.mean == (0.5, 0.5, 0.5) and settings.std == (0.25, 0.25, 0.25)
    assert llava_preprocess(str(tmp_path)).std == (0.25, 0.25, 0.25)


def test_a_processor_config_without_video_settings_falls_back_to_the_older_files(tmp_path):
    # LLaVA-OneVision's hub checkpoints ship a processor_config.json of processor kwargs only.
    _write(tmp_path, "processor_config.json", {"num_image_tokens": 729, "processor_class": "x"})
    _write(tmp_path, "preprocessor_config.json", {"min_pixels": 3136, "max_pixels": 12845056})
    assert qwen_preprocess(str(tmp_path)).max_pixels == 12845056


@pytest.mark.parametrize("content, bounds", [
    ({"size": {"min_pixels": 3136, "max_pixels": 12544}}, (3136, 12544)),
    ({"max_pixels": 50176, "size": {"shortest_edge": 6272, "longest_edge": 12544}}, (6272, 50176))])
def test_qwen_pixel_bounds_are_read_from_size_under_either_name(tmp_path, content, bounds):
    """A bound given on its own wins over 'size', which names it shortest/longest_edge or min/max_pixels."""
    _write(tmp_path, "preprocessor_config.json", content)
    settings = qwen_preprocess(str(tmp_path))
    assert (settings.min_pixels, settings.max_pixels) == bounds


def test_a_preprocessing_size_that_is_not_an_object_names_its_file(tmp_path):
    _write(tmp_path, "preprocessor_config.json", {"size": 448})
    with pytest.raises(HippoError, match=r"preprocessor_config.json: the preprocessing 'size' entry must "
                                         r"be an object, got 448$"):
        qwen_preprocess(str(tmp_path))


def test_a_bad_nested_video_processor_names_its_file(tmp_path):
    _write(tmp_path, "processor_config.json", {"video_processor": [1, 2]})
    with pytest.raises(HippoError, match=r"processor_config.json \(video_processor\)"):
        qwen_preprocess(str(tmp_path))


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-llava-onevision"])
def test_every_eos_of_the_generation_config_stops_as_in_hf_generate(preset):
    """Qwen2.5-VL's generation_config.json stops on [<|im_end|>, <|endoftext|>]: the tokenizer's
    eos alone would let hippo generate past the second where HF generate stops."""
    adapter = load_adapter(preset, seed=0)
    frames = load_video(str(_clip()), num_frames=4)
    free = HippoPipeline(adapter, mode="ar").generate(frames, PROMPT_IDS, 6, eos_token_id=None).tokens
    stop = next(t for t in free[1:] if t != adapter.eos_token_id and t not in free[:1])
    adapter.model.generation_config.eos_token_id = [adapter.eos_token_id, stop]
    assert adapter.eos_token_ids == [adapter.eos_token_id, stop]
    kwargs = adapter.generate_kwargs(frames, PROMPT_IDS)
    with torch.no_grad():
        expected = adapter.model.generate(**kwargs, max_new_tokens=6, do_sample=False)
    expected = expected[0, kwargs["input_ids"].shape[1]:].tolist()
    got = HippoPipeline(adapter, mode="ar").generate(frames, PROMPT_IDS, 6).tokens
    assert got == expected == free[:free.index(stop) + 1]


_CLIP = {}


def _clip():
    if "path" not in _CLIP:
        import tempfile
        from pathlib import Path

        path = Path(tempfile.mkdtemp()) / "sixty_seconds.mp4"
        _CLIP["path"] = make_synthetic_video(path, 240, 56, 56, 4.0)  # 60 s at 4 fps
    return _CLIP["path"]


@pytest.mark.parametrize("start,end", [(None, None), (10.0, 40.0)])
def test_frames_sampled_by_count_space_qwen_positions_at_their_rate(start, end):
    """8 frames spread over 60 s are 7.5 s apart: HF's processor spaces the temporal patches
    by 2 / sampled_fps seconds (VideoMetadata.sampled_fps), not by one second."""
    adapter = load_adapter("tiny-qwen2.5-vl", seed=0)
    pipeline = HippoPipeline(adapter, mode="ar")
    prepared, _ = pipeline.prepare(str(_clip()), PROMPT_IDS, num_frames=8, start=start, end=end)
    frames = load_video(str(_clip()), num_frames=8, start=start, end=end)
    seconds = (60.0 if end is None else end) - (0.0 if start is None else start)
    expected = adapter.prepare(frames, PROMPT_IDS, fps=8 / seconds)
    assert torch.equal(prepared.position_ids, expected.position_ids)
    assert not torch.equal(prepared.position_ids, adapter.prepare(frames, PROMPT_IDS).position_ids)

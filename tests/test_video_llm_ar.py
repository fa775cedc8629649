"""End to end, for both families: the project's sample video -> adapter -> hippo's runtime ->
greedy AR equals HF `generate` on the same (video, prompt), token for token (tiny random models,
fp32, CPU; on CUDA too when a GPU is present)."""
from __future__ import annotations

import pytest
import torch

from hippo.assets import sample_video_path
from hippo.models import load_adapter
from hippo.errors import HippoError
from hippo.runtime import LanguageModelRuntime, generate_autoregressive
from hippo.video import load_video

PRESETS = ["tiny-qwen2.5-vl", "tiny-qwen2.5-vl-mha", "tiny-llava-onevision",
           "tiny-llava-onevision-mha"]
MAX_NEW_TOKENS = 12


def _frames(preset: str) -> torch.Tensor:
    # Qwen needs an even frame count (temporal patches of 2); LLaVA-OV takes any count.
    return load_video(sample_video_path(), num_frames=4 if "qwen" in preset else 3)


def _hf_greedy(adapter, frames, prompt, max_new_tokens: int, **prepare) -> list[int]:
    kwargs = adapter.generate_kwargs(frames, prompt, **prepare)
    prompt_len = kwargs["input_ids"].shape[1]
    with torch.no_grad():
        out = adapter.model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=adapter.eos_token_id,
                                     pad_token_id=adapter.eos_token_id)
    return out[0, prompt_len:].tolist()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_ar_matches_hf_generate(device, preset, seed):
    adapter = load_adapter(preset, device=device, seed=seed)
    frames = _frames(preset)
    prompt = "describe the moving square"
    expected = _hf_greedy(adapter, frames, prompt, MAX_NEW_TOKENS)

    prepared = adapter.prepare(frames, prompt)
    runtime = LanguageModelRuntime.from_hf(adapter.model, prepared.length + MAX_NEW_TOKENS + 8)
    with torch.no_grad():
        result = generate_autoregressive(runtime, prepared, MAX_NEW_TOKENS,
                                         eos_token_id=adapter.eos_token_id)
    assert result.tokens == expected


@pytest.mark.parametrize("fps, frames, prompt", [(0.1, 4, "hi"), (0.5, 4, "hi"),
                                                 (None, 12, [7])])
def test_qwen_video_longer_than_its_suffix_matches_hf_generate(device, fps, frames, prompt):
    """Few frames per second (or many frames before a one-token prompt): the video's temporal
    positions run past the text after it, so get_rope_index's rope_deltas (from the largest
    position) and HF `generate` (from the last one) disagree; hippo follows `generate`."""
    adapter = load_adapter("tiny-qwen2.5-vl", device=device, seed=0)
    video = load_video(sample_video_path(), num_frames=frames)
    expected = _hf_greedy(adapter, video, prompt, 24, fps=fps)
    prepared = adapter.prepare(video, prompt, fps=fps)
    assert int(prepared.position_ids.max()) > int(prepared.position_ids[0, 0, -1])  # the case
    runtime = LanguageModelRuntime.from_hf(adapter.model, prepared.length + 32)
    with torch.no_grad():
        result = generate_autoregressive(runtime, prepared, 24, eos_token_id=adapter.eos_token_id)
    assert result.tokens == expected


def test_prompt_beyond_cache_is_a_clear_error():
    adapter = load_adapter("tiny-qwen2.5-vl")
    prepared = adapter.prepare(_frames("tiny-qwen2.5-vl"), "hi")
    runtime = LanguageModelRuntime.from_hf(adapter.model, prepared.length + 4)
    with pytest.raises(HippoError, match=f"beyond the cache: {prepared.length} prompt tokens \\+ 6 "
                                         f"new tokens need {prepared.length + 5} positions"):
        generate_autoregressive(runtime, prepared, max_new_tokens=6)
    # The last new token is never fed: 5 of them fit 4 positions (they were refused).
    assert len(generate_autoregressive(runtime, prepared, max_new_tokens=5).tokens) >= 1

"""HippoPipeline's interface: what it returns, and one clear error for each mistake a user can
make (mismatched pair, incompatible layouts, bad options, bad video, too few tokens)."""
from __future__ import annotations

import gc
import time
import weakref

import pytest
import torch

from hippo.assets import sample_video_path
from hippo.models import load_adapter
from hippo.errors import HippoError
from hippo.pipeline import HippoOptions, HippoPipeline, check_lane_devices
from hippo.preserve import PreservationOptions, kept_prompt_length
from hippo_testing import requires_cuda
from speculative_testing import exact_copy_pair, make_pair, sample_frames, spoil_rows_from


def test_generate_from_a_video_file_returns_tokens_text_and_stats():
    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    out = HippoPipeline(target, draft).generate(sample_video_path(), "what moves?", 12,
                                                num_frames=4)
    assert len(out.tokens) == 12 or out.tokens[-1] == target.eos_token_id
    assert isinstance(out.text, str)
    assert out.stats.mode == "parallel" and out.stats.tokens == len(out.tokens)
    assert out.stats.draft_prompt_tokens < out.stats.prompt_tokens  # 90% of the video pruned
    prompt = HippoPipeline(target, draft).prepare(sample_video_path(), "what moves?", num_frames=4)[0]
    assert out.stats.prompt_tokens == prompt.length
    assert out.stats.draft_prompt_tokens == kept_prompt_length(prompt, 0.1)
    ar = HippoPipeline(target, draft, mode="ar").generate(sample_video_path(), "what moves?", 12,
                                                          num_frames=4)
    assert ar.tokens == out.tokens
    assert ar.stats.mean_accepted_tokens == 1.0


def test_runtimes_follow_models_moved_or_given_new_weights():
    """A pipeline keeps its runtimes between generations; a model cast (`.to()`) or given new
    tensors (load_state_dict(assign=True), peft's merge) since must get new ones, not decode
    with the old fused weights or fail on a dtype mismatch."""
    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    pipeline = HippoPipeline(target, draft, gamma=3)
    pipeline.generate(sample_video_path(), "what moves?", 8, num_frames=4)
    with torch.no_grad():
        for model in (target.model, draft.model):
            state = {name: torch.randn_like(value) * value.std() + value.mean()
                     for name, value in model.state_dict().items()}
            model.load_state_dict(state, assign=True)
    fresh = HippoPipeline(target, draft, gamma=3).generate(sample_video_path(), "what moves?", 8,
                                                           num_frames=4)
    again = pipeline.generate(sample_video_path(), "what moves?", 8, num_frames=4)
    assert again.tokens == fresh.tokens
    for model in (target.model, draft.model):
        model.to(torch.bfloat16)
    fresh = HippoPipeline(target, draft, gamma=3).generate(sample_video_path(), "what moves?", 8,
                                                           num_frames=4)
    assert pipeline.generate(sample_video_path(), "what moves?", 8,
                             num_frames=4).tokens == fresh.tokens


def test_a_full_draft_prefill_is_draft_prefill_time_on_the_cpu(monkeypatch):
    """Without a side stream to overlap the target's prefill, the draft's full prefill runs
    before it and is the draft's time (it was in no phase). The pipeline's clock jumps by an
    hour inside the draft's prefill: a sleep there compared the two prefills' wall times, which
    a loaded machine stretches by tenths of a second (seen: the target's 1 ms prefill at 0.4 s)."""
    from types import SimpleNamespace

    import hippo.pipeline

    prefill_full = hippo.pipeline.prefill_full
    hour = 3600.0
    jumped = [0.0]

    def slow_prefill_full(*args, **kwargs):
        jumped[0] += hour
        return prefill_full(*args, **kwargs)

    load_video = hippo.pipeline.load_video

    def slow_load_video(*args, **kwargs):
        jumped[0] += 2 * hour
        return load_video(*args, **kwargs)

    monkeypatch.setattr(hippo.pipeline, "prefill_full", slow_prefill_full)
    monkeypatch.setattr(hippo.pipeline, "load_video", slow_load_video)
    monkeypatch.setattr(hippo.pipeline, "time",
                        SimpleNamespace(perf_counter=lambda: time.perf_counter() + jumped[0]))
    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    stats = HippoPipeline(target, draft, draft_prefill="full+compact").generate(
        sample_video_path(), "what moves?", 4, num_frames=4).stats
    assert jumped[0] == 3 * hour  # the draft's full prefill ran once
    assert hour <= stats.draft_prefill_s < 2 * hour and stats.prefill_s < hour
    assert 3 * hour <= stats.total_s < 4 * hour  # generate's total: reading the video included


def test_a_time_window_of_a_file_equals_its_frames_cut_by_hand():
    from hippo.video import load_video

    target, draft = make_pair("llava_onevision", "perturbed-copy", seed=2)
    pipeline = HippoPipeline(target, draft, mode="sequential", gamma=3)
    cut = load_video(sample_video_path(), num_frames=16)[4:12]  # seconds 1 to 3 of the 4 frames/s sample
    by_hand = pipeline.generate(cut[[0, 2, 5, 7]], "what moves?", 10)
    out = pipeline.generate(sample_video_path(), "what moves?", 10, num_frames=4, start=1.0, end=3.0)
    assert out.tokens == by_hand.tokens
    whole = pipeline.generate(sample_video_path(), "what moves?", 10, num_frames=4)
    assert out.stats.prompt_tokens == whole.stats.prompt_tokens
    for window in ({"start": 1.0}, {"end": 3.0}):
        with pytest.raises(HippoError, match="cut decoded frames yourself"):
            pipeline.generate(cut, "what moves?", 10, **window)


def test_a_rate_above_the_clips_spaces_the_frames_at_the_clips_rate(tmp_path):
    # --fps 1 on a 0.5 fps clip decodes its every frame, 2 s apart: Qwen2.5-VL's temporal positions
    # must say so (they were spaced from the rate asked for, as if the frames were 1 s apart).
    from hippo.assets import write_video

    clip = write_video(tmp_path / "slow.mp4", torch.arange(8, dtype=torch.uint8).mul(30)
                       .view(8, 1, 1, 1).expand(8, 56, 56, 3).contiguous().numpy(), fps=0.5)
    pipeline = HippoPipeline(load_adapter("tiny-qwen2.5-vl"), None)
    asked, own = (pipeline.prepare(clip, "hi", fps=rate)[0] for rate in (1.0, 0.5))
    assert torch.equal(asked.inputs_embeds, own.inputs_embeds)
    assert torch.equal(asked.position_ids, own.position_ids)


def test_frames_beyond_the_context_are_refused_before_decoding(monkeypatch):
    """A long video at one frame per second: the visual tokens, the prompt's text and the new
    tokens would overflow the model's positions, which is known from the frame count and size
    and the encoded prompt before anything is decoded or embedded."""
    from hippo import video
    from hippo.models.qwen2_5_vl import Qwen2_5_VLAdapter

    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    pipeline = HippoPipeline(target, draft)
    frames = video.load_video(sample_video_path(), num_frames=16)
    prepared, _ = pipeline.prepare(frames, "what moves?")
    tokens = target.visual_tokens(16, 112, 112)
    text = target.text_tokens("what moves?")
    assert prepared.num_visual == tokens and prepared.length == tokens + text
    monkeypatch.setattr(Qwen2_5_VLAdapter, "max_positions", property(lambda self: 100))

    def no_decoding(*args):
        raise AssertionError("decoded although the frames cannot fit")

    monkeypatch.setattr(video._OpenCVReader, "frames", no_decoding)
    monkeypatch.setattr(video._DecordReader, "frames", no_decoding)
    monkeypatch.setattr(Qwen2_5_VLAdapter, "embed_video", no_decoding)
    assert tokens >= 100
    message = (f"16 frames of 112x112 make {tokens} visual tokens; with the prompt's {text} text "
               f"tokens and 4 new tokens that is {tokens + text + 4}, beyond the 100 positions "
               f"of the target \\(qwen2_5_vl\\)")
    with pytest.raises(HippoError, match=message):
        pipeline.generate(sample_video_path(), "what moves?", 4, num_frames=16)
    with pytest.raises(HippoError, match=message):
        pipeline.generate(frames, "what moves?", 4)
    with pytest.raises(HippoError, match="ask for fewer frames"):
        pipeline.generate(sample_video_path(), "what moves?", 4, fps=4.0)
    with pytest.raises(HippoError, match=f"text tokens that is {tokens + text}, beyond the 100"):
        pipeline.prepare(frames, "what moves?")  # no new tokens named: the prompt alone
    # Exactly the context: admitted (reaches the vision tower); one position less: refused,
    # also for the prompt's text alone.
    new = 10
    monkeypatch.setattr(Qwen2_5_VLAdapter, "max_positions", property(lambda self: tokens + text + new))
    with pytest.raises(AssertionError, match="decoded although"):
        pipeline.generate(sample_video_path(), "what moves?", new, num_frames=16)
    with pytest.raises(HippoError, match="fewer new tokens or a shorter prompt"):
        pipeline.generate(sample_video_path(), "what moves?", new + 1, num_frames=16)
    with pytest.raises(HippoError, match="a shorter prompt"):
        pipeline.generate(sample_video_path(), "what moves? " * 8, new, num_frames=16)


def test_a_bad_prompt_is_refused_before_the_video_is_read(monkeypatch):
    from hippo import pipeline

    target, draft = make_pair("llava_onevision", "perturbed-copy", seed=0)
    monkeypatch.setattr(pipeline, "load_video", lambda *args, **kwargs: pytest.fail("video read"))
    with pytest.raises(HippoError, match="token ids must lie in"):
        HippoPipeline(target, draft).prepare("/no/such/video.mp4", [target.vocab_size])


@pytest.mark.parametrize("roles", ["draft", "both"])
def test_gemm_prologues_reach_their_runtimes_and_keep_the_output(roles):
    """HippoOptions(gemm_prologues=...) builds the named runtimes with the fused GEMM ops (on the
    CPU the same ops composed, o_proj and the head on skinny_linear's reference: fp32 sums in
    another order, far from these tokens' margins): the same tokens as the default pipeline."""
    target, draft = make_pair("llava_onevision", "perturbed-copy", seed=1)
    default = HippoPipeline(target, draft).generate(sample_video_path(), "what moves?", 10,
                                                    num_frames=4)
    fused = HippoPipeline(target, draft, gemm_prologues=roles)
    out = fused.generate(sample_video_path(), "what moves?", 10, num_frames=4)
    assert out.tokens == default.tokens
    assert {role: runtime.gemm_prologues for role, runtime in fused._runtimes.items()} == {
        "target": roles == "both", "draft": True}


@pytest.mark.parametrize("mode", ["sequential", "ar"])
def test_sampled_generation_repeats_with_a_seed(mode):
    """A seed repeats a run whatever the global generator holds (README: --mode ar, or a fixed
    gamma), and another seed gives another run."""
    target, draft = make_pair("llava_onevision", "perturbed-copy", seed=0)
    frames = torch.from_numpy(__import__("numpy").zeros((3, 56, 56, 3), dtype="uint8"))
    pipeline = HippoPipeline(target, None, mode="ar") if mode == "ar" else \
        HippoPipeline(target, draft, mode="sequential", gamma=3)
    run = lambda seed: pipeline.generate(frames, "hi", 16, temperature=0.9, top_p=0.9,  # noqa: E731
                                         seed=seed).tokens
    torch.manual_seed(0)  # not whatever state an earlier test left (that may be 1234's below)
    first = run(5)
    torch.manual_seed(1234)  # a seeded run must not read the global generator
    assert run(5) == first
    assert run(6) != first
    assert 1 <= len(pipeline.generate(frames, "hi", 4, temperature=0.9).tokens) <= 4  # no seed


def test_mismatched_tokenizers_or_families_are_one_clear_error():
    target = load_adapter("tiny-qwen2.5-vl")
    with pytest.raises(HippoError, match="tokenizers differ"):
        HippoPipeline(target, load_adapter("tiny-qwen2.5-vl-v640"))
    with pytest.raises(HippoError, match="a draft must be of the target's family"):
        HippoPipeline(target, load_adapter("tiny-llava-onevision"))


def test_pair_with_different_visual_layouts_is_a_clear_error():
    # Same family and vocabulary, but 56-px and 70-px frames: different visual grids.
    pipeline = HippoPipeline(load_adapter("tiny-llava-onevision"),
                             load_adapter("tiny-llava-onevision-mha"))
    with pytest.raises(HippoError, match="different token layouts"):
        pipeline.generate(sample_video_path(), "hi", 4, num_frames=2)


@pytest.mark.parametrize("options,message", [
    (dict(mode="beam"), "unknown mode"),
    (dict(draft_prefill="half"), "unknown draft_prefill"),
    (dict(gamma=0), "gamma must be"),
    (dict(gamma="fast"), "gamma must be"),
    (dict(max_gamma=99), "max_gamma"),
    (dict(gemm_prologues=True), "unknown gemm_prologues"),
    (dict(draft_priority="high"), "draft_priority must be True or False"),
    (dict(step_invariant="yes"), "step_invariant must be True or False"),
    (dict(use_cuda_graphs="maybe"), "use_cuda_graphs must be True, False or None"),
    (dict(max_gamma=2.5), "max_gamma must be an int"),
    (dict(preservation=0.1), "must be a PreservationOptions"),
    # skinny_linear's step-size-independent kernel takes up to 32 rows (a verify step of g + 1).
    (dict(step_invariant=True, gamma=32), "gamma .* at most 31, got 32"),
    (dict(step_invariant=True, max_gamma=32), "gamma .* at most 31, got 32"),
    (dict(step_invariant=True, gemm_prologues="draft"),
     "step_invariant cannot be combined with gemm_prologues 'draft'"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(HippoError, match=message):
        HippoOptions(**options)


def test_step_invariance_covers_the_largest_verify_step():
    HippoOptions(step_invariant=True, gamma=31)
    HippoOptions(step_invariant=True, max_gamma=31)
    HippoOptions(step_invariant=False, gamma=32)


def test_bad_requests_are_clear_errors(tmp_path):
    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0)
    pipeline = HippoPipeline(target, draft)
    with pytest.raises(HippoError, match="max_new_tokens"):
        pipeline.generate(sample_video_path(), "hi", 0, num_frames=2)
    with pytest.raises(HippoError):
        pipeline.generate(tmp_path / "missing.mp4", "hi", 4)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video at all")
    with pytest.raises(HippoError):
        pipeline.generate(corrupt, "hi", 4)
    with pytest.raises(HippoError, match="temperature"):
        pipeline.generate(sample_video_path(), "hi", 4, num_frames=2, temperature=-1.0)
    with pytest.raises(HippoError, match="self-speculation"):
        HippoPipeline(target, None, draft_prefill="full+compact")
    with pytest.raises(HippoError, match="keep_ratio"):
        HippoPipeline(target, draft, preservation=PreservationOptions(keep_ratio=2.0))
    with pytest.raises(HippoError, match="max_new_tokens"):
        pipeline.generate(sample_video_path(), "hi", 4.5, num_frames=2)
    with pytest.raises(HippoError, match="video must be a file path"):
        pipeline.generate(sample_video_path().read_bytes(), "hi", 4)
    with pytest.raises(HippoError, match="the prompt is not valid UTF-8"):
        pipeline.generate(sample_video_path(), b"\xe9t\xe9".decode("utf-8", "surrogateescape"), 4,
                          num_frames=2)
    with pytest.raises(HippoError, match="got the URL https://example.com/a.mp4: download it"):
        pipeline.generate("https://example.com/a.mp4", "hi", 4, num_frames=2)
    with pytest.raises(HippoError, match="prompt must be a str"):
        pipeline.generate(sample_video_path(), None, 4, num_frames=2)
    with pytest.raises(HippoError, match="eos_token_id"):
        pipeline.generate(sample_video_path(), "hi", 4, num_frames=2, eos_token_id="eos")
    with pytest.raises(HippoError, match="a draft device needs a draft model"):
        HippoPipeline(target, None, draft_device="cpu")
    with pytest.raises(HippoError, match="unknown device"):
        HippoPipeline(target, draft, draft_device="banana")
    with pytest.raises(HippoError, match="num_frames or fps, not both"):
        pipeline.generate(sample_video_path(), "hi", 4, num_frames=2, fps=1.0)
    with pytest.raises(HippoError, match="need a temperature > 0"):
        pipeline.generate(sample_video_path(), "hi", 4, num_frames=2, top_k=3)
    for eos in (10**6, -1):
        with pytest.raises(HippoError, match=f"eos_token_id {eos} is not a token id"):
            pipeline.generate(sample_video_path(), "hi", 4, num_frames=2, eos_token_id=eos)
    with pytest.raises(HippoError, match="integer token ids"):
        pipeline.generate(sample_video_path(), [1.7], 4, num_frames=2)
    for empty in ((4, 0, 56, 3), (4, 56, 0, 3), (0, 56, 56, 3)):  # checked before their tokens
        with pytest.raises(HippoError, match="must not be empty"):
            pipeline.generate(torch.zeros(empty, dtype=torch.uint8), "hi", 4)


@pytest.mark.parametrize("arguments, needle", [
    (("tiny-qwen2.5-vl", None), "the target must be a model adapter"),
    ((None, None), "the target must be a model adapter"),
    (("adapter", "tiny-qwen2.5-vl-draft"), "the draft must be a model adapter"),
])
def test_pipeline_needs_adapters(arguments, needle):
    target, draft = (load_adapter("tiny-qwen2.5-vl") if a == "adapter" else a for a in arguments)
    with pytest.raises(HippoError, match=needle):
        HippoPipeline(target, draft)


def test_bad_pipeline_arguments_are_clear_errors():
    target = load_adapter("tiny-qwen2.5-vl")
    with pytest.raises(HippoError, match="options must be a HippoOptions"):
        HippoPipeline(target, None, options={"mode": "ar"})
    with pytest.raises(HippoError, match="unknown option 'modes'"):
        HippoPipeline(target, None, modes="ar")
    with pytest.raises(HippoError, match="unknown option 'zzz'"):
        HippoPipeline(target, None).with_options(zzz=1)
    with pytest.raises(HippoError, match="role must be 'target' or 'draft', got 'verifier'"):
        HippoPipeline(target, None).runtime("verifier")
    frames = torch.zeros(2, 56, 56, 3, dtype=torch.uint8)
    for count in ("4", None, 4.0, -1):  # refused before any arithmetic on them
        with pytest.raises(HippoError, match=f"max_new_tokens must be an integer of at least 0, got {count!r}"):
            HippoPipeline(target, None).prepare(frames, "hi", max_new_tokens=count)
        with pytest.raises(HippoError, match="max_new_tokens must be an integer of at least 1"):
            HippoPipeline(target, None).generate(frames, "hi", count)
    for source in (None, 3):
        with pytest.raises(HippoError, match="preset name or a checkpoint directory"):
            load_adapter(source)
    with pytest.raises(HippoError, match="seed must be an integer"):
        load_adapter("tiny-qwen2.5-vl", seed="x")


def test_decoded_frames_are_never_resampled_in_silence():
    """num_frames samples a file; given decoded frames it used to be ignored (all were used)."""
    pipeline = HippoPipeline(load_adapter("tiny-qwen2.5-vl"), None, mode="ar")
    frames = torch.zeros(4, 56, 56, 3, dtype=torch.uint8)
    with pytest.raises(HippoError, match="num_frames samples a video file.*got num_frames=2"):
        pipeline.generate(frames, "hi", 2, num_frames=2)
    assert pipeline.generate(frames[[0, 2]], "hi", 2).stats.tokens >= 1


def test_decoded_frames_take_fps_as_their_rate_checked_for_every_family():
    """With decoded frames fps is the rate they were sampled at (Qwen2.5-VL's temporal
    positions; None is 2 frames per second). A file sampled at num_frames is spaced by the count
    over its duration: its frames given with that rate make the same prompt. A bad rate is refused
    for LLaVA too, whose positions ignore it (it was accepted in silence: nan, -1, "2")."""
    from hippo.video import load_video

    qwen = HippoPipeline(load_adapter("tiny-qwen2.5-vl"), None, mode="ar")
    frames = load_video(sample_video_path(), num_frames=4)  # 16 frames at 4 fps: 1 frame a second
    from_file = qwen.prepare(sample_video_path(), "hi", num_frames=4)[0]
    given = qwen.prepare(frames, "hi", fps=1.0)[0]
    assert torch.equal(given.position_ids, from_file.position_ids)
    assert torch.equal(given.inputs_embeds, from_file.inputs_embeds)
    default, two = (qwen.prepare(frames, "hi", fps=rate)[0] for rate in (None, 2.0))
    assert torch.equal(default.position_ids, two.position_ids)
    assert not torch.equal(default.position_ids, from_file.position_ids)
    for name in ("tiny-qwen2.5-vl", "tiny-llava-onevision"):
        adapter = load_adapter(name)
        pipeline = HippoPipeline(adapter, None, mode="ar")
        for fps in (0, -1.0, float("nan"), float("inf"), "2", True):
            with pytest.raises(HippoError, match="fps must be a positive number"):
                pipeline.generate(frames, "hi", 2, fps=fps)
            with pytest.raises(HippoError, match="fps must be a positive number"):
                adapter.prepare(frames, [1, 2], fps=fps)
            with pytest.raises(HippoError, match="fps must be a positive number"):
                adapter.generate_kwargs(frames, [1, 2], fps=fps)


def test_bad_sampling_and_stop_tokens_are_refused_before_the_video_is_read(monkeypatch):
    from hippo import pipeline as module

    monkeypatch.setattr(module, "load_video", lambda *args, **kwargs: pytest.fail("video read"))
    pipeline = HippoPipeline(load_adapter("tiny-qwen2.5-vl"), None)
    for kwargs, message in [(dict(temperature=-1.0), "temperature"), (dict(seed="x"), "seed"),
                            (dict(eos_token_id=10**6), "not a token id"),
                            (dict(eos_token_id=True), "eos_token_id must be a token id")]:
        with pytest.raises(HippoError, match=message):
            pipeline.generate("/no/such/video.mp4", "hi", 4, **kwargs)
    with pytest.raises(HippoError, match="max_new_tokens must be an integer of at least 1, got True"):
        pipeline.generate("/no/such/video.mp4", "hi", True)


def test_selection_layers_beyond_the_target_are_refused_with_the_pipeline():
    target = load_adapter("tiny-qwen2.5-vl")  # two layers
    for layers in ((), (2,), (-1,)):
        with pytest.raises(HippoError, match="selection layers"):
            HippoPipeline(target, None, preservation=PreservationOptions(layers=layers))
        with pytest.raises(HippoError, match="selection layers"):
            HippoPipeline(target, None).with_options(preservation=PreservationOptions(layers=layers))
    HippoPipeline(target, None, preservation=PreservationOptions(layers=(0, 1)))


def test_bad_generate_prepared_arguments_are_clear_errors():
    from hippo.speculative import SamplingOptions

    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0)
    pipeline = HippoPipeline(target, draft, mode="sequential", gamma=2)
    frames = torch.zeros(2, 56, 56, 3, dtype=torch.uint8)
    target_prompt, draft_prompt = pipeline.prepare(frames, "hi")
    other_target, other_draft = pipeline.prepare(torch.zeros(4, 56, 56, 3, dtype=torch.uint8), "hi")
    # The same token ids on another grid (frames on their side), and the same grid in other ids.
    _, wide_draft = pipeline.prepare(torch.zeros(2, 56, 112, 3, dtype=torch.uint8), "hi")
    _, tall_draft = pipeline.prepare(torch.zeros(2, 112, 56, 3, dtype=torch.uint8), "hi")
    _, other_text_draft = pipeline.prepare(frames, "ho")
    assert torch.equal(wide_draft.input_ids, tall_draft.input_ids) and wide_draft.grid != tall_draft.grid
    assert other_text_draft.grid == draft_prompt.grid
    greedy = SamplingOptions()
    for prompts, message in [((target_prompt, None), "draft_prompt must be the draft's PreparedPrompt"),
                             (("hi", draft_prompt), "target_prompt must be a PreparedPrompt"),
                             ((other_target, draft_prompt), "pass the two prompts of one prepare"),
                             ((target_prompt, other_draft), "pass the two prompts of one prepare"),
                             ((pipeline.prepare(torch.zeros(2, 56, 112, 3, dtype=torch.uint8), "hi")[0],
                               tall_draft), "pass the two prompts of one prepare"),
                             ((target_prompt, other_text_draft), "pass the two prompts of one prepare"),
                             ((draft_prompt, target_prompt), "do not fit this model's hidden size")]:
        with pytest.raises(HippoError, match=message):
            pipeline.generate_prepared(*prompts, 4, greedy, set())
    with pytest.raises(HippoError, match="sampling must be a SamplingOptions"):
        pipeline.generate_prepared(target_prompt, draft_prompt, 4, None, set())
    for count in (0, 4.5):
        with pytest.raises(HippoError, match="max_new_tokens must be an integer of at least 1"):
            pipeline.generate_prepared(target_prompt, draft_prompt, count, greedy, set())
    with pytest.raises(HippoError, match="eos_token_id 1000000 is not a token id"):
        pipeline.generate_prepared(target_prompt, draft_prompt, 4, greedy, {10**6})
    started = time.perf_counter()
    out = pipeline.generate_prepared(target_prompt, draft_prompt, 4, greedy, set())
    wall = time.perf_counter() - started
    expected = out.tokens
    # Its statistics time the whole generation (benchmarks report them).
    assert 0 < out.stats.prefill_s + out.stats.draft_prefill_s <= out.stats.total_s <= wall
    assert pipeline.generate_prepared(target_prompt, draft_prompt, 4, greedy, None).tokens == expected
    assert pipeline.generate_prepared(target_prompt, draft_prompt, 1, greedy, None).tokens == expected[:1]
    # AR decoding, and a self-speculating pipeline, use no draft prompt.
    assert pipeline.with_options(mode="ar").generate_prepared(
        target_prompt, None, 4, greedy, set()).tokens == expected
    assert HippoPipeline(target, None, mode="sequential", gamma=2).generate_prepared(
        target_prompt, None, 4, greedy, set()).tokens == expected


@pytest.mark.parametrize("options,message", [
    (dict(temperature=float("nan")), "finite"), (dict(temperature=float("inf")), "finite"),
    (dict(temperature=1e-45), "overflow"), (dict(seed=-1), "seed"), (dict(seed=2**64), "seed"),
    (dict(seed="abc"), "seed must be an integer"), (dict(temperature="hot"), "must be a number"),
    (dict(top_k=2.5), "top_k must be an integer"), (dict(temperature=None), "temperature must be a number"),
])
def test_bad_sampling_options_are_clear_errors(options, message):
    from hippo.runtime.autoregressive import SamplingOptions

    with pytest.raises(HippoError, match=message):
        SamplingOptions(**options)


def test_sampling_options_at_their_bounds():
    """The limits are inclusive where documented: temperature MIN_TEMPERATURE (1e-6) and seed
    2**62 pass, a hair beyond them does not; the defaults are greedy decoding."""
    from hippo.runtime.autoregressive import MAX_SEED, MIN_TEMPERATURE, SamplingOptions

    assert (MIN_TEMPERATURE, MAX_SEED) == (1e-6, 2**62)
    assert SamplingOptions().greedy and SamplingOptions(temperature=0).greedy
    assert not SamplingOptions(temperature=1e-6).greedy
    for options in (dict(seed=0), dict(seed=2**62), dict(temperature=1.0, top_p=1.0),
                    dict(temperature=1.0, top_k=0)):
        SamplingOptions(**options)
    for options, message in [(dict(temperature=0.99e-6), "overflow"), (dict(seed=2**62 + 1), "seed"),
                             (dict(temperature=-0.5), "temperature must be >= 0"),
                             (dict(temperature=True), "temperature must be a number"),
                             (dict(temperature=1.0, top_p="0.9"), "top_p must be a number"),
                             (dict(temperature=1.0, top_p=True), "top_p must be a number"),
                             (dict(temperature=1.0, top_p=0.0), "top_p"),
                             (dict(temperature=1.0, top_k=-1), "top_k")]:
        with pytest.raises(HippoError, match=message):
            SamplingOptions(**options)


def test_resolve_device():
    from hippo.models import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu:0") == torch.device("cpu")  # what its tensors' device says
    for bad, message in [("gpu", "unknown device"), ("meta", "not supported"),
                         ("cuda:99", "CUDA GPU"), ("cpu:1", "there is one CPU device")]:
        with pytest.raises(HippoError, match=message):
            resolve_device(bad)
    with pytest.raises(HippoError, match="dtype"):
        load_adapter("tiny-qwen2.5-vl", dtype=torch.int8)


def test_lanes_on_a_cpu_and_a_gpu_need_sequential_decoding():
    """Parallel decoding orders the two lanes with CUDA stream events: a CPU target has none to
    wait on a CUDA draft with, and a CPU draft's early verification read the target's logits
    unordered with its stream (checked from the devices alone: no GPU needed)."""
    cpu, gpu0, gpu1 = torch.device("cpu"), torch.device("cuda:0"), torch.device("cuda:1")
    for target, draft, mode in [(cpu, cpu, "parallel"), (cpu, gpu0, "sequential"),
                                (gpu0, cpu, "sequential"), (gpu0, gpu1, "parallel")]:
        check_lane_devices(target, draft, mode)
    for target, draft in [(cpu, gpu0), (gpu0, cpu)]:
        with pytest.raises(HippoError, match="parallel decoding needs the target and the draft "
                                             "both on CUDA or both on the CPU"):
            check_lane_devices(target, draft, "parallel")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                                                     requires_cuda])])
@pytest.mark.parametrize("mode", ["ar", "parallel"])
def test_a_generation_inside_inference_mode_leaves_the_pipeline_and_the_model_usable(mode,
                                                                                     device):
    """Servers run requests under torch.inference_mode(). A pipeline whose runtimes were built
    there kept inference tensors (its KV cache, the fused weights the model's parameters then
    view): every later generation outside it failed on the cache's in-place updates, and the
    model could no longer be trained. On CUDA the runtimes also capture graphs (parallel mode:
    two streams) inside inference mode."""
    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0, device=device)
    pipeline = HippoPipeline(target, draft, mode=mode, gamma=3)
    with torch.inference_mode():
        inside = pipeline.generate(sample_video_path(), "what moves?", 8, num_frames=4)
    outside = pipeline.generate(sample_video_path(), "what moves?", 8, num_frames=4)
    assert outside.tokens == inside.tokens
    target.model(input_ids=torch.tensor([[1, 2, 3]], device=device)).logits.sum().backward()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                                                     requires_cuda])])
@pytest.mark.parametrize("mode", ["ar", "sequential", "parallel"])
@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_a_generation_failing_mid_way_leaves_the_next_one_as_on_a_fresh_pipeline(
        monkeypatch, mode, failure, device):
    """A server keeps one pipeline: after a generation fails mid-way (an OOM from a step, an
    interrupt), the next one must give a fresh pipeline's tokens and statistics. On CUDA the
    failing round leaves a target step queued on its lane's stream (slowed here), which nothing
    joins: it must not advance the shared cache after the next generation's reset."""
    from hippo.runtime.decoder import LanguageModelRuntime
    from hippo.speculative import SamplingOptions

    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0, device=device)
    pipeline = HippoPipeline(target, draft, mode=mode, gamma=3)
    prompts = pipeline.prepare(sample_frames("qwen2_5_vl", 4), "what moves?")
    sampling = SamplingOptions()
    expected = HippoPipeline(target, draft, mode=mode, gamma=3).generate_prepared(
        *prompts, 12, sampling, None)
    step, calls = LanguageModelRuntime.step, []

    def failing_step(self, *args, **kwargs):
        # The draft's first step after the target's third (its third, for "ar") fails; in
        # parallel mode that target step was issued on its lane's stream and is still queued.
        is_target = self is pipeline.runtime("target")
        calls.append(is_target)
        if is_target and self.device.type == "cuda":
            torch.cuda._sleep(200_000_000)  # about 0.1 s: queued well past the failure
        if sum(calls) >= 3 and (mode == "ar" or not is_target):
            raise failure("out of memory")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(LanguageModelRuntime, "step", failing_step)
    with pytest.raises(failure):
        pipeline.generate_prepared(*prompts, 12, sampling, None)
    monkeypatch.setattr(LanguageModelRuntime, "step", step)
    again = pipeline.generate_prepared(*prompts, 12, sampling, None)
    assert again.tokens == expected.tokens
    keys = ("tokens", "rounds", "target_steps", "draft_steps", "drafted", "accepted", "gammas")
    if mode == "parallel" and device == "cuda":
        # How many draft steps a pre-verify round takes before the host sees its first draft
        # rejected depends on timing on a GPU (two fresh pipelines differ too): bounds only.
        keys = tuple(key for key in keys if key != "draft_steps")
        gammas = again.stats.gammas  # each drafting round takes its first step at least
        assert sum(g > 0 for g in gammas) <= again.stats.draft_steps <= sum(gammas)
    assert [getattr(again.stats, key) for key in keys] == \
        [getattr(expected.stats, key) for key in keys]


def test_pipelines_sharing_runtimes_take_turns_across_threads(monkeypatch):
    """with_options shares the runtimes, hence their KV caches: a generation started in another
    thread while one is under way must wait for it, not overwrite its cache (that gave wrong
    tokens in silence, or a rollback error)."""
    import threading

    from hippo.runtime.decoder import LanguageModelRuntime

    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0)
    video, prompt = sample_video_path(), "what moves?"
    base = HippoPipeline(target, draft, mode="sequential", gamma=3)
    sibling = base.with_options(mode="ar")
    expected = [base.generate(video, prompt, 12, num_frames=4).tokens,
                sibling.generate(video, "other", 12, num_frames=2).tokens]
    paused, sibling_done = threading.Event(), threading.Event()
    step = LanguageModelRuntime.step

    def pausing_step(self, *args, **kwargs):
        # The first generation stops after its first step until the other thread's is done
        # (or, when that one must wait for this one, for a second).
        if threading.current_thread().name == "first" and not paused.is_set():
            paused.set()
            sibling_done.wait(timeout=1.0)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(LanguageModelRuntime, "step", pausing_step)
    results: dict[str, object] = {}

    def run(name, pipeline, *args, **kwargs):
        try:
            if name == "second":
                paused.wait(timeout=10)
            results[name] = pipeline.generate(*args, **kwargs).tokens
        except Exception as error:  # noqa: BLE001 - reported by the assertion
            results[name] = error
        finally:
            if name == "second":
                sibling_done.set()

    threads = [threading.Thread(target=run, name="first",
                                args=("first", base, video, prompt, 12), kwargs=dict(num_frames=4)),
               threading.Thread(target=run, name="second",
                                args=("second", sibling, video, "other", 12),
                                kwargs=dict(num_frames=2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [results.get("first"), results.get("second")] == expected


@pytest.mark.parametrize("mode", ["ar", "sequential", "parallel"])
@pytest.mark.parametrize("overflow", ["head", "layers"])
def test_logits_that_overflow_float16_are_a_clear_error_also_when_greedy(mode, overflow):
    """A model whose activations overflow fp16 gives NaN or inf logits; greedy decoding took
    their argmax (token 0 for ever with NaN) in silence, speculative decoding agreeing with it."""
    target = load_adapter("tiny-qwen2.5-vl", seed=0)
    with torch.no_grad():
        if overflow == "head":  # some logits beyond fp16's 65504: +inf
            target.model.lm_head.weight.mul_(3e5)
        else:  # the residual stream overflows: NaN after the final norm
            for layer in target.model.model.language_model.layers:
                layer.mlp.down_proj.weight.mul_(1e6)
    target.model.to(torch.float16)
    pipeline = HippoPipeline(target, None, mode=mode, gamma=3)
    with pytest.raises(HippoError, match="logits after the prompt are not finite"):
        pipeline.generate(sample_video_path(), "what moves?", 8, num_frames=2)



def _spoil(logits: torch.Tensor, value: str) -> None:
    """Logits as an overflowing model gives them: all NaN, or one +inf (whose argmax looks
    like any other token)."""
    if value == "nan":
        logits.fill_(float("nan"))
    else:
        logits[..., 7] = float("inf")


NON_FINITE_PAIRS = [("qwen2_5_vl", "small-draft", 0), ("llava_onevision", "perturbed-copy", 1)]


@pytest.mark.parametrize("column, value", [(2, "nan"), (11, "inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("mode", ["ar", "sequential", "parallel"])
@pytest.mark.parametrize("family, kind, seed", NON_FINITE_PAIRS)
def test_target_logits_turning_non_finite_mid_generation_are_a_clear_error(
        monkeypatch, device, family, kind, seed, mode, temperature, column, value):
    """Logits that overflow after the prompt (its logits pass the prefill's check): greedy
    decoding emitted their argmax in silence (token 0 for ever with NaN, AR and speculative
    alike) and a round of the target alone sampled token 0; sampling elsewhere failed with
    torch's or verify_sampling's RuntimeError. Every mode names the first token whose logits
    are not finite, the same one: row `column` and the ones after it are spoilt (12 tokens:
    column 11 is the last, a round of the target alone in sequential decoding). On CUDA the
    flags cross streams and graphs: they are read with the round's one synchronisation."""
    from hippo.runtime.decoder import LanguageModelRuntime
    from hippo.speculative import SamplingOptions

    target, draft = make_pair(family, kind, seed, device=device)
    pipeline = HippoPipeline(target, draft, mode=mode, gamma=3)
    prompts = pipeline.prepare(sample_frames(family, 4), "what moves?")
    step = LanguageModelRuntime.step
    spoil_rows_from(monkeypatch, pipeline, "target", prompts[0].length, column,
                    lambda rows: _spoil(rows, value))
    sampling = SamplingOptions(temperature, seed=0 if temperature else None)
    whose = "the model's" if mode == "ar" else "the target's"
    with pytest.raises(HippoError, match=f"{whose} next-token logits are not finite .* at new "
                                         f"token {column + 1}:"):
        pipeline.generate_prepared(*prompts, 12, sampling, None)
    monkeypatch.setattr(LanguageModelRuntime, "step", step)
    assert len(pipeline.generate_prepared(*prompts, 12, sampling, None).tokens) == 12


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("family, kind, seed", NON_FINITE_PAIRS)
def test_draft_logits_turning_non_finite_mid_generation(monkeypatch, device, family, kind, seed,
                                                         mode, temperature, value):
    """The draft's logits overflow from its third step on. Greedy, its tokens are proposals
    only: they are rejected and the output is the target's own (AR's). Sampling, a candidate
    drawn from no distribution cannot pass the acceptance test (verify_sampling's RuntimeError
    on the CPU; a token judged against NaN where the check is off): the round that tests it
    names the draft and the token, the fourth new one (the prefill chose the first, and the
    draft's first three steps the next three: its third is the first spoilt)."""
    from hippo.runtime.decoder import LanguageModelRuntime
    from hippo.speculative import SamplingOptions

    target, draft = make_pair(family, kind, seed, device=device)
    pipeline = HippoPipeline(target, draft, mode=mode, gamma=3)
    prompts = pipeline.prepare(sample_frames(family, 4), "what moves?")
    sampling = SamplingOptions(temperature, seed=0 if temperature else None)
    expected = None if temperature else \
        HippoPipeline(target, draft, mode="ar").generate_prepared(*prompts, 12, sampling,
                                                                  None).tokens
    step, calls = LanguageModelRuntime.step, []

    def spoilt_step(self, input_ids, position_ids):
        logits = step(self, input_ids, position_ids)
        if self is pipeline.runtime("draft"):
            calls.append(len(calls))
            if len(calls) >= 3:
                logits = logits.clone()
                _spoil(logits, value)
        return logits

    monkeypatch.setattr(LanguageModelRuntime, "step", spoilt_step)
    if temperature:
        with pytest.raises(HippoError, match=r"^the draft's next-token logits are not finite "
                                             r"\(NaN or inf, torch\.float32\) at new token "
                                             r"4:"):
            pipeline.generate_prepared(*prompts, 12, sampling, None)
    else:
        assert pipeline.generate_prepared(*prompts, 12, sampling, None).tokens == expected
    assert len(calls) >= 3


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("mode, whose", [("sequential", "target"), ("sequential", "draft"),
                                         ("parallel", "target"), ("parallel", "draft")])
def test_logits_non_finite_only_after_an_accepted_eos_are_never_refused(monkeypatch, mode,
                                                                         whose, temperature):
    """Logits that turn NaN only after the eos: AR stops at the eos and never computes them,
    and speculative decoding, whose round accepted the eos among its candidates (a draft that
    is an exact copy: every candidate is accepted), emits the same tokens rather than refusing
    the round for a row or a draft step whose token is never emitted (a parallel round drafts
    past its candidates, and those drafts are tested in the next round, after the eos)."""
    from hippo.speculative import SamplingOptions
    from speculative_testing import make_pipeline

    target, draft = exact_copy_pair()
    sampling = SamplingOptions(temperature, seed=0 if temperature else None)
    pipeline = make_pipeline(target, draft, mode, 3, 1.0)
    prompts = pipeline.prepare(sample_frames("llava_onevision", 4), "what moves?")
    tokens = pipeline.generate_prepared(*prompts, 12, sampling, None).tokens  # the same seed
    if not temperature:
        ar = make_pipeline(target, draft, "ar", 3, 1.0)
        assert ar.generate_prepared(*prompts, 12, sampling, None).tokens == tokens
    eos = next(i for i in range(2, 11) if tokens[i] not in tokens[:i])  # its first occurrence
    spoil_rows_from(monkeypatch, pipeline, whose, prompts[0 if whose == "target" else 1].length,
                    eos + 1)  # the rows past the eos
    out = pipeline.generate_prepared(*prompts, 12, sampling, {tokens[eos]})
    assert out.tokens == tokens[:eos + 1]
    assert out.stats.accepted > 0


@pytest.mark.parametrize("mode", ["ar", "sequential", "parallel"])
def test_a_non_finite_row_that_chose_an_accepted_eos_is_refused(monkeypatch, mode):
    """The row whose +inf chose the eos (an exact copy drafts it, and the target accepts it:
    its argmax) is the eos's own choice, which AR computes and refuses: a round that accepted
    the eos among its candidates refuses it too, rather than stopping on it in silence."""
    from hippo.runtime.decoder import LanguageModelRuntime
    from hippo.speculative import SamplingOptions
    from speculative_testing import make_pipeline

    target, draft = exact_copy_pair()
    pipeline = make_pipeline(target, draft, mode, 3, 1.0)
    prompts = pipeline.prepare(sample_frames("llava_onevision", 4), "what moves?")
    sampling = SamplingOptions(0.0)
    tokens = pipeline.generate_prepared(*prompts, 12, sampling, None).tokens
    eos = 1  # chosen by the target's step on token 0: a candidate in both round plans
    assert tokens[eos] != tokens[0]
    step = LanguageModelRuntime.step

    def spoilt_step(self, input_ids, position_ids):
        logits = step(self, input_ids, position_ids)
        first = self.length - input_ids.shape[1] + 1 - prompts[0].length  # row 0's column
        if self is pipeline.runtime("target") and 0 <= eos - first < logits.shape[1]:
            logits = logits.clone()
            logits[:, eos - first, tokens[eos]] = float("inf")
        return logits

    monkeypatch.setattr(LanguageModelRuntime, "step", spoilt_step)
    whose = "the model's" if mode == "ar" else "the target's"
    with pytest.raises(HippoError, match=f"^{whose} next-token logits are not finite .* at new "
                                         f"token {eos + 1}:"):
        pipeline.generate_prepared(*prompts, 12, sampling, {tokens[eos]})


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_target_rows_fed_rejected_drafts_are_never_refused(monkeypatch, mode):
    """A draft that always proposes a token the target never emits: every candidate is rejected
    and the target's rows fed those drafts (NaN here) choose nothing that is emitted, nor does
    AR ever compute them. The output is AR's, not a refusal."""
    from hippo.runtime.decoder import LanguageModelRuntime
    from hippo.speculative import SamplingOptions

    target, draft = make_pair("qwen2_5_vl", "small-draft", 0)
    pipeline = HippoPipeline(target, draft, mode=mode, gamma=3)
    prompts = pipeline.prepare(sample_frames("qwen2_5_vl", 4), "what moves?")
    sampling = SamplingOptions(0.0)
    expected = HippoPipeline(target, draft, mode="ar").generate_prepared(
        *prompts, 12, sampling, None).tokens
    never = next(token for token in range(100) if token not in expected)
    step, spoilt = LanguageModelRuntime.step, []

    def forcing_step(self, input_ids, position_ids):
        logits = step(self, input_ids, position_ids)
        if self is pipeline.runtime("draft"):
            logits = logits.clone()
            logits[..., never] = 1e4  # finite: the draft's proposal, always rejected
        elif (input_ids[0] == never).any():
            logits = logits.clone()
            logits[:, input_ids[0] == never] = float("nan")
            spoilt.append(True)
        return logits

    monkeypatch.setattr(LanguageModelRuntime, "step", forcing_step)
    out = pipeline.generate_prepared(*prompts, 12, sampling, None)
    assert out.tokens == expected and out.stats.accepted == 0
    assert spoilt or mode == "parallel"  # a parallel round feeds the target no rejected draft


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("mode", ["ar", "sequential", "parallel"])
def test_token_zero_is_emitted_like_any_other(monkeypatch, mode, temperature):
    """-1 marks a row whose logits are not finite: token 0, chosen from finite logits (the
    argmax of NaNs is 0, but these are not NaN), is emitted, not refused."""
    from hippo.runtime.decoder import LanguageModelRuntime
    from hippo.speculative import SamplingOptions

    target, draft = make_pair("qwen2_5_vl", "small-draft", 0)
    pipeline = HippoPipeline(target, draft, mode=mode, gamma=3)
    prompts = pipeline.prepare(sample_frames("qwen2_5_vl", 4), "what moves?")
    step = LanguageModelRuntime.step

    def zero_step(self, input_ids, position_ids):
        logits = step(self, input_ids, position_ids).clone()
        logits[..., 0] = 1e4
        return logits

    monkeypatch.setattr(LanguageModelRuntime, "step", zero_step)
    sampling = SamplingOptions(temperature, seed=0 if temperature else None)
    assert pipeline.generate_prepared(*prompts, 8, sampling, None).tokens[1:] == [0] * 7


def _with_rope(adapter, rope_parameters: dict, max_positions: int) -> None:
    """The adapter's language model with another RoPE (as its config.json could ask)."""
    text = adapter.text_model
    text.config.max_position_embeddings = max_positions
    text.config.rope_parameters = rope_parameters
    text.rotary_emb = type(text.rotary_emb)(config=text.config)


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_a_rope_switching_inside_the_context_is_refused_for_speculative_decoding(mode):
    """longrope switches to its long factors once a call's largest position passes
    original_max_position_embeddings: a verify step straddling it differs from the target's
    AR steps (seen: the output left the AR output after 20 tokens), so speculative decoding
    is refused; AR decoding (HF generate's arithmetic) and dynamic NTK, which switches only
    past the context the pipeline admits, stay allowed."""
    target, draft = make_pair("llava_onevision", "perturbed-copy", seed=0)
    half = target.text_model.rotary_emb.inv_freq.numel()
    _with_rope(target, {"rope_type": "longrope", "rope_theta": 1e4,
                        "original_max_position_embeddings": 53, "short_factor": [1.0] * half,
                        "long_factor": [1.0 + 3 * i for i in range(half)]}, 212)
    with pytest.raises(HippoError, match="would not be lossless with the target's rope_type 'longrope'"):
        HippoPipeline(target, draft, mode=mode)
    HippoPipeline(target, draft, mode="ar")
    _with_rope(target, {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 8.0}, 212)
    HippoPipeline(target, draft, mode=mode)


def test_dynamic_ntk_stays_lossless_when_a_request_fills_the_context():
    """Dynamic NTK rescales the frequencies of a whole call once its largest position passes
    max_position_embeddings. Parallel rounds drafted past max_new_tokens, so with prompt +
    max_new_tokens == max_position_embeddings their last verify steps crossed it and rotated
    the in-context rows too (seen: token 9 of 12 left the AR output)."""
    target, draft = make_pair("llava_onevision", "perturbed-copy", seed=0)
    frames = sample_frames("llava_onevision", 2)
    new_tokens = 12
    length = HippoPipeline(target, draft, mode="ar").prepare(frames, "what moves?")[0].length
    _with_rope(target, {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 8.0},
               length + new_tokens)
    expected = HippoPipeline(target, draft, mode="ar").generate(
        frames, "what moves?", new_tokens, eos_token_id=None).tokens
    for mode in ("sequential", "parallel"):
        out = HippoPipeline(target, draft, mode=mode, gamma=8,
                            preservation=PreservationOptions(keep_ratio=0.5)).generate(
            frames, "what moves?", new_tokens, eos_token_id=None)
        assert out.tokens == expected, mode


def test_release_frees_the_runtimes_of_every_pipeline_sharing_them():
    """A server frees a long request's cache with release(); the next generation rebuilds a
    runtime of the size it needs and decodes the same tokens."""
    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0)
    pipeline = HippoPipeline(target, draft, mode="sequential", gamma=3)
    sibling = pipeline.with_options(mode="parallel")
    before = pipeline.generate(sample_video_path(), "what moves?", 8, num_frames=4).tokens
    cache = weakref.ref(pipeline.runtime("target").cache.tensor)
    sibling.release()
    gc.collect()
    assert pipeline.runtime("target") is None and pipeline.runtime("draft") is None
    assert cache() is None, "the KV cache is still alive"
    assert pipeline.generate(sample_video_path(), "what moves?", 8, num_frames=4).tokens == before


def test_runtimes_are_reused_and_sized_in_whole_granules(monkeypatch):
    """Caches are sized in whole CACHE_GRANULEs (256 positions): a request a little longer than
    the last reuses the runtimes, one beyond a runtime's room rebuilds it larger (its old cache
    freed first); the draft's cache holds the kept tokens only, the whole prompt for a full
    prefill. Pipelines from with_options share the runtimes only under the same runtime options."""
    from hippo.runtime.decoder import LanguageModelRuntime

    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0)
    pipeline = HippoPipeline(target, draft, mode="sequential", gamma=3)
    frames = torch.randint(0, 256, (34, 112, 112, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    prompt, _ = pipeline.prepare(frames, "what moves?")
    kept = kept_prompt_length(prompt, PreservationOptions().keep_ratio)
    # Up to the target's 512 positions exactly: beyond the draft's 256 kept-token positions.
    new_tokens = 512 - prompt.length + 1
    assert 256 < prompt.length and kept + new_tokens - 1 > 256
    roles = ("target", "draft")

    def sizes(p: HippoPipeline) -> dict[str, int]:
        return {role: p.runtime(role).cache.max_seq_len for role in roles}

    expected = pipeline.with_options(mode="ar").generate(frames, "what moves?", 4).tokens
    assert pipeline.generate(frames, "what moves?", 4).tokens == expected
    assert sizes(pipeline) == {"target": 512, "draft": 256}
    runtimes = {role: weakref.ref(pipeline.runtime(role)) for role in roles}
    pipeline.generate(frames, "what moves?", 8)  # a few tokens more: the same runtimes
    assert all(pipeline.runtime(role) is runtimes[role]() for role in roles)
    sibling = pipeline.with_options(mode="parallel", gamma="auto")
    assert all(sibling.runtime(role) is runtimes[role]() for role in roles)
    assert pipeline.with_options(step_invariant=True).runtime("target") is None
    old_caches = {model: weakref.ref(pipeline.runtime(role).cache.tensor)
                  for role, model in (("target", target.model), ("draft", draft.model))}
    built = []
    from_hf = LanguageModelRuntime.from_hf

    def recording_from_hf(model, *args, **kwargs):
        gc.collect()
        built.append((model is draft.model, old_caches[model]() is not None))
        return from_hf(model, *args, **kwargs)

    monkeypatch.setattr(LanguageModelRuntime, "from_hf", recording_from_hf)
    long = pipeline.generate(frames, "what moves?", new_tokens, eos_token_id=None)
    assert len(long.tokens) == new_tokens
    assert built == [(True, False)]  # the draft's alone, its old cache freed first
    assert pipeline.runtime("target") is runtimes["target"]()
    assert sizes(pipeline) == {"target": 512, "draft": 512}
    # One token more: the target's room is 768 positions, the draft's still 512; AR alike.
    longer = pipeline.generate(frames, "what moves?", new_tokens + 1, eos_token_id=None).tokens
    assert longer[:-1] == long.tokens and sizes(pipeline) == {"target": 768, "draft": 512}
    autoregressive = HippoPipeline(target, None, mode="ar")
    assert autoregressive.generate(frames, "what moves?", new_tokens + 1,
                                   eos_token_id=None).tokens == longer
    assert autoregressive.runtime("target").cache.max_seq_len == 768
    # A full prefill fills the draft's cache with the whole prompt before compacting it.
    full = HippoPipeline(target, draft, mode="sequential", gamma=3, draft_prefill="full+compact")
    assert full.generate(frames, "what moves?", 4).tokens == expected
    assert sizes(full) == {"target": 512, "draft": 512}


def test_a_model_without_a_trained_context_takes_any_length_and_prepared_prompts_are_checked(
        monkeypatch):
    """A config without max_position_embeddings sets no limit; with one, generate_prepared
    refuses max_new_tokens beyond it (prepare() was told none)."""
    from hippo.models.qwen2_5_vl import Qwen2_5_VLAdapter
    from hippo.speculative import SamplingOptions

    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0)
    frames = sample_frames("qwen2_5_vl", 2)
    expected = HippoPipeline(target, draft, mode="sequential", gamma=3).generate(
        frames, "what moves?", 6, eos_token_id=None).tokens
    monkeypatch.setattr(Qwen2_5_VLAdapter, "max_positions", property(lambda self: None))
    for mode in ("ar", "sequential", "parallel"):
        assert HippoPipeline(target, draft, mode=mode, gamma=3).generate(
            frames, "what moves?", 6, eos_token_id=None).tokens == expected
    pipeline = HippoPipeline(target, draft, mode="sequential", gamma=3)
    prompts = pipeline.prepare(frames, "what moves?")
    limit = prompts[0].length + 6
    monkeypatch.setattr(Qwen2_5_VLAdapter, "max_positions", property(lambda self: limit))
    assert pipeline.generate_prepared(*prompts, 6, SamplingOptions(), None).tokens == expected
    with pytest.raises(HippoError, match=f"context too long: {limit + 1} tokens \\(prompt plus "
                                         f"max_new_tokens\\) exceed the target's {limit} "
                                         "positions \\(qwen2_5_vl\\)"):
        pipeline.generate_prepared(*prompts, 7, SamplingOptions(), None)


def test_a_drafts_context_bounds_the_modes_that_run_it(monkeypatch):
    """A request beyond the draft's context (not the target's) is refused by the speculative
    modes, which run the draft over the target's positions, from generate() and
    generate_prepared() alike; mode "ar" never runs the draft and takes it (generate() refused
    it, generate_prepared() took it even in the speculative modes)."""
    from hippo.speculative import SamplingOptions

    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0)
    frames = sample_frames("qwen2_5_vl", 2)
    prompts = HippoPipeline(target, draft, mode="ar").prepare(frames, "what moves?")
    monkeypatch.setattr(draft.text_model.config, "max_position_embeddings", prompts[0].length + 4)
    ar = HippoPipeline(target, draft, mode="ar")
    expected = ar.generate(frames, "what moves?", 8, eos_token_id=None).tokens
    assert len(expected) == 8
    assert ar.generate_prepared(*prompts, 8, SamplingOptions(), None).tokens == expected
    for mode in ("sequential", "parallel"):
        pipeline = HippoPipeline(target, draft, mode=mode, gamma=3)
        with pytest.raises(HippoError, match="positions of the draft"):
            pipeline.generate(frames, "what moves?", 8, eos_token_id=None)
        with pytest.raises(HippoError, match=f"exceed the draft's {prompts[0].length + 4} "):
            pipeline.generate_prepared(*prompts, 8, SamplingOptions(), None)
        assert pipeline.generate_prepared(*prompts, 4, SamplingOptions(), None).tokens == \
            expected[:4]


def test_a_files_frames_are_spaced_at_the_rate_they_were_sampled_at():
    """fps as asked up to the clip's own rate; num_frames frames over the clip or its window
    (its end cut at the clip's); fps as asked, or None, where the clip records no rate."""
    from hippo.pipeline import _sampled_rate
    from hippo.video import VideoInfo

    clip = VideoInfo(num_frames=41, fps=10.0, height=56, width=56)  # 4.1 s
    assert _sampled_rate(clip, 3.0, 13, None, None) == 3.0  # not 13 frames / 4.1 s
    assert _sampled_rate(clip, 3.0, 7, 1.0, 3.2) == 3.0
    assert _sampled_rate(clip, 25.0, 41, None, None) == 10.0
    assert _sampled_rate(clip, None, 8, None, None) == pytest.approx(8 / 4.1)
    assert _sampled_rate(clip, None, 4, 1.0, 3.0) == 2.0
    assert _sampled_rate(clip, None, 4, 2.1, 9.0) == pytest.approx(2.0)  # the window ends with the clip
    assert _sampled_rate(clip, None, 1, 2.0, 2.0) is None  # an instant's frame (load_video takes it)
    unknown = VideoInfo(num_frames=6, fps=0.0, height=56, width=56)  # a folder of frames
    assert _sampled_rate(unknown, None, 4, None, None) is None
    assert _sampled_rate(unknown, 3.0, 4, None, None) == 3.0


def test_default_options_and_frame_count():
    """What a pipeline does unless told otherwise (README, HippoOptions' docstring): parallel
    decoding with gamma 'auto' up to 12, a pruned draft prefill, DEFAULT_FRAMES (16) frames."""
    options = HippoOptions()
    assert (options.mode, options.gamma, options.max_gamma, options.largest_gamma,
            options.draft_prefill, options.gemm_prologues) == ("parallel", "auto", 12, 12,
                                                               "pruned", "none")
    pipeline = HippoPipeline(load_adapter("tiny-llava-onevision"), None, mode="ar")
    default = pipeline.prepare(sample_video_path(), "hi")[0]
    sixteen = pipeline.prepare(sample_video_path(), "hi", num_frames=16)[0]
    assert torch.equal(default.inputs_embeds, sixteen.inputs_embeds)
    assert default.num_visual == pipeline.target.visual_tokens(16, 56, 56)
    frames = sample_frames("llava_onevision", 2)
    assert len(pipeline.generate(frames, "hi", eos_token_id=None).tokens) == 64  # max_new_tokens


@pytest.mark.parametrize("mode", ["ar", "sequential", "parallel"])
def test_generation_stops_after_the_targets_eos_by_default(monkeypatch, mode):
    """eos_token_id left out: the target's stop ids end the generation (eos included), none when
    it has none; AR statistics count one target step per token after the prefill's."""
    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0)
    frames = sample_frames("qwen2_5_vl", 2)
    pipeline = HippoPipeline(target, draft, mode=mode, gamma=3)
    tokens = pipeline.generate(frames, "what moves?", 12, eos_token_id=None).tokens
    end = next(i for i in range(2, 12) if tokens[i] not in tokens[:i])
    monkeypatch.setattr(type(target), "eos_token_ids", property(lambda self: [tokens[end]]))
    assert pipeline.eos_ids() == {tokens[end]}
    out = pipeline.generate(frames, "what moves?", 12)
    assert out.tokens == tokens[:end + 1] and out.stats.tokens == end + 1
    if mode == "ar":
        assert (out.stats.target_steps, out.stats.rounds) == (end, end)
        one = pipeline.generate(frames, "what moves?", 1).stats
        assert (one.tokens, one.target_steps, one.rounds) == (1, 0, 0)
    monkeypatch.setattr(type(target), "eos_token_ids", property(lambda self: []))
    assert pipeline.eos_ids() == set()
    assert pipeline.generate(frames, "what moves?", 12).tokens == tokens


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_generated_tokens_take_the_positions_after_the_prompt(family):
    """Speculative decoding feeds its tokens at the positions AR decoding gives them, right after
    the prompt's. The tiny models' greedy tokens do not notice a shift by one position; a target
    whose attention is sharp (queries scaled up) does within a few tokens."""
    target, draft = make_pair(family, "perturbed-copy", seed=0)
    with torch.no_grad():
        for layer in target.text_model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
    frames = sample_frames(family, 2)

    def run(mode: str) -> list[int]:
        pipeline = HippoPipeline(target, draft, mode=mode, gamma=3, step_invariant=True)
        return pipeline.generate(frames, "what moves?", 16, eos_token_id=None).tokens

    expected = run("ar")
    assert run("sequential") == expected
    assert run("parallel") == expected


def test_a_pipeline_for_hippo_decoding_is_refused_where_the_kernels_do_not_run(monkeypatch):
    """Checked when the pipeline is made, not at the first launch; mode='ar' needs no kernels."""
    import hippo_ext

    target = load_adapter("tiny-qwen2.5-vl")
    monkeypatch.setattr(hippo_ext, "kernels_unsupported", lambda device: "simulated: no kernels")
    for mode in ("sequential", "parallel"):
        with pytest.raises(HippoError, match=f"{mode} decoding on cpu needs hippo_ext's kernels, "
                                             "which cannot run there: simulated: no kernels"):
            HippoPipeline(target, None, mode=mode)
    HippoPipeline(target, None, mode="ar")


@pytest.mark.parametrize("method", ["hippo", "uniform"])
def test_self_speculation_keeping_every_token_accepts_every_draft(method):
    """Self-speculation drafts with the target over a copy of its own cache: keeping every visual
    token, the draft is the target and every drafted token is accepted (the output is the AR
    output either way). "uniform" selection reads no attention from the target's prefill."""
    target = load_adapter("tiny-qwen2.5-vl", seed=0)
    frames = sample_frames("qwen2_5_vl", 2)
    expected = HippoPipeline(target, None, mode="ar").generate(frames, "what moves?", 12,
                                                               eos_token_id=None).tokens
    for keep_ratio in (1.0, 0.5):
        pipeline = HippoPipeline(target, None, mode="sequential", gamma=3,
                                 preservation=PreservationOptions(keep_ratio=keep_ratio,
                                                                  method=method))
        for _ in range(2):  # the second on reused runtimes
            out = pipeline.generate(frames, "what moves?", 12, eos_token_id=None)
            assert out.tokens == expected
            if keep_ratio == 1.0:
                assert out.stats.drafted > 0 and out.stats.accepted == out.stats.drafted

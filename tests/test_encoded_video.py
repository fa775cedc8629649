"""Several questions about one video: HippoPipeline.encode_video decodes the video and runs each
model's vision tower once; every generation from the EncodedVideo gives the tokens that the same
call on the video itself gives, and leaves the encoding as it was. Adapters split prepare() the
same way (embed_video, then prepare_embedded)."""
from __future__ import annotations

import pytest
import torch

from hippo.assets import sample_video_path
from hippo.errors import HippoError
from hippo.models import VideoEmbedding, load_adapter
from hippo.models.agreement import AgreementPair, TINY_DRAFT, TINY_TARGET
from hippo.pipeline import EncodedVideo, HippoPipeline
from speculative_testing import FAMILY_PRESETS, make_pair, make_pipeline, sample_frames

QUESTIONS = ("what moves?", "describe the colours in one long sentence, please", "why?")
PREPARED_FIELDS = ("input_ids", "inputs_embeds", "position_ids", "visual_features")


def _assert_same_prompt(got, want) -> None:
    for name in PREPARED_FIELDS:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert (got.rope_delta, got.visual_start, got.num_visual, got.grid) == \
        (want.rope_delta, want.visual_start, want.num_visual, want.grid)


def _tensors(encoded: EncodedVideo) -> list[torch.Tensor]:
    return [tensor for embedding in encoded.embeddings.values()
            for tensor in (embedding.embeddings, embedding.visual_features,
                           *embedding.position_inputs.values())]


@pytest.mark.parametrize("fps", [None, 1.5])
@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_an_adapters_prepare_is_its_embedding_merged(family, fps):
    """prepare(frames, prompt) is prepare_embedded(embed_video(frames), prompt), field for field
    (Qwen2.5-VL's temporal positions follow fps), for text and token-id prompts; one embedding
    serves prompts of any length."""
    adapter = load_adapter(FAMILY_PRESETS[family][0], seed=3)
    frames = sample_frames(family, 4)
    embedding = adapter.embed_video(frames, fps)
    assert embedding.adapter is adapter and embedding.frames == tuple(frames.shape[:3])
    assert embedding.num_visual == adapter.visual_tokens(*frames.shape[:3])
    assert embedding.visual_features.shape[:3] == embedding.grid
    table = adapter.model.get_input_embeddings()
    for prompt in (*QUESTIONS, [5, 6, 7]):
        prepared = adapter.prepare_embedded(embedding, prompt)
        _assert_same_prompt(prepared, adapter.prepare(frames, prompt, fps))
        # The video's rows are the embedding's, the text's the token table's.
        span = slice(prepared.visual_start, prepared.visual_start + prepared.num_visual)
        assert torch.equal(prepared.inputs_embeds[0, span], embedding.embeddings)
        text = torch.ones(prepared.length, dtype=torch.bool)
        text[span] = False
        assert torch.equal(prepared.inputs_embeds[0, text], table(prepared.input_ids[0, text]))


@pytest.mark.parametrize("mode", ["ar", "sequential", "parallel"])
@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_questions_about_an_encoded_video_get_the_videos_answers(monkeypatch, device, family, mode):
    """Each question about an encoded file gets the tokens the file itself gets (greedy, and
    sampled with a seed where rounds do not depend on timing), with the video decoded and each
    vision tower run once in all; the encoding is unchanged by the generations."""
    target, draft = make_pair(family, "small-draft", seed=2, device=device)
    pipeline = HippoPipeline(target, mode="ar") if mode == "ar" else \
        make_pipeline(target, draft, mode, 3, 0.3)
    runs = _count_decoding_and_embedding(monkeypatch, pipeline)
    encoded = pipeline.encode_video(sample_video_path(), num_frames=4)
    roles = {"target"} if mode == "ar" else {"target", "draft"}
    assert runs == {"decoded": 1, "embedded": len(roles)} and set(encoded.embeddings) == roles
    before = [tensor.clone() for tensor in _tensors(encoded)]
    timed = mode == "parallel" and device != "cpu"
    for question in QUESTIONS:
        for sampling in ({}, {} if timed else dict(temperature=0.8, seed=4)):
            counted = dict(runs)
            got = pipeline.generate(encoded, question, 12, **sampling)
            assert runs == counted  # nothing decoded or embedded again
            want = pipeline.generate(sample_video_path(), question, 12, num_frames=4, **sampling)
            assert got.tokens == want.tokens
            assert got.stats.prompt_tokens == want.stats.prompt_tokens
            assert got.stats.draft_prompt_tokens == want.stats.draft_prompt_tokens
        prepared = pipeline.prepare(encoded, question, max_new_tokens=12)
        for got, want in zip(prepared, pipeline.prepare(sample_video_path(), question, num_frames=4)):
            if want is not None:
                _assert_same_prompt(got, want)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(encoded), before))


def _count_decoding_and_embedding(monkeypatch: pytest.MonkeyPatch,
                                  pipeline: HippoPipeline) -> dict[str, int]:
    """Counts, in the returned dict, each video decode and each vision-tower run from now on."""
    from hippo import pipeline as module

    runs = {"decoded": 0, "embedded": 0}

    def counting(function, key):
        def counted(*args, **kwargs):
            runs[key] += 1
            return function(*args, **kwargs)
        return counted

    monkeypatch.setattr(module, "load_video", counting(module.load_video, "decoded"))
    for adapter in pipeline._models().values():
        monkeypatch.setattr(adapter, "embed_video", counting(adapter.embed_video, "embedded"))
    return runs


def test_decoded_frames_and_their_rate_encode_as_generate_takes_them():
    """Frames already decoded, with the rate they were sampled at (Qwen2.5-VL spaces its
    temporal positions by it): the encoding keeps the rate, and answers as generate(frames)."""
    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=1)
    pipeline = HippoPipeline(target, draft, mode="sequential", gamma=2)
    frames = sample_frames("qwen2_5_vl", 6)
    for fps in (None, 0.5, 3.0):
        encoded = pipeline.encode_video(frames, fps=fps)
        assert encoded.fps == fps and encoded.frames == tuple(frames.shape[:3])
        for question in QUESTIONS[:2]:
            assert pipeline.generate(encoded, question, 10).tokens == \
                pipeline.generate(frames, question, 10, fps=fps).tokens


def test_pipelines_sharing_models_share_encodings():
    """with_options() keeps the models, so its pipelines take each other's encodings; a pipeline
    self-speculating on the pair's target takes the pair's (it needs the target's alone)."""
    target, draft = make_pair("llava_onevision", "perturbed-copy", seed=0)
    pair = HippoPipeline(target, draft)
    encoded = pair.encode_video(sample_video_path(), num_frames=3)
    sequential = pair.with_options(mode="sequential", gamma=2)
    alone = HippoPipeline(target, None, mode="sequential", gamma=2)
    for pipeline in (sequential, alone):
        assert pipeline.generate(encoded, "what moves?", 8).tokens == \
            pipeline.generate(sample_video_path(), "what moves?", 8, num_frames=3).tokens


def test_an_encoding_goes_only_to_the_models_that_made_it():
    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    other_target, other_draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    frames = sample_frames("qwen2_5_vl", 2)
    encoded = HippoPipeline(target, draft).encode_video(frames)
    for pipeline in (HippoPipeline(other_target, other_draft), HippoPipeline(target, other_draft)):
        with pytest.raises(HippoError, match="not made by this pipeline's (target|draft) model"):
            pipeline.generate(encoded, "what moves?", 4)
    alone = HippoPipeline(target, None).encode_video(frames)
    with pytest.raises(HippoError, match="not made by this pipeline's draft model"):
        HippoPipeline(target, draft).prepare(alone, "what moves?")
    # The adapters' own check: another model's embedding, or no embedding at all.
    with pytest.raises(HippoError, match="embedded by another model \\(a qwen2_5_vl adapter\\)"):
        other_target.prepare_embedded(encoded.embeddings["target"], "what moves?")
    with pytest.raises(HippoError, match="must be a VideoEmbedding .* got Tensor"):
        target.prepare_embedded(frames, "what moves?")
    anonymous = VideoEmbedding(**{**vars(encoded.embeddings["target"]), "adapter": None})
    with pytest.raises(HippoError, match="names no adapter"):
        target.prepare_embedded(anonymous, "what moves?")


def test_an_encoding_was_sampled_when_it_was_made():
    target, draft = make_pair("llava_onevision", "perturbed-copy", seed=0)
    pipeline = HippoPipeline(target, draft)
    encoded = pipeline.encode_video(sample_video_path(), num_frames=2)
    for sampling in (dict(num_frames=2), dict(fps=1.0), dict(start=0.0), dict(end=1.0, fps=2.0)):
        with pytest.raises(HippoError, match="sampled when it was encoded"):
            pipeline.generate(encoded, "what moves?", 4, **sampling)
        with pytest.raises(HippoError, match="sampled when it was encoded"):
            pipeline.prepare(encoded, "what moves?", **sampling)


def test_encode_video_refuses_what_prepare_refuses(monkeypatch, tmp_path):
    """The same clear errors as generate's, before anything is decoded where they can be."""
    from hippo import video
    from hippo.models.llava_onevision import LlavaOnevisionAdapter

    target, draft = make_pair("llava_onevision", "perturbed-copy", seed=0)
    pipeline = HippoPipeline(target, draft)
    with pytest.raises(HippoError, match="video file not found|no such|does not exist"):
        pipeline.encode_video(tmp_path / "missing.mp4")
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video at all")
    with pytest.raises(HippoError):
        pipeline.encode_video(tmp_path / "corrupt.mp4")
    with pytest.raises(HippoError, match="num_frames or fps, not both"):
        pipeline.encode_video(sample_video_path(), num_frames=2, fps=1.0)
    with pytest.raises(HippoError, match=r"file path or decoded frames \(a uint8 tensor \[T, H, W, 3\]\), got int"):
        pipeline.encode_video(42)
    # An encoding is not encoded again: the error says what to do with it.
    with pytest.raises(HippoError, match="encoded already: ask it questions with generate"):
        pipeline.encode_video(pipeline.encode_video(sample_frames("llava_onevision", 2)))
    with pytest.raises(HippoError, match="cut decoded frames yourself"):
        pipeline.encode_video(sample_frames("llava_onevision", 2), start=0.5)
    # Frames whose visual tokens alone overflow a model's context: refused before decoding.
    monkeypatch.setattr(LlavaOnevisionAdapter, "max_positions", property(lambda self: 20))
    for reader in (video._OpenCVReader, video._DecordReader):
        monkeypatch.setattr(reader, "frames", lambda *args: pytest.fail("decoded"))
    with pytest.raises(HippoError, match=f"16 frames of .* make {target.visual_tokens(16, 1, 1)} "
                                         "visual tokens; with the prompt's 0 text tokens"):
        pipeline.encode_video(sample_video_path(), num_frames=16)


def test_a_question_beyond_the_context_of_an_encoded_video_is_refused(monkeypatch):
    """The video fits, the question with its new tokens does not: one clear error, and the
    encoding still serves a question that fits."""
    from hippo.models.qwen2_5_vl import Qwen2_5_VLAdapter

    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    pipeline = HippoPipeline(target, draft)
    frames = sample_frames("qwen2_5_vl", 4)
    visual, text = target.visual_tokens(*frames.shape[:3]), target.text_tokens("what moves?")
    monkeypatch.setattr(Qwen2_5_VLAdapter, "max_positions", property(lambda self: visual + text + 6))
    encoded = pipeline.encode_video(frames)
    with pytest.raises(HippoError, match="fewer new tokens or a shorter prompt"):
        pipeline.generate(encoded, "what moves?", 7)
    with pytest.raises(HippoError, match="a shorter prompt"):
        pipeline.generate(encoded, "what moves? " * 4, 6)
    assert len(pipeline.generate(encoded, "what moves?", 6, eos_token_id=None).tokens) == 6


def test_a_bad_question_is_refused_before_anything_runs():
    target, draft = make_pair("llava_onevision", "perturbed-copy", seed=0)
    pipeline = HippoPipeline(target, draft)
    encoded = pipeline.encode_video(sample_frames("llava_onevision", 2))
    count = target.text_tokens("what moves?")
    assert pipeline.text_tokens("what moves?") == {"target": count, "draft": count}
    assert pipeline.prepare(encoded, "what moves?")[0].length == encoded.embeddings["target"].num_visual + count
    with pytest.raises(HippoError, match="token ids must lie in"):
        pipeline.generate(encoded, [target.vocab_size], 4)
    with pytest.raises(HippoError, match="prompt must be a str or a list of token ids"):
        pipeline.generate(encoded, 3.5, 4)


def test_an_adapter_without_a_vision_tower_says_so():
    pair = AgreementPair(TINY_TARGET, TINY_DRAFT, eps=0.1, vocab=64)
    with pytest.raises(HippoError, match="synthetic adapter has no vision tower"):
        pair.target.embed_video(sample_frames("llava_onevision", 2))


def test_a_copied_encoding_shares_the_models_and_pickling_one_is_refused():
    """copy.deepcopy copies the tensors, never the models (a copy of them would be refused by
    the pipeline, after doubling its memory); pickle and torch.save say why they cannot."""
    import copy
    import io
    import pickle

    target, draft = make_pair("llava_onevision", "perturbed-copy", seed=0)
    pipeline = HippoPipeline(target, draft, mode="sequential", gamma=2)
    encoded = pipeline.encode_video(sample_frames("llava_onevision", 2))
    shallow = copy.copy(encoded.embeddings["target"])
    assert shallow.embeddings is encoded.embeddings["target"].embeddings and shallow.adapter is target
    copied = copy.deepcopy(encoded)
    assert copied.embeddings["target"].adapter is target and copied.embeddings["draft"].adapter is draft
    assert copied.embeddings["target"].embeddings is not encoded.embeddings["target"].embeddings
    assert pipeline.generate(copied, "what moves?", 6).tokens == \
        pipeline.generate(encoded, "what moves?", 6).tokens
    for save in (lambda: pickle.dumps(encoded), lambda: torch.save(encoded, io.BytesIO())):
        with pytest.raises(HippoError, match="cannot be pickled or saved"):
            save()


def test_an_encoding_made_before_the_models_dtype_changed_is_refused():
    """model.to(another dtype) after encode_video: the embeddings are the old dtype's vision
    tower's, so they are refused rather than cast (generate(video) would differ)."""
    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    pipeline = HippoPipeline(target, draft, mode="sequential", gamma=2)
    frames = sample_frames("qwen2_5_vl", 4)
    encoded = pipeline.encode_video(frames)
    for adapter in (target, draft):
        adapter.model.to(torch.bfloat16)
    with pytest.raises(HippoError, match="embedded in torch.float32, and the model is now torch.bfloat16"):
        pipeline.generate(encoded, "what moves?", 4)
    again = pipeline.encode_video(frames)
    assert pipeline.generate(again, "what moves?", 4).tokens == pipeline.generate(frames, "what moves?", 4).tokens

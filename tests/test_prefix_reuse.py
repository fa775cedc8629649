"""Prefix reuse (hippo.runtime.prefix_reuse): a question about an encoded video after another
about it prefills only its own text, the target's cache keeping the prompt up to the video's end.
The cache forgets the prefix whenever a write could reach it; AR and speculative decoding reuse
it alike, so they stay equal token for token; a split prefill computes what a whole one does."""
from __future__ import annotations

import gc

import pytest
import torch

from hippo.assets import sample_video_path
from hippo.errors import HippoError
from hippo.pipeline import HippoPipeline
from hippo.runtime import LanguageModelRuntime, StaticKVCache, prefill_prompt
from hippo.runtime.prefix_reuse import split_length
from hippo_testing import rel_error
from speculative_testing import FAMILY_PRESETS, make_pair, make_pipeline, sample_frames

QUESTIONS = ("what moves?", "describe the colours in one long sentence, please", "why?")


class Source:
    """Something a weak reference can name, standing in for a video embedding."""


def _cache(length: int = 0) -> StaticKVCache:
    cache = StaticKVCache(2, 1, 2, 32, 4, dtype=torch.float32, device="cpu")
    cache.reserve(length)
    cache.advance(length)
    return cache


def test_the_cache_holds_a_prefix_until_a_write_could_reach_it():
    source, other = Source(), Source()
    cache = _cache(10)
    assert not cache.holds_prefix(source, 10)
    with pytest.raises(HippoError, match="holds 10 positions, not the prefix's 8"):
        cache.hold_prefix(source, 8)
    cache.hold_prefix(source, 10)
    assert cache.holds_prefix(source, 10)
    assert not cache.holds_prefix(other, 10) and not cache.holds_prefix(source, 9)
    cache.reserve(5)
    cache.advance(5)
    cache.rollback(12)
    cache.rollback(10)  # back to the prefix's end: kept
    assert cache.holds_prefix(source, 10)
    cache.rollback(9)  # below it: the next append would overwrite position 9
    assert not cache.holds_prefix(source, 10)
    for forget in (lambda c: c.reset(), lambda c: c.fill_to(10),
                   lambda c: c.rollback(torch.tensor([10]))):  # values unknown on the host
        cache = _cache(10)
        cache.hold_prefix(source, 10)
        forget(cache)
        assert not cache.holds_prefix(source, 10)
    cache = _cache(10)
    cache.hold_prefix(source, 10)
    del source
    gc.collect()
    assert not any(cache.holds_prefix(candidate, 10) for candidate in (other, None))


def _runtime_and_prompts(family: str, seed: int):
    """A tiny target's runtime and prompts of QUESTIONS about one embedded video, sharing it."""
    target, _ = make_pair(family, "small-draft", seed=seed)
    runtime = LanguageModelRuntime.from_hf(target.model, max_seq_len=256)
    video = target.embed_video(sample_frames(family, 4))
    prompts = [target.prepare_embedded(video, question, share_prefix=True)
               for question in QUESTIONS]
    return target, runtime, prompts


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_a_split_prefill_computes_the_whole_prefill(family, seed):
    """Cold, the prefix then the rest; warm, the rest after the held prefix: the same last
    logits, queries and cache as one prefill of the whole prompt (fp32: to rounding), and a
    warm prefill is the cold split's bit for bit."""
    target, runtime, prompts = _runtime_and_prompts(family, seed)
    whole = LanguageModelRuntime.from_hf(target.model, max_seq_len=256)
    layers = (0, 1)
    for index, prompt in enumerate(prompts):
        split = prompt.prefix_length
        assert split == prompt.visual_start + prompt.num_visual < prompt.length
        query_len = prompt.length - split
        got = prefill_prompt(runtime, prompt, query_layers=layers, query_len=query_len)
        assert got.reused == (0 if index == 0 else split)
        whole.reset()
        want = whole.prefill(prompt.inputs_embeds, prompt.position_ids, query_layers=layers,
                             query_len=query_len)
        assert rel_error(got.result.logits, want.logits) < 1e-5
        assert rel_error(got.result.queries, want.queries) < 1e-5
        length = prompt.length
        assert runtime.cache.current_length() == length
        assert rel_error(runtime.cache.tensor[..., :length, :], whole.cache.tensor[..., :length, :]) < 1e-5
        cold = LanguageModelRuntime.from_hf(target.model, max_seq_len=256)
        again = prefill_prompt(cold, prompt, query_layers=layers, query_len=query_len)
        assert again.reused == 0
        assert torch.equal(again.result.logits, got.result.logits)
        assert torch.equal(again.result.queries, got.result.queries)


def test_a_prompt_is_prefilled_whole_without_a_prefix_source():
    target, runtime, prompts = _runtime_and_prompts("qwen2_5_vl", 0)
    alone = target.prepare_embedded(prompts[0].prefix_source, QUESTIONS[0])  # not shared
    assert alone.prefix_source is None and split_length(alone) == 0
    whole = runtime.replica()
    for _ in range(2):  # never held, never reused
        got = prefill_prompt(runtime, alone)
        assert got.reused == 0
    want = whole.prefill(alone.inputs_embeds, alone.position_ids)
    assert torch.equal(got.result.logits, want.logits)


def test_queries_reaching_into_the_prefix_keep_the_split_that_ar_decoding_uses():
    """PreservationOptions(query_len=...) beyond the text after the video: the prefix is not
    reused (its queries are not kept) but the prompt is still split where AR decoding splits
    it, so the logits are AR's bit for bit; the queries are a whole prefill's, to rounding."""
    _, runtime, prompts = _runtime_and_prompts("qwen2_5_vl", 0)
    prompt = prompts[1]  # long enough after the video for a split to round otherwise
    after = prompt.length - prompt.prefix_length
    query_len = after + 5  # five queries inside the prefix
    assert split_length(prompt) == prompt.prefix_length
    autoregressive = prefill_prompt(runtime.replica(), prompt)
    whole = runtime.replica()
    want = whole.prefill(prompt.inputs_embeds, prompt.position_ids, query_layers=(0, 1),
                         query_len=query_len)
    for _ in range(2):  # the prefix held by the first, prefilled again by the second
        got = prefill_prompt(runtime, prompt, query_layers=(0, 1), query_len=query_len)
        assert got.reused == 0
        assert torch.equal(got.result.logits, autoregressive.result.logits)
        assert got.result.queries.shape == want.queries.shape
        assert rel_error(got.result.queries, want.queries) < 1e-5
    assert prefill_prompt(runtime, prompt).reused == prompt.prefix_length
    with pytest.raises(HippoError, match=rf"query_len must be in 1..{prompt.length} \(the prompt\)"):
        prefill_prompt(runtime, prompt, query_layers=(1,), query_len=0)


PAIRS = [("qwen2_5_vl", "small-draft", 0), ("llava_onevision", "small-draft", 1),
         ("qwen2_5_vl", "perturbed-copy", 2)]
SETTINGS = [dict(mode="sequential", gamma=3), dict(mode="parallel", gamma="auto"),
            dict(mode="sequential", gamma=2, draft_prefill="full+compact"),
            dict(mode="parallel", gamma=4, self_speculative=True)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("family, kind, seed", PAIRS)
def test_questions_reusing_the_prefix_give_the_targets_own_decoding(device, family, kind, seed,
                                                                  settings):
    """Questions about two encoded videos, in an order that reuses, keeps and drops the held
    prefix (a question about a file in between): every answer equals the target's AR decoding
    through the same runtimes (reusing alike) and the answer to the video itself, greedy; the
    statistics say how much of each prompt was reused."""
    settings = dict(settings)
    self_speculative = settings.pop("self_speculative", False)
    target, draft = make_pair(family, kind, seed=seed, device=device)
    pipeline = make_pipeline(target, None if self_speculative else draft, settings.pop("mode"),
                             settings.pop("gamma"), 0.3, **settings)
    autoregressive = pipeline.with_options(mode="ar")
    assert autoregressive.runtime("target") is pipeline.runtime("target")  # shared
    first = pipeline.encode_video(sample_video_path(), num_frames=4)
    second = pipeline.encode_video(sample_frames(family, 2))
    order = [(first, 0), (first, 1), ("file", 1), (first, 2), (second, 0), (first, 0),
             (first, 0), (second, 1)]
    held = None
    for video, question in order:
        for runner in (pipeline, autoregressive):
            if video == "file":
                out = runner.generate(sample_video_path(), QUESTIONS[question], 10, num_frames=4)
                expected_reuse, held = 0, None
            else:
                out = runner.generate(video, QUESTIONS[question], 10)
                prefix = runner.prepare(video, QUESTIONS[question])[0].prefix_length
                expected_reuse, held = (prefix if held is video else 0), video
            assert out.stats.reused_prompt_tokens == expected_reuse, (video, question)
            if runner is pipeline:
                hippo = out
        assert hippo.tokens == out.tokens, (video, question)
        reference = (sample_video_path(), dict(num_frames=4)) if video in ("file", first) else \
            (sample_frames(family, 2), {})
        fresh = pipeline.with_options(mode="ar", use_cuda_graphs=False)  # runtimes of its own
        assert fresh.generate(reference[0], QUESTIONS[question], 10,
                              **reference[1]).tokens == out.tokens


def test_without_reuse_every_question_is_prefilled_whole():
    target, draft = make_pair("llava_onevision", "small-draft", seed=0)
    pipeline = HippoPipeline(target, draft, mode="sequential", gamma=3)
    encoded = pipeline.encode_video(sample_video_path(), num_frames=4, reuse_prefix=False)
    for question in QUESTIONS * 2:
        out = pipeline.generate(encoded, question, 8)
        assert out.stats.reused_prompt_tokens == 0
        assert out.tokens == pipeline.generate(sample_video_path(), question, 8,
                                               num_frames=4).tokens
    with pytest.raises(HippoError, match="reuse_prefix must be True or False"):
        pipeline.encode_video(sample_video_path(), reuse_prefix="yes")


@pytest.mark.parametrize("mode", ["ar", "sequential", "parallel"])
def test_a_generation_failing_part_way_leaves_the_held_prefix_sound(monkeypatch, mode):
    """A callback raising at the first token, and a prefill of the text after the video
    failing: the next question still reuses the prefix and gets the answer a fresh pipeline
    gives."""
    from hippo.runtime import decoder

    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=1)
    pipeline = HippoPipeline(target, mode="ar") if mode == "ar" else \
        make_pipeline(target, draft, mode, 3, 0.3)
    encoded = pipeline.encode_video(sample_video_path(), num_frames=4)
    pipeline.generate(encoded, QUESTIONS[0], 6)

    def refuse(tokens):
        raise RuntimeError("client gone")

    with pytest.raises(RuntimeError, match="client gone"):
        pipeline.generate(encoded, QUESTIONS[1], 6, on_tokens=refuse)
    prefill = decoder.LanguageModelRuntime.prefill

    def failing_prefill(self, embeds, *args, **kwargs):
        if embeds.shape[1] < 20:  # the text after the video, not the prefix
            raise RuntimeError("out of memory, say")
        return prefill(self, embeds, *args, **kwargs)

    monkeypatch.setattr(decoder.LanguageModelRuntime, "prefill", failing_prefill)
    with pytest.raises(RuntimeError, match="out of memory"):
        pipeline.generate(encoded, QUESTIONS[2], 6)
    monkeypatch.setattr(decoder.LanguageModelRuntime, "prefill", prefill)
    fresh = HippoPipeline(target, mode="ar")
    for question in QUESTIONS:
        out = pipeline.generate(encoded, question, 6)
        assert out.stats.reused_prompt_tokens > 0
        assert out.tokens == fresh.generate(sample_video_path(), question, 6, num_frames=4).tokens


def test_a_longer_request_rebuilds_the_runtime_and_prefills_the_prefix_again():
    target, draft = make_pair("llava_onevision", "perturbed-copy", seed=0)
    pipeline = HippoPipeline(target, draft, mode="sequential", gamma=3)
    encoded = pipeline.encode_video(sample_frames("llava_onevision", 2))
    pipeline.generate(encoded, QUESTIONS[0], 4)
    runtime = pipeline.runtime("target")
    long = pipeline.generate(encoded, QUESTIONS[1], 300, eos_token_id=None)
    assert pipeline.runtime("target") is not runtime and long.stats.reused_prompt_tokens == 0
    again = pipeline.generate(encoded, QUESTIONS[0], 4)
    assert again.stats.reused_prompt_tokens > 0


def test_an_in_place_write_to_the_weights_or_the_embedding_drops_the_held_prefix():
    """load_state_dict, an optimizer step or copy_ keep the runtime (matches_model), so its
    cache must not keep a prefix computed with the old weights; nor from an edited embedding."""
    target, _ = make_pair("qwen2_5_vl", "small-draft", seed=0)
    pipeline = HippoPipeline(target, mode="ar")
    encoded = pipeline.encode_video(sample_frames("qwen2_5_vl", 4))
    pipeline.generate(encoded, QUESTIONS[0], 4)
    runtime = pipeline.runtime("target")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in target.text_model.layers.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    out = pipeline.generate(encoded, QUESTIONS[1], 6)
    assert pipeline.runtime("target") is runtime and out.stats.reused_prompt_tokens == 0
    whole = pipeline.encode_video(sample_frames("qwen2_5_vl", 4), reuse_prefix=False)
    assert out.tokens == HippoPipeline(target, mode="ar").generate(whole, QUESTIONS[1], 6).tokens
    assert pipeline.generate(encoded, QUESTIONS[2], 4).stats.reused_prompt_tokens > 0
    with torch.no_grad():
        encoded.embeddings["target"].embeddings.mul_(0.5)
    assert pipeline.generate(encoded, QUESTIONS[0], 4).stats.reused_prompt_tokens == 0


def test_other_chat_text_before_the_video_is_another_prefix():
    """prompt_prefix_ids (public, mutable) make the prefix's text: changed, even to ids of the
    same length, the held prefix is not the prompt's."""
    target, runtime, prompts = _runtime_and_prompts("llava_onevision", 0)
    video = prompts[0].prefix_source
    assert prefill_prompt(runtime, prompts[0]).reused == 0
    assert prefill_prompt(runtime, prompts[1]).reused == prompts[1].prefix_length
    target.prompt_prefix_ids = [(i + 1) % target.vocab_size for i in target.prompt_prefix_ids]
    other = target.prepare_embedded(video, QUESTIONS[1], share_prefix=True)
    assert other.prefix_length == prompts[1].prefix_length
    got = prefill_prompt(runtime, other)
    assert got.reused == 0
    assert torch.equal(got.result.logits, prefill_prompt(runtime.replica(), other).result.logits)
    with pytest.raises(HippoError, match="share_prefix must be True or False, got 'no'"):
        target.prepare_embedded(video, QUESTIONS[1], share_prefix="no")


def test_find_partings_recomputation_splits_the_prefill_as_ar_did():
    """divergence.target_logits_after recomputes the target's logits as AR computed them: for
    a prompt about an encoded video, with the prefill split at the video's end, bit for bit
    what the AR runtime's own cache gives after a reused prefix."""
    from hippo.speculative.divergence import target_logits_after

    target, _ = make_pair("qwen2_5_vl", "small-draft", seed=2)
    pipeline = HippoPipeline(target, mode="ar")
    encoded = pipeline.encode_video(sample_video_path(), num_frames=4)
    pipeline.generate(encoded, QUESTIONS[0], 4)
    out = pipeline.generate(encoded, QUESTIONS[1], 8, eos_token_id=None)
    assert out.stats.reused_prompt_tokens > 0
    prompt = pipeline.prepare(encoded, QUESTIONS[1])[0]
    runtime = pipeline.runtime("target")
    runtime.rollback(prompt.length + 3)  # the cache AR left: the prompt, then 3 tokens fed
    fed = torch.tensor([[out.tokens[3]]])
    own = runtime.step(fed, prompt.generated_positions(3, 1))[0, -1].float()
    assert torch.equal(target_logits_after(runtime, prompt, out.tokens[:4]), own)


def test_a_long_text_after_the_video_is_prefilled_whole(monkeypatch):
    """Text after the video beyond MAX_TEXT_AFTER_PREFIX (whose prefill at a kept prefix's end
    would materialise large attention scores on a GPU): the prompt is prefilled whole, and its
    prefix neither reused nor kept; AR and HIPPO still agree, and shorter questions reuse."""
    from hippo.runtime import prefix_reuse

    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0)
    pipeline = make_pipeline(target, draft, "sequential", 3, 0.3)
    encoded = pipeline.encode_video(sample_video_path(), num_frames=4)
    short, long = QUESTIONS[2], QUESTIONS[1]
    prompt = pipeline.prepare(encoded, long)[0]
    limit = prompt.length - prompt.prefix_length - 1  # the long question is one token over
    monkeypatch.setattr(prefix_reuse, "MAX_TEXT_AFTER_PREFIX", limit)
    assert prefix_reuse.split_length(prompt) == 0
    autoregressive = pipeline.with_options(mode="ar")
    reused = []
    for question in (short, long, long, short, short):
        hippo = pipeline.generate(encoded, question, 8)
        ar = autoregressive.generate(encoded, question, 8)
        assert hippo.tokens == ar.tokens
        reused.append((hippo.stats.reused_prompt_tokens > 0, ar.stats.reused_prompt_tokens > 0))
    assert reused == [(False, True), (False, False), (False, False), (False, True), (True, True)]

"""Stop strings (generate(stop=...), hippo.streaming.StopStrings): a generation ends after the
token that completes one of them in the text, in every mode exactly where decoding one token at a
time ends, and that token is kept."""
from __future__ import annotations

import random

import pytest
import torch
from hippo.errors import HippoError
from hippo.models import load_adapter
from hippo.models.tokenizer import HFPromptTokenizer
from hippo.pipeline import HippoPipeline
from hippo.streaming import EmittedTokens, StopStrings
from hippo_testing import bpe_tokenizer
from speculative_testing import (FAMILY_PRESETS, exact_copy_pair, make_pair, make_pipeline,
                                 sample_frames, spoil_rows_from)

PROMPT = "what moves?"


def _first_completion(tokenizer, tokens: list[int], strings) -> int | None:
    """The reference: the first index i whose prefix tokens[:i + 1] decodes to a text holding
    one of the strings (decoded whole, from the start, for every prefix)."""
    return next((i for i in range(len(tokens))
                 if any(s in tokenizer.decode(tokens[:i + 1]) for s in strings)), None)


def _stops_in(text: str, rng: random.Random, count: int) -> list[str]:
    """Stop strings taken from a text: 1-4 characters, never a replacement character (bytes
    that were not UTF-8 in the random models' output)."""
    spans = [text[i:i + n] for n in (1, 2, 3, 4) for i in range(len(text) - n + 1)]
    spans = [span for span in spans if "\ufffd" not in span]
    return rng.sample(spans, min(count, len(spans)))


@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_every_mode_stops_where_one_token_at_a_time_stops(device, family):
    """Stop strings drawn from the free run's text: AR, sequential and parallel decoding (g 1, 3
    and adaptive) all stop at the token that first completes one, the reference's index; a
    string the text never holds changes nothing."""
    target, draft = make_pair(family, "small-draft", seed=2, device=device)
    frames = sample_frames(family, 4)
    ar = HippoPipeline(target, mode="ar")
    free = ar.generate(frames, PROMPT, 32, eos_token_id=None)
    rng = random.Random(0)
    stops = _stops_in(free.text, rng, 6)
    assert stops, free.text
    pipelines = [ar] + [make_pipeline(target, draft, mode, gamma, 0.5)
                        for mode in ("sequential", "parallel") for gamma in (1, 3, "auto")]
    for stop in stops + [[stops[0], stops[-1]], ["\x00never\x00"]]:
        strings = [stop] if isinstance(stop, str) else stop
        index = _first_completion(target.tokenizer, free.tokens, strings)
        expected = free.tokens if index is None else free.tokens[:index + 1]
        for pipeline in pipelines:
            out = pipeline.generate(frames, PROMPT, 32, eos_token_id=None, stop=stop)
            assert out.tokens == expected, (stop, pipeline.options.mode, pipeline.options.gamma)


def test_sampled_runs_stop_where_their_own_text_completes_a_stop_string():
    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    frames = sample_frames("qwen2_5_vl", 4)
    for mode in ("ar", "sequential"):
        pipeline = make_pipeline(target, draft, mode, 3, 0.5) if mode != "ar" \
            else HippoPipeline(target, mode="ar")
        sampled = pipeline.generate(frames, PROMPT, 32, eos_token_id=None, temperature=1.0, seed=5)
        for stop in _stops_in(sampled.text, random.Random(1), 4):
            index = _first_completion(target.tokenizer, sampled.tokens, [stop])
            out = pipeline.generate(frames, PROMPT, 32, eos_token_id=None, temperature=1.0, seed=5,
                                    stop=stop)
            assert out.tokens == sampled.tokens[:index + 1], (mode, stop)
            assert stop in out.text


def test_the_callback_sees_the_stopping_token_and_nothing_after():
    target, draft = make_pair("llava_onevision", "small-draft", seed=0)
    frames = sample_frames("llava_onevision", 3)
    pipeline = make_pipeline(target, draft, "parallel", 4, 0.5)
    free = pipeline.generate(frames, PROMPT, 24, eos_token_id=None)
    stop = _stops_in(free.text[len(free.text) // 2:], random.Random(2), 1)[0]
    seen: list[int] = []
    out = pipeline.generate(frames, PROMPT, 24, eos_token_id=None, stop=stop, on_tokens=seen.extend)
    assert seen == out.tokens
    index = _first_completion(target.tokenizer, free.tokens, [stop])
    assert out.tokens == free.tokens[:index + 1]


@pytest.mark.parametrize("tokenizer_kind", ["bytes", "bpe"])
def test_stop_strings_match_the_text_decoded_whole(tokenizer_kind):
    """StopStrings told one token at a time against the reference, on random token sequences:
    stops that span tokens, start in a held-back multi-byte character, are longer than every
    piece, or several at once."""
    tokenizer = load_adapter("tiny-qwen2.5-vl").tokenizer if tokenizer_kind == "bytes" \
        else HFPromptTokenizer(bpe_tokenizer())
    source = "Question?\nAnswer briefly. 猫が歩く 🐈 café — ok"
    words = tokenizer.encode(source)
    rng = random.Random(3)
    for _ in range(80):
        start = rng.randrange(len(words))
        tokens = words[start:] + [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(8))]
        text = tokenizer.decode(tokens)
        strings = _stops_in(text, rng, rng.choice((1, 2, 3))) or ["?\n"]
        if rng.random() < 0.3:
            strings.append(text[-12:].replace("\ufffd", "") or "x")  # a long one
        stop = StopStrings(tokenizer, strings)
        hits = [i for i, token in enumerate(tokens) if stop.completed_by(token)]
        # ending_within looks ahead (a speculative round's accepted drafts) on a copy: peeking
        # before every token changes nothing that follows
        stop, peeks, peeked_hits = StopStrings(tokenizer, strings), [], []
        output = EmittedTokens(len(tokens) + 1, set(), stop=stop)
        for i, token in enumerate(tokens):
            peeks.append(output.ending_within(tokens[i:]))
            if stop.completed_by(token):
                peeked_hits.append(i)
        assert peeked_hits == hits
        assert peeks == [next((j - i for j in hits if j >= i), None) for i in range(len(tokens))]
        assert (hits[0] if hits else None) == _first_completion(tokenizer, tokens, strings), \
            (tokens, strings)


def test_a_stop_string_is_completed_by_the_last_byte_of_its_last_character():
    tokenizer = load_adapter("tiny-qwen2.5-vl").tokenizer  # ids 0-255 are bytes
    stop = StopStrings(tokenizer, ["猫が"])
    data = list("a猫が".encode())
    assert [stop.completed_by(byte) for byte in data] == [False] * (len(data) - 1) + [True]


@pytest.mark.parametrize("bad", ["", [""], [1], ("a", None), {"a"}, 7, b"ab", (s for s in "ab")])
def test_bad_stop_strings_are_refused_before_the_video_is_read(bad):
    target = load_adapter("tiny-qwen2.5-vl")
    with pytest.raises(HippoError, match="stop must be a non-empty string or a list of them"):
        HippoPipeline(target, mode="ar").generate("/no/such/video.mp4", PROMPT, 4, stop=bad)


def test_stop_strings_made_directly_are_checked_too():
    tokenizer = load_adapter("tiny-qwen2.5-vl").tokenizer
    for bad in ([], ["a", ""], [b"a"]):
        with pytest.raises(HippoError, match="stop"):
            StopStrings(tokenizer, bad)


def test_stop_strings_need_the_targets_tokenizer():
    target = load_adapter("tiny-qwen2.5-vl")
    target.tokenizer = None
    pipeline = HippoPipeline(target, mode="ar")
    prompts = pipeline.prepare(sample_frames("qwen2_5_vl", 2), [1, 2, 3])
    from hippo.speculative.acceptance import SamplingOptions

    with pytest.raises(HippoError, match="the target has no tokenizer"):
        pipeline.generate_prepared(*prompts, 4, SamplingOptions(), None, stop="x")
    assert len(pipeline.generate_prepared(*prompts, 4, SamplingOptions(), None).tokens) == 4


@pytest.mark.parametrize("mode", ["ar", "sequential", "parallel"])
def test_the_output_says_why_the_generation_ended(mode):
    """finish_reason: eos, stop_string, max_new_tokens or callback; where several hold at the
    last token, in that order, the same in every mode (a stop string completed by the last token
    allowed is the reason, as is an eos token that is also the last allowed)."""
    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=2)
    frames = sample_frames("qwen2_5_vl", 4)
    pipeline = make_pipeline(target, draft, mode, 3, 0.5) if mode != "ar" \
        else HippoPipeline(target, mode="ar")
    free = pipeline.generate(frames, PROMPT, 24, eos_token_id=None)
    assert free.finish_reason == "max_new_tokens"
    eos = free.tokens[9]
    assert pipeline.generate(frames, PROMPT, 24, eos_token_id=eos).finish_reason == "eos"
    cut = pipeline.generate(frames, PROMPT, 10, eos_token_id=eos)  # eos is the 10th token too
    assert (cut.tokens[-1], cut.finish_reason) == (eos, "eos")
    last = next(i for i in range(5, 24) if "\ufffd" not in target.tokenizer.decode(free.tokens[i:i + 1])
                and target.tokenizer.decode(free.tokens[i:i + 1]))
    stop = target.tokenizer.decode(free.tokens[last:last + 1])
    index = _first_completion(target.tokenizer, free.tokens, [stop])
    out = pipeline.generate(frames, PROMPT, 24, eos_token_id=None, stop=stop)
    assert (len(out.tokens), out.finish_reason) == (index + 1, "stop_string")
    out = pipeline.generate(frames, PROMPT, index + 1, eos_token_id=None, stop=stop)
    assert (len(out.tokens), out.finish_reason) == (index + 1, "stop_string")
    out = pipeline.generate(frames, PROMPT, 24, eos_token_id=None,
                            on_tokens=lambda tokens: True)
    assert (out.tokens, out.finish_reason) == (free.tokens[:1], "callback")


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("mode, whose", [("sequential", "target"), ("parallel", "target"),
                                         ("parallel", "draft")])
def test_logits_non_finite_only_after_a_stop_string_are_never_refused(monkeypatch, mode, whose,
                                                                      temperature):
    """Logits that turn NaN only after the token that completes a stop string: AR stops there
    and never computes them, and a speculative round that accepted that token among its
    candidates (an exact copy drafts: every one is accepted) emits the same tokens rather than
    refusing the round for rows whose tokens are never emitted (as after an accepted eos)."""
    from hippo.speculative import SamplingOptions

    target, draft = exact_copy_pair()
    sampling = SamplingOptions(temperature, seed=0 if temperature else None)
    pipeline = make_pipeline(target, draft, mode, 3, 1.0)
    prompts = pipeline.prepare(sample_frames("llava_onevision", 4), PROMPT)
    tokens = pipeline.generate_prepared(*prompts, 12, sampling, None).tokens  # the same seed
    texts = [target.tokenizer.decode(tokens[:i + 1]) for i in range(len(tokens))]
    at = next(i for i in range(2, 11) if texts[i] and texts[i][-1] != "\ufffd"
              and texts[i][-1] not in texts[i - 1])  # the first token that completes it
    stop = texts[at][-1]
    assert _first_completion(target.tokenizer, tokens, [stop]) == at
    spoil_rows_from(monkeypatch, pipeline, whose, prompts[0 if whose == "target" else 1].length,
                    at + 1)  # the rows past the token that completes it
    out = pipeline.generate_prepared(*prompts, 12, sampling, None, stop=stop)
    assert (out.tokens, out.finish_reason) == (tokens[:at + 1], "stop_string")
    assert out.stats.accepted > 0


def test_decoding_functions_take_a_new_stop_strings_only():
    """generate_autoregressive and EmittedTokens take a StopStrings, which holds one
    generation's text: strings alone (no tokenizer) and one told another generation's tokens
    (it would match a stop string across the two texts) are refused before any step; and
    decode_after_prefill takes an EmittedTokens of its own max_new_tokens and eos ids only."""
    from hippo.runtime import generate_autoregressive
    from hippo.speculative.acceptance import SamplingOptions, TokenAcceptance
    from hippo.speculative.decoder import decode_after_prefill
    from hippo.speculative.draft_length import DraftLength

    target = load_adapter("tiny-qwen2.5-vl")
    pipeline = HippoPipeline(target, mode="ar")
    prompt, _ = pipeline.prepare(sample_frames("qwen2_5_vl", 4), PROMPT, max_new_tokens=12)
    runtime = pipeline._runtime("target", target, prompt.length + 12)
    free = generate_autoregressive(runtime, prompt, 12)
    text = target.tokenizer.decode(free.tokens)
    across = text[-1] + text[:2]  # the end of one run's text and the start of the next
    assert across not in text
    stop = StopStrings(target.tokenizer, [across])
    assert generate_autoregressive(runtime, prompt, 12, stop=stop).tokens == free.tokens
    with pytest.raises(HippoError, match="holds another generation's text: make a new one"):
        generate_autoregressive(runtime, prompt, 12, stop=stop)
    with pytest.raises(HippoError, match="stop must be a hippo.streaming.StopStrings .* got list"):
        generate_autoregressive(runtime, prompt, 12, stop=[across])
    fresh = StopStrings(target.tokenizer, [across])
    assert generate_autoregressive(runtime, prompt, 12, stop=fresh).tokens == free.tokens
    with pytest.raises(HippoError, match="holds another generation's text"):
        EmittedTokens(4, set(), stop=fresh)
    arguments = dict(mode="sequential", draft_length=DraftLength(3),
                     acceptance=TokenAcceptance(SamplingOptions(), target.vocab_size))
    for output, needle in ((["x"], "output must be a hippo.streaming.EmittedTokens"),
                           (EmittedTokens(5, set()), "made of this call's max_new_tokens"),
                           (EmittedTokens(4, {7}), "made of this call's max_new_tokens")):
        with pytest.raises(HippoError, match=needle):
            decode_after_prefill(runtime, runtime, torch.tensor([5]), torch.arange(3, 19)[None],
                                 max_new_tokens=4, eos_ids=(), output=output, **arguments)

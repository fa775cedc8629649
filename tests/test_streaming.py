"""Streaming (hippo.streaming): on_tokens receives every emitted token once, in order, as soon as
the round that emitted it is read, and nothing past an eos or max_new_tokens; it changes no
token; IncrementalText gives out the text of a growing token list piece by piece."""
from __future__ import annotations

import random
import threading

import pytest
from hippo.assets import sample_video_path
from hippo.errors import HippoError
from hippo.models import load_adapter
from hippo.models.tokenizer import HFPromptTokenizer
from hippo.pipeline import HippoPipeline
from hippo.streaming import IncrementalText
from hippo_testing import bpe_tokenizer
from speculative_testing import FAMILY_PRESETS, make_pair, make_pipeline, sample_frames

MODES = ("ar", "sequential", "parallel")
PROMPT = "what moves?"


class Recorder:
    """An on_tokens callback that keeps each group it is handed, and what had been emitted
    when it was called (the statistics' token count is only set at the end)."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []

    def __call__(self, tokens: list[int]) -> None:
        assert isinstance(tokens, list) and tokens and all(type(t) is int for t in tokens)
        self.groups.append(list(tokens))

    @property
    def tokens(self) -> list[int]:
        return [token for group in self.groups for token in group]


def _pipeline(target, draft, mode: str, gamma) -> HippoPipeline:
    if mode == "ar":
        return HippoPipeline(target, mode="ar")
    return make_pipeline(target, draft, mode, gamma, 0.5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_the_groups_are_the_output_round_by_round(device, family, mode):
    """Greedy and sampled, with and without an eos inside a block: the groups concatenate to the
    output, which equals the output without a callback; AR hands one token per step, a
    speculative decoder the first token and then one group per round that emitted any. On a
    GPU too (two streams, CUDA graphs, the parallel draft running ahead)."""
    target, draft = make_pair(family, "small-draft", seed=1, device=device)
    frames = sample_frames(family, 4)
    for gamma in (1, 3, "auto"):
        pipeline = _pipeline(target, draft, mode, gamma)
        free = pipeline.generate(frames, PROMPT, 24, eos_token_id=None).tokens
        for eos, sampling in ((None, {}), (free[6], {}), (None, dict(temperature=0.9, seed=3))):
            plain = pipeline.generate(frames, PROMPT, 24, eos_token_id=eos, **sampling)
            recorder = Recorder()
            out = pipeline.generate(frames, PROMPT, 24, eos_token_id=eos, on_tokens=recorder,
                                    **sampling)
            assert recorder.tokens == out.tokens
            # g by timing (gamma "auto"; a parallel draft's lead on a GPU): sampled runs differ.
            timed = gamma == "auto" or (mode == "parallel" and device != "cpu")
            if not sampling or mode == "ar" or not timed:
                assert out.tokens == plain.tokens
            if eos is not None:
                assert out.tokens[-1] == eos and eos not in out.tokens[:-1]
            if mode == "ar":
                assert [len(group) for group in recorder.groups] == [1] * len(out.tokens)
            else:
                assert recorder.groups[0] == out.tokens[:1]
                assert len(recorder.groups) <= out.stats.rounds + 1
                if mode == "sequential":  # every sequential round emits
                    assert len(recorder.groups) == out.stats.rounds + 1


@pytest.mark.parametrize("mode", MODES)
def test_max_new_tokens_cuts_the_last_group(mode):
    """A round that accepts past max_new_tokens hands over only the tokens up to it."""
    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    frames = sample_frames("qwen2_5_vl", 4)
    for limit in (1, 2, 5, 8):
        recorder = Recorder()
        out = _pipeline(target, draft, mode, 6).generate(frames, PROMPT, limit, eos_token_id=None,
                                                          on_tokens=recorder)
        assert len(out.tokens) == limit and recorder.tokens == out.tokens



@pytest.mark.parametrize("mode", MODES)
def test_returning_true_stops_after_the_tokens_handed_over(mode):
    """A callback returning True ends the generation after its group (a client gone, a stop
    string seen): the output is what was handed over, a prefix of the free run; any other
    return value (file.write's count, None) goes on."""
    target, draft = make_pair("llava_onevision", "small-draft", seed=0)
    frames = sample_frames("llava_onevision", 3)
    pipeline = _pipeline(target, draft, mode, 3)
    free = pipeline.generate(frames, PROMPT, 20, eos_token_id=None).tokens
    for enough in (1, 2, 6, 11):
        recorder = Recorder()

        def stop_when_enough(tokens, recorder=recorder, enough=enough):
            recorder(tokens)
            return len(recorder.tokens) >= enough

        out = pipeline.generate(frames, PROMPT, 20, eos_token_id=None, on_tokens=stop_when_enough)
        assert out.tokens == recorder.tokens == free[:len(out.tokens)]
        assert len(out.tokens) - len(recorder.groups[-1]) < enough <= len(out.tokens)
        assert out.stats.tokens == len(out.tokens)
    counts = pipeline.generate(frames, PROMPT, 20, eos_token_id=None, on_tokens=len)
    assert counts.tokens == free
    assert pipeline.generate(frames, PROMPT, 20, eos_token_id=None).tokens == free


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_the_first_token_comes_before_the_drafts_work(monkeypatch, mode):
    """Speculative decoding hands over the first token right after the target's prefill, as AR
    does, before the token selection and the draft's prefill; and a generation that the first
    token ends (max_new_tokens 1, its eos, a callback returning True) does no draft work."""
    import hippo.pipeline

    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0)
    frames = sample_frames("qwen2_5_vl", 4)
    pipeline = _pipeline(target, draft, mode, 3)
    events: list[str] = []
    for name in ("preserve_tokens", "prefill_pruned"):
        original = getattr(hippo.pipeline, name)

        def spy(*args, name=name, original=original, **kwargs):
            events.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(hippo.pipeline, name, spy)
    free = pipeline.generate(frames, PROMPT, 8, eos_token_id=None,
                             on_tokens=lambda tokens: events.append("tokens"))
    assert events[:3] == ["tokens", "preserve_tokens", "prefill_pruned"], events
    for stops in (dict(max_new_tokens=1), dict(eos_token_id=free.tokens[0]),
                  dict(on_tokens=lambda tokens: True)):
        events.clear()
        kwargs = dict(dict(max_new_tokens=8, eos_token_id=None), **stops)
        out = pipeline.generate(frames, PROMPT, **kwargs)
        assert out.tokens == free.tokens[:1] and not events, (stops, events)
        assert (out.stats.rounds, out.stats.draft_prompt_tokens) == (0, 0)
    assert pipeline.generate(frames, PROMPT, 8, eos_token_id=None).tokens == free.tokens


@pytest.mark.parametrize("mode", MODES)
def test_the_first_calls_time_is_not_the_prefills(monkeypatch, mode):
    """The callback's time counts in the generation's, never in stats.prefill_s (the target's
    time to its first token, which benchmarks and `hippo generate` report): speculative
    decoding hands the first token over inside its prefill phase, and must leave it out as AR
    does; with a longer generation and with one that the first token ends."""
    import time
    from types import SimpleNamespace

    import hippo.pipeline
    import hippo.runtime.autoregressive

    hour = 3600.0
    offset = [0.0]  # the modules' clock, which the first call moves on by an hour
    for module in (hippo.pipeline, hippo.runtime.autoregressive):
        monkeypatch.setattr(module, "time",
                            SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0]))

    def slow_first(tokens):
        if not offset[0]:
            offset[0] = hour

    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0)
    frames = sample_frames("qwen2_5_vl", 4)
    pipeline = _pipeline(target, draft, mode, 3)
    for max_new_tokens in (6, 1):
        offset[0] = 0.0
        stats = pipeline.generate(frames, PROMPT, max_new_tokens, eos_token_id=None,
                                  on_tokens=slow_first).stats
        assert 0 < stats.prefill_s < hour <= stats.total_s, (max_new_tokens, stats)


def test_tokens_are_handed_over_while_the_generation_runs(monkeypatch):
    """Each group arrives when its round ends, before the next round's target step runs."""
    from hippo.runtime.decoder import LanguageModelRuntime

    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0)
    frames = sample_frames("qwen2_5_vl", 4)
    handed_at_step: list[int] = []
    steps = [0]
    step = LanguageModelRuntime.step

    def counting_step(self, *args, **kwargs):
        steps[0] += 1
        return step(self, *args, **kwargs)

    monkeypatch.setattr(LanguageModelRuntime, "step", counting_step)
    out = _pipeline(target, draft, "sequential", 2).generate(
        frames, PROMPT, 16, eos_token_id=None, on_tokens=lambda tokens: handed_at_step.append(steps[0]))
    assert len(handed_at_step) == out.stats.rounds + 1
    assert handed_at_step == sorted(handed_at_step) and len(set(handed_at_step)) == len(handed_at_step)
    assert handed_at_step[-1] == steps[0]  # the last group: right after the last step


def test_a_bad_callback_is_refused_before_the_video_is_read():
    target = load_adapter("tiny-qwen2.5-vl")
    for bad in ("print", [print], 3):
        with pytest.raises(HippoError, match="on_tokens must be a callable"):
            HippoPipeline(target, mode="ar").generate("/no/such/video.mp4", PROMPT, 4, on_tokens=bad)


@pytest.mark.parametrize("mode", MODES)
def test_a_callback_that_raises_ends_the_generation_and_leaves_the_pipeline_usable(mode):
    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=2)
    frames = sample_frames("qwen2_5_vl", 4)
    pipeline = _pipeline(target, draft, mode, 3)
    expected = pipeline.generate(frames, PROMPT, 12, eos_token_id=None).tokens

    class Stop(Exception):
        pass

    calls = [0]

    def stop_at_the_third_group(tokens):
        calls[0] += 1
        if calls[0] == 3:
            raise Stop

    with pytest.raises(Stop):
        pipeline.generate(frames, PROMPT, 12, eos_token_id=None, on_tokens=stop_at_the_third_group)
    assert calls[0] == 3
    assert pipeline.generate(frames, PROMPT, 12, eos_token_id=None).tokens == expected


def test_a_generation_started_from_the_callback_is_refused_not_a_deadlock():
    """The callback runs while its generation holds the runtimes: generating (on the pipeline or
    a sibling sharing its runtimes) or releasing them from there would wait for itself."""
    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0)
    frames = sample_frames("qwen2_5_vl", 4)
    pipeline = _pipeline(target, draft, "sequential", 3)
    sibling = pipeline.with_options(mode="ar")
    expected = pipeline.generate(frames, PROMPT, 8, eos_token_id=None).tokens
    for reentry in (lambda: pipeline.generate(frames, PROMPT, 2), lambda: sibling.generate(frames, PROMPT, 2),
                    pipeline.release):
        outcome: list[BaseException] = []

        def generate_inside(tokens, reentry=reentry):
            reentry()

        def run(outcome=outcome):
            try:
                pipeline.generate(frames, PROMPT, 8, on_tokens=generate_inside)
            except BaseException as error:  # noqa: BLE001 - checked below
                outcome.append(error)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout=120)
        assert not thread.is_alive(), "the generation waited for itself"
        assert len(outcome) == 1 and isinstance(outcome[0], HippoError), outcome
        assert "in use by the generation this thread is running" in str(outcome[0])
    assert pipeline.generate(frames, PROMPT, 8, eos_token_id=None).tokens == expected


def test_generate_prepared_streams_too():
    target, draft = make_pair("llava_onevision", "small-draft", seed=0)
    pipeline = _pipeline(target, draft, "parallel", 2)
    prompts = pipeline.prepare(sample_video_path(), PROMPT, num_frames=3)
    from hippo.speculative.acceptance import SamplingOptions

    recorder = Recorder()
    out = pipeline.generate_prepared(*prompts, 10, SamplingOptions(), None, on_tokens=recorder)
    assert recorder.tokens == out.tokens and len(out.tokens) == 10
    with pytest.raises(HippoError, match="on_tokens must be a callable"):
        pipeline.generate_prepared(*prompts, 10, SamplingOptions(), None, on_tokens="x")


def _pieces(tokenizer, tokens: list[int], rng: random.Random) -> list[str]:
    """IncrementalText's pieces for the tokens pushed in random groups, and the finish."""
    text, pieces, index = IncrementalText(tokenizer), [], 0
    while index < len(tokens):
        size = rng.choice((1, 1, 2, 3, 7))
        pieces.append(text.push(tokens[index:index + size]))
        index += size
    return pieces + [text.finish()]


def test_incremental_text_of_bytes_waits_for_whole_characters():
    """The byte tokenizer of the presets (ids 0-255 are bytes): a character of 2-4 UTF-8 bytes
    comes out once its last byte is pushed, never as replacement characters in between."""
    tokenizer = load_adapter("tiny-qwen2.5-vl").tokenizer
    sentence = "Ça va? 猫が歩く 🐈 — naïve café"
    ids = list(sentence.encode("utf-8"))
    text = IncrementalText(tokenizer)
    given = "".join(text.push([token]) for token in ids)
    assert given + text.finish() == sentence
    assert given == sentence  # the last byte completes the last character
    text = IncrementalText(tokenizer)
    cat = "🐈".encode()
    assert [text.push([b]) for b in cat] == ["", "", "", "🐈"]
    rng = random.Random(0)
    for _ in range(50):
        chars = [rng.choice("aé猫🐈 \n?") for _ in range(rng.randrange(0, 30))]
        data = list("".join(chars).encode("utf-8"))
        pieces = _pieces(tokenizer, data, rng)
        assert "".join(pieces) == tokenizer.decode(data)
        assert not any(piece.endswith("\ufffd") for piece in pieces[:-1])


def test_incremental_text_ends_with_the_bytes_that_never_completed():
    tokenizer = load_adapter("tiny-qwen2.5-vl").tokenizer
    text = IncrementalText(tokenizer)
    assert text.push([*b"ok ", 0xE7, 0x8C]) == "ok "
    assert text.finish() == "\ufffd"  # a cut-off character, as decode gives it
    assert text.finish() == ""
    # A stray continuation byte in the middle is given out with the text after it.
    text = IncrementalText(tokenizer)
    assert text.push([0x80]) == ""
    assert text.push([ord("a")]) == "\ufffda"


def test_incremental_text_of_endless_invalid_bytes_stays_linear():
    """A model emitting bytes that never form characters (0xFF, stray continuation bytes), with
    now and then a character cut across tokens: the replacement characters are handed out a few
    tokens later rather than held back for ever, each push decodes a bounded window (not every
    token since the last whole character), and the pieces still join to the decoded text."""
    tokenizer = load_adapter("tiny-qwen2.5-vl").tokenizer
    decoded_lengths = []

    class Counting:
        def decode(self, ids):
            decoded_lengths.append(len(ids))
            return tokenizer.decode(ids)

    rng = random.Random(4)
    for _ in range(20):
        data = []
        while len(data) < 400:
            data += rng.choice(([0xFF], [0x80], [0xE7, 0x8C], list("猫".encode()), [ord("a")],
                                [0xFF] * 30))
        decoded_lengths.clear()
        text, pieces, index = IncrementalText(Counting()), [], 0
        while index < len(data):
            size = rng.choice((1, 1, 2, 3))
            pieces.append(text.push(data[index:index + size]))
            index += size
        pieces.append(text.finish())
        assert "".join(pieces) == tokenizer.decode(data)
        assert max(decoded_lengths) <= 24, max(decoded_lengths)
    text = IncrementalText(tokenizer)
    given = "".join(text.push([0xFF]) for _ in range(100))
    assert given == "\ufffd" * (100 - 8)  # all but the last few tokens' handed out
    assert given + text.finish() == "\ufffd" * 100


def test_incremental_text_of_a_byte_level_bpe_tokenizer_is_its_decoded_text():
    """Random token sequences of a Qwen2-style byte-level BPE tokenizer (tokens that are parts of
    multi-byte characters, special tokens, which decode skips), pushed in random groups."""
    tokenizer = HFPromptTokenizer(bpe_tokenizer())
    rng = random.Random(1)
    words = tokenizer.encode("Question?\nAnswer briefly. 猫 café — 🐈")
    for _ in range(60):
        tokens = [rng.choice(words) if rng.random() < 0.7 else rng.randrange(tokenizer.vocab_size)
                  for _ in range(rng.randrange(0, 40))]
        pieces = _pieces(tokenizer, tokens, rng)
        assert "".join(pieces) == tokenizer.decode(tokens), tokens
    assert "".join(_pieces(tokenizer, words, rng)) == "Question?\nAnswer briefly. 猫 café — 🐈"


def _metaspace_tokenizer() -> HFPromptTokenizer:
    """A sentencepiece-style tokenizer (Llama's, Mistral's): a word's leading space is part of its
    token, and decoding drops it at the start of a text, so a token decoded alone loses it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.train_from_iterator(["Hello world, what moves here?", "the cat walks away"] * 4,
                                trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"],
                                                    show_progress=False))
    return HFPromptTokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>",
                                                     unk_token="<unk>"))


def test_incremental_text_keeps_the_spaces_a_token_alone_would_lose():
    tokenizer = _metaspace_tokenizer()
    ids = tokenizer.encode("Hello world the cat walks")
    assert tokenizer.decode(ids[-1:]) == "walks"  # its space is dropped when decoded alone
    text = IncrementalText(tokenizer)
    assert "".join(text.push([token]) for token in ids) + text.finish() == "Hello world the cat walks"
    rng = random.Random(2)
    for _ in range(40):
        tokens = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(0, 30))]
        assert "".join(_pieces(tokenizer, tokens, rng)) == tokenizer.decode(tokens), tokens


def test_incremental_text_keeps_the_space_of_a_word_after_special_tokens():
    """Special tokens decode to nothing: after a run of them (longer than the few tokens of
    context), the next word still keeps the space it has in the decoded text."""
    tokenizer = _metaspace_tokenizer()
    hello, world = tokenizer.encode("Hello world")[:1], tokenizer.encode("Hello world")[1:]
    for run in (1, 5, 12):
        ids = hello + [tokenizer.eos_token_id] * run + world
        text = IncrementalText(tokenizer)
        given = "".join(text.push([token]) for token in ids) + text.finish()
        assert given == tokenizer.decode(ids) == "Hello world", run
        text = IncrementalText(tokenizer)  # the word and the run in one group
        given = text.push(ids[:1 + run]) + text.push(ids[1 + run:]) + text.finish()
        assert given == "Hello world", run
    rng = random.Random(3)
    for _ in range(40):
        tokens = []
        while len(tokens) < 30:
            tokens += [tokenizer.eos_token_id] * rng.randrange(1, 9) if rng.random() < 0.2 \
                else [rng.randrange(tokenizer.vocab_size)]
        assert "".join(_pieces(tokenizer, tokens, rng)) == tokenizer.decode(tokens), tokens

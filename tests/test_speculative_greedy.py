"""Lossless greedy decoding: HIPPO's output equals the target's own greedy AR output token for
token, for both families, two pairs each, several seeds and videos, keep ratios, draft lengths,
sequential and parallel decoding, pruned and full+compact drafts, and when eos or
max_new_tokens ends a generation inside a block (tiny random models, fp32, CPU; CUDA too when
a GPU is present)."""
from __future__ import annotations

import itertools

import pytest

from hippo.models import load_adapter
from hippo.pipeline import HippoPipeline
from speculative_testing import (FAMILY_PRESETS, PAIR_KINDS, make_pair, make_pipeline,
                                 sample_frames)

KEEP_RATIOS = (0.0, 0.05, 0.1, 0.5, 1.0)  # 0.0: the draft sees no visual token
GAMMAS = (1, 3, 8)
MODES = ("sequential", "parallel")
DRAFT_PREFILLS = ("pruned", "full+compact")
PROMPT = "what moves?"
MAX_NEW_TOKENS = 24


def _autoregressive(target, frames, max_new_tokens: int = MAX_NEW_TOKENS, eos="target"):
    return HippoPipeline(target, None, mode="ar").generate(
        frames, PROMPT, max_new_tokens, eos_token_id=eos).tokens


@pytest.mark.parametrize("seed,num_frames", [(0, 4), (1, 2)])
@pytest.mark.parametrize("kind", PAIR_KINDS)
@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_greedy_equals_target_autoregressive(device, family, kind, seed, num_frames):
    target, draft = make_pair(family, kind, seed, device)
    frames = sample_frames(family, num_frames)
    expected = _autoregressive(target, frames)
    accepted, drafted = dict.fromkeys(MODES, 0), dict.fromkeys(MODES, 0)
    for keep, gamma, mode, prefill in itertools.product(KEEP_RATIOS, GAMMAS, MODES,
                                                        DRAFT_PREFILLS):
        out = make_pipeline(target, draft, mode, gamma, keep, prefill).generate(
            frames, PROMPT, MAX_NEW_TOKENS)
        assert out.tokens == expected, (keep, gamma, mode, prefill)
        assert out.stats.tokens == len(expected)
        accepted[mode] += out.stats.accepted
        drafted[mode] += out.stats.drafted
    # The pair must exercise acceptance and rejection both, in each mode, not one path only.
    for mode in MODES:
        assert 0 < accepted[mode] < drafted[mode], (mode, accepted, drafted)
    if device == "cpu":  # the pairs' agreement was set on the CPU: about half the drafts pass
        total_accepted, total_drafted = sum(accepted.values()), sum(drafted.values())
        assert 0.05 * total_drafted < total_accepted < 0.95 * total_drafted, (accepted, drafted)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_self_speculative_greedy_is_exact(device, family, mode):
    target, _ = make_pair(family, "small-draft", seed=2, device=device)
    frames = sample_frames(family, 4)
    expected = _autoregressive(target, frames)
    for keep in KEEP_RATIOS:
        out = make_pipeline(target, None, mode, 4, keep).generate(frames, PROMPT, MAX_NEW_TOKENS)
        assert out.tokens == expected, keep
    # With every token kept the draft is the target: everything is accepted.
    out = make_pipeline(target, None, mode, 4, 1.0).generate(frames, PROMPT, MAX_NEW_TOKENS)
    assert out.stats.acceptance_rate == 1.0
    assert out.stats.mean_accepted_tokens > 2


def _with_padded_table(name: str, seed: int, device: str):
    """The preset's -v640 model (640 logits) behind the family's 512-id tokenizer: a padded
    vocabulary, as Qwen2.5-VL 7B's 152064 ids against 3B's 151936."""
    from hippo.models.presets import ByteTokenizer

    adapter = load_adapter(f"{name}-v640", seed=seed, device=device)
    adapter.tokenizer = ByteTokenizer(512)
    return adapter


@pytest.mark.parametrize("wider", ["target", "draft"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_tables_of_other_widths_stay_lossless(device, family, mode, wider):
    """The target's greedy choice is over its whole table, also the ids past a narrower
    draft's; a wider draft proposes only ids the target has."""
    name, draft_name, _ = FAMILY_PRESETS[family]
    if wider == "target":
        target, draft = _with_padded_table(name, 0, device), load_adapter(draft_name, seed=1,
                                                                          device=device)
    else:
        target, draft = load_adapter(name, seed=0, device=device), _with_padded_table(name, 1,
                                                                                      device)
    frames = sample_frames(family, 2)
    expected = _autoregressive(target, frames, 40, eos=None)
    if wider == "target":  # the case: the target emits ids the draft's table lacks
        assert any(token >= 512 for token in expected), expected
    out = make_pipeline(target, draft, mode, 3, 0.5).generate(frames, PROMPT, 40,
                                                              eos_token_id=None)
    assert out.tokens == expected


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_eos_and_max_new_tokens_inside_a_block(device, family, mode):
    """A block of accepted tokens that holds the eos, or runs past max_new_tokens, is cut exactly
    where the target's own decoding stops."""
    target, _ = make_pair(family, "small-draft", seed=3, device=device)
    frames = sample_frames(family, 4)
    free = _autoregressive(target, frames, eos=None)
    for stop_at in (0, 2, 5, 9):  # the eos is the token AR emits at this index (0: prefill)
        eos = free[stop_at]
        expected = free[:free.index(eos) + 1]
        assert _autoregressive(target, frames, eos=eos) == expected
        out = make_pipeline(target, None, mode, 8, 1.0).generate(frames, PROMPT, MAX_NEW_TOKENS,
                                                             eos_token_id=eos)
        assert out.tokens == expected, stop_at
    for limit in (1, 2, 7, 11):
        out = make_pipeline(target, None, mode, 4, 1.0).generate(frames, PROMPT, limit,
                                                             eos_token_id=None)
        assert out.tokens == free[:limit], limit


def _record_origins(monkeypatch) -> list[str]:
    """Spy on the decoder: where each emitted token came from, by index. "first" (the prefill's
    token), "accepted" (a draft the target accepted, with more of the round's tokens after it),
    "accepted-last" (the round's last accepted draft, parallel decoding), "correction" (the
    target's token after a rejected draft), "bonus" (the target's token after a wholly accepted
    block), "target" (a round of the target alone)."""
    from hippo.speculative.decoder import SpeculativeDecoder

    origins: list[str] = ["first"]
    verdict: list[tuple[int, int]] = []  # (accepted, candidates) of the round being settled
    read_verdict, settle = SpeculativeDecoder.read_verdict, SpeculativeDecoder.settle

    def spy_read_verdict(self, result, candidates):
        values = read_verdict(self, result, candidates)
        verdict[:] = [(values[0], candidates.shape[1])]
        return values

    def spy_settle(self, accepted, correction, **kwargs):
        labels = ["accepted"] * len(accepted)
        if correction is not None:
            counts = verdict[0] if verdict else None
            labels.append("target" if counts is None else
                          "correction" if counts[0] < counts[1] else "bonus")
        elif labels:
            labels[-1] = "accepted-last"
        origins.extend(labels)
        verdict.clear()
        return settle(self, accepted, correction, **kwargs)

    monkeypatch.setattr(SpeculativeDecoder, "read_verdict", spy_read_verdict)
    monkeypatch.setattr(SpeculativeDecoder, "settle", spy_settle)
    return origins


def _first_occurrences(tokens: list[int], origins: list[str], origin: str) -> list[int]:
    """Indices of tokens of this origin that occur there first (an eos there stops there)."""
    return [i for i, (token, o) in enumerate(zip(tokens, origins))
            if o == origin and tokens.index(token) == i]


# Sampling: at temperature 1 the tiny models' flat distributions accept nearly every draft; at 0.1
# the perturbed copy is rejected in about a third of its drafts.
@pytest.mark.parametrize("kind,temperature", [("small-draft", 0.0), ("perturbed-copy", 0.1)],
                         ids=["greedy", "sampling"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_eos_as_a_correction_or_inside_an_accepted_block(monkeypatch, device, family, mode,
                                                         kind, temperature):
    """With a real draft: an eos that is the target's correction, or an accepted draft with more
    of its round after it, ends the generation right there, in greedy decoding and in sampling
    (same seed: the run is the eos-free run cut after its first eos)."""
    if device == "cuda" and mode == "parallel" and temperature > 0:
        # Where a pre-verify block stops depends on when the host sees the verdict, and with it
        # how many random numbers the draft draws: two runs of one seed need not agree.
        pytest.skip("parallel sampling on CUDA does not replay a seed's run")
    target, draft = make_pair(family, kind, seed=1, device=device)
    frames = sample_frames(family, 2)
    pipeline = make_pipeline(target, draft, mode, 3, 0.5)
    sampling = dict(temperature=temperature, seed=11)
    origins = _record_origins(monkeypatch)
    free = pipeline.generate(frames, PROMPT, MAX_NEW_TOKENS, eos_token_id=None,
                             **sampling).tokens
    assert len(origins) >= len(free)  # the last round may offer more than max_new_tokens
    origins = origins[:len(free)]
    if temperature == 0.0:
        assert free == _autoregressive(target, frames, eos=None)
    for origin in ("correction", "accepted"):
        stops = _first_occurrences(free, origins, origin)
        assert stops, f"no {origin} token to stop at: {origins}"
        for stop in stops:
            out = pipeline.generate(frames, PROMPT, MAX_NEW_TOKENS, eos_token_id=free[stop],
                                    **sampling)
            assert out.tokens == free[:stop + 1], (origin, stop)
            if temperature == 0.0:
                out = pipeline.generate(frames, PROMPT, stop + 1, eos_token_id=None)
                assert out.tokens == free[:stop + 1], (origin, stop)


@pytest.mark.parametrize("method", ["hippo", "attention", "uniform", "random"])
def test_every_selection_method_is_lossless(device, method, monkeypatch):
    import hippo.pipeline

    chosen = []  # the options token preservation ran with: the method must reach it
    preserve_tokens = hippo.pipeline.preserve_tokens

    def recording_preserve_tokens(prompt, options, *args):
        chosen.append((options.method, options.per_frame))
        return preserve_tokens(prompt, options, *args)

    monkeypatch.setattr(hippo.pipeline, "preserve_tokens", recording_preserve_tokens)
    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=4, device=device)
    frames = sample_frames("qwen2_5_vl", 4)
    expected = _autoregressive(target, frames)
    for per_frame in (False, True):
        out = make_pipeline(target, draft, "parallel", "auto", 0.25, method=method,
                        per_frame=per_frame).generate(frames, PROMPT, MAX_NEW_TOKENS)
        assert out.tokens == expected
        assert out.stats.draft_prompt_tokens < out.stats.prompt_tokens
        assert chosen.pop() == (method, per_frame)


def test_statistics_add_up(device):
    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0, device=device)
    frames = sample_frames("qwen2_5_vl", 4)
    for mode in MODES:
        stats = make_pipeline(target, draft, mode, 3, 0.5).generate(frames, PROMPT, 20).stats
        assert stats.tokens == 20 and stats.rounds == stats.target_steps
        assert 0 <= stats.accepted <= stats.drafted
        assert 1.0 <= stats.mean_accepted_tokens <= (3 + 1)
        assert stats.draft_steps >= stats.drafted - stats.rounds
        assert stats.total_s >= stats.decode_s > 0 and stats.prefill_s > 0
        assert stats.draft_s > 0 and stats.verify_s > 0  # the phases' times reach the stats
        if device == "cpu":  # nothing overlaps: both phases lie inside the decoding loop
            assert stats.draft_s + stats.verify_s <= stats.decode_s
        assert stats.tokens_per_s > 0
        assert set(stats.as_dict()) >= {"mean_accepted_tokens", "acceptance_rate", "rounds",
                                         "prefill_s", "selection_s", "draft_s", "verify_s"}


@pytest.mark.parametrize("mode", MODES)
def test_statistics_count_only_what_was_emitted(mode):
    """A draft that is always right (the target itself over its whole cache) and a g beyond
    what is left to emit: candidates verified past max_new_tokens are not counted as drafted
    or accepted (accepted could exceed the tokens emitted)."""
    from hippo.preserve import PreservationOptions

    target = load_adapter("tiny-qwen2.5-vl", seed=0)
    frames = sample_frames("qwen2_5_vl", 2)
    pipeline = HippoPipeline(target, None, mode=mode, gamma=8,
                             preservation=PreservationOptions(keep_ratio=1.0))
    for tokens in (5, 13):
        stats = pipeline.generate(frames, PROMPT, tokens, eos_token_id=None).stats
        assert stats.tokens == tokens and stats.accepted == stats.drafted
        assert stats.accepted <= tokens - 1 and stats.acceptance_rate == 1.0
    # An eos inside an accepted block: the candidates after it are not counted either.
    free = pipeline.generate(frames, PROMPT, 13, eos_token_id=None).tokens
    stop = next(i for i in range(3, 13) if free.index(free[i]) == i)
    stats = pipeline.generate(frames, PROMPT, 13, eos_token_id=free[stop]).stats
    assert stats.tokens == stop + 1 and stats.accepted == stats.drafted <= stop


def test_rates_over_nothing_are_none():
    """One token (the prefill's): no step ran, nothing was decoded or drafted; AR drafts
    nothing. None, not 0 (which read as measurements, and gave speedups of noise)."""
    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    frames = sample_frames("qwen2_5_vl", 2)
    one = HippoPipeline(target, draft).generate(frames, PROMPT, 1).stats
    assert one.tokens == 1 and one.mean_accepted_tokens is None
    assert one.decode_s_per_token is None and one.acceptance_rate is None
    assert one.draft_s == 0.0 and one.verify_s == 0.0 and one.rounds == 0  # no phase ran
    ar = HippoPipeline(target, draft, mode="ar").generate(frames, PROMPT, 4).stats
    assert ar.mean_accepted_tokens == 1.0 and ar.acceptance_rate is None


def test_adaptive_gamma_follows_step_times():
    from hippo.speculative.draft_length import DraftLength

    policy = DraftLength("auto", initial=4, max_gamma=12)
    for _ in range(8):
        policy.observe(target_step_s=6e-3, draft_step_s=1e-3)
    assert policy.current == 6
    for _ in range(8):
        policy.observe(target_step_s=50e-3, draft_step_s=1e-3)
    assert policy.current == 12  # capped
    fixed = DraftLength(3)
    fixed.observe(1.0, 1e-3)
    assert fixed.current == 3


def test_sequential_draft_length_maximises_expected_tokens_per_second():
    from hippo.speculative.draft_length import DraftLength, best_sequential_length

    # Cheap draft, high acceptance: long blocks pay; low acceptance: one token is best.
    assert best_sequential_length(0.95, 10e-3, 1e-3, 16) >= 8
    assert best_sequential_length(0.1, 10e-3, 1e-3, 16) <= 2
    assert best_sequential_length(1.0, 10e-3, 1e-3, 16) == 16
    # Brute force over the formula agrees.
    a, t, d = 0.8, 5e-3, 1e-3
    rate = [((1 - a ** (g + 1)) / (1 - a)) / (g * d + t) for g in range(1, 13)]
    assert best_sequential_length(a, t, d, 12) == 1 + rate.index(max(rate))
    policy = DraftLength("auto", mode="sequential", max_gamma=12)
    for _ in range(8):
        policy.observe(5e-3, 1e-3, accepted=1, drafted=10)  # acceptance 0.1
    assert policy.current <= 2


def test_generation_repeats_across_calls(device):
    """Runtimes are reused between generations (and rebuilt when a longer cache is needed)."""
    target, draft = make_pair("llava_onevision", "perturbed-copy", seed=1, device=device)
    frames = sample_frames("llava_onevision", 3)
    pipeline = make_pipeline(target, draft, "parallel", 3, 0.5)
    first = pipeline.generate(frames, PROMPT, 8).tokens
    longer = pipeline.generate(frames, PROMPT, 30).tokens
    assert pipeline.generate(frames, PROMPT, 8).tokens == first == longer[:8]
    assert longer == _autoregressive(target, frames, 30)

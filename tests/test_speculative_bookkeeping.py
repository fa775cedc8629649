"""What the lossless tests cannot see: bugs that keep the output exact but waste work or report
wrong numbers. The draft's positions after a pruned prompt, no token computed twice, round
statistics, the adaptive g's inputs, and the per-device random streams (tiny random models, fp32,
CPU)."""
from __future__ import annotations

import itertools

import pytest
import torch

from hippo.errors import HippoError
from hippo.runtime import LanguageModelRuntime
from hippo.speculative.acceptance import SamplingOptions, TokenAcceptance
from hippo.speculative.decoder import SpeculativeDecoder, decode_after_prefill
from hippo.speculative.draft_length import DraftLength
from hippo.speculative.lanes import UNKNOWN_TOKEN, Lane
from hippo.speculative.statistics import GenerationStats
from hippo.streaming import EmittedTokens
from speculative_testing import make_pair, make_pipeline, sample_frames

MODES = ("sequential", "parallel")
PROMPT = "what moves?"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_a_pruned_draft_continues_at_the_targets_positions(monkeypatch, family, mode):
    """Generated tokens sit at the target's next positions in the draft too (M-RoPE included),
    not after the draft's shorter cache: the draft then sees the video as the target does."""
    target, draft = make_pair(family, "small-draft", seed=0)
    pipeline = make_pipeline(target, draft, mode, 3, 0.25)
    target_prompt, draft_prompt = pipeline.prepare(sample_frames(family, 4), PROMPT,
                                                   num_frames=None)
    draft_positions = []
    step = LanguageModelRuntime.step

    def spy_step(runtime, input_ids, position_ids):
        if runtime is pipeline._runtimes.get("draft"):
            draft_positions.append(position_ids.clone())
        return step(runtime, input_ids, position_ids)

    monkeypatch.setattr(LanguageModelRuntime, "step", spy_step)
    out = pipeline.generate_prepared(target_prompt, draft_prompt, 16, SamplingOptions(), set())
    assert out.stats.draft_prompt_tokens < out.stats.prompt_tokens
    generated = target_prompt.generated_positions(0, 64)
    assert draft_positions
    for positions in draft_positions:
        first = int(positions.flatten()[0] - generated.flatten()[0])
        assert first >= 0
        assert torch.equal(positions, generated[..., first:first + positions.shape[-1]])


@pytest.mark.parametrize("mode", MODES)
def test_no_lane_recomputes_a_token_it_has_consumed(monkeypatch, mode):
    """A column is fed again only after it or an earlier one changed (a rejection): rolling
    back too far, or dropping drafts that stay valid, would re-run work and still give exact
    output."""
    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    consumed: dict[int, dict[int, tuple]] = {}  # id(lane) -> {column: the tokens up to it}
    feed = Lane.feed

    def spy_feed(lane, end):
        seen = consumed.setdefault(id(lane), {})
        tokens = lane.tokens[0, :end].tolist()
        for column in range(lane.fed, end):
            prefix = tuple(tokens[:column + 1])
            assert seen.get(column) != prefix, f"column {column} fed twice in the same context"
            seen[column] = prefix
        return feed(lane, end)

    monkeypatch.setattr(Lane, "feed", spy_feed)
    out = make_pipeline(target, draft, mode, 3, 0.5).generate(sample_frames("qwen2_5_vl", 4),
                                                          PROMPT, 24)
    assert 0 < out.stats.accepted < out.stats.drafted  # rejections and acceptances both happened


@pytest.mark.parametrize("limit, gammas", [(2, [0]), (7, [4, 0]), (12, [4, 4, 0])])
def test_sequential_rounds_are_counted_up_to_the_last_target_step(limit, gammas):
    """Self-speculation at keep 1.0 accepts everything: g + 1 tokens a round, and a round of the
    target alone for the last token (never a draft that could not be emitted)."""
    target, _ = make_pair("llava_onevision", "small-draft", seed=2)
    stats = make_pipeline(target, None, "sequential", 4, 1.0).generate(
        sample_frames("llava_onevision", 2), PROMPT, limit, eos_token_id=None).stats
    assert stats.gammas == gammas
    assert stats.rounds == stats.target_steps == len(gammas)
    assert stats.drafted == stats.accepted == sum(gammas)
    assert stats.tokens == limit


@pytest.mark.parametrize("gamma, limit, gammas, drafted", [
    (4, 2, [0], 0), (4, 12, [4, 4, 2, 0], 10), (4, 7, [4, 1, 0], 5), (1, 5, [1, 1, 1, 0], 3)])
def test_parallel_rounds_are_counted_up_to_the_last_target_step(gamma, limit, gammas, drafted):
    """Self-speculation at keep 1.0 accepts everything. A parallel round of g verifies its k
    unverified drafts and d_1 and keeps d_2..d_g (g = 1 drafts, and verifies, one a round);
    nothing is drafted past column limit - 2, so the last round verifies what is left with a
    bonus row (at 12: 3 carried, then 1) or, with nothing left, is the target's alone. Calling
    g = 1 a closing round, or dropping the carried drafts there, stays exact but verifies
    nothing, or wastes a step. With no rejection no block stops early: every g is drafted."""
    target, _ = make_pair("llava_onevision", "small-draft", seed=2)
    stats = make_pipeline(target, None, "parallel", gamma, 1.0).generate(
        sample_frames("llava_onevision", 2), PROMPT, limit, eos_token_id=None).stats
    assert stats.gammas == gammas and stats.draft_steps == sum(gammas)
    assert stats.rounds == stats.target_steps == len(gammas)
    assert stats.drafted == stats.accepted == drafted
    assert stats.tokens == limit


def test_a_parallel_round_verifies_once_and_reports_what_it_judged(monkeypatch):
    """One verification a round: a pre-verify round's early check is its verdict, not a fresh
    draw of uniforms per draft step or at the end. And the adaptive g hears each round's
    accepted count out of the candidates it judged (u_1..u_k and d_1; a closing round's k):
    under self-speculation, all of them, as test_parallel_rounds_are_counted_... counts them."""
    observed, verified = [], []
    observe, verify = DraftLength.observe, TokenAcceptance.verify

    def spy_observe(policy, target_step_s, draft_step_s, accepted=0, drafted=0):
        observed.append((accepted, drafted))
        return observe(policy, target_step_s, draft_step_s, accepted, drafted)

    def spy_verify(acceptance, candidates, draft_probs, target_logits, *, bonus):
        verified.append(candidates.shape[1])
        return verify(acceptance, candidates, draft_probs, target_logits, bonus=bonus)

    monkeypatch.setattr(DraftLength, "observe", spy_observe)
    monkeypatch.setattr(TokenAcceptance, "verify", spy_verify)
    target, _ = make_pair("llava_onevision", "small-draft", seed=2)
    stats = make_pipeline(target, None, "parallel", 4, 1.0).generate(
        sample_frames("llava_onevision", 2), PROMPT, 12, eos_token_id=None).stats
    assert stats.gammas == [4, 4, 2, 0]  # pre-verify, two post-verify rounds, closing with 1 left
    assert verified == [1, 4, 4, 1]
    assert observed == [(1, 1), (4, 4), (4, 4), (1, 1)]


class _FixedClock:
    """A phase clock whose every round took the given times."""

    def __init__(self, **seconds: float) -> None:
        self.seconds = seconds

    def collect(self) -> dict[str, float]:
        return dict(self.seconds)


def test_a_round_feeds_the_adaptive_length_its_step_times():
    """A slow target and a fast draft make g grow (PEARL's g ~ T_target / T_draft): the
    decoder hands the verify time as the target's and the draft time per step as the draft's."""
    stats = GenerationStats(mode="parallel")
    decoder = SpeculativeDecoder(None, None, None, DraftLength("auto", initial=4, max_gamma=12),
                                 stats, _FixedClock(verify=6e-3, draft=3e-3),
                                 EmittedTokens(64, set()))
    for _ in range(4):
        decoder.emitted_in_round = 3  # what the round's settle emitted: 2 drafts, a correction
        decoder.end_round(4, 3, accepted=2, candidates=3)  # 3 draft steps: 1 ms each
    assert decoder.draft_length.current == 6
    assert (stats.rounds, stats.drafted, stats.accepted, stats.gammas) == (4, 12, 8, [4] * 4)
    # A round cut short by eos or max_new_tokens after one token: the statistics count the
    # candidates up to it, the adaptive length all it verified.
    decoder.emitted_in_round = 1
    decoder.end_round(4, 3, accepted=3, candidates=3)
    assert (stats.drafted, stats.accepted) == (13, 9)


def test_the_phase_clock_gives_each_phase_its_time(monkeypatch):
    """On the CPU a phase is what perf_counter shows around it: collect() gives each phase's
    seconds since the last collect (what a round hands the adaptive g), totals the whole
    generation's (stats.draft_s and verify_s)."""
    from hippo.speculative import timing

    now = [100.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    clock, cpu = timing.PhaseClock(), torch.device("cpu")
    for phase, seconds in (("draft", 0.25), ("verify", 1.0), ("draft", 0.5)):
        with clock.measure(phase, cpu):
            now[0] += seconds
    assert clock.collect() == {"draft": 0.75, "verify": 1.0}
    with clock.measure("verify", cpu):
        now[0] += 2.0
    assert clock.collect() == {"verify": 2.0}
    assert clock.collect() == {}
    assert dict(clock.totals) == {"draft": 0.75, "verify": 3.0}


def test_each_device_draws_its_own_random_stream():
    """A draft on another device must not replay the target's random numbers."""
    acceptance = TokenAcceptance(SamplingOptions(temperature=1.0, seed=5), vocab=7)
    first, second = acceptance.generator("cpu"), acceptance.generator("cpu:0")
    assert first.initial_seed() != second.initial_seed()
    assert acceptance.generator("cpu") is first
    assert acceptance.generator(torch.device("cpu")) is first  # a device or its name: one stream
    assert TokenAcceptance(SamplingOptions(), vocab=7).generator("cpu") is None  # greedy
    assert TokenAcceptance(SamplingOptions(seed=5), vocab=7).generator("cpu") is None
    unseeded = TokenAcceptance(SamplingOptions(temperature=1.0), vocab=7)
    assert unseeded.generator("cpu") is None  # the global generator
    assert 0 <= int(unseeded.choose(torch.zeros(1, 7))) < 7


def test_draft_probabilities_span_the_targets_table():
    """A draft's distribution over the target's vocab: one id narrower (or more) is padded with
    zeros, a wider one is cut to it (ids the target cannot emit are never proposed)."""
    acceptance = TokenAcceptance(SamplingOptions(temperature=1.0, seed=0), vocab=7)
    for width in (5, 6, 7, 9):
        probs = acceptance.probabilities(torch.zeros(1, width))
        kept = min(width, 7)
        assert probs.shape == (1, 7), width
        assert torch.allclose(probs[0, :kept], torch.full((kept,), 1 / kept))
        assert not probs[0, kept:].any(), width
    greedy = TokenAcceptance(SamplingOptions(), vocab=7)  # argmax over the target's ids only
    for best, token in ((6, 6), (7, 5), (8, 5)):
        logits = torch.arange(9.0)[None] / 10
        logits[0, 5], logits[0, best] = 5.0, 9.0
        assert int(greedy.propose(logits)[0]) == token, best


def test_verification_takes_a_row_per_candidate_and_the_bonus_row():
    """verify() judges m candidates on m + 1 target rows (bonus) or m (no bonus: the last row
    is only read when a candidate is rejected there); any other count is refused, not read
    past or short."""
    acceptance = TokenAcceptance(SamplingOptions(), vocab=7)
    candidates = torch.tensor([[1, 2]])
    rows = torch.nn.functional.one_hot(torch.tensor([[1, 2, 6]]), 7).float()  # argmax 1, 2, 6
    verdict = acceptance.verify(candidates, None, rows, bonus=True)
    assert (int(verdict.num_accepted), int(verdict.next_token)) == (2, 6)  # the bonus
    assert int(acceptance.verify(candidates, None, rows[:, :2], bonus=False).num_accepted) == 2
    verdict = acceptance.verify(torch.tensor([[1, 3]]), None, rows[:, :2], bonus=False)
    assert (int(verdict.num_accepted), int(verdict.next_token)) == (1, 2)  # the correction
    for count, bonus in ((2, True), (4, True), (1, False), (3, False)):
        with pytest.raises(HippoError, match=rf"verification of 2 candidates needs 3 target rows "
                                             rf"\(bonus\) or 2 \(no bonus\), got {count}"):
            acceptance.verify(candidates, None, torch.zeros(1, count, 7), bonus=bonus)


def test_bad_decoding_arguments_are_clear_errors():
    """decode_after_prefill, TokenAcceptance and DraftLength refuse what used to fail deep
    inside a round (an IndexError past the positions, a TypeError from range())."""
    target, _ = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    runtimes = [LanguageModelRuntime.from_hf(target.model, 32) for _ in range(2)]
    for runtime in runtimes:
        runtime.prefill(runtime.embed(torch.tensor([[1, 2, 3]])), torch.arange(3)[None])
    acceptance = TokenAcceptance(SamplingOptions(), target.vocab_size)

    def decode(count, new_tokens, eos_ids=frozenset(), mode="sequential"):
        return decode_after_prefill(*runtimes, torch.tensor([5]), torch.arange(3, 3 + count)[None],
                                    mode=mode, acceptance=acceptance,
                                    draft_length=DraftLength(3, mode="sequential"),
                                    max_new_tokens=new_tokens, eos_ids=eos_ids)

    with pytest.raises(HippoError, match="positions hold 10 generated positions.*needs 19 "
                                         r"\(every new token but the last is fed\)"):
        decode(10, 20)
    with pytest.raises(HippoError, match="positions hold 18 generated positions.*needs 19 "):
        decode(18, 20)
    assert len(decode(19, 20, None).emitted) == 20  # exactly enough
    with pytest.raises(HippoError, match="unknown speculative mode 'greedy'"):
        decode(16, 4, mode="greedy")  # not parallel decoding in silence
    for count in (2.5, 0):
        with pytest.raises(HippoError, match="max_new_tokens must be an integer of at least 1"):
            decode(16, count)
    with pytest.raises(HippoError, match="is not a token id"):
        decode(16, 4, {-1})
    assert len(decode(16, 4, None).emitted) == 4  # None: no stop token
    batched = LanguageModelRuntime.from_hf(target.model, 32, batch=2)
    with pytest.raises(HippoError, match="one sequence: .* got target batch 1, draft batch 2"):
        decode_after_prefill(runtimes[0], batched, torch.tensor([5]),
                             torch.arange(3, 19)[None], mode="sequential",
                             acceptance=acceptance, draft_length=DraftLength(3),
                             max_new_tokens=4, eos_ids=())
    with pytest.raises(HippoError, match="and 2 first tokens"):  # was Tensor.item()'s error
        decode_after_prefill(*runtimes, torch.tensor([5, 6]), torch.arange(3, 19)[None],
                             mode="sequential", acceptance=acceptance,
                             draft_length=DraftLength(3), max_new_tokens=4, eos_ids=())
    with pytest.raises(HippoError, match="options must be a SamplingOptions"):
        TokenAcceptance(None, 7)
    for vocab in (0, 2.5, "7"):
        with pytest.raises(HippoError, match="vocab must be a positive integer"):
            TokenAcceptance(SamplingOptions(), vocab)
    assert TokenAcceptance(SamplingOptions(), 1).vocab == 1
    with pytest.raises(HippoError, match="initial must be an int of at least 1"):
        DraftLength("auto", initial=0)


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_every_lane_step_sits_at_the_columns_it_feeds(monkeypatch, mode):
    """Each step of either lane feeds generated columns [start, end) at exactly the target's
    positions of those columns: a draft one position off stays lossless but sees the video
    shifted, and accepts less."""
    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0)
    pipeline = make_pipeline(target, draft, mode, 3, 0.25)
    target_prompt, draft_prompt = pipeline.prepare(sample_frames("qwen2_5_vl", 4), "what moves?",
                                                   num_frames=None)
    expected = target_prompt.generated_positions(0, 64)
    feeding: list[tuple[int, int]] = []
    seen: list[tuple[int, int, torch.Tensor]] = []
    feed, step = Lane.feed, LanguageModelRuntime.step

    def spy_feed(lane, end):
        feeding.append((lane.fed, end))
        try:
            return feed(lane, end)
        finally:
            feeding.pop()

    def spy_step(runtime, input_ids, position_ids):
        if feeding:
            seen.append((*feeding[-1], position_ids.clone()))
        return step(runtime, input_ids, position_ids)

    monkeypatch.setattr(Lane, "feed", spy_feed)
    monkeypatch.setattr(LanguageModelRuntime, "step", spy_step)
    pipeline.generate_prepared(target_prompt, draft_prompt, 16, SamplingOptions(), set())
    assert len(seen) > 4
    for start, end, positions in seen:
        assert torch.equal(positions, expected[..., start:end]), (start, end)


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_step_counts_are_the_steps_that_ran(monkeypatch, mode):
    """stats.draft_steps and target_steps count the runtime steps taken: a parallel pre-verify
    block stops early after a rejection, so what a round asked for is not what ran."""
    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    pipeline = make_pipeline(target, draft, mode, 3, 0.5)
    calls = {"target": 0, "draft": 0}
    step = LanguageModelRuntime.step

    def spy_step(runtime, input_ids, position_ids):
        for role, candidate in pipeline._runtimes.items():
            if runtime is candidate:
                calls[role] += 1
        return step(runtime, input_ids, position_ids)

    monkeypatch.setattr(LanguageModelRuntime, "step", spy_step)
    stats = pipeline.generate(sample_frames("qwen2_5_vl", 4), "what moves?", 24).stats
    assert 0 < stats.accepted < stats.drafted
    assert (stats.draft_steps, stats.target_steps) == (calls["draft"], calls["target"])
    if mode == "parallel":  # some block stopped early: requested and run differ
        assert stats.draft_steps < sum(stats.gammas)


def test_a_parallel_block_asks_to_stop_before_each_step_after_the_first(monkeypatch):
    """stop_early is asked before every draft step but the first, with the probabilities of the
    steps so far: asked later, a block whose d_1 was already rejected drafts a wasted step (the
    output stays right, so only this sees it)."""
    from hippo.speculative.decoder import SpeculativeDecoder

    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    pipeline = make_pipeline(target, draft, "parallel", 4, 0.5)
    blocks = []
    draft_block = SpeculativeDecoder.draft_block

    def spy_block(decoder, last, count, stop_early=None):
        asked = []

        def recorded(probs):
            asked.append(len(probs))
            return stop_early(probs)

        drafted, probs = draft_block(decoder, last, count,
                                     recorded if stop_early is not None else None)
        if stop_early is not None:
            blocks.append((count, drafted, asked))
        return drafted, probs

    monkeypatch.setattr(SpeculativeDecoder, "draft_block", spy_block)
    pipeline.generate(sample_frames("qwen2_5_vl", 4), "what moves?", 24)
    assert blocks
    for count, drafted, asked in blocks:
        assert asked == list(range(1, len(asked) + 1)), (count, drafted, asked)
        # asked before each step after the first: all steps ran, or the last answer stopped it
        assert len(asked) == (drafted if drafted < count else count - 1), (count, drafted, asked)
    assert any(drafted < count for count, drafted, _ in blocks)  # some block stopped early


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_adaptive_gamma_never_drops_below_one(mode):
    """A draft much slower than the target (time ratio under 0.5) still drafts one token a
    round: g = 0 would verify a stale column."""
    policy = DraftLength("auto", initial=4, max_gamma=12, mode=mode)
    for _ in range(8):
        policy.observe(target_step_s=1e-3, draft_step_s=10e-3)  # no acceptance seen yet
    assert policy.current == 1


def test_rounds_with_nothing_accepted_lower_the_acceptance_estimate():
    """Rounds that accept none of their drafts count (as 0) in the smoothed acceptance that picks
    the sequential g: after many of them one draft token is best."""
    policy = DraftLength("auto", initial=4, max_gamma=12, mode="sequential")
    policy.observe(5e-3, 1e-3, accepted=10, drafted=10)
    assert policy.current == 12
    for _ in range(8):
        policy.observe(5e-3, 1e-3, accepted=0, drafted=10)
    assert policy.current == 1


def test_sequential_acceptance_counts_the_judged_candidates():
    """Leviathan et al.'s a is the rate per candidate the target judged: after a rejection the
    rest of the block was never judged. 3 accepted of 8 drafted is 3 of 4 judged (a = 0.75),
    not 3/8; a whole block accepted is a = 1."""
    policy = DraftLength("auto", initial=8, max_gamma=12, mode="sequential")
    policy.observe(1.0, 0.05, accepted=3, drafted=8)
    assert policy._acceptance == pytest.approx(0.75)
    policy = DraftLength("auto", initial=8, max_gamma=12, mode="sequential")
    policy.observe(1.0, 0.05, accepted=8, drafted=8)
    assert policy._acceptance == 1.0 and policy.current == 12


@pytest.mark.parametrize("a, draft_cost", [(0.8, 0.05), (0.9, 0.05), (0.9, 0.2)])
def test_adaptive_sequential_length_is_as_fast_as_the_best_fixed_one(a, draft_cost):
    """A stationary model (each draft token accepted with probability a, a draft step costing
    draft_cost target steps): the adaptive g's tokens per second come within 3% of the best
    fixed g's (accepted / drafted as the acceptance kept g near half its best: 7-15% slower)."""
    import random

    from hippo.speculative.draft_length import best_sequential_length

    def simulate(policy: DraftLength, rounds: int = 2000) -> float:
        rng, tokens, seconds = random.Random(0), 0, 0.0
        for _ in range(rounds):
            g = policy.current
            accepted = 0
            while accepted < g and rng.random() < a:
                accepted += 1
            tokens += accepted + 1
            seconds += g * draft_cost + 1.0
            policy.observe(1.0, draft_cost, accepted, g)
        return tokens / seconds

    best = best_sequential_length(a, 1.0, draft_cost, 12)
    adaptive = simulate(DraftLength("auto", max_gamma=12, mode="sequential"))
    fixed = simulate(DraftLength(best))
    assert adaptive > 0.97 * fixed


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_adaptive_gamma_ignores_timings_that_are_not_numbers(mode):
    """A NaN or infinite step time leaves the averages as they were (it made round() raise in
    the parallel rule and pinned the sequential g to 1 for good)."""
    policy = DraftLength("auto", initial=4, max_gamma=12, mode=mode)
    policy.observe(6e-3, 1e-3, accepted=6, drafted=6)
    before = policy.current
    for bad in (float("nan"), float("inf"), 0.0, -1e-3):  # 0: not seen; negative: a clock error
        policy.observe(bad, 1e-3, accepted=6, drafted=6)
        policy.observe(6e-3, bad, accepted=6, drafted=6)
    assert 1 < policy.current <= 12 and policy._target_step_s == pytest.approx(6e-3)
    assert before == policy.current


def test_a_token_past_the_lanes_table_is_fed_as_the_unknown_token():
    """A correction the lane's model cannot embed (a wider target's id) is written as
    UNKNOWN_TOKEN, every id up to the table's last row as itself; the lane feeds every column
    of its capacity and rolls back to a count of generated tokens."""
    target, _ = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    runtime = LanguageModelRuntime.from_hf(target.model, 16)
    rows = runtime.text_model.embed_tokens.num_embeddings
    lane = Lane(runtime, 0, torch.arange(8)[None], 8)
    assert (lane.table_rows, lane.capacity) == (rows, 8)
    for column, token in enumerate((rows - 1, rows, rows + 7, 5)):
        lane.write_token(column, token)
    assert lane.tokens[0, :4].tolist() == [rows - 1, UNKNOWN_TOKEN, UNKNOWN_TOKEN, 5]
    lane.write_token(0, 3)
    assert lane.feed(8).shape[:2] == (1, 8)  # every column up to the capacity has a position
    lane.rollback(3)
    assert (lane.fed, runtime.length) == (3, 3)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_adaptive_gamma_waits_for_both_step_times(mode):
    """A step time of 0 is one not measured: g stays at `initial` until both sides were timed
    (the ratio divided by None). Then, with no acceptance counts seen yet, the sequential rule
    falls back to PEARL's ratio, rounded to the nearest g (5.6 -> 6, not 5); a fixed g never
    moves, whatever the step times say."""
    for target_s, draft_s in ((5.6e-3, 0.0), (0.0, 1e-3)):
        policy = DraftLength("auto", initial=4, max_gamma=12, mode=mode)
        policy.observe(target_s, draft_s)
        assert policy.current == 4
    policy.observe(5.6e-3, 1e-3)
    assert policy._acceptance is None and policy.current == 6
    fixed = DraftLength(3, mode=mode)
    for target_s, draft_s in ((1e-3, 1.0), (1.0, 1e-3)):
        fixed.observe(target_s, draft_s, accepted=0, drafted=3)
        assert fixed.current == 3


def test_draft_length_arguments_at_their_bounds():
    """gamma and max_gamma take both ends of 1..32 and initial any int from 1; one past either
    end, a fraction or an unknown rule is refused. "auto" starts at initial (4) capped by
    max_gamma (12), with PEARL's parallel rule."""
    for gamma in (1, 32):
        assert DraftLength(gamma).current == gamma
    for max_gamma in (1, 32):
        assert DraftLength("auto", max_gamma=max_gamma).max_gamma == max_gamma
    assert DraftLength("auto", initial=1).current == 1
    assert DraftLength("auto", max_gamma=2).current == 2
    policy = DraftLength()
    assert (policy.adaptive, policy.current, policy.max_gamma, policy.mode) == (True, 4, 12, "parallel")
    for gamma in (0, 33, 2.5, "fast"):
        with pytest.raises(HippoError, match=r"gamma must be 'auto' or an int in 1\.\.32"):
            DraftLength(gamma)
    for max_gamma in (0, 33, 2.5):
        with pytest.raises(HippoError, match=r"max_gamma must be an int in 1\.\.32"):
            DraftLength("auto", max_gamma=max_gamma)
    for initial in (0, 2.5):
        with pytest.raises(HippoError, match="initial must be an int of at least 1"):
            DraftLength("auto", initial=initial)
    with pytest.raises(HippoError, match="unknown draft-length rule 'tree'"):
        DraftLength(3, mode="tree")


def _greedy(target, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """The target's own greedy decoding of new_tokens after prompt [1, L] (one token a step)."""
    length = prompt.shape[1]
    reference = LanguageModelRuntime.from_hf(target.model, length + new_tokens)
    token = reference.prefill(reference.embed(prompt),
                              torch.arange(length)[None]).logits[:, -1].argmax(-1)
    tokens = [int(token)]
    for index in range(new_tokens - 1):
        token = reference.step(token[:, None], torch.tensor([[length + index]]))[:, -1].argmax(-1)
        tokens.append(int(token))
    return tokens


@pytest.mark.parametrize("gamma", [1, 2, 5])
@pytest.mark.parametrize("mode", MODES)
def test_no_step_holds_a_token_past_the_request(mode, gamma):
    """Nothing is drafted past max_new_tokens: runtimes holding exactly prompt +
    max_new_tokens, what AR needs, suffice (parallel rounds drafted past it and stepped out of
    the cache mid-generation), and no step feeds a position the request does not reach (a
    dynamic-NTK RoPE rotates a whole step by its largest position)."""
    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    length = prompt.shape[1]
    positions = torch.arange(length)[None]
    for new_tokens in sorted({1, 2, gamma, gamma + 1, 12}):
        expected = _greedy(target, prompt, new_tokens)
        runtimes = [LanguageModelRuntime.from_hf(model.model, length + new_tokens)
                    for model in (target, draft)]
        for runtime in runtimes:
            runtime.prefill(runtime.embed(prompt), positions)
        decoder = decode_after_prefill(
            *runtimes, torch.tensor([expected[0]]),
            torch.arange(length, length + new_tokens)[None], mode=mode,
            acceptance=TokenAcceptance(SamplingOptions(), target.vocab_size),
            draft_length=DraftLength(gamma, mode=mode), max_new_tokens=new_tokens, eos_ids=())
        assert decoder.emitted == expected, new_tokens
        # The target has consumed every emitted token but the last, and nothing after it.
        assert runtimes[0].length <= length + new_tokens - 1, new_tokens
        assert decoder.stats.accepted <= decoder.stats.drafted


@pytest.mark.parametrize("kind,seed", [("perturbed-copy", 0), ("small-draft", 1),
                                       ("small-draft", 2)])
@pytest.mark.parametrize("mode", MODES)
def test_caches_of_exactly_the_fed_tokens_suffice(monkeypatch, mode, kind, seed):
    """Every new token but the last is fed, and nothing more: runtimes holding exactly prompt +
    fed_token_count(max_new_tokens) positions (the draft: its kept tokens + as many) and that
    many position ids suffice for every g, fixed or adaptive (its rounds alternate at random
    here), every max_new_tokens against g and every stop by eos, and give the target's greedy
    output. The target's cache reaches that length (the bound is tight) and the draft's never
    passes it (a step beyond a cache is refused; one beyond the positions is caught here)."""
    from hippo.runtime.autoregressive import fed_token_count

    target, draft = make_pair("qwen2_5_vl", kind, seed=seed)
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    length, kept = prompt.shape[1], 4
    free = _greedy(target, prompt, 24)
    feed = Lane.feed

    def checked_feed(lane, end):
        assert end <= lane.positions.shape[-1], (end, lane.positions.shape)
        return feed(lane, end)

    monkeypatch.setattr(Lane, "feed", checked_feed)
    observe = DraftLength.observe

    def random_gamma(policy, *args):  # the adaptive g at random, not from CPU timings
        observe(policy, *args)
        if policy.adaptive:
            policy.current = int(torch.randint(1, policy.max_gamma + 1, (1,)))

    monkeypatch.setattr(DraftLength, "observe", random_gamma)
    torch.manual_seed(seed)
    for gamma, new_tokens, stop_at in itertools.product(
            (1, 2, 5, "auto"), (1, 2, 3, 4, 6, 7, 24), (None, 1, 4)):
        if stop_at is not None and stop_at >= new_tokens:
            continue
        eos_ids = set() if stop_at is None else {free[stop_at]}
        expected = free[:new_tokens] if stop_at is None else free[:free.index(free[stop_at]) + 1]
        fed = fed_token_count(new_tokens)
        runtimes = [LanguageModelRuntime.from_hf(target.model, length + fed),
                    LanguageModelRuntime.from_hf(draft.model, kept + fed)]
        runtimes[0].prefill(runtimes[0].embed(prompt), torch.arange(length)[None])
        runtimes[1].prefill(runtimes[1].embed(prompt[:, :kept]), torch.arange(kept)[None])
        policy = DraftLength(gamma, max_gamma=6, initial=3, mode=mode)
        decoder = decode_after_prefill(
            *runtimes, torch.tensor([free[0]]), torch.arange(length, length + fed)[None],
            mode=mode, acceptance=TokenAcceptance(SamplingOptions(), target.vocab_size),
            draft_length=policy, max_new_tokens=new_tokens, eos_ids=eos_ids)
        case = (gamma, new_tokens, stop_at)
        assert decoder.emitted == expected, case
        assert runtimes[0].length <= length + fed and runtimes[1].length <= kept + fed, case
        if stop_at is None:
            assert runtimes[0].length == length + fed, case  # the bound is reached


def test_a_request_that_fits_autoregressive_decoding_fits_speculative_decoding(monkeypatch):
    """Speculative decoding needs no room beyond what the target's own decoding needs: position
    ids for max_new_tokens (as autoregressive decoding takes them) are enough, and a pipeline's
    target runtime from a mode="ar" generation serves a speculative one of the same request
    unchanged (they were refused, "needs max_new_tokens + 2 * gamma + 2", and rebuilt larger,
    capturing every graph again)."""
    import hippo.pipeline as pipeline_module
    from hippo.runtime.autoregressive import fed_token_count

    target, draft = make_pair("qwen2_5_vl", "perturbed-copy", seed=0)
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    length, new_tokens = prompt.shape[1], 9
    expected = _greedy(target, prompt, new_tokens)
    for mode in MODES:
        runtimes = [LanguageModelRuntime.from_hf(model.model, length + new_tokens)
                    for model in (target, draft)]
        for runtime in runtimes:
            runtime.prefill(runtime.embed(prompt), torch.arange(length)[None])
        decoder = decode_after_prefill(
            *runtimes, torch.tensor([expected[0]]),
            torch.arange(length, length + new_tokens)[None], mode=mode,
            acceptance=TokenAcceptance(SamplingOptions(), target.vocab_size),
            draft_length=DraftLength(8, mode=mode), max_new_tokens=new_tokens, eos_ids=())
        assert decoder.emitted == expected, mode

    monkeypatch.setattr(pipeline_module, "CACHE_GRANULE", 1)  # caches of the exact size asked
    autoregressive = make_pipeline(target, draft, "ar", 8, 0.5)
    frames = sample_frames("qwen2_5_vl", 4)
    prompts = autoregressive.prepare(frames, PROMPT, max_new_tokens=new_tokens)
    tokens = autoregressive.generate_prepared(*prompts, new_tokens, SamplingOptions(), set()).tokens
    runtime = autoregressive.runtime("target")
    assert runtime.cache.max_seq_len == prompts[0].length + fed_token_count(new_tokens)
    for mode, gamma, prefill in (("parallel", 8, "pruned"), ("sequential", "auto", "full+compact")):
        hippo = autoregressive.with_options(mode=mode, gamma=gamma, draft_prefill=prefill)
        out = hippo.generate_prepared(*prompts, new_tokens, SamplingOptions(), set())
        assert out.tokens == tokens, mode
        assert hippo.runtime("target") is runtime, mode  # not rebuilt
        assert hippo.runtime("draft").cache.max_seq_len == max(
            out.stats.draft_prompt_tokens + fed_token_count(new_tokens),
            prompts[0].length if prefill == "full+compact" else 0)


def test_generation_stats_rates_by_hand():
    """The rates reports and benchmarks print (decode speedup compares decode_s_per_token):
    each one by hand, and as_dict carries them with the counts (gammas as their mean)."""
    stats = GenerationStats(mode="sequential", tokens=9, rounds=3, target_steps=4, drafted=10,
                            accepted=6, gammas=[4, 4, 2], decode_s=0.4, total_s=0.5)
    assert stats.mean_accepted_tokens == 2.0  # 8 tokens after the prefill's, in 4 steps
    assert stats.decode_s_per_token == 0.05  # 0.4 s over the 8 decoded tokens
    assert stats.acceptance_rate == 0.6
    assert stats.tokens_per_s == 18.0
    assert stats.mean_gamma == 10 / 3
    data = stats.as_dict()
    assert "gammas" not in data and data["mode"] == "sequential" and data["tokens"] == 9
    assert (data["mean_accepted_tokens"], data["decode_s_per_token"], data["acceptance_rate"],
            data["tokens_per_s"], data["mean_gamma"]) == (2.0, 0.05, 0.6, 18.0, 10 / 3)
    # Two tokens: one decoded; nothing timed: no rate (0 tokens/s, not a division by zero).
    two = GenerationStats(mode="ar", tokens=2, target_steps=1, decode_s=0.25)
    assert two.decode_s_per_token == 0.25 and two.mean_accepted_tokens == 1.0
    assert two.tokens_per_s == 0.0 and two.mean_gamma is None
    one = GenerationStats(mode="ar", tokens=1, decode_s=0.25)  # the prefill's token alone
    assert one.decode_s_per_token is None and one.mean_accepted_tokens is None
    fresh = GenerationStats(mode="parallel")
    assert (fresh.tokens, fresh.rounds, fresh.target_steps, fresh.draft_steps, fresh.drafted,
            fresh.accepted, fresh.prompt_tokens, fresh.draft_prompt_tokens, fresh.gammas) \
        == (0, 0, 0, 0, 0, 0, 0, 0, [])
    assert fresh.tokens_per_s == 0.0 and fresh.decode_s_per_token is None
    assert all(value == 0.0 for name, value in fresh.as_dict().items() if name.endswith("_s"))

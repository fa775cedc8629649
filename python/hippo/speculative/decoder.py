"""The machinery both speculative decoders share: drafting a block, a target step, reading a
round's verdict with one host synchronisation, and settling both caches afterwards.

The decoding loops (sequential.py, parallel.py) are written in terms of these few operations. A
generation starts from prefilled caches: the target holds the prompt, the draft its (possibly
pruned) view of it, and the target's first token is known.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from hippo.errors import HippoError
from hippo.runtime.autoregressive import (eos_id_set, fed_token_count, finite_rows,
                                          new_token_count, non_finite_logits_error)
from hippo.runtime.decoder import LanguageModelRuntime
from hippo.speculative.acceptance import TokenAcceptance, Verdict
from hippo.speculative.draft_length import DraftLength
from hippo.speculative.lanes import Lane
from hippo.speculative.statistics import GenerationStats
from hippo.speculative.timing import PhaseClock
from hippo.streaming import EmittedTokens


class SpeculativeDecoder:
    """State of one speculative generation (batch 1).

    emitted: the generated tokens so far, on the host (output's, which also decides when the
    generation ends); token j is in column j of both lanes. The target has always consumed
    every emitted token but the last; the draft may have consumed fewer (it catches up in its
    next block) or, in parallel decoding, more (drafts that are still unverified).
    """

    def __init__(self, target: Lane, draft: Lane, acceptance: TokenAcceptance,
                 draft_length: DraftLength, stats: GenerationStats, clock: PhaseClock,
                 output: EmittedTokens) -> None:
        self.target, self.draft = target, draft
        self.acceptance = acceptance
        self.draft_length = draft_length
        self.stats, self.clock = stats, clock
        self.output = output
        self.emitted = output.tokens
        self.emitted_in_round = 0  # how many tokens the round's settle emitted

    # ------------------------------------------------------------------------------ emitting

    def start(self, first_token: torch.Tensor) -> None:
        """The target's token after the prompt ([1], from its prefill logits), emitted here
        unless the caller emitted it already (to hand it over before the draft's prefill)."""
        if not self.emitted:
            self.output.emit([int(first_token.item())])
        for lane in (self.target, self.draft):
            lane.write_token(0, self.emitted[0])

    @property
    def finished(self) -> bool:
        return self.output.finished

    @property
    def remaining(self) -> int:
        return self.output.remaining

    def settle(self, accepted: list[int], correction: int | None, *,
               draft_stays_ahead: bool = False) -> None:
        """Emit the accepted candidates and the target's correction or bonus token, write that
        token into both lanes, and roll the caches back to what is still valid.

        draft_stays_ahead: the draft's further drafts remain valid (parallel decoding, when
        every candidate was accepted): keep them.
        """
        self.emitted_in_round = self.output.emit(
            accepted + ([correction] if correction is not None else []))
        if self.finished:
            return
        last = len(self.emitted) - 1
        if correction is not None:
            for lane in (self.target, self.draft):
                lane.write_token(last, correction)
        self.target.rollback(last)
        if not draft_stays_ahead:
            self.draft.rollback(min(self.draft.fed, last))

    # ----------------------------------------------------------------------------- the models

    def draft_block(self, last: int, count: int,
                    stop_early: Callable[[list], bool] | None = None) -> tuple[int, list]:
        """Draft up to `count` tokens after generated token `last`, into columns last + 1 ...

        The draft first consumes every token it has not seen up to `last` (one step of 1 or 2
        tokens), then one token per step. stop_early(probabilities so far) is asked before each
        step after the first.
        Returns (how many were drafted, the draft probabilities of each [1, V], or Nones when
        greedy). Issues work on the current stream; no host synchronisation.
        """
        draft = self.draft
        probs: list[torch.Tensor | None] = []
        with self.clock.measure("draft", draft.device):
            for index in range(count):
                if index > 0 and stop_early is not None and stop_early(probs):
                    break
                logits = draft.feed(last + index + 1)
                token, token_probs = self.acceptance.propose(logits[:, -1])
                draft.tokens[:, last + index + 1] = token
                probs.append(token_probs)
        self.stats.draft_steps += len(probs)
        return len(probs), probs

    def target_step(self, end: int) -> torch.Tensor:
        """Feed the target every generated token up to `end` (exclusive); [1, n, V] logits."""
        with self.clock.measure("verify", self.target.device):
            logits = self.target.feed(end)
        self.stats.target_steps += 1
        return logits

    def share_drafts(self, start: int, end: int) -> None:
        """Copy drafted columns [start, end) to the target's lane when it lives on another
        device (issued on the target device's current stream)."""
        if self.draft.tokens is not self.target.tokens and end > start:
            self.target.tokens[:, start:end].copy_(self.draft.tokens[:, start:end],
                                                   non_blocking=True)

    def read_verdict(self, verdict: Verdict, candidates: torch.Tensor) -> tuple[int, int, list[int]]:
        """(accepted count, next token, candidate values): the round's one synchronisation.

        It reads the verdict's finite flags too and refuses what is NaN or inf where it chose a
        token the round emits: a target row up to the first rejection (rows after it were fed
        rejected drafts, which AR never computes), and, sampling, the distribution of a
        candidate the test looked at; neither past an accepted eos, nor past an accepted draft
        that completes a stop string, nor past max_new_tokens (AR stops there, and the two must
        agree on what they refuse)."""
        flags = [flag for flag in (verdict.target_finite, verdict.draft_finite)
                 if flag is not None]
        values = torch.cat([verdict.num_accepted, verdict.next_token, candidates[0],
                            *flags]).tolist()
        count = candidates.shape[1]
        accepted, token = int(values[0]), int(values[1])
        drafted = [int(v) for v in values[2:2 + count]]
        ending = self.output.ending_within(drafted[:accepted])  # an eos or a stop string
        emitted = min(accepted + 1 if ending is None else ending + 1,
                      self.remaining)  # tokens this round can emit
        first = len(self.emitted)  # the column of candidate 0 and of target row 0
        rows = values[2 + count:]
        if verdict.target_finite is not None:
            target_rows = verdict.target_finite.numel()
            self._refuse_non_finite("the target's", self.target, rows[:target_rows][:emitted],
                                    first)
            rows = rows[target_rows:]
        if verdict.draft_finite is not None:
            self._refuse_non_finite("the draft's", self.draft, rows[:min(emitted, count)], first)
        return accepted, token, drafted

    @staticmethod
    def _refuse_non_finite(whose: str, lane: Lane, flags: list, first: int) -> None:
        """Raise for the first 0 of flags, which stand for columns first, first + 1, ..."""
        bad = next((first + index for index, finite in enumerate(flags) if not finite), None)
        if bad is not None:
            raise non_finite_logits_error(whose, bad + 1, lane.runtime.dtype)

    def choose_alone(self, logits: torch.Tensor, column: int) -> int:
        """The target's token from [1, V] logits without a draft (a round of the target alone),
        read with its finite flag in one synchronisation."""
        token, finite = torch.cat([self.acceptance.choose(logits),
                                   finite_rows(logits, torch.int64)]).tolist()
        self._refuse_non_finite("the target's", self.target, [finite], column)
        return int(token)

    def end_round(self, gamma: int, drafted_steps: int, accepted: int = 0,
                  candidates: int = 0) -> None:
        """Book-keeping after the round's synchronisation (and its settle): one target step,
        `drafted_steps` draft steps, `accepted` of `candidates` verified drafts; phase times
        and acceptance feed the adaptive g. The statistics count the candidates up to the last
        token the round emitted: those past an eos, a completed stop string or max_new_tokens
        were verified for nothing."""
        emitted = self.emitted_in_round
        self.stats.rounds += 1
        self.stats.drafted += min(candidates, emitted)
        self.stats.accepted += min(accepted, emitted)
        self.stats.gammas.append(gamma)
        times = self.clock.collect()
        self.draft_length.observe(times.get("verify", 0.0),
                                  times.get("draft", 0.0) / drafted_steps if drafted_steps else 0.0,
                                  accepted, candidates)


def decode_after_prefill(target: LanguageModelRuntime, draft: LanguageModelRuntime,
                         first_token: torch.Tensor, positions: torch.Tensor, *, mode: str,
                         acceptance: TokenAcceptance, draft_length: DraftLength,
                         max_new_tokens: int, eos_ids: set[int],
                         stats: GenerationStats | None = None,
                         draft_priority: bool = False,
                         output: EmittedTokens | None = None) -> SpeculativeDecoder:
    """Speculative decoding from prefilled caches: the target's holds the prompt, the draft's its
    view of it (both at their current lengths); first_token [1] is the target's choice after the
    prompt; positions [..., n] the position ids of generated tokens 0, 1, ... (n at least
    fed_token_count(max_new_tokens), max_new_tokens - 1: no step feeds the last token, and each
    cache needs that much room after its prompt); draft_priority puts the draft's steps on a
    high-priority CUDA stream. output: where the tokens are emitted (hippo.streaming: with an
    on_tokens callback or stop strings), made of max_new_tokens and eos_ids when None; one
    made of the same may hold the first token already (emitted by the caller, to hand it over
    before the draft's prefill; that token is then the one decoded from, and first_token must
    be it). Returns the finished decoder (emitted, stats)."""
    batches = (target.cache.batch, draft.cache.batch, first_token.numel())
    if batches != (1, 1, 1):
        raise HippoError(f"speculative decoding generates one sequence: it needs runtimes of "
                         f"batch 1 and one first token, got target batch {batches[0]}, draft "
                         f"batch {batches[1]} and {batches[2]} first tokens")
    max_new_tokens = new_token_count(max_new_tokens)
    eos_ids = eos_id_set(eos_ids, acceptance.vocab)
    output = _checked_output(output, max_new_tokens, eos_ids)
    fed = fed_token_count(max_new_tokens)
    if positions.shape[-1] < fed:
        raise HippoError(f"positions hold {positions.shape[-1]} generated positions; "
                         f"max_new_tokens {max_new_tokens} needs {fed} (every new token but "
                         f"the last is fed)")
    capacity = max(fed, 1)  # the lanes' columns: the first token's too, when none is fed
    stats = stats or GenerationStats(mode=mode)
    # Every size a round can step with, captured before the first round (CUDA graphs only):
    # target steps of 1..g+1 tokens in sequential rounds (the drafts and the bonus row), of
    # 1..g in parallel ones (the unverified drafts and the newest token); draft steps of 1 or 2
    # (catching up, then drafting). A size missed here is still captured when it first runs.
    largest_target_step = draft_length.max_gamma + (1 if mode == "sequential" else 0)
    target.capture_steps(range(1, largest_target_step + 1))
    draft.capture_steps((1, 2))
    clock = PhaseClock()
    decoder = SpeculativeDecoder(Lane(target, target.length, positions, capacity),
                                 Lane(draft, draft.length, positions, capacity,
                                      high_priority=draft_priority), acceptance,
                                 draft_length, stats, clock, output)
    decoder.start(first_token)
    run_decoding(decoder, mode)
    stats.draft_s += clock.totals.get("draft", 0.0)
    stats.verify_s += clock.totals.get("verify", 0.0)
    stats.tokens = len(decoder.emitted)
    return decoder


def _checked_output(output: object, max_new_tokens: int, eos_ids: set[int]) -> EmittedTokens:
    """decode_after_prefill's output: a new EmittedTokens of max_new_tokens and eos_ids, or
    the caller's, made of the same and holding at most the first token."""
    if output is None:
        return EmittedTokens(max_new_tokens, eos_ids)
    if not isinstance(output, EmittedTokens):
        raise HippoError(f"output must be a hippo.streaming.EmittedTokens or None, got "
                         f"{type(output).__name__}")
    if (output.max_new_tokens, output.eos_ids) != (max_new_tokens, eos_ids) \
            or len(output.tokens) > 1:
        raise HippoError(f"output must be made of this call's max_new_tokens and eos_ids and hold "
                         f"at most the first token; it was made of {output.max_new_tokens} and "
                         f"{sorted(output.eos_ids)} and holds {len(output.tokens)} tokens")
    return output


def run_decoding(decoder: SpeculativeDecoder, mode: str) -> None:
    """Rounds of `mode` ("sequential" or "parallel") until the decoder finishes (an eos, a stop
    string, max_new_tokens or the callback: EmittedTokens); the loop's wall time goes to
    stats.decode_s."""
    from hippo.speculative.parallel import ParallelState, parallel_round
    from hippo.speculative.sequential import sequential_round

    round_fn: Callable[[SpeculativeDecoder], None]
    if mode == "sequential":
        round_fn = sequential_round
    elif mode == "parallel":
        state = ParallelState()
        round_fn = lambda d: parallel_round(d, state)  # noqa: E731
    else:
        raise HippoError(f"unknown speculative mode {mode!r}: 'sequential' or 'parallel'")
    started = time.perf_counter()
    while not decoder.finished:
        round_fn(decoder)
    for lane in (decoder.target, decoder.draft):
        if lane.device.type == "cuda":
            torch.cuda.synchronize(lane.device)
    decoder.stats.decode_s += time.perf_counter() - started

"""Parallel speculative decoding (HIPPO, after PEARL): drafting and verification overlap.

Each round runs one target step and one draft block at the same time, on two streams of one GPU
or on two devices (but a closing round, below):

* post-verify: the target verifies the k unverified drafts u_1..u_k (one step over c, u_1..u_k,
  where c is the newest emitted token) while the draft, assuming all of them will be accepted,
  drafts the next block d_1..d_g. The target's last row then checks d_1 too. If u_1..u_k and d_1
  are all accepted, they are emitted and d_2..d_g become the next round's unverified drafts; no
  draft work was wasted and the target never waited for the draft.
* pre-verify (k = 0, after a rejection or at the start): the target takes one step on c, which
  checks d_1 while the draft goes on drafting; when d_1 is rejected and the host learns it before
  the block is done, drafting stops early and the next round restarts from the correction.
* closing (nothing is drafted past column max_new_tokens - 2, as in sequential rounds): when the
  unverified drafts reach that column, the target verifies them in one step with a bonus row, as a
  sequential round does (a plain target step when there are none), and the draft does nothing.

Greedy output equals the target's own greedy decoding and sampling keeps its distribution: every
emitted token passes the same verification as in sequential decoding (a candidate drafted under an
assumption is only checked when the assumption held). The round ends with one host
synchronisation, which reads the verdict.
"""
from __future__ import annotations

import torch

from hippo.speculative.decoder import SpeculativeDecoder
from hippo.speculative.sequential import target_only_round, verify_with_bonus


class ParallelState:
    """What carries from one round to the next: the unverified drafts after the newest emitted
    token, and (sampling) the draft distributions they were drawn from."""

    def __init__(self) -> None:
        self.unverified = 0
        self.probs: list = []

    def reset(self) -> None:
        self.unverified, self.probs = 0, []


def parallel_round(decoder: SpeculativeDecoder, state: ParallelState) -> None:
    target, draft = decoder.target, decoder.draft
    last = len(decoder.emitted) - 1
    pending = state.unverified
    # As in sequential rounds, nothing is drafted past column max_new_tokens - 2, so no step
    # holds a token past the request: the target never sees a position the request does not
    # reach (a RoPE that rescales by a call's largest position, dynamic NTK, would rotate the
    # whole verify step otherwise) and its cache needs no room beyond prompt + max_new_tokens.
    gamma = min(decoder.draft_length.current, decoder.remaining - 1 - pending)
    if gamma < 1:
        _closing_round(decoder, state, last)
        return
    main = target.main_stream()
    target.fork()
    draft.fork()

    # Both sides are issued before either is awaited: on CUDA they run concurrently.
    with target.on_stream():
        logits = decoder.target_step(last + 1 + pending)
    check = _RoundVerification(decoder, state, logits, last)
    with draft.on_stream():
        drafted, probs = decoder.draft_block(last + pending, gamma,
                                             stop_early=check.first_draft_rejected)
    target.join(main)
    draft.join(main)
    if draft.device != target.device:
        draft.join(draft.main_stream())

    verdict, candidates = check.verdict(probs)
    accepted, correction, values = decoder.read_verdict(verdict, candidates)
    if accepted == pending + 1:  # everything, d_1 included: d_2..d_g stay as drafts
        first_new = last + 1 + pending
        decoder.share_drafts(first_new, first_new + drafted)
        decoder.settle(values, None, draft_stays_ahead=True)
        state.unverified, state.probs = drafted - 1, probs[1:]
    else:
        decoder.settle(values[:accepted], correction)
        state.reset()
    decoder.end_round(gamma, drafted, accepted, pending + 1)


def _closing_round(decoder: SpeculativeDecoder, state: ParallelState, last: int) -> None:
    """The round after the drafts reached column max_new_tokens - 2: the target verifies the
    unverified drafts u_1..u_k with a bonus row (a sequential round's verification; with
    k = 0 one plain target step) and nothing more is drafted."""
    pending = state.unverified
    if pending == 0:
        target_only_round(decoder, last)
        return
    accepted = verify_with_bonus(decoder, last, pending, state.probs)
    state.reset()
    decoder.end_round(0, 0, accepted, pending)


class _RoundVerification:
    """The verification of a round's candidates u_1..u_k, d_1 against the target's k + 1 rows
    (no bonus row: d_2 is the next candidate). In a pre-verify round it is issued as soon as d_1
    exists, on the target's stream, and its accepted count is copied to the host without
    waiting, so that drafting can stop once the host sees d_1 rejected."""

    def __init__(self, decoder: SpeculativeDecoder, state: ParallelState,
                 logits: torch.Tensor, last: int) -> None:
        self.decoder, self.state, self.logits, self.last = decoder, state, logits, last
        self._result: tuple | None = None
        self._ready: torch.cuda.Event | None = None
        self._host_accepted: torch.Tensor | None = None

    def first_draft_rejected(self, probs: list) -> bool:
        """Asked before each draft step after the first. Only a pre-verify round stops early (a
        post-verify round's block is wanted whenever u_1..u_k pass), and only on what is known:
        the host never waits for the verdict here."""
        if self.state.unverified > 0:
            return False
        if self._result is None:
            self._issue_early(probs)
        if self._ready is not None and not self._ready.query():
            return False
        return int(self._host_accepted[0]) == 0

    def verdict(self, probs: list) -> tuple:
        """(verdict, candidates on the target's device); issued on the current stream unless
        the early check issued it already."""
        if self._result is None:
            self._result = self._verify(probs)
        return self._result

    def _issue_early(self, probs: list) -> None:
        target, draft = self.decoder.target, self.decoder.draft
        if draft.stream is None:  # CPU: everything so far has run already
            self._result = self._verify(probs)
            self._host_accepted = self._result[0].num_accepted
            return
        first_draft_done = torch.cuda.Event()
        first_draft_done.record(draft.stream)
        with target.on_stream():
            target.stream.wait_event(first_draft_done)
            self._result = self._verify(probs)
            accepted = self._result[0].num_accepted
            # device="cpu": under torch.set_default_device("cuda") a pinned tensor without
            # one is made on the GPU and fails ("Only dense CPU tensors can be pinned").
            self._host_accepted = torch.empty(1, dtype=torch.int64, device="cpu",
                                              pin_memory=True)
            self._host_accepted.copy_(accepted, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(target.stream)

    def _verify(self, probs: list) -> tuple:
        decoder, first = self.decoder, self.last + 1
        count = self.state.unverified + 1
        decoder.share_drafts(first + count - 1, first + count)  # d_1, when on another device
        candidates = decoder.target.tokens[:, first:first + count]
        draft_probs = None
        if not decoder.acceptance.greedy:
            draft_probs = torch.stack(self.state.probs + probs[:1], dim=1)
        verdict = decoder.acceptance.verify(candidates, draft_probs, self.logits, bonus=False)
        return verdict, candidates

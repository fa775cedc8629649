"""The draft length g: fixed, or adapted at run time from the generation's own measurements.

Parallel decoding (PEARL's rule): the target verifies while the draft drafts the next block, and
the round takes max(T_verify, g * T_draft); g = T_verify / T_draft keeps both sides busy and
neither waiting.

Sequential decoding: the round takes g * T_draft + T_verify and emits on average
(1 - a^(g+1)) / (1 - a) tokens when each draft token is accepted with probability a (Leviathan et
al.'s expected block length); g is the length that maximises tokens per second.

Step times (PhaseClock) are smoothed over rounds. a is the rate per *judged* candidate (the
accepted ones and the first rejected one; those after a rejection were never judged): accepted /
drafted would read a = 0.9 at g = 8 as 0.64 and keep g far below its best. Its counts decay by
ACCEPTANCE_MEMORY a round, so that a ratio of sums over about ten rounds estimates it (a mean of
per-round ratios is both biased and too noisy to choose g from).
"""
from __future__ import annotations

import math

from hippo.errors import HippoError, is_int

MAX_DRAFT_LENGTH = 32  # a sequential verify step of g + 1 tokens stays within the runtime's 64
SMOOTHING = 0.5
ACCEPTANCE_MEMORY = 0.9
RULES = ("parallel", "sequential")


class DraftLength:
    """gamma: an int (fixed g) or "auto" (start at `initial`, then the rule of `mode`)."""

    def __init__(self, gamma: int | str = "auto", *, initial: int = 4, max_gamma: int = 12,
                 mode: str = "parallel") -> None:
        if gamma != "auto" and (not is_int(gamma) or not 1 <= gamma <= MAX_DRAFT_LENGTH):
            raise HippoError(f"gamma must be 'auto' or an int in 1..{MAX_DRAFT_LENGTH}, "
                             f"got {gamma!r}")
        if not is_int(max_gamma) or not 1 <= max_gamma <= MAX_DRAFT_LENGTH:
            raise HippoError(f"max_gamma must be an int in 1..{MAX_DRAFT_LENGTH}, got {max_gamma!r}")
        if not is_int(initial) or initial < 1:
            raise HippoError(f"initial must be an int of at least 1, got {initial!r}")
        if mode not in RULES:
            raise HippoError(f"unknown draft-length rule {mode!r}; choose one of {RULES}")
        self.adaptive = gamma == "auto"
        self.mode = mode
        self.max_gamma = max_gamma if self.adaptive else int(gamma)
        self.current = min(initial, max_gamma) if self.adaptive else int(gamma)
        self._target_step_s: float | None = None
        self._draft_step_s: float | None = None
        self._acceptance: float | None = None
        self._accepted = self._judged = 0.0

    def observe(self, target_step_s: float, draft_step_s: float, accepted: int = 0,
                drafted: int = 0) -> None:
        """One round's time per target step and per draft step (0: not seen), and how many of
        the `drafted` candidates it verified were accepted (fewer than all: the next was rejected)."""
        if not self.adaptive:
            return
        self._target_step_s = _smooth(self._target_step_s, target_step_s)
        self._draft_step_s = _smooth(self._draft_step_s, draft_step_s)
        if drafted > 0:
            judged = accepted + (1 if accepted < drafted else 0)
            self._accepted = ACCEPTANCE_MEMORY * self._accepted + accepted
            self._judged = ACCEPTANCE_MEMORY * self._judged + judged
            self._acceptance = self._accepted / self._judged
        if not (self._target_step_s and self._draft_step_s):
            return
        if self.mode == "parallel" or self._acceptance is None:
            ratio = self._target_step_s / self._draft_step_s
            self.current = max(1, min(self.max_gamma, round(ratio)))
        else:
            self.current = best_sequential_length(self._acceptance, self._target_step_s,
                                                  self._draft_step_s, self.max_gamma)


def best_sequential_length(acceptance: float, target_step_s: float, draft_step_s: float,
                           max_gamma: int) -> int:
    """argmax over g of expected tokens per round / round time, for sequential rounds."""
    def tokens_per_second(g: int) -> float:
        expected = g + 1 if acceptance >= 1.0 else (1 - acceptance ** (g + 1)) / (1 - acceptance)
        return expected / (g * draft_step_s + target_step_s)

    return max(range(1, max_gamma + 1), key=tokens_per_second)


def _smooth(previous: float | None, latest: float) -> float | None:
    """A step time into its running average; 0 (not seen), negative, NaN or inf leave it as it was."""
    if not math.isfinite(latest) or latest <= 0:
        return previous
    return latest if previous is None else SMOOTHING * previous + (1 - SMOOTHING) * latest

"""The draft length g: fixed, or adapted at run time as PEARL does (g near T_target / T_draft).

In parallel decoding the target verifies while the draft drafts the next block; the round takes
max(T_verify, g * T_draft), so g = T_verify / T_draft keeps both sides busy and neither waiting.
The step times come from the generation's own measurements (PhaseClock), smoothed.
"""
from __future__ import annotations

from hippo.models.base import HippoError

MAX_DRAFT_LENGTH = 32  # a sequential verify step of g + 1 tokens stays within the runtime's 64
SMOOTHING = 0.5


class DraftLength:
    """gamma: an int (fixed g) or "auto" (start at `initial`, then T_target / T_draft)."""

    def __init__(self, gamma: int | str = "auto", *, initial: int = 4,
                 max_gamma: int = 12) -> None:
        if gamma != "auto" and (not isinstance(gamma, int) or not 1 <= gamma <= MAX_DRAFT_LENGTH):
            raise HippoError(f"gamma must be 'auto' or an int in 1..{MAX_DRAFT_LENGTH}, "
                             f"got {gamma!r}")
        if not 1 <= max_gamma <= MAX_DRAFT_LENGTH:
            raise HippoError(f"max_gamma must lie in 1..{MAX_DRAFT_LENGTH}, got {max_gamma}")
        self.adaptive = gamma == "auto"
        self.max_gamma = max_gamma if self.adaptive else int(gamma)
        self.current = min(initial, max_gamma) if self.adaptive else int(gamma)
        self._target_step_s: float | None = None
        self._draft_step_s: float | None = None

    def observe(self, target_step_s: float, draft_step_s: float) -> None:
        """One round's time per target step and per draft step (either may be 0: not seen)."""
        if not self.adaptive:
            return
        self._target_step_s = _smooth(self._target_step_s, target_step_s)
        self._draft_step_s = _smooth(self._draft_step_s, draft_step_s)
        if self._target_step_s and self._draft_step_s:
            ratio = self._target_step_s / self._draft_step_s
            self.current = max(1, min(self.max_gamma, round(ratio)))


def _smooth(previous: float | None, latest: float) -> float | None:
    if latest <= 0:
        return previous
    return latest if previous is None else SMOOTHING * previous + (1 - SMOOTHING) * latest

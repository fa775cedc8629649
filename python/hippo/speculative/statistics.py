"""What one generation did and how long each part took."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    """Counts and times of one generation.

    tokens: generated tokens (the first comes from the target's prefill).
    target_steps: target forward steps after the prefill (decode or verify steps).
    drafted / accepted: draft candidates that were verified, and how many of them the target
        accepted (candidates drafted past a rejection are neither).
    reused_prompt_tokens: the prompt tokens (the video's prefix) whose keys and values the
        target's cache held from an earlier question about the same video (EncodedVideo).
    gammas: the draft length g of each round (mean_gamma: their mean), as a round shrinks it
        near max_new_tokens (0: a round that drafts nothing); a parallel round may draft fewer
        after an early stop (draft_steps counts the draft steps that ran).
    Times in seconds: prefill (target prefill to its first token), selection (token
    preservation), draft_prefill, draft and verify (busy time of each side; they overlap in
    parallel mode), decode (wall time of the decoding loop) and total (wall time of generate).
    """

    mode: str
    tokens: int = 0
    rounds: int = 0
    target_steps: int = 0
    draft_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0
    draft_prompt_tokens: int = 0
    gammas: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    selection_s: float = 0.0
    draft_prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0

    # Rates over nothing (a generation of one token: no step after the prefill; nothing drafted)
    # are None, not 0: a 0 would read as a measurement, and speedups from it as noise.
    @property
    def mean_accepted_tokens(self) -> float | None:
        """MAT: tokens emitted per target step after the prefill (1 for autoregressive decoding)."""
        return (self.tokens - 1) / self.target_steps if self.target_steps else None

    @property
    def decode_s_per_token(self) -> float | None:
        """Decoding time per token after the first (the prefill's): the rate speedups compare."""
        return self.decode_s / (self.tokens - 1) if self.tokens > 1 else None

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted; None where nothing was drafted (AR decoding)."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def mean_gamma(self) -> float | None:
        return sum(self.gammas) / len(self.gammas) if self.gammas else None

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("gammas")
        data.update(mean_accepted_tokens=self.mean_accepted_tokens,
                    acceptance_rate=self.acceptance_rate, tokens_per_s=self.tokens_per_s,
                    decode_s_per_token=self.decode_s_per_token,
                    mean_gamma=self.mean_gamma)
        return data

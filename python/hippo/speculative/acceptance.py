"""How tokens are chosen and checked: greedy or distribution-exact sampling.

One object serves both models of a speculative decoder, so the draft's proposals and the target's
verification apply the same temperature, top-k and top-p (HF's warpers, in HF's order, as the AR
baseline does). Verification is hippo_ext's fused ops: `verify_greedy` (argmax-and-compare) and
`verify_sampling` (accept while u <= p/q, then the residual norm(max(0, p - q))). Everything stays
on the device; the decoding loops read the result with one host synchronisation per round.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import hippo_ext
from hippo.errors import HippoError, is_int
from hippo.runtime.autoregressive import SamplingOptions, finite_rows, warp_logits


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] probabilities -> [B] one sample each, by the exponential race: argmax p_i / E_i
    with E_i ~ Exp(1) picks i with probability p_i / sum(p). Unlike torch.multinomial it never
    synchronises with the host, which keeps a round of drafting free of syncs."""
    race = torch.empty_like(probs).exponential_(generator=generator)
    # A zero draw would turn 0 / 0 into NaN, which argmax would pick: keep draws positive.
    race.clamp_min_(torch.finfo(race.dtype).tiny)
    return (probs / race).argmax(dim=-1)


@dataclass
class Verdict:
    """Device tensors [1] of one verification: how many candidates were accepted and the token
    emitted after them (a correction, or the bonus when all were and a bonus row was given);
    and, read with them, int64 flags: target_finite [rows], 1 where the target's row of logits
    is finite, draft_finite [m] (sampling), 1 where the distribution a candidate was drawn from
    is (None: not checked)."""

    num_accepted: torch.Tensor
    next_token: torch.Tensor
    target_finite: torch.Tensor | None = None
    draft_finite: torch.Tensor | None = None


class TokenAcceptance:
    """Draft proposals and their verification for one generation (batch 1).

    vocab: the target's vocabulary (its logits' width). The target's rows are used whole, so its
    choices are those of its own greedy decoding or sampling even where checkpoints of one family
    pad their tables differently (Qwen2.5-VL 7B 152064 ids, 3B 151936). A wider draft's logits
    are cut to it (ids the target cannot emit are not proposed); a narrower draft's
    probabilities are padded with zeros (ids it cannot propose).
    Random numbers come from one seeded generator per device, so a seeded generation repeats.
    """

    def __init__(self, options: SamplingOptions, vocab: int) -> None:
        if not isinstance(options, SamplingOptions):
            raise HippoError(f"options must be a SamplingOptions, got {type(options).__name__}")
        if not is_int(vocab) or vocab < 1:
            raise HippoError(f"vocab must be a positive integer (the target's logits width), "
                             f"got {vocab!r}")
        self.options = options
        self.vocab = vocab
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def greedy(self) -> bool:
        return self.options.greedy

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The generation's generator on `device` (None when greedy or unseeded)."""
        if self.greedy or self.options.seed is None:
            return None
        device = torch.device(device)
        if device not in self._generators:
            offset = len(self._generators)  # one independent stream per device
            self._generators[device] = torch.Generator(device).manual_seed(
                self.options.seed + 7919 * offset)
        return self._generators[device]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] logits -> float32 probabilities after the warpers (sampling only)."""
        o = self.options
        probs = torch.softmax(warp_logits(logits[..., :self.vocab], o.temperature, o.top_k, o.top_p),
                              dim=-1)
        missing = self.vocab - probs.shape[-1]
        return torch.nn.functional.pad(probs, (0, missing)) if missing > 0 else probs

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """[1, V] logits of the target -> [1] the token it emits (argmax or a sample)."""
        token, _ = self.propose(logits)
        return token

    def propose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[1, V] logits -> ([1] token, [1, V] the probabilities it was drawn from, None when
        greedy). No host synchronisation."""
        if self.greedy:
            return logits[..., :self.vocab].argmax(dim=-1), None
        probs = self.probabilities(logits)
        return sample_categorical(probs, self.generator(probs.device)), probs

    def verify(self, candidates: torch.Tensor, draft_probs: torch.Tensor | None,
               target_logits: torch.Tensor, *, bonus: bool) -> Verdict:
        """Check m candidate tokens against the target.

        candidates: [1, m] draft tokens (m >= 1), on the target's device.
        draft_probs: [1, m, V] the distributions they were drawn from (sampling only).
        target_logits: [1, m + 1, V] with bonus=True (row m gives the bonus token when all are
            accepted), [1, m, V] with bonus=False (all accepted: nothing more is emitted and
            next_token is meaningless; used by parallel decoding, whose next candidate is
            already drafted).
        """
        count = candidates.shape[1]
        rows = target_logits
        if not bonus:  # a row that is never read: verification wants m + 1 rows
            rows = torch.cat([rows, rows[:, -1:]], dim=1)
        if rows.shape[1] != count + 1:
            raise HippoError(f"verification of {count} candidates needs {count + 1} target rows "
                             f"(bonus) or {count} (no bonus), got {target_logits.shape[1]}")
        finite = finite_rows(target_logits[0], torch.int64)  # cat with the verdict's int64s
        if self.greedy:
            accepted, token = hippo_ext.verify_greedy(candidates, rows, check=False)
            return Verdict(accepted, token, finite)
        target_probs = self.probabilities(rows)
        draft_probs = draft_probs.to(target_probs.device)
        # A greedy draft's tokens are mere proposals (a broken draft's are rejected and the
        # output stays the target's), but a sampled candidate's distribution enters the
        # acceptance test: one that is not finite drew from no distribution at all.
        draft_finite = finite_rows(draft_probs[0], torch.int64)
        if not target_probs.is_cuda:
            # Non-finite logits (either model's) give NaN probabilities, which the CPU op's
            # value check refuses with a bare RuntimeError: zeros instead, and the decoder
            # refuses the round by name when it reads the finite flags with the verdict. (The
            # CUDA op checks no values: a NaN reads as a rejection there.)
            target_probs = torch.nan_to_num(target_probs, nan=0.0)
            draft_probs = torch.nan_to_num(draft_probs, nan=0.0)
        uniforms = torch.rand(1, count + 1, device=rows.device,
                              generator=self.generator(rows.device))
        accepted, token = hippo_ext.verify_sampling(
            candidates, draft_probs, target_probs, uniforms, check=False)
        return Verdict(accepted, token, finite, draft_finite)

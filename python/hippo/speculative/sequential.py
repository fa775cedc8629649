"""Sequential speculative decoding (the baseline HIPPO improves on): the draft proposes g tokens,
then one target step over g + 1 tokens verifies them and adds a correction or bonus token."""
from __future__ import annotations

import torch

from hippo.speculative.decoder import SpeculativeDecoder


def sequential_round(decoder: SpeculativeDecoder) -> None:
    """Draft g, verify g + 1, settle. g shrinks near max_new_tokens: a round never drafts what
    could not be emitted (at g = 0 it is one plain target step)."""
    last = len(decoder.emitted) - 1  # the newest emitted token: the target has not seen it
    gamma = min(decoder.draft_length.current, decoder.remaining - 1)
    if gamma == 0:
        target_only_round(decoder, last)
        return
    drafted, probs = decoder.draft_block(last, gamma)
    decoder.share_drafts(last + 1, last + 1 + drafted)
    accepted = verify_with_bonus(decoder, last, drafted, probs)
    decoder.end_round(gamma, drafted, accepted, drafted)


def verify_with_bonus(decoder: SpeculativeDecoder, last: int, count: int,
                      probs: list[torch.Tensor]) -> int:
    """One target step over the newest emitted token (column `last`) and the `count` drafts
    after it, already in the target's tokens (drawn from `probs` when sampling): the accepted
    drafts and the correction or bonus token are settled. Returns how many were accepted."""
    logits = decoder.target_step(last + 1 + count)
    candidates = decoder.target.tokens[:, last + 1:last + 1 + count]
    draft_probs = None if decoder.acceptance.greedy else torch.stack(probs, dim=1)
    verdict = decoder.acceptance.verify(candidates, draft_probs, logits, bonus=True)
    accepted, correction, values = decoder.read_verdict(verdict, candidates)
    decoder.settle(values[:accepted], correction)
    return accepted


def target_only_round(decoder: SpeculativeDecoder, last: int) -> None:
    """One autoregressive target step (the last token of a generation needs no draft)."""
    logits = decoder.target_step(last + 1)
    token = decoder.choose_alone(logits[:, -1], last + 1)
    decoder.settle([], token)
    decoder.end_round(0, 0)

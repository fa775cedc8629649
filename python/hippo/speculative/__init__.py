"""Speculative decoding over two runtimes: acceptance rules, sequential and parallel (HIPPO /
PEARL) decoding, draft-cache construction, adaptive draft length, statistics."""
from __future__ import annotations

from hippo.speculative.acceptance import SamplingOptions, TokenAcceptance
from hippo.speculative.draft_length import DraftLength
from hippo.speculative.statistics import GenerationStats

__all__ = ["DraftLength", "GenerationStats", "SamplingOptions", "TokenAcceptance"]

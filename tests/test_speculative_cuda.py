"""HIPPO decoding on a GPU (skipped without one): CUDA graphs for every step, the draft on its
own stream (or its own device), bf16.

In bf16 a verify step over g + 1 tokens and a one-token step can round differently, so HIPPO and
AR may part at a near-tie of the target's top two logits. Where they do, the test shows the tie
(the two logits within bf16 rounding of each other) and counts the cases; with
step_invariant=True (verify rows bitwise equal to single steps) they must not part at all.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from hippo.pipeline import HippoPipeline
from hippo.preserve import PreservationOptions
from hippo.runtime import LanguageModelRuntime
from hippo.speculative.divergence import find_parting
from hippo_testing import requires_cuda
from speculative_testing import FAMILY_PRESETS, make_pair, sample_frames

pytestmark = [pytest.mark.cuda, requires_cuda]
PROMPT = "what moves?"
MAX_NEW_TOKENS = 32


def _bf16_pair(family: str, seed: int):
    target, draft = make_pair(family, "perturbed-copy", seed, device="cuda")
    for adapter in (target, draft):
        adapter.model.to(torch.bfloat16)
    return target, draft


def _check_divergence(ar: HippoPipeline, frames, expected: list[int], got: list[int]) -> int:
    """0 when equal; 1 when they part at a near-tie (asserted); fails otherwise. `ar`: the
    pipeline whose AR generation gave `expected`."""
    parting = find_parting(ar.runtime("target"), ar.target.prepare(frames, PROMPT), expected, got)
    if parting is None:
        return 0
    assert parting.near_tie, f"HIPPO and AR {parting.describe()}"
    return 1


@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_bf16_greedy_equals_ar_up_to_near_ties(family):
    near_ties = runs = 0
    for seed in (0, 1):
        target, draft = _bf16_pair(family, seed)
        frames = sample_frames(family, 4)
        ar = HippoPipeline(target, draft, mode="ar")
        expected = ar.generate(frames, PROMPT, MAX_NEW_TOKENS).tokens
        for mode, prefill, gamma, keep in itertools.product(
                ("sequential", "parallel"), ("pruned", "full+compact"), (1, 3, 8), (0.1, 1.0)):
            out = HippoPipeline(target, draft, mode=mode, gamma=gamma, draft_prefill=prefill,
                                preservation=PreservationOptions(keep_ratio=keep)).generate(
                frames, PROMPT, MAX_NEW_TOKENS)
            near_ties += _check_divergence(ar, frames, expected, out.tokens)
            runs += 1
    print(f"{family}: {near_ties} of {runs} bf16 runs parted from AR at a near-tie")


def test_step_invariant_bf16_greedy_is_exact():
    """step_invariant rests on hippo_ext's decode_attention (head dims 64/80/128) and
    skinny_linear: an agreement pair with head_dim 64 in bf16, where a verify step's logits are
    bitwise those of single steps, so HIPPO equals AR exactly, near-ties included."""
    from hippo.models.agreement import AgreementPair, LanguageModelShape, synthetic_prompt
    from hippo.speculative.acceptance import SamplingOptions

    pair = AgreementPair(LanguageModelShape(256, 2, 4, 2, 512),
                         LanguageModelShape(128, 1, 2, 1, 256), eps=0.3, vocab=1000,
                         dtype=torch.bfloat16, device="cuda")
    prompts = [synthetic_prompt(adapter, frames=4, grid=(8, 8)) for adapter in (pair.target,
                                                                                pair.draft)]
    base = HippoPipeline(pair.target, pair.draft, mode="ar", step_invariant=True)
    expected = base.generate_prepared(*prompts, MAX_NEW_TOKENS, SamplingOptions(), set()).tokens
    for mode, gamma, priority in (("sequential", 4, False), ("parallel", 4, False),
                                  ("parallel", "auto", False), ("parallel", 4, True)):
        out = base.with_options(mode=mode, gamma=gamma, draft_priority=priority).generate_prepared(
            *prompts, MAX_NEW_TOKENS, SamplingOptions(), set())
        assert out.tokens == expected, (mode, gamma, priority)


def test_caches_of_exactly_the_fed_tokens_suffice_with_cuda_graphs(monkeypatch):
    """Runtimes sized to prompt + max_new_tokens - 1 (no granule rounding) with every step
    captured: capture_steps skips the sizes a short request has no room for, and the rounds
    never step beyond the room; each output equals AR's exactly (step_invariant)."""
    import hippo.pipeline as pipeline_module
    from hippo.models.agreement import AgreementPair, LanguageModelShape, synthetic_prompt
    from hippo.speculative.acceptance import SamplingOptions

    monkeypatch.setattr(pipeline_module, "CACHE_GRANULE", 1)
    pair = AgreementPair(LanguageModelShape(256, 2, 4, 2, 512),
                         LanguageModelShape(128, 1, 2, 1, 256), eps=0.3, vocab=1000,
                         dtype=torch.bfloat16, device="cuda")
    prompts = [synthetic_prompt(adapter, frames=2, grid=(4, 4)) for adapter in (pair.target,
                                                                                pair.draft)]
    expected = HippoPipeline(pair.target, pair.draft, mode="ar", step_invariant=True
                             ).generate_prepared(*prompts, 12, SamplingOptions(), set()).tokens
    for mode, gamma, new_tokens in itertools.product(("sequential", "parallel"),
                                                     (1, 4, 8, "auto"), (1, 2, 3, 5, 12)):
        pipeline = HippoPipeline(pair.target, pair.draft, mode=mode, gamma=gamma,
                                 step_invariant=True)
        out = pipeline.generate_prepared(*prompts, new_tokens, SamplingOptions(), set())
        case = (mode, gamma, new_tokens)
        assert out.tokens == expected[:new_tokens], case
        target = pipeline.runtime("target")
        assert target.cache.max_seq_len == prompts[0].length + new_tokens - 1, case


def test_parallel_rounds_overlap_on_two_streams_without_extra_syncs():
    """The draft's steps and the target's run on separate streams, each replaying its own
    graphs; a generation of many rounds finishes (the hang of graphs sharing a capture stream would not) and memory
    stays flat over repeated generations."""
    target, draft = _bf16_pair("qwen2_5_vl", 2)
    frames = sample_frames("qwen2_5_vl", 4)
    pipeline = HippoPipeline(target, draft, mode="parallel", gamma=4)
    first = pipeline.generate(frames, PROMPT, 64, eos_token_id=None)
    assert first.stats.rounds >= 63 // 4  # at most g tokens per parallel round
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    for _ in range(5):
        assert pipeline.generate(frames, PROMPT, 64, eos_token_id=None).tokens == first.tokens
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= baseline + (1 << 20)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_draft_on_another_device_is_lossless():
    target, draft = make_pair("llava_onevision", "perturbed-copy", 0, device="cuda:0")
    frames = sample_frames("llava_onevision", 3)
    expected = HippoPipeline(target, draft, mode="ar").generate(frames, PROMPT, 24).tokens
    out = HippoPipeline(target, draft, mode="parallel", gamma=3,
                        draft_device="cuda:1").generate(frames, PROMPT, 24)
    assert out.tokens == expected


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_at_most_one_host_synchronisation_per_round(monkeypatch, mode):
    """torch's sync debug mode flags every synchronising call inside the decoding loop; once
    the graphs of the step shapes are captured, a round may make one (reading its verdict)."""
    import warnings

    import hippo.speculative.decoder as decoder_module

    target, draft = _bf16_pair("llava_onevision", 3)
    frames = sample_frames("llava_onevision", 3)
    pipeline = HippoPipeline(target, draft, mode=mode, gamma=3)
    pipeline.generate(frames, PROMPT, 48, eos_token_id=None)  # captures every step shape
    original, flagged = decoder_module.run_decoding, []

    def run_decoding_watched(decoder, run_mode):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                original(decoder, run_mode)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        flagged.extend(w for w in caught if "synchroniz" in str(w.message))

    monkeypatch.setattr(decoder_module, "run_decoding", run_decoding_watched)
    out = pipeline.generate(frames, PROMPT, 48, eos_token_id=None)
    assert len(flagged) <= out.stats.rounds + 2, [str(w.message) for w in flagged[:3]]


def test_draft_priority_puts_the_draft_lane_on_a_high_priority_stream():
    from hippo.speculative.lanes import Lane
    target, _ = _bf16_pair("llava_onevision", 1)
    runtime = LanguageModelRuntime.from_hf(target.model, max_seq_len=16)
    positions = torch.arange(8)[None]
    normal = Lane(runtime, 0, positions, 8)
    high = Lane(runtime, 0, positions, 8, high_priority=True)
    assert high.stream.priority < normal.stream.priority == 0

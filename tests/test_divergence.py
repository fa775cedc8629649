"""hippo.speculative.divergence: where a greedy output parts from the target's, and by how much."""
from __future__ import annotations

import math

import pytest
import torch

from hippo.models import load_adapter
from hippo.runtime import LanguageModelRuntime
from hippo.speculative import divergence
from hippo.speculative.divergence import (Parting, find_parting, first_difference,
                                          rounding_step)
from speculative_testing import sample_frames


@pytest.mark.parametrize("expected,got,index", [
    ([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 5, 3], 1), ([4], [5], 0),
    ([1, 2, 3], [1, 2], 2), ([1], [1, 2], 1), ([], [], None)])
def test_first_difference(expected, got, index):
    assert first_difference(expected, got) == index


@pytest.mark.parametrize("value,dtype,step", [
    (1.0, torch.bfloat16, 2.0 ** -7), (3.0, torch.bfloat16, 2.0 ** -6),
    (-0.3, torch.bfloat16, 2.0 ** -9), (1.5, torch.float16, 2.0 ** -10),
    (100.0, torch.float32, 2.0 ** -17), (0.0, torch.bfloat16, 2.0 ** -8)])
def test_rounding_step_is_the_dtype_spacing(value, dtype, step):
    assert rounding_step(value, dtype) == step
    if value != 0:  # the next representable number above |value| (rounded) is one step away
        x = torch.tensor(abs(value), dtype=dtype)
        above = torch.nextafter(x, torch.tensor(math.inf, dtype=dtype))
        assert float(above) - float(x) == step


def test_near_tie_is_a_small_non_negative_gap():
    assert Parting(3, 7, 9, 1.5, torch.bfloat16).near_tie
    assert Parting(3, 7, 9, 0.0, torch.bfloat16).near_tie
    assert not Parting(3, 7, 9, 2.5, torch.bfloat16).near_tie
    for dtype in (torch.bfloat16, torch.float16, torch.float64):  # float64: the 2-step default
        assert Parting(3, 7, 9, 2.0, dtype).near_tie and not Parting(3, 7, 9, 2.5, dtype).near_tie
    below = Parting(3, 7, 9, -1.0, torch.bfloat16)  # AR's own arithmetic cannot give this
    assert not below.near_tie and "disagrees" in below.describe()
    assert "NOT a near-tie" in Parting(3, 7, None, math.inf, torch.bfloat16).describe()
    for steps in (0.0, 0.5):  # no gap, or under a step: a tie, not a disagreement
        assert Parting(3, 7, 9, steps, torch.bfloat16).describe().endswith(
            "rounding steps, a near-tie")


def _runtime_and_prompt(preset: str, family: str):
    torch.manual_seed(0)
    target = load_adapter(preset)
    prompt = target.prepare(sample_frames(family, 2), "what moves?")
    return target, LanguageModelRuntime.from_hf(target.model, max_seq_len=prompt.length + 16), prompt


@pytest.mark.parametrize("preset,family", [("tiny-qwen2.5-vl", "qwen2_5_vl"),
                                           ("tiny-llava-onevision", "llava_onevision")])
def test_find_parting_measures_the_targets_logit_gap(preset, family):
    """The margin is the target's own logit gap between the two tokens after the shared prefix
    (checked against the HF forward of the whole sequence), in float32 rounding steps."""
    target, runtime, prompt = _runtime_and_prompt(preset, family)
    vocab = target.model.get_input_embeddings().num_embeddings
    expected = torch.randint(0, vocab, (6,)).tolist()
    got = expected[:3] + [(expected[3] + 1) % vocab] + expected[4:]
    assert find_parting(runtime, prompt, expected, list(expected)) is None

    parting = find_parting(runtime, prompt, expected, got)
    assert (parting.index, parting.expected, parting.got) == (3, expected[3], got[3])
    embeds = torch.cat([prompt.inputs_embeds,
                        target.model.get_input_embeddings()(torch.tensor([expected[:3]]))], 1)
    positions = torch.cat([prompt.position_ids, prompt.generated_positions(0, 3)], -1)
    with torch.no_grad():
        logits = target.model(inputs_embeds=embeds, position_ids=positions).logits[0, -1]
    mine, other = float(logits[expected[3]]), float(logits[got[3]])
    margin = (mine - other) / rounding_step(max(abs(mine), abs(other)), torch.float32)
    assert parting.margin_steps == pytest.approx(margin, rel=1e-3, abs=50)


@pytest.mark.parametrize("gap_steps,near_tie", [(0, True), (1, True), (8, True), (64, True),
                                                (65, False), (-1, False)])
def test_find_parting_calls_a_gap_of_up_to_64_float32_steps_a_tie(monkeypatch, gap_steps,
                                                                   near_tie):
    """The verdict on logits whose two tokens lie a known number of float32 steps apart (a
    verify step's differently ordered sums reach several in fp32; bf16: two, above)."""
    _, runtime, prompt = _runtime_and_prompt("tiny-qwen2.5-vl", "qwen2_5_vl")
    logits = torch.zeros(32)
    logits[5] = 1.5
    logits[9] = 1.5 - gap_steps * 2.0 ** -23  # float32 spacing in [1, 2)
    monkeypatch.setattr(divergence, "target_logits_after", lambda *args: logits)
    parting = find_parting(runtime, prompt, [1, 5, 2], [1, 9, 2])
    assert parting.margin_steps == gap_steps and parting.near_tie == near_tie


def test_an_output_that_ends_early_is_no_tie():
    _, runtime, prompt = _runtime_and_prompt("tiny-qwen2.5-vl", "qwen2_5_vl")
    parting = find_parting(runtime, prompt, [5, 6, 7], [5, 6])
    assert parting.index == 2 and parting.got is None and not parting.near_tie
    parting = find_parting(runtime, prompt, [5, 6], [5, 6, 7])  # AR's output ended first
    assert (parting.index, parting.expected, parting.got) == (2, None, 7)
    assert parting.margin_steps == math.inf and not parting.near_tie


def test_a_replica_recomputes_its_runtime_bit_for_bit():
    """find_parting's recomputation runs on a replica of AR's runtime: the same logits."""
    _, runtime, prompt = _runtime_and_prompt("tiny-llava-onevision", "llava_onevision")
    tokens = [3, 1, 4]
    first = divergence.target_logits_after(runtime, prompt, tokens)
    runtime.prefill(prompt.inputs_embeds, prompt.position_ids)
    positions = prompt.generated_positions(0, 3)
    for index, token in enumerate(tokens):
        logits = runtime.step(torch.tensor([[token]]), positions[..., index:index + 1])[0, -1]
    assert torch.equal(first, logits.float())


def test_step_invariance_makes_near_ties_harmless_on_the_cpu():
    """A target whose output head gives a token, a few fp32 steps apart, the same logit as the
    one AR picks: a verify step may then pick the other (CPU BLAS and SDPA round a row by the
    step's size), which must be a near-tie; with step_invariant=True speculative decoding is
    AR bit for bit."""
    from hippo.pipeline import HippoPipeline
    from hippo.preserve import PreservationOptions

    frames = sample_frames("qwen2_5_vl", 2)
    target = load_adapter("tiny-qwen2.5-vl", seed=0)
    head = target.model.lm_head.weight
    original = head.detach().clone()
    chosen = HippoPipeline(target, None, mode="ar").generate(
        frames, "what moves?", 8, eos_token_id=None).tokens[6]
    rival = (chosen + 37) % head.shape[0]
    direction = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0))
    partings = []
    for offset in (-4e-8, -2e-8, 2e-8, 4e-8):
        with torch.no_grad():
            head.copy_(original)
            head[rival] = original[chosen] + offset * direction
        for step_invariant in (False, True):
            ar = HippoPipeline(target, None, mode="ar", step_invariant=step_invariant)
            expected = ar.generate(frames, "what moves?", 16, eos_token_id=None).tokens
            for gamma in (4, 8):
                out = HippoPipeline(target, None, mode="parallel", gamma=gamma,
                                    step_invariant=step_invariant,
                                    preservation=PreservationOptions(keep_ratio=1.0)).generate(
                    frames, "what moves?", 16, eos_token_id=None).tokens
                if step_invariant:
                    assert out == expected, f"offset {offset}, gamma {gamma}"
                elif out != expected:
                    parting = find_parting(ar.runtime("target"),
                                           ar.prepare(frames, "what moves?")[0], expected, out)
                    assert parting.near_tie, parting.describe()
                    partings.append(parting)
    print(f"{len(partings)} default runs parted from AR, each at a near-tie")

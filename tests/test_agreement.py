"""The synthetic agreement pair: identical logits when the layers are scaled away, agreement that
falls as eps grows, and speculative decoding over it that stays lossless (what `hippo bench` and
benchmarks/bench_speculative.py time)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hippo.models.agreement import TINY_DRAFT, TINY_TARGET, AgreementPair, synthetic_prompt
from hippo.pipeline import HippoPipeline
from hippo.speculative.acceptance import SamplingOptions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair():
    return AgreementPair(TINY_TARGET, TINY_DRAFT, eps=1e-6, vocab=300, seed=0)


def _next_token_agreement(pair, ids: torch.Tensor) -> float:
    with torch.no_grad():
        target = pair.target.model(ids).logits.argmax(-1)
        draft = pair.draft.model(ids).logits.argmax(-1)
    return float((target == draft).float().mean())


def test_logits_agree_when_layers_are_scaled_away(pair):
    pair.set_eps(1e-6)
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target, draft = pair.target.model(ids).logits, pair.draft.model(ids).logits
    torch.testing.assert_close(target, draft, rtol=1e-3, atol=1e-3)


def test_agreement_falls_as_eps_grows(pair):
    ids = torch.randint(0, 300, (4, 64), generator=torch.Generator().manual_seed(1))
    agreement = []
    for eps in (1e-6, 0.3, 1.0, 4.0):
        pair.set_eps(eps)
        agreement.append(_next_token_agreement(pair, ids))
    assert agreement[0] == 1.0
    assert agreement == sorted(agreement, reverse=True) and agreement[-1] < 0.5
    with pytest.raises(ValueError, match="positive"):
        pair.set_eps(0.0)


def test_speculative_decoding_over_the_pair_is_lossless(pair):
    pair.set_eps(0.3)
    prompts = [synthetic_prompt(adapter, frames=3, grid=(4, 4)) for adapter in (pair.target,
                                                                                pair.draft)]
    pipeline = HippoPipeline(pair.target, pair.draft, mode="ar")
    expected = pipeline.generate_prepared(*prompts, 40, SamplingOptions(), set()).tokens
    for mode in ("sequential", "parallel"):
        out = pipeline.with_options(mode=mode, gamma=4).generate_prepared(
            *prompts, 40, SamplingOptions(), set())
        assert out.tokens == expected
        assert out.stats.mean_accepted_tokens > 1.5  # the pair agrees often at this eps


def test_bench_speculative_runs_on_the_cpu(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_speculative.py"), "--preset", "tiny",
         "--eps", "0.3", "--gammas", "3", "--new-tokens", "24", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": f"{ROOT / 'python'}:{ROOT}"})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["method"] for row in rows] == ["ar", "sequential g=3", "parallel g=3",
                                               "parallel g=auto"]
    assert all(row["matches_ar"] for row in rows)
    assert "| method |" in result.stdout


def test_hf_assisted_baseline_drafts_gamma_tokens_per_round(pair):
    """`hippo bench`'s hf_assisted row is labelled with its g: each round must draft g tokens.
    HF's default assistant_confidence_threshold (0.4) stopped every round after one draft token
    on this pair (its distributions are near-flat), so the baseline ran at g = 1."""
    from hippo.bench.hf_baselines import hf_generate

    pair.set_eps(1e-6)  # the two agree: every drafted token is accepted
    prompt = synthetic_prompt(pair.target, frames=2, grid=(2, 2))
    model, widths = pair.target.model, []
    forward = model.forward

    def recording_forward(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    model.forward = recording_forward
    try:
        run = hf_generate(model, prompt.input_ids, 16, assistant=pair.draft.model,
                          num_assistant_tokens=4)
    finally:
        del model.forward
    assert len(run.tokens) == 16
    last_prefill = max(i for i, width in enumerate(widths) if width >= prompt.length)
    timed = widths[last_prefill:]  # the timed 16-token call: its first round, then the next
    assert timed[:3] == [prompt.length + 4, 5, 5], widths  # 4 drafted tokens in each round

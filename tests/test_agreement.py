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


def test_hf_baselines_time_decoding_without_the_prefill(monkeypatch):
    """Decode time per token is (t(n tokens) - t(1 token)) / (n - 1), after a warm-up, on a
    simulated clock: each generate call costs 0.5 s of prefill and 0.25 s per token. A model
    without a pad id gets 0; with an assistant, HF drafts a constant g at no threshold."""
    from types import SimpleNamespace

    from hippo.bench import hf_baselines

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(hf_baselines, "time", SimpleNamespace(perf_counter=lambda: clock.now))

    class Model:
        def __init__(self, pad_token_id):
            self.generation_config = SimpleNamespace(pad_token_id=pad_token_id)
            self.calls = []

        def generate(self, *, input_ids, attention_mask, max_new_tokens, min_new_tokens,
                     do_sample, **kwargs):
            assert torch.equal(attention_mask, torch.ones_like(input_ids)) and not do_sample
            self.calls.append((max_new_tokens, min_new_tokens, kwargs))
            clock.now += 0.5 + 0.25 * max_new_tokens
            return torch.cat([input_ids, 100 + torch.arange(max_new_tokens)[None]], dim=1)

    model, prompt = Model(None), torch.tensor([[7, 8, 9]])
    run = hf_baselines.hf_generate(model, prompt, 9)
    assert run.tokens == list(range(100, 109))
    assert run.total_s == pytest.approx(0.5 + 9 * 0.25)
    assert run.decode_s_per_token == pytest.approx(0.25)
    assert model.calls == [(n, n, dict(pad_token_id=0)) for n in (2, 1, 9)]  # warm-up first
    assert hf_baselines.hf_generate(model, prompt, 2).decode_s_per_token == pytest.approx(0.25)
    assert hf_baselines.hf_generate(model, prompt, 1).decode_s_per_token == 0.0

    model, assistant = Model(3), Model(None)
    assistant.generation_config.assistant_confidence_threshold = 0.4
    hf_baselines.hf_generate(model, prompt, 4, assistant=assistant, num_assistant_tokens=5)
    assert model.calls[-1] == (4, 4, dict(assistant_model=assistant, pad_token_id=3))
    config = assistant.generation_config
    assert (config.num_assistant_tokens, config.num_assistant_tokens_schedule,
            config.assistant_confidence_threshold) == (5, "constant", 0.0)


@pytest.mark.parametrize("eps", [-1.0, float("inf"), float("nan")])
def test_eps_must_be_positive_and_finite(pair, eps):
    """A refused eps leaves the pair as it was (a NaN or infinite scale could not be undone)."""
    pair.set_eps(0.3)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = pair.target.model(ids).logits
    with pytest.raises(ValueError, match="positive and finite"):
        pair.set_eps(eps)
    assert pair.eps == 0.3
    with torch.no_grad():
        torch.testing.assert_close(pair.target.model(ids).logits, before, rtol=0, atol=0)


def test_setting_eps_scales_from_the_current_one(pair):
    """set_eps is absolute: the same eps gives the same logits however it was reached."""
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pair.set_eps(0.5)
        direct = pair.draft.model(ids).logits, pair.target.model(ids).logits
        pair.set_eps(2.0)
        pair.set_eps(0.5)
        again = pair.draft.model(ids).logits, pair.target.model(ids).logits
    for first, second in zip(direct, again):
        torch.testing.assert_close(second, first, rtol=1e-4, atol=1e-5)


def test_the_synthetic_prompt_is_a_seeded_video_prompt(pair):
    """text_before text tokens, frames x Hg x Wg visual tokens, text_after text tokens; the
    embeddings are the model's of the ids; the same seed gives the same prompt."""
    prompt = synthetic_prompt(pair.target, frames=3, grid=(2, 4), text_before=5, text_after=7,
                              feature_dim=6, seed=4)
    assert prompt.length == 5 + 3 * 2 * 4 + 7 and prompt.input_ids.shape == (1, prompt.length)
    assert (prompt.visual_start, prompt.num_visual, prompt.grid) == (5, 24, (3, 2, 4))
    assert int(prompt.input_ids.min()) >= 0 and int(prompt.input_ids.max()) < 300
    assert torch.equal(prompt.position_ids, torch.arange(prompt.length)[None])
    assert prompt.rope_delta == 0
    assert prompt.visual_features.shape == (3, 2, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(prompt.inputs_embeds,
                                   pair.target.text_model.embed_tokens(prompt.input_ids))
    same = synthetic_prompt(pair.target, frames=3, grid=(2, 4), text_before=5, text_after=7,
                            feature_dim=6, seed=4)
    assert torch.equal(same.input_ids, prompt.input_ids)
    assert torch.equal(same.visual_features, prompt.visual_features)
    other = synthetic_prompt(pair.target, frames=3, grid=(2, 4), text_before=5, text_after=7,
                             feature_dim=6, seed=5)
    assert not torch.equal(other.input_ids, prompt.input_ids)
    default = synthetic_prompt(pair.draft, frames=1, grid=(2, 2))
    assert (default.visual_start, default.length, default.visual_features.shape[-1]) == (16, 52, 64)


def test_a_video_llm_pair_agrees_on_the_video_too():
    """agreement_adapters (the demo's pair): with the layers scaled away, the target's prompt
    embeddings, visual ones included, are the draft's lifted (same inner products) and the two
    give the same logits for a real video prompt."""
    from hippo.assets import sample_video_path
    from hippo.models.agreement import agreement_adapters
    from hippo.video import load_video

    target, draft, knob = agreement_adapters("tiny-qwen2.5-vl", "tiny-qwen2.5-vl-draft", 1e-6)
    assert knob.eps == 1e-6
    frames = load_video(sample_video_path(), num_frames=4)
    prompts = [adapter.prepare(frames, [7, 8, 9]) for adapter in (target, draft)]
    assert prompts[0].num_visual == prompts[1].num_visual > 0
    assert torch.equal(prompts[0].input_ids, prompts[1].input_ids)
    embeds_t, embeds_d = (prompt.inputs_embeds[0].float() for prompt in prompts)
    assert embeds_t.shape[-1] != embeds_d.shape[-1]
    torch.testing.assert_close(embeds_t @ embeds_t.T, embeds_d @ embeds_d.T, rtol=1e-4, atol=1e-4)
    logits = []
    with torch.no_grad():
        for adapter, prompt in zip((target, draft), prompts):
            hidden = adapter.text_model(inputs_embeds=prompt.inputs_embeds,
                                        position_ids=prompt.position_ids).last_hidden_state
            logits.append(adapter.lm_head(hidden))
    # Up to the final RMSNorm's eps, which weighs more in the wider model's mean square of the
    # visual tokens' small embeddings (about 1% of their logits here; text tokens agree exactly).
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-2)
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))

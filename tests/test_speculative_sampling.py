"""Distribution-exact sampling: over many seeded runs on a tiny vocabulary, the tokens that
speculative decoding emits are distributed as the target's own samples (with the same
temperature, top-k and top-p), for sequential and parallel decoding.

The exact distributions are enumerated from the target's forward; the empirical counts must pass
a chi-square test at a false-alarm rate of 1e-4 (the seeds are fixed, so the outcome is too). A
draft that disagrees strongly with the target makes a wrong acceptance rule or residual visible:
test_the_check_catches_a_wrong_residual shows this bound failing for one, and the perturbed
draft makes parallel decoding's post-verify rounds frequent (a wrong draft distribution for the
candidate drafted during verification was seen to fail it by a factor of three). Longer blocks
(g = 3) with an eos, and one test through the whole video pipeline (a pruned draft prompt, the
warp's top-3 keeping the large vocabulary enumerable), check the same way.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

from hippo.runtime import LanguageModelRuntime, warp_logits
from hippo.speculative.acceptance import SamplingOptions, TokenAcceptance, sample_categorical
from hippo.speculative.decoder import decode_after_prefill
from hippo.speculative.draft_length import DraftLength
from hippo_testing import chi_square_critical, requires_cuda
from speculative_testing import make_pair, make_pipeline, sample_frames

VOCAB = 7
PROMPT = [3, 1, 4]
RUNS = 2500
GENERATED = 4  # token 0 comes from the prefill, tokens 1-3 from speculative rounds
STOP = VOCAB  # the "no token" symbol after an eos
WARPS = [dict(temperature=1.0), dict(temperature=0.8, top_k=5, top_p=0.95)]


def _tiny_lm(seed: int, hidden: int, layers: int, logit_scale: float, vocab: int = VOCAB):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # peaked, model-specific distributions: target and draft disagree
        model.lm_head.weight.mul_(logit_scale)
    return model


def _perturbed_copy(seed: int, noise: float):
    """The target plus noise: a draft that agrees often, so post-verify rounds are common."""
    model = _tiny_lm(seed, 32, 2, 10.0)
    generator = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=generator) * noise * param.std())
    return model


@pytest.fixture(scope="module")
def target_model():
    return _tiny_lm(0, 32, 2, 10.0)


DRAFTS = {  # an independent small model (agrees rarely) and a perturbed copy (agrees often)
    "independent": lambda: _tiny_lm(1, 16, 1, 10.0),
    "perturbed": lambda: _perturbed_copy(0, 0.3),
}


def _exact_distribution(model, warp: dict, generated: int = GENERATED,
                        eos: int | None = None) -> torch.Tensor:
    """P(tokens 0..generated-1) of the target's own sampling, [V + 1] * generated in float64.
    A generation that stops after an eos at token k shows STOP in tokens k+1.. (counts are
    padded the same way); without eos the STOP cells are zero."""
    options = SamplingOptions(**warp)
    prefixes = torch.tensor(list(itertools.product(range(VOCAB), repeat=generated - 1)))
    prompts = torch.tensor(PROMPT).expand(prefixes.shape[0], -1)
    with torch.no_grad():  # every prefix in one batch: row i of the logits gives token i
        logits = model(torch.cat([prompts, prefixes], dim=1)).logits[:, len(PROMPT) - 1:]
    probs = torch.softmax(warp_logits(logits.double(), options.temperature, options.top_k,
                                      options.top_p), dim=-1)  # [V^(n-1), n, V]
    chosen = probs[:, :-1].gather(-1, prefixes[..., None])[..., 0].prod(dim=-1)
    joint = (chosen[:, None] * probs[:, -1]).reshape((VOCAB,) * generated)
    if eos is None:
        return torch.nn.functional.pad(joint, (0, 1) * generated)
    padded = torch.zeros((VOCAB + 1,) * generated, dtype=torch.float64)
    for tokens in itertools.product(range(VOCAB), repeat=generated):
        padded[_padded(list(tokens), eos, generated)] += joint[tokens]
    return padded


def _padded(tokens: list[int], eos: int | None, generated: int) -> tuple[int, ...]:
    """tokens cut after their first eos, then padded with STOP to `generated`."""
    if eos is not None and eos in tokens:
        tokens = tokens[:tokens.index(eos) + 1]
    return tuple(tokens) + (STOP,) * (generated - len(tokens))


def _sample_runs(target_model, draft_model, mode: str, warp: dict, runs: int,
                 acceptance_factory=TokenAcceptance, gamma: int | str = 2,
                 generated: int = GENERATED, eos: int | None = None) -> torch.Tensor:
    """Counts [V + 1] * generated of the emitted tokens over `runs` seeded generations, on the
    models' device (on CUDA: graph-captured steps, parallel rounds on two streams)."""
    target = LanguageModelRuntime.from_hf(target_model, 32)
    draft = LanguageModelRuntime.from_hf(draft_model, 32)
    device = target.device
    ids = torch.tensor([PROMPT], device=device)
    positions = torch.arange(len(PROMPT), device=device)[None]
    positions_after = torch.arange(len(PROMPT), len(PROMPT) + 20, device=device)[None]
    counts = torch.zeros((VOCAB + 1,) * generated, dtype=torch.int64)
    eos_ids = set() if eos is None else {eos}
    for seed in range(runs):
        acceptance = acceptance_factory(SamplingOptions(**warp, seed=seed), VOCAB)
        target.reset()
        draft.reset()
        logits = target.prefill(target.embed(ids), positions).logits
        draft.prefill(draft.embed(ids), positions)
        first = acceptance.choose(logits[:, -1])
        decoder = decode_after_prefill(
            target, draft, first, positions_after, mode=mode, acceptance=acceptance,
            draft_length=DraftLength(gamma, initial=2, max_gamma=4, mode=mode),
            max_new_tokens=generated, eos_ids=eos_ids)
        assert decoder.emitted == list(_padded(decoder.emitted, eos, len(decoder.emitted)))
        counts[_padded(decoder.emitted, eos, generated)] += 1
    return counts


def _marginals_pass(counts: torch.Tensor, exact: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """The chi-square test on the joint of tokens `dims`."""
    others = tuple(d for d in range(counts.dim()) if d not in dims)
    return _chi_square_passes(counts.sum(dim=others), exact.sum(dim=others))


def _chi_square_passes(counts: torch.Tensor, probs: torch.Tensor, alpha_z: float = 3.719) -> bool:
    """Pearson's chi-square against `probs`, cells with expected counts under 5 pooled; the
    critical value is Wilson-Hilferty's approximation at z (3.719: a one-sided 1e-4)."""
    total = int(counts.sum())
    expected = probs.flatten() * total
    observed = counts.flatten().double()
    small = expected < 5
    cells_e = torch.cat([expected[~small], expected[small].sum()[None]])
    cells_o = torch.cat([observed[~small], observed[small].sum()[None]])
    keep = cells_e > 0
    if bool((cells_o[~keep] > 0).any()):
        return False  # a token the target never samples
    cells_e, cells_o = cells_e[keep], cells_o[keep]
    statistic = float(((cells_o - cells_e) ** 2 / cells_e).sum())
    return statistic < chi_square_critical(cells_e.numel() - 1, z=alpha_z)


@pytest.mark.parametrize("warp", WARPS, ids=["t1", "t0.8-k5-p0.95"])
@pytest.mark.parametrize("draft", sorted(DRAFTS))
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_sampling_matches_target_distribution(target_model, mode, draft, warp):
    draft_model = DRAFTS[draft]()
    exact = _exact_distribution(target_model, warp)
    counts = _sample_runs(target_model, draft_model, mode, warp, RUNS)
    # Each speculative token marginally, and the first two jointly. With g = 2, parallel
    # decoding's pre-verify rounds and post-verify rounds (after a full acceptance) both emit.
    for token in range(1, GENERATED):
        assert _marginals_pass(counts, exact, (token,)), token
    assert _marginals_pass(counts, exact, (1, 2))


@pytest.mark.parametrize("mode, gamma", [("sequential", 1), ("parallel", 1), ("parallel", "auto")])
def test_sampling_matches_target_distribution_at_other_draft_lengths(target_model, mode, gamma):
    """g = 1 (every round one candidate, parallel rounds all pre-/post-verify of one token) and
    an adaptive g (parallel: it follows the measured step times, from 2 up to 4)."""
    warp = WARPS[1]
    exact = _exact_distribution(target_model, warp)
    counts = _sample_runs(target_model, DRAFTS["perturbed"](), mode, warp, RUNS, gamma=gamma)
    for token in range(1, GENERATED):
        assert _marginals_pass(counts, exact, (token,)), token
    assert _marginals_pass(counts, exact, (1, 2))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_cuda_sampling_matches_target_distribution(target_model, mode):
    """The same check on the GPU, where steps replay CUDA graphs, parallel rounds run the draft
    on its own stream and the random numbers come from the device's generator."""
    warp = WARPS[1]
    exact = _exact_distribution(target_model, warp)
    counts = _sample_runs(copy.deepcopy(target_model).cuda(), DRAFTS["perturbed"]().cuda(), mode,
                          warp, RUNS)
    for token in range(1, GENERATED):
        assert _marginals_pass(counts, exact, (token,)), token
    assert _marginals_pass(counts, exact, (1, 2))


@pytest.mark.parametrize("draft_vocab, mode", [(5, "sequential"), (9, "parallel")])
def test_sampling_with_a_draft_of_another_table_width(target_model, draft_vocab, mode):
    """Checkpoints of one family pad their vocabularies differently (Qwen2.5-VL 7B 152064 ids,
    3B 151936): the target samples from its whole table, whether the draft's is narrower (it
    never proposes the target's last ids) or wider (ids the target lacks)."""
    warp = WARPS[0]
    exact = _exact_distribution(target_model, warp)
    counts = _sample_runs(target_model, _tiny_lm(1, 16, 1, 10.0, vocab=draft_vocab), mode, warp,
                          RUNS)
    for token in range(1, GENERATED):
        assert _marginals_pass(counts, exact, (token,)), token
    assert _marginals_pass(counts, exact, (1, 2))


LONG_BLOCK = 3
LONG_GENERATED = 5  # a sequential round drafts tokens 1-3 and verifies them in one step
EOS = 2


@pytest.mark.parametrize("draft", sorted(DRAFTS))
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_sampling_with_longer_blocks_and_an_eos(target_model, mode, draft):
    """g = 3 (a rejection at the second or third draft of a block; carried draft distributions
    two deep in parallel decoding) with an eos that stops generations at any token."""
    warp = WARPS[1]
    exact = _exact_distribution(target_model, warp, LONG_GENERATED, EOS)
    stopped_early = float(exact[(slice(None),) * (LONG_GENERATED - 1) + (STOP,)].sum())
    assert 0.2 < stopped_early < 0.8  # the eos matters: neither rare nor certain
    counts = _sample_runs(target_model, DRAFTS[draft](), mode, warp, RUNS, gamma=LONG_BLOCK,
                          generated=LONG_GENERATED, eos=EOS)
    for token in range(1, LONG_GENERATED):
        assert _marginals_pass(counts, exact, (token,)), token
    for pair in ((1, 2), (2, 3), (3, 4)):
        assert _marginals_pass(counts, exact, pair), pair


def test_a_zero_exponential_draw_never_picks_a_token_of_probability_zero(monkeypatch):
    """sample_categorical races p_i / E_i; a draw E_i of exactly 0 would make 0 / 0 a NaN,
    which argmax picks (a token the target never samples): the race keeps its draws positive."""
    monkeypatch.setattr(torch.Tensor, "exponential_",
                        lambda self, generator=None: self.zero_())
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75], [0.0, 0.0, 1.0, 0.0]])
    assert sample_categorical(probs, None).tolist() == [3, 2]


class _ResidualFromTarget(TokenAcceptance):
    """A classic bug: after a rejection, sample from p instead of norm(max(0, p - q))."""

    def verify(self, candidates, draft_probs, target_logits, *, bonus):
        verdict = super().verify(candidates, draft_probs, target_logits, bonus=bonus)
        probs = self.probabilities(target_logits[:, :candidates.shape[1] + int(bonus)])
        row = probs[0, min(int(verdict.num_accepted), probs.shape[1] - 1)]
        verdict.next_token = torch.multinomial(row, 1, generator=self.generator(row.device))
        return verdict


def test_the_check_catches_a_wrong_residual(target_model):
    draft_model = DRAFTS["independent"]()
    warp = WARPS[0]
    exact = _exact_distribution(target_model, warp)
    counts = _sample_runs(target_model, draft_model, "sequential", warp, RUNS,
                          acceptance_factory=_ResidualFromTarget)
    assert not _marginals_pass(counts, exact, (1,))


# Through the whole video pipeline: a video-LLM pair, the draft on its pruned prompt (other
# positions, fewer tokens). The vocabulary is large, so the warp keeps it enumerable: top-3 at a
# low temperature (the tiny models' flat distributions would accept nearly every draft at 1.0).
VIDEO_WARP = dict(temperature=0.1, top_k=3)
VIDEO_TOKENS = 4
VIDEO_RUNS = 2000


def _exact_video_distribution(adapter, prompt, warp: dict, count: int) -> dict[tuple, float]:
    """{tokens 0..count-1: probability} of the target's own sampling after a prepared prompt,
    enumerated over the warp's support with the target's runtime."""
    options = SamplingOptions(**warp)
    runtime = LanguageModelRuntime.from_hf(adapter.model, prompt.length + count)

    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(warp_logits(logits.double(), options.temperature, options.top_k,
                                         options.top_p), dim=-1)

    exact: dict[tuple, float] = {}

    def extend(prefix: tuple, p: float, probs: torch.Tensor) -> None:
        for token in torch.nonzero(probs).flatten().tolist():
            tokens = prefix + (token,)
            if len(tokens) == count:
                exact[tokens] = p * float(probs[token])
                continue
            runtime.rollback(prompt.length)
            logits = runtime.step(torch.tensor([tokens]),
                                  prompt.generated_positions(0, len(tokens)))
            extend(tokens, p * float(probs[token]), probabilities(logits[0, -1]))

    runtime.reset()
    first = runtime.prefill(prompt.inputs_embeds, prompt.position_ids).logits[0, -1]
    extend((), 1.0, probabilities(first))
    return exact


def _dense(tables: list[dict[tuple, float]], count: int) -> list[torch.Tensor]:
    """Sparse {tokens: value} tables as dense [S] * count tensors over the S tokens they name."""
    symbols = sorted({token for table in tables for tokens in table for token in tokens})
    index = {token: i for i, token in enumerate(symbols)}
    dense = [torch.zeros((len(symbols),) * count, dtype=torch.float64) for _ in tables]
    for table, tensor in zip(tables, dense):
        for tokens, value in table.items():
            tensor[tuple(index[token] for token in tokens)] += value
    return dense


@pytest.mark.parametrize("family,mode", [("qwen2_5_vl", "sequential"),
                                         ("llava_onevision", "parallel")])
def test_video_pipeline_sampling_matches_target_distribution(family, mode):
    target, draft = make_pair(family, "perturbed-copy", seed=1)
    pipeline = make_pipeline(target, draft, mode, 3, 0.5)
    target_prompt, draft_prompt = pipeline.prepare(sample_frames(family, 2), "what moves?",
                                                   num_frames=None)
    exact = _exact_video_distribution(target, target_prompt, VIDEO_WARP, VIDEO_TOKENS)
    counts: dict[tuple, int] = {}
    accepted = drafted = 0
    for seed in range(VIDEO_RUNS):
        out = pipeline.generate_prepared(target_prompt, draft_prompt, VIDEO_TOKENS,
                                         SamplingOptions(**VIDEO_WARP, seed=seed), set())
        counts[tuple(out.tokens)] = counts.get(tuple(out.tokens), 0) + 1
        accepted, drafted = accepted + out.stats.accepted, drafted + out.stats.drafted
    assert out.stats.draft_prompt_tokens < out.stats.prompt_tokens
    assert 0.1 * drafted < accepted < 0.9 * drafted  # both verdicts are frequent
    counts, exact = _dense([counts, exact], VIDEO_TOKENS)
    for token in range(1, VIDEO_TOKENS):
        assert _marginals_pass(counts, exact, (token,)), token
    for pair in ((1, 2), (2, 3)):
        assert _marginals_pass(counts, exact, pair), pair

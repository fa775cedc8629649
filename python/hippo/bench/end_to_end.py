"""The end-to-end benchmark: five ways to generate from one video prompt, in one run, across
agreement levels of a synthetic pair (hippo.models.agreement), so that speed is measured at
realistic MAT with the real per-step costs of real model shapes.

Methods: HF `generate` (eager), HF assisted generation (the same draft as assistant, seeing the
whole prompt), hippo's AR (the target alone through the graph-captured runtime), sequential SD and
HIPPO (parallel, adaptive g), the last two with the draft on the kept visual tokens (keep_ratio,
10% by default). Every
row carries the MAT it was measured at (hippo's own methods measure theirs; each eps row also
gives the sequential MAT as the pair's agreement). Acceptance is never faked: both models run in
full. Greedy outputs are compared with hippo's AR: hippo's own methods that part from it get a
`parting` note with the target's logit gap there (in bf16 on a GPU a near-tie, at most 2 rounding
steps, is the only allowed cause); HF's methods are compared only.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hippo.bench.hf_baselines import hf_generate
from hippo.models.agreement import (QWEN2_0_5B, QWEN2_7B, TINY_DRAFT, TINY_TARGET,
                                    AgreementPair, LanguageModelShape, synthetic_prompt)
from hippo.pipeline import HippoPipeline
from hippo.preserve import PreservationOptions
from hippo.report import in_ms, ratio, rounded
from hippo.speculative.acceptance import SamplingOptions
from hippo.speculative.divergence import find_parting

METHODS = ("hf_generate", "hf_assisted", "hippo_ar", "sequential", "hippo")
TOKENS_PER_FRAME = (14, 14)  # 196 visual tokens per frame, as a 384-px LLaVA-OneVision frame


@dataclass(frozen=True)
class BenchPreset:
    target: LanguageModelShape
    draft: LanguageModelShape
    device: str
    dtype: torch.dtype
    frames: tuple[int, ...]
    grid: tuple[int, int]
    eps: tuple[float, ...]   # spans MAT from about 12 down to 1-2 (measured, not monotone at the tail)
    vocab: int
    new_tokens: int


PRESETS = {
    "tiny": BenchPreset(TINY_TARGET, TINY_DRAFT, "cpu", torch.float32, (4,), (6, 6),
                        (0.1, 0.3, 0.5, 1.0, 2.0, 2.2), 1000, 64),
    "7b": BenchPreset(QWEN2_7B, QWEN2_0_5B, "cuda", torch.bfloat16, (32, 64), TOKENS_PER_FRAME,
                      (0.001, 0.002, 0.004, 0.008, 0.016, 0.03), 152064, 128),
}


def run_end_to_end(preset: BenchPreset, *, frames: tuple[int, ...] | None = None,
                   eps_values: tuple[float, ...] | None = None, gamma: int = 12,
                   new_tokens: int | None = None, methods: tuple[str, ...] = METHODS,
                   keep_ratio: float = 0.1, gemm_prologues: str = "none",
                   draft_priority: bool = False, progress: bool = True,
                   echo: Callable[[str], None] = print) -> list[dict]:
    """Rows of measurements, one per (frames, eps, method). gemm_prologues and draft_priority:
    HippoOptions of hippo's methods; the HF baselines are unchanged."""
    from tqdm import tqdm

    frames = frames or preset.frames
    eps_values = eps_values or preset.eps
    new_tokens = new_tokens or preset.new_tokens
    pair = AgreementPair(preset.target, preset.draft, eps=eps_values[0], vocab=preset.vocab,
                         dtype=preset.dtype, device=preset.device)
    base = HippoPipeline(pair.target, pair.draft, mode="ar",
                         preservation=PreservationOptions(keep_ratio=keep_ratio),
                         gemm_prologues=gemm_prologues, draft_priority=draft_priority)
    pipelines = {"hippo_ar": base,
                 "sequential": base.with_options(mode="sequential", gamma=gamma),
                 "hippo": base.with_options(mode="parallel", gamma="auto",
                                            max_gamma=max(gamma, 12))}
    rows = []
    work = [(count, eps) for count in frames for eps in eps_values]
    # No bar where stderr is no terminal (a log, a pipe), and on a terminal the `with` clears it
    # before an error propagates: hippo's error line stands alone (as in the dataset runner).
    with tqdm(work, desc="bench", disable=None if progress else True, leave=False) as bar:
        for count, eps in bar:
            pair.set_eps(eps)
            prompts = [synthetic_prompt(adapter, frames=count, grid=preset.grid)
                       for adapter in (pair.target, pair.draft)]
            measured = _measure_all(pair, pipelines, prompts, new_tokens, gamma, methods)
            rows += _rows(measured, count, prompts[0].length, eps, gamma)
            echo(f"frames {count}, eps {eps}: " + ", ".join(
                f"{r['method']} {r['ms/token']} ms/token" for r in rows[-len(measured):]))
    return rows


def _measure_all(pair: AgreementPair, pipelines: dict, prompts: list, new_tokens: int,
                 gamma: int, methods: tuple[str, ...]) -> dict[str, dict]:
    measured: dict[str, dict] = {}
    greedy = SamplingOptions()
    for name in ("hippo_ar", "sequential", "hippo"):
        if name in methods or name == "hippo_ar":  # hippo's AR is every row's reference
            pipeline = pipelines[name]
            # Warm-up of the same length: a shorter one sizes the caches smaller, and the timed
            # run would rebuild them and capture every CUDA graph again inside its timing.
            pipeline.generate_prepared(*prompts, new_tokens, greedy, set())
            out = pipeline.generate_prepared(*prompts, new_tokens, greedy, set())
            stats = out.stats
            measured[name] = dict(tokens=out.tokens, total_s=stats.total_s,
                                  per_token=stats.decode_s_per_token,
                                  mat=stats.mean_accepted_tokens,
                                  acceptance=stats.acceptance_rate,
                                  phases_ms=[round(1e3 * t, 2) for t in (
                                      stats.prefill_s, stats.selection_s,
                                      stats.draft_prefill_s)])
    reference = measured["hippo_ar"]["tokens"]
    ar_runtime = pipelines["hippo_ar"].runtime("target")
    for name in ("sequential", "hippo"):
        if name in measured:
            parting = find_parting(ar_runtime, prompts[0], reference, measured[name]["tokens"])
            measured[name]["parting"] = "" if parting is None else parting.describe()
    input_ids = prompts[0].input_ids
    if "hf_generate" in methods:
        run = hf_generate(pair.target.model, input_ids, new_tokens)
        measured["hf_generate"] = dict(tokens=run.tokens, total_s=run.total_s,
                                       per_token=run.decode_s_per_token, mat=1.0, acceptance=None)
    if "hf_assisted" in methods:
        run = hf_generate(pair.target.model, input_ids, new_tokens, assistant=pair.draft.model,
                          num_assistant_tokens=gamma)
        measured["hf_assisted"] = dict(tokens=run.tokens, total_s=run.total_s,
                                       per_token=run.decode_s_per_token, mat=None,
                                       acceptance=None)
    return {name: measured[name] for name in METHODS if name in measured}


def _rows(measured: dict[str, dict], frames: int, prompt_tokens: int, eps: float,
          gamma: int) -> list[dict]:
    reference = measured["hippo_ar"]["tokens"]
    pair_mat = measured.get("sequential", {}).get("mat")
    rows = []
    for name, m in measured.items():
        row = dict(frames=frames, prompt_tokens=prompt_tokens, eps=eps, method=name,
                   gamma=("auto" if name == "hippo" else gamma if name in (
                       "sequential", "hf_assisted") else "-"),
                   MAT=rounded(m["mat"]), pair_MAT=rounded(pair_mat),
                   acceptance=rounded(m["acceptance"], 3),
                   **{"ms/token": in_ms(m["per_token"])},
                   total_s=round(m["total_s"], 3), matches_ar=m["tokens"] == reference,
                   parting=m.get("parting", ""),
                   **{"prefill/selection/draft prefill ms": m.get("phases_ms", "-")})
        for base in ("hf_generate", "hippo_ar", "hf_assisted"):
            if base in measured and base != name:
                row[f"x {base}"] = ratio(measured[base]["per_token"], m["per_token"])
        rows.append(row)
    return rows


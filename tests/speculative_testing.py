"""Target/draft pairs and videos for the speculative-decoding tests (tiny random models, offline).

Each family has two pairs over two target configurations. Two independent random models agree
on almost nothing (a pair that never accepts tests only the rejection path), so both pairs are
made to agree often but not always, and blocks are accepted in part, wholly, and rejected:

* "small-draft": a GQA target and a smaller draft of another width, head count and depth, made
  an agreement pair (hippo.models.agreement: shared embedding and head through a lift, layer
  outputs scaled by AGREEMENT_EPS);
* "perturbed-copy": an MHA target with a *perturbed copy* of itself as its draft (the same
  weights plus noise on the language model).
"""
from __future__ import annotations

import functools

import torch

from hippo.assets import sample_video_path
from hippo.models import load_adapter
from hippo.models.agreement import make_agreement
from hippo.pipeline import HippoPipeline
from hippo.preserve import PreservationOptions
from hippo.runtime import find_text_model
from hippo.video import load_video

# family -> (GQA target preset, its smaller draft preset, MHA target preset)
FAMILY_PRESETS = {
    "qwen2_5_vl": ("tiny-qwen2.5-vl", "tiny-qwen2.5-vl-draft", "tiny-qwen2.5-vl-mha"),
    "llava_onevision": ("tiny-llava-onevision", "tiny-llava-onevision-draft",
                        "tiny-llava-onevision-mha"),
}
PAIR_KINDS = ("small-draft", "perturbed-copy")
PERTURBATION = 0.05
# Layer-output scale of the small-draft pairs: about half of the drafts accepted at these sizes
# (measured on the CPU: 0.3-0.76 over both families and seeds 0-1; at 1.0 nearly all, at 100
# none). On a GPU a pair's greedy text can be another (the LLaVA pair of seed 0 parts from its
# CPU text at the third token, cuDNN's TF32 on or off) and agree more: 97% on an H200
# (2026-11-28).
AGREEMENT_EPS = 10.0


def perturb_language_model(adapter, scale: float, seed: int) -> None:
    """Add scale * std(W) Gaussian noise to every language-model matrix, in place."""
    text_model, lm_head = find_text_model(adapter.model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in list(text_model.layers.parameters()) + [lm_head.weight]:
            if param.dim() == 2:
                noise = torch.randn(param.shape, generator=generator).to(param)
                param.add_(noise * (scale * float(param.std())))


def make_pair(family: str, kind: str, seed: int, device: str = "cpu"):
    """(target adapter, draft adapter) of one family."""
    target_name, draft_name, copied_name = FAMILY_PRESETS[family]
    if kind == "small-draft":
        target = load_adapter(target_name, seed=seed, device=device)
        draft = load_adapter(draft_name, seed=seed + 100, device=device)
        make_agreement(target.model, draft.model, AGREEMENT_EPS, seed)
        return target, draft
    target = load_adapter(copied_name, seed=seed, device=device)
    draft = load_adapter(copied_name, seed=seed, device=device)
    perturb_language_model(draft, PERTURBATION, seed)
    return target, draft


def make_pipeline(target, draft, mode: str, gamma, keep_ratio: float,
                  draft_prefill: str = "pruned", **preservation) -> HippoPipeline:
    """A speculative pipeline over the pair with the given keep ratio (and other
    PreservationOptions fields)."""
    return HippoPipeline(target, draft, mode=mode, gamma=gamma, draft_prefill=draft_prefill,
                         preservation=PreservationOptions(keep_ratio=keep_ratio, **preservation))


@functools.lru_cache(maxsize=8)
def sample_frames(family: str, num_frames: int) -> torch.Tensor:
    # Qwen takes frames in temporal pairs; LLaVA-OneVision any count.
    count = num_frames + (num_frames % 2 if family == "qwen2_5_vl" else 0)
    return load_video(sample_video_path(), num_frames=count)


def exact_copy_pair(family: str = "llava_onevision"):
    """(target, draft): an MHA target and an exact copy of it as the draft, so that every
    candidate is accepted (rounds that accept an eos, a stop string, a whole block)."""
    name = FAMILY_PRESETS[family][2]
    return load_adapter(name, seed=1), load_adapter(name, seed=1)


def spoil_rows_from(monkeypatch, pipeline: HippoPipeline, role: str, prompt_length: int,
                    column: int, spoil=None) -> None:
    """From now on, every step of the pipeline's `role` runtime ("target" or "draft") returns
    its rows that choose new-token column `column` or later spoilt (`spoil(rows)` in place;
    NaN by default). Row r of a step of n tokens chooses column length - n + 1 + r after the
    prompt of `prompt_length` tokens."""
    from hippo.runtime.decoder import LanguageModelRuntime

    step = LanguageModelRuntime.step

    def spoilt_step(self, input_ids, position_ids):
        logits = step(self, input_ids, position_ids)
        if self is pipeline.runtime(role):
            first = self.length - input_ids.shape[1] + 1 - prompt_length
            logits = logits.clone()
            rows = logits[:, max(column - first, 0):]
            rows.fill_(float("nan")) if spoil is None else spoil(rows)
        return logits

    monkeypatch.setattr(LanguageModelRuntime, "step", spoilt_step)

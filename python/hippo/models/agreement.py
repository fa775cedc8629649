"""A synthetic target/draft pair whose agreement is tunable, for honest speed measurements.

Two independent random models agree on almost nothing (MAT about 1), so speculative decoding
could not be timed at realistic acceptance. This pair has the real per-step costs of real model
shapes (7B-class target, 0.5B-class draft) and one knob, `eps`, for how often they agree:

* the target's embedding and output head are the draft's, lifted into the target's width through
  one orthonormal map Q (H_draft -> H_target), and its final RMSNorm weight is
  sqrt(H_draft / H_target), so that with the layers' contributions at zero both models give
  the same logits (up to the RMSNorms' eps, which weighs more in the wider model: about 1% on
  the small visual embeddings, nothing that changes a choice);
* every layer's output projections (o_proj, down_proj) in both models are scaled by `eps` (> 0):
  as eps goes to 0 the layers add nothing and the two agree always; raising eps lets each
  model's own random layers move its logits, and agreement falls (measured at 7B/0.5B sizes,
  eps 0.003 -> 0.91 next-token agreement, 0.01 -> 0.73, 0.03 -> 0.32).

Acceptance is measured, never faked: the models run in full, like any other pair. The prompt is
synthetic too: random token embeddings with a span of "visual" tokens in a (T, Hg, Wg) grid and
random visual features, so that token selection does its real work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hippo.models.base import PreparedPrompt, VideoLLMAdapter
from hippo.runtime.decoder import find_text_model


@dataclass(frozen=True)
class LanguageModelShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


# Qwen2 shapes (the language models of Qwen2.5-VL-7B and LLaVA-OneVision-0.5B).
QWEN2_7B = LanguageModelShape(3584, 28, 28, 4, 18944)
QWEN2_0_5B = LanguageModelShape(896, 24, 14, 2, 4864)
TINY_TARGET = LanguageModelShape(256, 6, 8, 2, 1024)  # heavy enough on a CPU to pay off
TINY_DRAFT = LanguageModelShape(32, 1, 2, 1, 64)
QWEN2_VOCAB = 152064


class SyntheticAdapter(VideoLLMAdapter):
    """A Qwen2 causal LM standing in for a video-LLM: prompts come from synthetic_prompt()."""

    family = "synthetic"

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model, tokenizer=None, prompt_prefix_ids=[], prompt_suffix_ids=[])

    @property
    def text_model(self) -> torch.nn.Module:
        return self.model.model

    def special_token_ids(self) -> dict[str, int | None]:
        return {"eos_token_id": None}

    @property
    def eos_token_id(self) -> int | None:
        return None

    @property
    def eos_token_ids(self) -> list[int]:
        return []


def _qwen2(shape: LanguageModelShape, vocab: int, dtype: torch.dtype, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=shape.hidden_size,
                         intermediate_size=shape.intermediate_size,
                         num_hidden_layers=shape.num_hidden_layers,
                         num_attention_heads=shape.num_attention_heads,
                         num_key_value_heads=shape.num_key_value_heads,
                         max_position_embeddings=32768, tie_word_embeddings=False,
                         use_sliding_window=False)
    # Built directly in `dtype` on `device`: a 7B model in float32 would need twice the memory.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def _output_projections(model: torch.nn.Module) -> list[torch.Tensor]:
    text_model, _ = find_text_model(model)
    return [w for layer in text_model.layers
            for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)]


class AgreementKnob:
    """The agreement of a constructed pair: set_eps rescales every output projection of both
    models in place, from the current eps to the new one (> 0: a zero scale could not be raised
    again; 1e-6 already means full agreement)."""

    def __init__(self, models: tuple[torch.nn.Module, ...], eps: float) -> None:
        self._weights = [w for model in models for w in _output_projections(model)]
        self.eps = 1.0
        self.set_eps(eps)

    @torch.no_grad()
    def set_eps(self, eps: float) -> None:
        if not 0 < eps < math.inf:
            raise ValueError(f"eps must be positive and finite, got {eps}")
        for weight in self._weights:
            weight.mul_(eps / self.eps)
        self.eps = eps


@torch.no_grad()
def make_agreement(target: torch.nn.Module, draft: torch.nn.Module, eps: float,
                   seed: int = 0) -> AgreementKnob:
    """Rewrite two HF models of one family (a Qwen2 causal LM, or Qwen2.5-VL) into an agreement
    pair, in place: random N(0, 1) token embeddings shared through the lift, the target's head
    the lifted draft head, its final norm rescaled, and (Qwen2.5-VL) the draft's vision tower
    copied into the target's with the merger's output lifted, so that visual embeddings agree
    too. Returns the eps knob."""
    text_t, head_t = find_text_model(target)
    text_d, head_d = find_text_model(draft)
    hidden_t, hidden_d = head_t.in_features, head_d.in_features
    generator = torch.Generator().manual_seed(seed)
    # The products run on the target's device (a 7B-wide embedding is 2 GB in float32).
    device = head_t.weight.device
    lift = _orthonormal_columns(hidden_t, hidden_d, generator).to(device)  # [H_t, H_d]
    embedding = torch.randn(text_d.embed_tokens.weight.shape, generator=generator).to(device)
    _assign(text_d.embed_tokens.weight, embedding)
    _assign(text_t.embed_tokens.weight, embedding @ lift.T)
    del embedding
    if head_t.weight.data_ptr() != text_t.embed_tokens.weight.data_ptr():  # untied heads
        _assign(head_t.weight, head_d.weight.to(device, torch.float32) @ lift.T)
    text_d.norm.weight.fill_(1.0)
    text_t.norm.weight.fill_(math.sqrt(hidden_d / hidden_t))
    visual_t = getattr(getattr(target, "model", None), "visual", None)
    visual_d = getattr(getattr(draft, "model", None), "visual", None)
    if visual_t is not None and visual_d is not None:
        _share_vision(visual_t, visual_d, lift)
    return AgreementKnob((target, draft), eps)


def _share_vision(visual_t: torch.nn.Module, visual_d: torch.nn.Module,
                  lift: torch.Tensor) -> None:
    """Qwen2.5-VL: the target's vision tower becomes the draft's, its merger's last projection
    lifted into the target's width (the merger ends in a linear map, which commutes with Q)."""
    last_t, last_d = visual_t.merger.mlp[-1], visual_d.merger.mlp[-1]
    for (name, param_t), (_, param_d) in zip(visual_t.named_parameters(),
                                             visual_d.named_parameters()):
        if param_t.shape == param_d.shape and not name.startswith("merger.mlp." + str(
                len(visual_t.merger.mlp) - 1)):
            param_t.copy_(param_d)
    _assign(last_t.weight, lift @ last_d.weight.to(lift.device, torch.float32))
    _assign(last_t.bias, lift @ last_d.bias.to(lift.device, torch.float32))


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(device=param.device, dtype=param.dtype))


class AgreementPair:
    """(target, draft) SyntheticAdapters of the given Qwen2 shapes, with knob eps (set_eps)."""

    def __init__(self, target_shape: LanguageModelShape, draft_shape: LanguageModelShape, *,
                 eps: float, vocab: int = QWEN2_VOCAB, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", seed: int = 0) -> None:
        torch.manual_seed(seed)
        draft = _qwen2(draft_shape, vocab, dtype, device)
        target = _qwen2(target_shape, vocab, dtype, device)
        self.knob = make_agreement(target, draft, eps, seed)
        self.target, self.draft = SyntheticAdapter(target), SyntheticAdapter(draft)

    @property
    def eps(self) -> float:
        return self.knob.eps

    def set_eps(self, eps: float) -> None:
        self.knob.set_eps(eps)


def _orthonormal_columns(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """A [rows, columns] matrix with orthonormal columns (float32, CPU)."""
    q, _ = torch.linalg.qr(torch.randn(rows, columns, generator=generator))
    return q


def synthetic_prompt(adapter: SyntheticAdapter, *, frames: int, grid: tuple[int, int],
                     text_before: int = 16, text_after: int = 32, feature_dim: int = 64,
                     seed: int = 0) -> PreparedPrompt:
    """A prompt of text_before random tokens, frames * Hg * Wg "visual" tokens (random ids
    standing in for visual embeddings) and text_after tokens, with random visual features."""
    height, width = grid
    num_visual = frames * height * width
    length = text_before + num_visual + text_after
    generator = torch.Generator().manual_seed(seed)
    vocab = adapter.vocab_size
    device = adapter.device
    ids = torch.randint(0, vocab, (1, length), generator=generator).to(device)
    with torch.no_grad():
        embeds = adapter.text_model.embed_tokens(ids)
    features = torch.randn(frames, height, width, feature_dim, generator=generator)
    return PreparedPrompt(input_ids=ids, inputs_embeds=embeds,
                          position_ids=torch.arange(length, device=device)[None], rope_delta=0,
                          visual_start=text_before, num_visual=num_visual,
                          grid=(frames, height, width),
                          visual_features=features.to(device=device, dtype=embeds.dtype))


def agreement_adapters(target_preset: str, draft_preset: str, eps: float, *, seed: int = 0,
                       device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                       ) -> tuple[VideoLLMAdapter, VideoLLMAdapter, AgreementKnob]:
    """Two tiny video-LLM presets of one family (Qwen2.5-VL) made into an agreement pair:
    (target adapter, draft adapter, eps knob). Real video in, real vision towers, synthetic
    weights."""
    from hippo.models import load_adapter

    target = load_adapter(target_preset, seed=seed, device=device, dtype=dtype)
    draft = load_adapter(draft_preset, seed=seed + 1, device=device, dtype=dtype)
    return target, draft, make_agreement(target.model, draft.model, eps, seed)

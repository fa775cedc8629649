"""A synthetic target/draft pair whose agreement is tunable, for honest speed measurements.

Two independent random models agree on almost nothing (MAT about 1), so speculative decoding
could not be timed at realistic acceptance. This pair has the real per-step costs of real model
shapes (7B-class target, 0.5B-class draft) and one knob, `eps`, for how often they agree:

* the target's embedding and output head are the draft's, lifted into the target's width through
  one orthonormal map Q (H_draft -> H_target), and its final RMSNorm weight is
  sqrt(H_draft / H_target), so that with the layers' contributions at zero both models give
  exactly the same logits;
* every layer's output projections (o_proj, down_proj) in both models are scaled by `eps`: at 0
  the layers add nothing and the two agree always; raising eps lets each model's own random
  layers move its logits, and agreement falls (NOTES.md: at 7B/0.5B sizes, eps 0.003 -> 0.91
  next-token agreement, 0.01 -> 0.73, 0.03 -> 0.32).

Acceptance is measured, never faked: the models run in full, like any other pair. The prompt is
synthetic too: random token embeddings with a span of "visual" tokens in a (T, Hg, Wg) grid and
random visual features, so that token selection does its real work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hippo.models.base import PreparedPrompt, VideoLLMAdapter


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
TINY_TARGET = LanguageModelShape(128, 2, 4, 2, 256)
TINY_DRAFT = LanguageModelShape(64, 1, 2, 1, 128)
QWEN2_VOCAB = 152064


class SyntheticAdapter(VideoLLMAdapter):
    """A Qwen2 causal LM standing in for a video-LLM: prompts come from synthetic_prompt()."""

    family = "synthetic"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.tokenizer = None
        self.prompt_prefix_ids, self.prompt_suffix_ids = [], []

    @property
    def text_model(self) -> torch.nn.Module:
        return self.model.model

    def special_token_ids(self) -> dict[str, int | None]:
        return {"eos_token_id": None}

    @property
    def eos_token_id(self) -> int | None:
        return None


def _qwen2(shape: LanguageModelShape, vocab: int, dtype: torch.dtype, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=shape.hidden_size,
                         intermediate_size=shape.intermediate_size,
                         num_hidden_layers=shape.num_hidden_layers,
                         num_attention_heads=shape.num_attention_heads,
                         num_key_value_heads=shape.num_key_value_heads,
                         max_position_embeddings=32768, tie_word_embeddings=False,
                         use_sliding_window=False)
    with torch.device(device):
        return Qwen2ForCausalLM(config).to(dtype)


def _output_projections(model: torch.nn.Module) -> list[torch.Tensor]:
    return [w for layer in model.model.layers
            for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)]


class AgreementPair:
    """(target, draft) SyntheticAdapters with agreement knob eps (set_eps changes it in place)."""

    def __init__(self, target_shape: LanguageModelShape, draft_shape: LanguageModelShape, *,
                 eps: float, vocab: int = QWEN2_VOCAB, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", seed: int = 0) -> None:
        torch.manual_seed(seed)
        draft = _qwen2(draft_shape, vocab, dtype, device)
        target = _qwen2(target_shape, vocab, dtype, device)
        with torch.no_grad():
            lift = _orthonormal_columns(target_shape.hidden_size, draft_shape.hidden_size,
                                        device)  # [H_t, H_d]
            embedding = torch.randn(vocab, draft_shape.hidden_size, device=device)
            draft.model.embed_tokens.weight.copy_(embedding)
            target.model.embed_tokens.weight.copy_(embedding @ lift.T)
            head = draft.lm_head.weight.float()
            target.lm_head.weight.copy_(head @ lift.T)
            target.model.norm.weight.fill_(math.sqrt(draft_shape.hidden_size
                                                     / target_shape.hidden_size))
        self.target, self.draft = SyntheticAdapter(target), SyntheticAdapter(draft)
        self.eps = 1.0
        self.set_eps(eps)

    @torch.no_grad()
    def set_eps(self, eps: float) -> None:
        """Rescale every output projection of both models from the current eps to `eps` (> 0:
        a zero scale could not be raised again; 1e-6 already means full agreement)."""
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        for weight in _output_projections(self.target.model) + _output_projections(
                self.draft.model):
            weight.mul_(eps / self.eps)
        self.eps = eps


def _orthonormal_columns(rows: int, columns: int, device: str) -> torch.Tensor:
    """A [rows, columns] matrix with orthonormal columns (float32)."""
    q, _ = torch.linalg.qr(torch.randn(rows, columns, device=device))
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

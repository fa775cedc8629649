"""Rotary position embedding as HF's Qwen2-family modules apply it, and which RoPE variants
hippo's static steps can reproduce: those whose frequencies HF recomputes from the positions of a
call (dynamic NTK, longrope) give a block of tokens other rotations than one token at a time."""
from __future__ import annotations

import torch
from torch import nn

from hippo.errors import HippoError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension: RoPE's rotation by 90 degrees."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] rotated by cos/sin [B, S, D] (written in HF's order for bitwise parity)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def is_dynamic_rope(rotary_emb: nn.Module) -> bool:
    """RoPE variants whose frequencies depend on the positions seen (HF recomputes them)."""
    rope_type = str(getattr(rotary_emb, "rope_type", "default"))
    return "dynamic" in rope_type or rope_type == "longrope"


def rope_switches_within(rotary_emb: nn.Module, positions: int) -> bool:
    """Whether HF's RoPE of this module gives a block of tokens other frequencies than it gives
    the same tokens one call each, somewhere below `positions`: HF picks the frequencies of a
    whole call from its largest position (longrope: the long factors once that position passes
    original_max_position_embeddings; dynamic NTK: rescaled past max_position_embeddings), so a
    verify step crossing that bound rotates its earlier tokens as autoregressive decoding (one
    token per call, HF `generate`) does not."""
    if not is_dynamic_rope(rotary_emb):
        return False
    if rotary_emb.rope_type == "longrope":
        parameters = getattr(getattr(rotary_emb, "config", None), "rope_parameters", None) or {}
        bound = parameters.get("original_max_position_embeddings")
    else:
        bound = getattr(rotary_emb, "original_max_seq_len", None)
    return bound is None or positions > int(bound)


def reject_step_dependent_rope(rotary_emb: nn.Module) -> None:
    """step_invariant promises a step's rows equal one-token steps' at every length."""
    if is_dynamic_rope(rotary_emb):
        raise HippoError(f"step_invariant=True cannot hold with rope_type "
                         f"{rotary_emb.rope_type!r}: HF picks its frequencies from the largest "
                         "position of each step, so a step of several tokens crossing the "
                         "original context rotates them as single-token steps do not")


def reject_dynamic_rope(rotary_emb: nn.Module) -> None:
    """CUDA graphs replay fixed frequencies; dynamic RoPE recomputes them on the host."""
    if is_dynamic_rope(rotary_emb):
        rope_type = rotary_emb.rope_type
        raise HippoError(f"rope_type {rope_type!r} recomputes frequencies from the positions "
                         "(a host sync); run with use_cuda_graphs=False")

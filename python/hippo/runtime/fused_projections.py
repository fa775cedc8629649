"""A decoder layer's q/k/v and gate/up projections as one matrix each, borrowed from HF's.

The runtime's fused layer runs one GEMM for q/k/v and one for gate/up. The concatenated weights
are made once and HF's parameters become views of them, so memory still holds one copy and
HF's own modules (prefill, `fused=False`) keep working on the same numbers.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hippo.models.base import HippoError


@dataclass
class FusedProjections:
    """One layer's q/k/v projection as one matrix [(Hq + 2 Hkv) D, hidden] with its bias, and
    its gate/up projection as one [2 I, hidden]. The HF parameters are views into these."""

    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor
    gate_up_weight: torch.Tensor


def fuse_layer_projections(layer: nn.Module) -> FusedProjections:
    """Concatenate a decoder layer's q/k/v and gate/up weights and point the HF parameters at
    slices of the result (so memory holds one copy). Idempotent: a layer fused before, whose
    parameters still view the fused tensors, is reused as is."""
    attention, mlp = layer.self_attn, layer.mlp
    previous = getattr(layer, "_hippo_fused", None)
    if previous is not None and _still_views(previous, attention, mlp):
        return previous
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    if any(p.bias is None for p in projections) or mlp.gate_proj.bias is not None:
        raise HippoError("expected Qwen2 projections: q/k/v with biases, gate/up without")
    with torch.no_grad():
        fused = FusedProjections(
            qkv_weight=torch.cat([p.weight for p in projections]),
            qkv_bias=torch.cat([p.bias for p in projections]),
            gate_up_weight=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    _point_at_slices(projections, "weight", fused.qkv_weight)
    _point_at_slices(projections, "bias", fused.qkv_bias)
    _point_at_slices((mlp.gate_proj, mlp.up_proj), "weight", fused.gate_up_weight)
    layer._hippo_fused = fused
    return fused


def _point_at_slices(modules: Sequence[nn.Module], name: str, fused: torch.Tensor) -> None:
    """Replace each module's parameter `name` by its rows of `fused` (in order)."""
    start = 0
    for module in modules:
        rows = getattr(module, name).shape[0]
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(fused[start:start + rows],
                                           requires_grad=old.requires_grad))
        start += rows


def _still_views(fused: FusedProjections, attention: nn.Module, mlp: nn.Module) -> bool:
    """Whether every parameter that fusing made a slice is still that slice: one replaced
    (`.data =`, load_state_dict(assign=True), peft's merge, `.to()`) must not be shadowed by the
    old numbers in the fused tensor."""
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    return (_are_slices(projections, "weight", fused.qkv_weight)
            and _are_slices(projections, "bias", fused.qkv_bias)
            and _are_slices((mlp.gate_proj, mlp.up_proj), "weight", fused.gate_up_weight))


def _are_slices(modules: Sequence[nn.Module], name: str, fused: torch.Tensor) -> bool:
    """Whether the modules' parameters `name` are, in order, the rows of `fused`."""
    start = 0
    for module in modules:
        parameter = getattr(module, name)
        if parameter is None:
            return False
        rows = fused[start:start + parameter.shape[0]]
        if (parameter.dtype != fused.dtype or parameter.device != fused.device
                or parameter.shape != rows.shape or parameter.stride() != rows.stride()
                or parameter.data_ptr() != rows.data_ptr()):
            return False
        start += parameter.shape[0]
    return start == fused.shape[0]

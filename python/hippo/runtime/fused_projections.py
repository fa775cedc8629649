"""A decoder layer's q/k/v and gate/up projections as one matrix each, borrowed from HF's.

The runtime's fused layer runs one GEMM for q/k/v and one for gate/up. The concatenated weights
are made once and HF's parameters become views of them, so memory still holds one copy and
HF's own modules (prefill, `fused=False`) keep working on the same numbers.

Saving: `save_pretrained`, `state_dict()` and `torch.save` give the same keys and values as
before fusing; safetensors' `save_model` / `load_model` refuse parameters that share a storage
("None is covering the entire storage"): save `model.state_dict()` with `save_file` instead.

The fused tensors are found again from the parameters themselves (rows next to each other in one
storage), never kept beside them on the module: a reference there would keep the old weights
alive once the parameters are replaced (`model.to(dtype or device)`, load_state_dict(assign=True))
and be copied a second time by deepcopy.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hippo.errors import HippoError


@dataclass
class FusedProjections:
    """One layer's q/k/v projection as one matrix [(Hq + 2 Hkv) D, hidden] with its bias, and
    its gate/up projection as one [2 I, hidden]. The HF parameters are views into these."""

    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor
    gate_up_weight: torch.Tensor


def fuse_layer_projections(layer: nn.Module) -> FusedProjections:
    """Concatenate a decoder layer's q/k/v and gate/up weights and point the HF parameters at
    slices of the result (so memory holds one copy). Idempotent: parameters that are already
    consecutive rows of one tensor (a layer fused before, or loaded so) are used in place. Each
    group is fused and its old tensors released before the next one is made, so the transient
    extra memory is the largest group of one layer (gate/up), not the whole layer."""
    attention, mlp = layer.self_attn, layer.mlp
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    if any(p.bias is None for p in projections) or mlp.gate_proj.bias is not None:
        raise HippoError("expected Qwen2 projections: q/k/v with biases, gate/up without")
    return FusedProjections(qkv_weight=_fused_rows(projections, "weight"),
                            qkv_bias=_fused_rows(projections, "bias"),
                            gate_up_weight=_fused_rows((mlp.gate_proj, mlp.up_proj), "weight"))


def _fused_rows(modules: Sequence[nn.Module], name: str) -> torch.Tensor:
    """The modules' parameters `name` as one tensor of their rows in order: a view of them where
    they already lie so in one storage, else their concatenation, which they then view."""
    fused = _rows_in_place(modules, name)
    if fused is not None:
        return fused
    with torch.no_grad():
        fused = torch.cat([getattr(module, name) for module in modules])
    _point_at_slices(modules, name, fused)
    return fused


def _rows_in_place(modules: Sequence[nn.Module], name: str) -> torch.Tensor | None:
    """A view of all the modules' parameters `name` when they are, in order, consecutive rows of
    one contiguous storage (same dtype, device and row shape), else None."""
    tensors = [getattr(module, name) for module in modules]
    first = tensors[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for tensor in tensors:
        if (tensor.dtype != first.dtype or tensor.device != first.device
                or tensor.shape[1:] != first.shape[1:] or not tensor.is_contiguous()
                or tensor.numel() == 0 or tensor.untyped_storage().data_ptr() != storage
                or tensor.storage_offset() != offset):
            return None
        offset += tensor.numel()
    shape = (sum(tensor.shape[0] for tensor in tensors), *first.shape[1:])
    strides = torch.empty(shape, device="meta").stride()
    return first.detach().as_strided(shape, strides, first.storage_offset())


def _point_at_slices(modules: Sequence[nn.Module], name: str, fused: torch.Tensor) -> None:
    """Replace each module's parameter `name` by its rows of `fused` (in order)."""
    start = 0
    for module in modules:
        rows = getattr(module, name).shape[0]
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(fused[start:start + rows],
                                           requires_grad=old.requires_grad))
        start += rows

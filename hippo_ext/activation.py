"""The gated activation of a SwiGLU MLP on its fused gate/up projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hippo_ext._fake import fake_error, register_fake

__all__ = ["silu_and_mul"]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``x [..., 2I]`` holds gate then up; returns ``[..., I]``.

    The activation is rounded to x's dtype before the product, as HF's
    ``act_fn(gate_proj(h)) * up_proj(h)`` does.
    """
    return torch.ops.hippo_ext.silu_and_mul.default(x)


def reference_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """HF's ``act_fn(gate) * up`` in eager PyTorch (tests and benchmarks compare against it)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@register_fake("silu_and_mul")
def _silu_and_mul_fake(x):
    if x.dim() == 0:  # the shape arithmetic below reads the last dimension
        raise fake_error("silu_and_mul", "x must have at least one dimension, got a scalar")
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)

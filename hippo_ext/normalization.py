"""RMSNorm, with the residual add of a pre-norm decoder layer fused in.

Both ops round exactly where HF's ``Qwen2RMSNorm`` (and the residual add before it) rounds, so a
model run through them keeps HF's eager arithmetic: the sum of squares is the one difference
(fp32, accumulated in another order on CUDA).
"""
from __future__ import annotations

import torch

from hippo_ext._fake import register_fake

__all__ = ["add_rms_norm", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``weight * dtype(x * rsqrt(mean(x**2) + eps))`` over the last dimension, in fp32 inside.

    x ``[..., H]`` contiguous (fp32, bf16 or fp16); weight ``[H]`` of x's dtype.
    """
    return torch.ops.hippo_ext.rms_norm.default(x, weight, float(eps))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + x, weight, eps), residual + x)`` in one pass.

    The sum is rounded to the dtype before it is normalised (as ``residual + x`` in eager
    PyTorch), and returned: it is the next residual of the decoder.
    """
    return torch.ops.hippo_ext.add_rms_norm.default(x, residual, weight, float(eps))


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """HF's Qwen2RMSNorm.forward in eager PyTorch, step for step: the arithmetic both kernels
    keep (tests and benchmarks compare against it)."""
    wide = x.to(torch.float32)
    variance = wide.pow(2).mean(-1, keepdim=True)
    return weight * (wide * torch.rsqrt(variance + eps)).to(x.dtype)


@register_fake("rms_norm")
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x)


@register_fake("add_rms_norm")
def _add_rms_norm_fake(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)

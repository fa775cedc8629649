"""A decoder layer's RMSNorm (with its residual add) or SwiGLU gating fused into the GEMM that
consumes it: one kernel where a decode step ran two.

Both ops keep the arithmetic of the ops they fuse (HF's rounding): the CPU runs that
composition itself; on CUDA, up to 16 rows of bf16/fp16 run skinny_linear's FMA kernel with the
norm or the gating applied as x is loaded (rows bitwise independent of how many there are), and
other shapes run the composition.
"""
from __future__ import annotations

import torch

__all__ = ["add_rms_norm_linear", "silu_and_mul_linear"]


def add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                        eps: float, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(add_rms_norm(x, residual, norm_weight, eps)[0], weight, bias), residual + x)``.

    x, residual ``[..., K]`` contiguous, of one dtype; norm_weight ``[K]``; weight ``[N, K]``;
    bias ``[N]`` or None. The second output is the rounded sum: the decoder's next residual.
    """
    return torch.ops.hippo_ext.add_rms_norm_linear.default(x, residual, norm_weight, float(eps),
                                                           weight, bias)


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(silu_and_mul(x), weight, bias)``: x ``[..., 2K]`` holds gate then up (the fused
    gate/up projection's output), weight ``[N, K]``, bias ``[N]`` or None."""
    return torch.ops.hippo_ext.silu_and_mul_linear.default(x, weight, bias)


@torch.library.register_fake("hippo_ext::add_rms_norm_linear")
def _add_rms_norm_linear_fake(x, residual, norm_weight, eps, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.size(0)), torch.empty_like(x)


@torch.library.register_fake("hippo_ext::silu_and_mul_linear")
def _silu_and_mul_linear_fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.size(0))

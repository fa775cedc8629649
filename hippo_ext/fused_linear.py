"""A decoder layer's RMSNorm (with its residual add) or SwiGLU gating fused into the GEMM that
consumes it, and for the q/k/v projection RoPE and the cache append fused after it: one kernel
where a decode step ran two or three.

Every op keeps the arithmetic of the ops it fuses (HF's rounding; on CUDA a norm's row sum of
squares is reduced in another order than add_rms_norm's kernel, so it may differ in its last
bits): the CPU runs that composition itself; on CUDA, up to 16 rows of bf16/fp16 run
skinny_linear's FMA kernel with the norm or the gating applied as x is loaded (rows bitwise
independent of how many there are), and other shapes run the composition. As with
skinny_linear's FMA kernel, where programmatic dependent launch is on (Hopper, unless
HIPPO_PDL=0) the weight and bias are read before the previous kernel in the stream has finished:
neither may be written by the kernel launched just before.
"""
from __future__ import annotations

import torch

from hippo_ext._fake import register_fake
from hippo_ext._validation import as_int, check_index_range, wants_value_check
from hippo_ext.rotary_embedding import query_heads_of

__all__ = ["add_rms_norm_linear", "qkv_projection", "silu_and_mul_linear"]


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


def qkv_projection(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                   eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
                   cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor, layer: int,
                   length: torch.Tensor, *,
                   check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's q/k/v stage for S new tokens in one op:
    ``qkv, total = add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias)``, then
    ``(rotary_kv_append(qkv, cos, sin, cache, layer, length), total)``.

    x, residual ``[B, S, hidden]``; weight ``[(Hq + 2 Hkv) D, hidden]`` (q, k, v rows) and bias;
    cos, sin, cache, layer and length as rotary_kv_append takes them (length already counts the
    new tokens). Returns q ``[B, S, Hq, D]`` (rotated) and the residual sum; the rotated keys and
    the values are written to the cache. check: as rotary_kv_append's (a host sync on CUDA).
    """
    if wants_value_check(length, check) and x.dim() == 3 and cache.dim() == 6 \
            and length.dtype in (torch.int32, torch.int64):
        check_index_range(length, cache.size(4) + 1, "qkv_projection", "length",
                          lower=x.size(1))
    return torch.ops.hippo_ext.qkv_projection.default(
        x, residual, norm_weight, float(eps), weight, bias, cos, sin, cache,
        as_int(layer, "qkv_projection", "layer"), length)


@register_fake("qkv_projection", dims={"x": 3, "weight": 2, "cache": 6})
def _qkv_projection_fake(x, residual, norm_weight, eps, weight, bias, cos, sin, cache, layer,
                         length):
    q_heads = query_heads_of("qkv_projection", weight.size(0), cache)
    return x.new_empty(x.size(0), x.size(1), q_heads, cache.size(5)), torch.empty_like(x)


@register_fake("add_rms_norm_linear", dims={"weight": 2})
def _add_rms_norm_linear_fake(x, residual, norm_weight, eps, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.size(0)), torch.empty_like(x)


@register_fake("silu_and_mul_linear", dims={"weight": 2})
def _silu_and_mul_linear_fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.size(0))

"""The fused layer ops (rms_norm / add_rms_norm, rotary_kv_append, silu_and_mul) against the eager
PyTorch they replace (HF's modules: one kernel per elementwise op), per call inside a CUDA graph.

Shapes on CUDA: the 7B-class target (hidden 3584, 28 q / 4 KV heads of 128, MLP 18944) and the
0.5B-class draft (hidden 896, 14 / 2 heads of 64, MLP 4864), bf16, for a decode step (1 token)
and a verify step (9 tokens). At these sizes every op is latency-bound: what the fusion buys is
one launch and one pass instead of 5-10, which is what the runtime step pays per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import hippo_ext
from hippo.runtime.rope import apply_rope
from hippo_ext.activation import reference_silu_and_mul
from hippo_ext.normalization import reference_rms_norm
from timing import bench_devices


@dataclass(frozen=True)
class LayerShape:
    name: str
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    context: int = 6_400


CUDA_SHAPES = [LayerShape("7b", 3584, 28, 4, 128, 18944), LayerShape("0.5b", 896, 14, 2, 64, 4864)]
CPU_SHAPES = [LayerShape("tiny", 256, 4, 2, 64, 512, context=256)]
SHAPES = CUDA_SHAPES if bench_devices() == ["cuda"] else CPU_SHAPES
TOKENS = [1, 9]
DTYPE = torch.bfloat16
EPS = 1e-6


@pytest.mark.parametrize("impl", ["hippo", "eager"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("device", bench_devices())
def test_add_rms_norm(benchmark, measure, device, shape, tokens, impl):
    benchmark.group = f"add_rms_norm {shape.name} x{tokens}"
    x, residual = (torch.randn(1, tokens, shape.hidden, device=device, dtype=DTYPE) for _ in range(2))
    weight = torch.randn(shape.hidden, device=device, dtype=DTYPE)
    if impl == "hippo":
        def fn():
            return hippo_ext.add_rms_norm(x, residual, weight, EPS)
    else:
        def fn():
            total = residual + x
            return reference_rms_norm(total, weight, EPS), total
    # read x, residual, weight; write the sum and the normed rows
    bytes_moved = (4 * x.numel() + weight.numel()) * x.element_size()
    measure(fn, device, bytes_moved=bytes_moved, graph=True, impl=impl, shape=shape.name, tokens=tokens)


@pytest.mark.parametrize("impl", ["hippo", "eager"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("device", bench_devices())
def test_silu_and_mul(benchmark, measure, device, shape, tokens, impl):
    benchmark.group = f"silu_and_mul {shape.name} x{tokens}"
    x = torch.randn(1, tokens, 2 * shape.intermediate, device=device, dtype=DTYPE)
    if impl == "hippo":
        def fn():
            return hippo_ext.silu_and_mul(x)
    else:
        def fn():
            return reference_silu_and_mul(x)
    bytes_moved = (x.numel() + x.numel() // 2) * x.element_size()
    measure(fn, device, bytes_moved=bytes_moved, graph=True, impl=impl, shape=shape.name, tokens=tokens)


@pytest.mark.parametrize("impl", ["hippo", "eager"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("device", bench_devices())
def test_rotary_kv_append(benchmark, measure, device, shape, tokens, impl):
    benchmark.group = f"rotary_kv_append {shape.name} x{tokens}"
    heads = shape.q_heads + 2 * shape.kv_heads
    qkv = torch.randn(1, tokens, heads * shape.head_dim, device=device, dtype=DTYPE)
    cos, sin = (torch.randn(1, tokens, shape.head_dim, device=device, dtype=DTYPE) for _ in range(2))
    cache = torch.zeros(1, 2, 1, shape.kv_heads, shape.context, shape.head_dim, device=device, dtype=DTYPE)
    length = torch.full((1,), shape.context // 2, device=device)
    if impl == "hippo":
        def fn():
            return hippo_ext.rotary_kv_append(qkv, cos, sin, cache, 0, length, check=False)
    else:  # HF's apply_rotary_pos_emb on [B, H, S, D] views, then the runtime's scatter
        positions = length[:, None] - tokens + torch.arange(tokens, device=device)

        def fn():
            split = qkv.view(1, tokens, heads, shape.head_dim).transpose(1, 2)
            rotated = apply_rope(split[:, :shape.q_heads + shape.kv_heads], cos, sin)
            index = positions[:, None, :, None].expand(1, shape.kv_heads, tokens, shape.head_dim)
            cache[0, 0].scatter_(2, index, rotated[:, shape.q_heads:])
            cache[0, 1].scatter_(2, index, split[:, shape.q_heads + shape.kv_heads:])
            return rotated[:, :shape.q_heads].transpose(1, 2).contiguous()
    # read qkv and the tables; write q, k and v
    bytes_moved = (2 * qkv.numel() + 2 * cos.numel()) * qkv.element_size()
    measure(fn, device, bytes_moved=bytes_moved, graph=True, impl=impl, shape=shape.name, tokens=tokens)

"""add_rms_norm_linear, silu_and_mul_linear and qkv_projection (one kernel: the norm or the
gating inside skinny_linear's FMA kernel, and for qkv_projection RoPE and the cache append after
it) against the standalone hippo_ext ops around cuBLAS (two or three kernels: what the runtime
runs in their place in verify steps; its decode steps, with fma_decode, run the GEMM on
skinny_linear's FMA kernel instead), at the 7B- and 0.5B-shaped layer GEMMs that follow an RMSNorm
(q/k/v, gate/up) or the gating (down), for decode and verify widths. The floor is the weight
bytes once. On the CPU (where both sides are the same composition) small shapes run as a smoke
test. The fused kernel runs with its plan of K slices per output pair and with one slice (what
it did before the slices); HIPPO_BENCH_ROWS picks other row counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import hippo_ext
from timing import bench_devices, bench_rows

EPS = 1e-6


@dataclass(frozen=True)
class FusedGemm:
    name: str
    # "norm" (add_rms_norm in front), "gating" (silu_and_mul in front) or "qkv" (add_rms_norm in
    # front, RoPE and the cache append after: q/k/v heads of head_dim, Hkv = kv_heads)
    prologue: str
    in_features: int
    out_features: int
    bias: bool = False
    head_dim: int = 128
    kv_heads: int = 4


CUDA_GEMMS = [
    FusedGemm("7b qkv", "qkv", 3584, 4608, bias=True, head_dim=128, kv_heads=4),
    FusedGemm("7b gate_up", "norm", 3584, 37888),
    FusedGemm("7b down", "gating", 18944, 3584),
    FusedGemm("0.5b qkv", "qkv", 896, 1152, bias=True, head_dim=64, kv_heads=2),
    FusedGemm("0.5b gate_up", "norm", 896, 9728),
    FusedGemm("0.5b down", "gating", 4864, 896),
]
CPU_GEMMS = [FusedGemm("small qkv", "qkv", 256, 384, bias=True, head_dim=32, kv_heads=2),
             FusedGemm("small gate_up", "norm", 256, 512),
             FusedGemm("small down", "gating", 512, 256)]
CONTEXT = 6400  # cache positions before the new tokens (qkv)
GEMMS = CUDA_GEMMS if bench_devices() == ["cuda"] else CPU_GEMMS
ROWS = bench_rows([1, 5, 9])
COPIES = 4  # distinct weights cycled inside the graph, so repeats do not hit the L2 cache


def _calls(gemm: FusedGemm, impl: str, rows: int, device: str):
    dtype = torch.bfloat16
    copies = COPIES if device == "cuda" else 1
    weights = [torch.randn(gemm.out_features, gemm.in_features, device=device, dtype=dtype)
               * gemm.in_features ** -0.5 for _ in range(copies)]
    bias = torch.randn(gemm.out_features, device=device, dtype=dtype) if gemm.bias else None
    if gemm.prologue == "gating":
        x = torch.randn(1, rows, 2 * gemm.in_features, device=device, dtype=dtype)
        if impl == "fused":
            return [lambda w=w: hippo_ext.silu_and_mul_linear(x, w, bias) for w in weights]
        return [lambda w=w: F.linear(hippo_ext.silu_and_mul(x), w, bias) for w in weights]
    x, residual = (torch.randn(1, rows, gemm.in_features, device=device, dtype=dtype)
                   for _ in range(2))
    norm_weight = torch.ones(gemm.in_features, device=device, dtype=dtype)
    if gemm.prologue == "qkv":
        return _qkv_calls(gemm, impl, x, residual, norm_weight, weights, bias)
    if impl == "fused":
        return [lambda w=w: hippo_ext.add_rms_norm_linear(x, residual, norm_weight, EPS, w, bias)
                for w in weights]

    def composed(w):
        normed, total = hippo_ext.add_rms_norm(x, residual, norm_weight, EPS)
        return F.linear(normed, w, bias), total
    return [lambda w=w: composed(w) for w in weights]


def _qkv_calls(gemm: FusedGemm, impl: str, x, residual, norm_weight, weights, bias):
    rows, device, dtype = x.size(1), x.device, x.dtype
    cache = torch.zeros(1, 2, 1, gemm.kv_heads, CONTEXT + rows, gemm.head_dim, device=device,
                        dtype=dtype)
    length = torch.full((1,), CONTEXT + rows, device=device)
    cos, sin = (torch.randn(1, rows, gemm.head_dim, device=device, dtype=dtype) for _ in range(2))
    if impl == "fused":
        return [lambda w=w: hippo_ext.qkv_projection(x, residual, norm_weight, EPS, w, bias, cos,
                                                     sin, cache, 0, length, check=False)
                for w in weights]

    def composed(w):
        normed, total = hippo_ext.add_rms_norm(x, residual, norm_weight, EPS)
        q = hippo_ext.rotary_kv_append(F.linear(normed, w, bias), cos, sin, cache, 0, length,
                                       check=False)
        return q, total
    return [lambda w=w: composed(w) for w in weights]


@pytest.mark.parametrize("impl", ["composed", "fused", "fused_1_slice"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("gemm", GEMMS, ids=lambda g: g.name)
@pytest.mark.parametrize("device", bench_devices())
def test_fused_linear(benchmark, measure, monkeypatch, device, gemm, rows, impl):
    benchmark.group = f"fused linear {gemm.name} M={rows}"
    if impl == "fused_1_slice":  # one warp per output pair: the kernel before its K slices
        monkeypatch.setenv("HIPPO_SKINNY_FMA_SLICES", "1")
    calls = _calls(gemm, impl.removesuffix("_1_slice"), rows, device)
    bytes_moved = gemm.out_features * gemm.in_features * 2  # the bf16 weight, once
    measure(calls if device == "cuda" else calls[0], device, bytes_moved=bytes_moved, graph=True,
            impl=impl, gemm=gemm.name, rows=rows)

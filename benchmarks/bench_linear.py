"""The runtime's GEMMs at decode and verify widths: cuBLAS (F.linear) against
hippo_ext.skinny_linear's two CUDA kernels (tensor cores, the default; the FMA kernel with
HIPPO_SKINNY_KERNEL=fma, M <= 16) and the weight bandwidth floor, for every layer GEMM of the
7B- and 0.5B-shaped models at M = 1, 5, 9 and 17 (HIPPO_BENCH_ROWS picks others).

The FMA kernel runs twice: with its plan of K slices and with one slice, which is what it did
before the slices.

RESULTS.md (H200, 2026-11-26): cuBLAS is flat in M up to 17 on all of them; the tensor-core
skinny kernel was 1.0-3.6x slower than cuBLAS. skinny_linear exists for step invariance (rows
bitwise independent of M), so its speed at M = 1 is what step_invariant=True costs a decode step.
On the CPU it runs one small shape as a smoke test.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import hippo_ext
from timing import bench_devices, bench_rows


@dataclass(frozen=True)
class Gemm:
    name: str
    in_features: int
    out_features: int
    bias: bool = False


CUDA_GEMMS = [
    Gemm("7b qkv", 3584, 4608, bias=True),
    Gemm("7b o_proj", 3584, 3584),
    Gemm("7b gate_up", 3584, 37888),
    Gemm("7b down", 18944, 3584),
    Gemm("7b lm_head", 3584, 152064),
    Gemm("0.5b qkv", 896, 1152, bias=True),
    Gemm("0.5b o_proj", 896, 896),
    Gemm("0.5b gate_up", 896, 9728),
    Gemm("0.5b down", 4864, 896),
    Gemm("0.5b lm_head", 896, 151936),
]
CPU_GEMMS = [Gemm("small", 256, 512, bias=True)]
GEMMS = CUDA_GEMMS if bench_devices() == ["cuda"] else CPU_GEMMS
ROWS = bench_rows([1, 5, 9, 17])
COPIES = 4  # distinct weights cycled inside the graph, so repeats do not hit the L2 cache


# skinny_linear's FMA kernel (M <= 16; M = 17 runs tensor cores): with its plan of K slices per
# output pair, and with one slice (one warp per pair: the kernel before the slices, 2026-11-27).
FMA_VARIANTS = {"hippo_fma": {"HIPPO_SKINNY_KERNEL": "fma"},
                "hippo_fma_1_slice": {"HIPPO_SKINNY_KERNEL": "fma", "HIPPO_SKINNY_FMA_SLICES": "1"}}


@pytest.mark.parametrize("impl", ["cublas", "hippo", *FMA_VARIANTS])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("gemm", GEMMS, ids=lambda g: g.name)
@pytest.mark.parametrize("device", bench_devices())
def test_linear(benchmark, measure, monkeypatch, device, gemm, rows, impl):
    for name, value in FMA_VARIANTS.get(impl, {}).items():
        monkeypatch.setenv(name, value)
    benchmark.group = f"linear {gemm.name} M={rows}"
    dtype = torch.bfloat16
    copies = COPIES if device == "cuda" else 1
    weights = [torch.randn(gemm.out_features, gemm.in_features, device=device, dtype=dtype)
               for _ in range(copies)]
    bias = torch.randn(gemm.out_features, device=device, dtype=dtype) if gemm.bias else None
    x = torch.randn(1, rows, gemm.in_features, device=device, dtype=dtype)
    if impl == "cublas":
        calls = [lambda w=w: F.linear(x, w, bias) for w in weights]
    else:
        workspace = hippo_ext.skinny_linear_workspace(gemm.out_features, device)
        calls = [lambda w=w: hippo_ext.skinny_linear(x, w, bias, workspace=workspace)
                 for w in weights]
    bytes_moved = weights[0].numel() * weights[0].element_size()
    measure(calls if device == "cuda" else calls[0], device, bytes_moved=bytes_moved, graph=True,
            impl=impl, gemm=gemm.name, rows=rows)

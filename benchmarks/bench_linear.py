"""The runtime's GEMMs at decode and verify widths, cuBLAS (F.linear) against
hippo_ext.skinny_linear and the weight bandwidth floor: is a verify step's extra time in its
skinny GEMMs, and does the skinny kernel fix it?

RESULTS.md (H200, 2026-11-26): the verify step of 5 or 9 tokens cost about twice the 1-token step
on the 7B model and three times on the 0.5B one, with the same op sequence. A GEMM of M rows reads
the same weight as one of a single row, so at these widths each should sit near the same floor;
this benchmark times every layer GEMM of both models at M = 1, 5, 9 and 17 to show which do not.
On the CPU it runs one small shape as a smoke test.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import hippo_ext
from timing import bench_devices


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
ROWS = [1, 5, 9, 17]
COPIES = 4  # distinct weights cycled inside the graph, so repeats do not hit the L2 cache


@pytest.mark.parametrize("impl", ["cublas", "hippo"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("gemm", GEMMS, ids=lambda g: g.name)
@pytest.mark.parametrize("device", bench_devices())
def test_linear(benchmark, measure, device, gemm, rows, impl):
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

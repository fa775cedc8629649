"""Helpers shared by the test files (a module of its own: the name `conftest` is ambiguous when
tests/ and benchmarks/ are collected in one run)."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
Outputs = TypeVar("Outputs")
FMA_SLICES_ENV = "HIPPO_SKINNY_FMA_SLICES"


def use_fma_slices(monkeypatch: pytest.MonkeyPatch, slices: str) -> None:
    """skinny_linear's FMA kernel (and the fused GEMM ops on it) with K sliced among `slices`
    warps per output pair ("1", "8", ...: capped at K's warp steps of 256), or with its own plan
    (from N, K and the SM count) for "planned"."""
    monkeypatch.delenv(FMA_SLICES_ENV, raising=False)
    if slices != "planned":
        monkeypatch.setenv(FMA_SLICES_ENV, slices)


def capture_cuda_graph(fn: Callable[[], Outputs], warmup: bool = True) -> tuple[torch.cuda.CUDAGraph, Outputs]:
    """fn() captured into a CUDA graph, and the outputs it returned inside the capture (the
    buffers each replay rewrites). As the runtime captures: on a side stream, after one eager
    call there unless warmup=False (for ops whose in-place writes the test counts), and with
    Python's cycle collector held off (it could free another graph mid-capture)."""
    from hippo.runtime.cuda_graphs import no_garbage_collection  # imported where a GPU captures

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    if warmup:
        with torch.cuda.stream(stream):
            fn()
        stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with no_garbage_collection(), torch.cuda.graph(graph, stream=stream):
        outputs = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, outputs


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN never passes a < comparison)."""
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of token samples against probs (normalised here); inf when a token of
    probability 0 was drawn."""
    counts = torch.bincount(samples.cpu(), minlength=probs.numel()).double()
    expected = counts.sum() * probs.double() / probs.double().sum()
    if bool(((expected == 0) & (counts > 0)).any()):
        return math.inf
    mask = expected > 0
    return float(((counts - expected) ** 2 / expected)[mask].sum())


def chi_square_critical(df: int, z: float = 4.75) -> float:
    """Wilson-Hilferty quantile of chi2(df) at the normal quantile z (4.75: about 1e-6)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3

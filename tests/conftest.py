"""Shared fixtures: every op test runs on the CPU always and on CUDA when a GPU is present."""
from __future__ import annotations

import pytest
import torch

import hippo_ext  # noqa: F401  (registers the ops)

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh, seeded CPU generator per test (inputs are drawn on the CPU, then moved)."""
    g = torch.Generator()
    g.manual_seed(torch.seed() % (2**31))
    return g


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN never passes a < comparison)."""
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))

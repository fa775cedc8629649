"""Shared fixtures: every op test runs on the CPU always and on CUDA when a GPU is present."""
from __future__ import annotations

import pytest
import torch

import hippo_ext  # noqa: F401  (registers the ops)
from hippo_testing import requires_cuda

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

"""Shared fixtures: every op test runs on the CPU always and on CUDA when a GPU is present."""
from __future__ import annotations

import os
import zlib

import pytest
import torch

import hippo_ext  # noqa: F401  (registers the ops)
from hippo_testing import requires_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def gen(request) -> torch.Generator:
    """A seeded CPU generator per test (inputs are drawn on the CPU, then moved). The seed comes
    from the test's id, so every test draws its own inputs and a failure reproduces; set
    HIPPO_TEST_SEED to draw other inputs (a soak run: loop over seeds)."""
    salt = os.environ.get("HIPPO_TEST_SEED", "")
    g = torch.Generator()
    g.manual_seed(zlib.crc32(f"{request.node.nodeid}{salt}".encode()))
    return g

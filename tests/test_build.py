"""The build registered what it promises: every op has a schema and a CPU kernel, and CUDA kernels
are all-or-nothing (all ops when hippo_ext was built with CUDA)."""
from __future__ import annotations

import os

import pytest
import torch

import hippo_ext


@pytest.mark.parametrize("op_name", hippo_ext.OP_NAMES)
def test_schema_and_cpu_kernel_registered(op_name: str) -> None:
    assert hasattr(torch.ops.hippo_ext, op_name)
    assert hippo_ext.has_kernel(op_name, "CPU")


def test_cuda_kernels_all_or_nothing() -> None:
    registered = [hippo_ext.has_kernel(op, "CUDA") for op in hippo_ext.OP_NAMES]
    assert all(registered) or not any(registered)
    assert hippo_ext.cuda_kernels_built() == all(registered)


@pytest.mark.skipif(os.environ.get("HIPPO_EXPECT_CUDA_KERNELS") != "1",
                    reason="set HIPPO_EXPECT_CUDA_KERNELS=1 where the build must include CUDA")
def test_cuda_kernels_built_where_expected() -> None:
    assert hippo_ext.cuda_kernels_built()


def test_every_public_op_is_wrapped() -> None:
    for op_name in hippo_ext.OP_NAMES:
        assert callable(getattr(hippo_ext, op_name))

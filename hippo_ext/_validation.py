"""Host-side checks of index *values*, shared by the wrappers.

The C++ ops check shapes, dtypes and devices always, and index values on the CPU path. On CUDA,
a value check needs a device-to-host copy (a sync), so the wrappers do it here, by default, and
callers inside CUDA graphs pass check=False. The kernels never access memory out of bounds
whatever the values; a bad value then gives a wrong answer, never a crash.
"""
from __future__ import annotations

import torch


def wants_value_check(tensor: torch.Tensor, check: bool) -> bool:
    """CPU ops validate values themselves; CUDA ops are validated here unless opted out."""
    return check and tensor.is_cuda


def check_index_range(index: torch.Tensor, upper: int, op: str, name: str, lower: int = 0) -> None:
    """Raise unless every value of index lies in [lower, upper)."""
    if index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < lower or hi >= upper:
        raise RuntimeError(
            f"{op}: {name} values must lie in [{lower}, {upper}), got min {lo} and max {hi}")


def check_strictly_ascending(index: torch.Tensor, op: str, name: str) -> None:
    """Raise unless index is strictly ascending along its last dimension."""
    if index.size(-1) > 1 and not bool((index[..., 1:] > index[..., :-1]).all()):
        raise RuntimeError(f"{op}: {name} must be strictly ascending along its last dimension")

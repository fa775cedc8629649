"""Host-side checks of index *values*, shared by the wrappers.

The C++ ops check shapes, dtypes and devices always, and index values on the CPU path. On CUDA,
a value check needs a device-to-host copy (a sync), so the wrappers do it here, by default, and
callers inside CUDA graphs pass check=False. The kernels never access memory out of bounds
whatever the values; a bad value then gives a wrong answer, never a crash.
"""
from __future__ import annotations

import math
import operator

import torch


def wants_value_check(tensor: torch.Tensor, check: bool) -> bool:
    """CPU ops validate values themselves; CUDA ops are validated here unless opted out. Not a
    tensor at all (a Python int or list): no check here, so that the op's schema names the
    argument that must be a tensor, rather than an AttributeError from this check."""
    return check and isinstance(tensor, torch.Tensor) and tensor.is_cuda


def check_index_range(index: torch.Tensor, upper: int, op: str, name: str, lower: int = 0) -> None:
    """Raise unless every value of index lies in [lower, upper)."""
    if index.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(index)).tolist()  # one host sync, not one per bound
    if lo < lower or hi >= upper:
        raise RuntimeError(
            f"{op}: {name} values must lie in [{lower}, {upper}), got min {lo} and max {hi}")


def check_unit_interval(values: torch.Tensor, op: str, name: str) -> None:
    """Raise unless every value lies in [0, 1] (NaN does not)."""
    if values.numel() and not bool(((values >= 0) & (values <= 1)).all()):
        raise RuntimeError(f"{op}: {name} values must lie in [0, 1]")


def check_probabilities(probs: torch.Tensor, op: str, name: str) -> None:
    """Raise unless every value is finite and non-negative (NaN is not)."""
    if probs.numel() and not bool(((probs >= 0) & probs.isfinite()).all()):
        raise RuntimeError(f"{op}: {name} must be finite and non-negative (probabilities)")


def check_strictly_ascending(index: torch.Tensor, op: str, name: str) -> None:
    """Raise unless index is strictly ascending along its last dimension."""
    if index.size(-1) > 1 and not bool((index[..., 1:] > index[..., :-1]).all()):
        raise RuntimeError(f"{op}: {name} must be strictly ascending along its last dimension")


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def as_int(value: object, op: str, name: str) -> int | torch.SymInt:
    """An integer argument (Python's or numpy's) that the op's int64 schema can take; 2.7 and
    True are refused, not read as 2 and 1, and 2**64 named, not left to the schema's parser. A
    SymInt (a size traced by torch.compile or torch.export) passes as it is: operator.index
    would specialise it to its current value."""
    if isinstance(value, torch.SymInt):  # torch.export's traced size
        return value
    if isinstance(value, bool):  # an int to operator.index; num_keep=True is a slip, not 1
        raise TypeError(f"{op}: {name} must be an integer, got the bool {value!r}")
    if isinstance(value, int):  # also a traced size, to Dynamo
        number = value
    else:
        try:
            number = operator.index(value)
        except TypeError:
            raise TypeError(f"{op}: {name} must be an integer, got {value!r}") from None
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(f"{op}: {name} must fit in int64, got {number}")
    return number


def default_scale(tensor: torch.Tensor) -> float:
    """1 / sqrt(D) for a [..., D] tensor; 1.0 where D is missing or 0, so that the op itself
    reports the bad shape."""
    head_dim = tensor.shape[-1] if tensor.dim() > 0 else 0
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0

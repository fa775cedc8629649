"""The fakes' registration, with the checks every fake needs.

A fake (`torch.library.register_fake`) gives an op's output shapes without touching data, for
torch.compile. The dispatcher also runs it *instead of the C++ op*, and so instead of the op's
checks, whenever any argument is on the meta device: a CPU call handed one meta tensor (say an HF
weight left on meta by a checkpoint that did not fill it) would return uninitialised memory, or
leave a tensor it should write untouched, without an error. So each fake first requires what the
C++ checks require of every op: all its tensors on one device. It also checks the dimensions its
shape arithmetic reads, so that torch.compile reports a bad shape as the eager op does and not
as an unpacking error or a division by zero.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

Fake = TypeVar("Fake", bound=Callable[..., object])


def fake_error(op: str, message: str) -> RuntimeError:
    """The error a fake raises: worded as the C++ checks word theirs."""
    return RuntimeError(f"{op}: {message}")


def _check_one_device(op: str, arguments: Mapping[str, object]) -> None:
    tensors = [(name, value) for name, value in arguments.items() if isinstance(value, torch.Tensor)]
    if not tensors:
        return
    first_name, first = tensors[0]
    for name, tensor in tensors[1:]:
        if tensor.device != first.device:
            raise fake_error(op, f"{name} is on {tensor.device} but {first_name} is on {first.device}")


def _check_dims(op: str, arguments: Mapping[str, object], dims: Mapping[str, tuple[int, ...]]) -> None:
    for name, allowed in dims.items():
        tensor = arguments[name]
        if isinstance(tensor, torch.Tensor) and tensor.dim() not in allowed:
            wanted = " or ".join(str(d) for d in allowed)
            raise fake_error(op, f"{name} must have {wanted} dimensions, got shape {tuple(tensor.shape)}")


def register_fake(op: str, *, dims: Mapping[str, int | tuple[int, ...]] | None = None
                  ) -> Callable[[Fake], Fake]:
    """Register the decorated function as the fake of hippo_ext::op, behind the checks above;
    `dims` names the tensors whose dimension count the fake relies on (a count or the counts
    allowed)."""
    wanted = {name: (d,) if isinstance(d, int) else tuple(d) for name, d in (dims or {}).items()}

    def decorate(fake: Fake) -> Fake:
        signature = inspect.signature(fake)
        unknown = set(wanted) - set(signature.parameters)
        assert not unknown, f"{op}: dims names no argument of the fake: {unknown}"

        @functools.wraps(fake)
        def checked(*args: object, **kwargs: object) -> object:
            arguments = signature.bind(*args, **kwargs).arguments
            _check_one_device(op, arguments)
            _check_dims(op, arguments, wanted)
            return fake(*args, **kwargs)

        torch.library.register_fake(f"hippo_ext::{op}")(checked)
        return fake

    return decorate

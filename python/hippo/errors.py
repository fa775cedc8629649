"""The errors a user can cause, and the small checks of user values that raise them: one clear
message each, no traceback needed (the `hippo` command prints the message alone)."""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager


class HippoError(RuntimeError):
    """An error a user can cause (bad video, prompt too long, unsupported model, ...): one clear
    message, no traceback needed."""


@contextmanager
def errors_prefixed(prefix: str) -> Iterator[None]:
    """HippoErrors raised inside start with `prefix: `: which file or checkpoint is at fault,
    where the code that found the fault does not know (a target and a draft each have one)."""
    try:
        yield
    except HippoError as err:
        raise HippoError(f"{prefix}: {err}") from err


def check_utf8(prompt: str, name: str = "the prompt") -> None:
    """Python keeps bytes of a command line or file that are not UTF-8 as lone surrogates,
    which tokenizers reject with a TypeError: say what is wrong instead."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise HippoError(f"{name} is not valid UTF-8 (character {error.start} is a lone "
                         "surrogate, from bytes that were not UTF-8): pass the text in UTF-8 "
                         "(check the terminal's or the shell's encoding)") from None


def is_int(value: object) -> bool:
    """An integer (Python's or numpy's), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_flag(name: str, value: object, allow_none: bool = False) -> None:
    """An on/off option must be a bool (None too where it means "the default for the device"):
    a truthy string such as "no" would otherwise switch it on."""
    if not isinstance(value, bool) and not (allow_none and value is None):
        allowed = "True, False or None" if allow_none else "True or False"
        raise HippoError(f"{name} must be {allowed}, got {value!r}")


def check_positive_rate(name: str, rate: object) -> None:
    """A rate (frames per second) must be a finite positive number (not a bool)."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not (math.isfinite(rate) and rate > 0):
        raise HippoError(f"{name} must be a positive number, got {rate!r}")


def short_repr(value: object, limit: int = 80) -> str:
    """repr(value) for an error message, cut after `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def first_few(items: list[str], separator: str, shown: int = 3) -> str:
    """The first `shown` items joined, and how many more there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return separator.join(items[:shown]) + more

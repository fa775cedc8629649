"""Where models run and in what: the device a user names (or the GPU when there is one) and the
dtypes hippo's kernels take."""
from __future__ import annotations

import torch

from hippo.errors import HippoError


def device_name(device: str | torch.device) -> str:
    """The GPU's model name for a CUDA device, "CPU" otherwise (what reports print)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


# The dtypes hippo's kernels take (fp32 on the CPU; bf16 and fp16 everywhere): a float64 or
# float8 model would fail inside its first prefill (rotary_tables' dtype check).
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_model_dtype(dtype: object, what: str = "dtype") -> None:
    """Refuse a model dtype hippo's kernels do not take, naming the ones they do."""
    if dtype not in MODEL_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in MODEL_DTYPES)
        raise HippoError(f"{what} must be one of {names}, got {dtype!r}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Where to run: `device` checked (cpu or an existing CUDA GPU), or by default the GPU when
    one is present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise HippoError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from err
    if resolved.type not in ("cpu", "cuda"):
        raise HippoError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    if resolved.type == "cpu":
        # torch takes "cpu:1" and runs on its one CPU device, whose tensors say "cpu": a
        # device compared with theirs must say so too.
        if resolved.index not in (None, 0):
            raise HippoError(f"device {device!r}: there is one CPU device (use cpu)")
        return torch.device("cpu")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise HippoError(f"device {device!r}: no CUDA GPU is available here (use cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise HippoError(f"device {device!r}: this machine has {torch.cuda.device_count()} "
                             "CUDA GPU(s)")
    return resolved

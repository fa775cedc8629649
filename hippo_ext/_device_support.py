"""Whether hippo_ext's kernels run on a given device: on a GPU, whether this build's CUDA
kernels do.

A kernel runs where the build holds machine code for the GPU's architecture, or PTX that the
driver can compile for it. The default build (TORCH_CUDA_ARCH_LIST "8.0+PTX;9.0a") holds sm_80
and sm_90a code and compute_80 PTX, so it runs on every GPU of compute capability 8.0 or later
(Blackwell through the PTX, compiled by the driver at first launch). Older GPUs lack what the
kernels are built on (cp.async, bf16 tensor cores), whatever the build. Launching on a GPU the
build does not cover fails with CUDA's "no kernel image is available"; this module finds that
out once per GPU, so that callers can say so plainly or choose another path.
"""
from __future__ import annotations

import functools

import torch

# What the kernels need: cp.async copies and bf16 mma.sync (compute capability 8.0).
LEAST_CAPABILITY = (8, 0)
# CUDA's messages for a launch with no code for the device (cudaErrorNoKernelImageForDevice;
# older drivers report cudaErrorInvalidDeviceFunction).
_NO_CODE_MESSAGES = ("no kernel image is available", "invalid device function")


def kernels_unsupported(device: torch.device | str | int) -> str | None:
    """None when hippo_ext's kernels run on `device`: the CPU always, a GPU where this build's
    CUDA kernels do; otherwise why not, in a sentence. The first call for a GPU runs one small
    op there. (An int is a CUDA device index.)"""
    from hippo_ext import cuda_kernels_built  # the package's: this module is imported by it

    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"hippo_ext has kernels for the CPU and CUDA GPUs only, not for {device.type}"
    if not cuda_kernels_built():
        return ("this build of hippo_ext has no CUDA kernels (built where torch had no CUDA or "
                "nvcc was missing, or with HIPPO_CPU_ONLY=1)")
    if not torch.cuda.is_available():
        return "no CUDA GPU is available here"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _unsupported_on(index)


@functools.cache
def _unsupported_on(index: int) -> str | None:
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < LEAST_CAPABILITY:
        return (f"{name} has compute capability {major}.{minor}; hippo_ext's CUDA kernels need "
                f"{LEAST_CAPABILITY[0]}.{LEAST_CAPABILITY[1]} or later")
    try:
        _launch_probe(index)
    except RuntimeError as error:
        if not any(message in str(error) for message in _NO_CODE_MESSAGES):
            raise
        return (f"this build of hippo_ext holds no code for {name} (compute capability "
                f"{major}.{minor}): rebuild it with TORCH_CUDA_ARCH_LIST naming {major}.{minor}, "
                "or with the default, whose compute_80 PTX the driver compiles for any GPU of "
                "compute capability 8.0 or later")
    return None


def _launch_probe(index: int) -> None:
    """One launch of a hippo_ext kernel on GPU `index` (every .cu file is compiled for the same
    targets, so one kernel answers for all)."""
    x = torch.ones(1, 8, device=torch.device("cuda", index))
    torch.ops.hippo_ext.rms_norm(x, x[0], 1e-6)
    torch.cuda.synchronize(index)

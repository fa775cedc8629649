"""`hippo info`: what this installation holds and can run, to check a build and to paste into a
bug report: versions, whether hippo_ext's CUDA kernels are built, each GPU and whether they run
there (the runtime falls back to HF's modules where they do not), and the video decoders."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

import hippo
import hippo_ext
from hippo.video import available_backends

# The distributions whose versions decide behaviour (transformers: position ids and cache layout;
# the decoders: which files open).
PACKAGES = ("transformers", "decord", "opencv-python-headless", "opencv-python", "pillow")


def installation_report() -> list[tuple[str, str]]:
    """(what, value) rows, in the order `hippo info` prints them."""
    rows = [("hippo", hippo.__version__), ("python", platform.python_version()),
            ("torch", _torch_build())]
    rows += [(name, version) for name in PACKAGES if (version := _version(name)) is not None]
    rows.append(("hippo_ext library", hippo_ext._C.__file__))  # which build is loaded
    built = hippo_ext.cuda_kernels_built()
    rows.append(("hippo_ext CUDA kernels", "built" if built else "not built (CPU kernels only)"))
    rows += [(f"cuda:{index}", _gpu(index, built)) for index in range(torch.cuda.device_count())]
    rows.append(("video decoders", ", ".join(available_backends()) or "none installed"))
    return rows


def _torch_build() -> str:
    if torch.version.cuda is None:
        return f"{torch.__version__} (CPU build)"
    available = "a GPU is visible" if torch.cuda.is_available() else "no GPU visible"
    return f"{torch.__version__} (CUDA {torch.version.cuda}; {available})"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu(index: int, kernels_built: bool) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    described = f"{torch.cuda.get_device_name(index)}, compute capability {major}.{minor}"
    if not kernels_built:
        return described
    reason = hippo_ext.kernels_unsupported(index)
    verdict = "hippo_ext kernels run" if reason is None else f"hippo_ext kernels do not run: {reason}"
    return f"{described}; {verdict}"


def print_report() -> None:
    rows = installation_report()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")

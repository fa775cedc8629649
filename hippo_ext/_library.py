"""Loads hippo_ext's compiled library (which registers every op's schema and kernels), or says
how to get one that loads: a missing build, or one made against another torch, would otherwise
surface as a bare ImportError naming a module or a mangled C++ symbol."""
from __future__ import annotations

import torch

try:
    import hippo_ext._C  # noqa: F401
except ImportError as error:
    if isinstance(error, ModuleNotFoundError) and error.name == "hippo_ext._C":
        raise ImportError("hippo_ext's compiled library is not built in this tree: build it with "
                          "`pip install --no-build-isolation .` (or `make install`)") from error
    _build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
    raise ImportError(
        f"hippo_ext's compiled library failed to load ({error}). It must be built against the "
        f"torch that loads it, here torch {torch.__version__} ({_build}): rebuild it with "
        "`pip install --no-build-isolation .` after any change of torch") from error

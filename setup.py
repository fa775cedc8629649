"""Build of hippo_ext (and the pure-Python `hippo` package).

The one description of the build: sources are every csrc/*.cpp, csrc/cpu/*.cpp and, when a
CUDA torch and nvcc are present, csrc/cuda/*.cu. CMakeLists.txt globs the same folders for
C++ consumers, so no source list is written twice.

Environment knobs:
  HIPPO_CPU_ONLY=1          build the CPU kernels only, even with a CUDA torch and nvcc;
  TORCH_CUDA_ARCH_LIST      CUDA targets (default "8.0+PTX;9.0a": sm_80 and Hopper's sm_90a
                            code, and compute_80 PTX that the driver compiles for later GPUs
                            such as Blackwell's, which the two do not run on);
  MAX_JOBS                  parallel compile jobs (ninja).
"""
from __future__ import annotations

import glob
import os
import re
import site
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0+PTX;9.0a"

# torch finds nvcc through CUDA_HOME; on these machines `nvcc` on PATH is a wrapper script whose
# parent folder is not the toolkit, so point at the real toolkit when nobody has.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

NO_TORCH = ("hippo_ext compiles against the torch it will run with, and none is importable here. "
            "Install torch into this environment first, then build with `pip install "
            "--no-build-isolation .` (`python -m build --no-isolation` for a wheel or sdist): "
            "an isolated build environment has no torch.")
try:
    import torch  # noqa: E402  (after CUDA_HOME is settled)
except ImportError as error:
    raise SystemExit(f"error: {NO_TORCH} ({error})") from None
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _version() -> str:
    """hippo.__version__, read without importing the package (its imports need the build)."""
    text = (ROOT / "python" / "hippo" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / pattern)))


def _want_cuda() -> bool:
    if os.environ.get("HIPPO_CPU_ONLY", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _pip_cuda_include_dirs() -> list[str]:
    """Headers (cublas_v2.h, cusparse.h, ...) that torch's CUDA headers include but that a
    minimal toolkit lacks; the nvidia-* wheels that a CUDA torch pulls in carry them."""
    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = []
    for root in roots:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            path = os.path.join(root, sub)
            if os.path.isdir(path):
                found.append(path)
    return found


def _extension():
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # The C++ standard is torch's own choice (C++20 from torch 2.13). HIPPO_PYTHON_MODULE: the
    # library is also the Python module hippo_ext._C (CMake's build for libtorch is not).
    cxx_flags = ["-O3", "-DHIPPO_PYTHON_MODULE"]
    include_dirs = [str(ROOT / "csrc")]
    if not _want_cuda():
        return CppExtension("hippo_ext._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                  "-DHIPPO_WITH_CUDA"]
    return CUDAExtension(
        "hippo_ext._C",
        sources + _sources("csrc/cuda/*.cu"),
        include_dirs=include_dirs + _pip_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags + ["-DHIPPO_WITH_CUDA"], "nvcc": nvcc_flags},
    )


# What `import hippo` and the `hippo` command need, as ranges; requirements.txt pins the one
# environment that CI and `make` build and test (torch 2.14.1, transformers 5.17.0) and adds the
# test tools. `--no-build-isolation` keeps the build on the environment's torch; offline, add
# `--no-deps` and bring these yourself.
RUNTIME_REQUIREMENTS = [
    "torch>=2.11",
    "numpy",
    "transformers>=5.17,<6",
    "decord>=0.6; platform_machine == 'x86_64'",  # no other wheels: OpenCV decodes there
    "opencv-python-headless",
    "pillow",
    "tqdm",
]
EXTRA_REQUIREMENTS = {
    # `hippo bench`: its plot, and Video-MME's parquet annotations.
    "bench": ["matplotlib", "pyarrow"],
}

setup(
    name="hippo",
    version=_version(),
    description="HIPPO: lossless speculative decoding for video LLMs (kernels: hippo_ext)",
    python_requires=">=3.10",
    packages=["hippo_ext"] + find_packages("python"),
    package_dir={"hippo": "python/hippo"},
    # PEP 561: type checkers read the packages' hints.
    package_data={"hippo": ["py.typed"], "hippo_ext": ["py.typed"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    entry_points={"console_scripts": ["hippo = hippo.cli:main"]},
    install_requires=RUNTIME_REQUIREMENTS,
    extras_require=EXTRA_REQUIREMENTS,
    zip_safe=False,
)

"""The build registered what it promises: every op has a schema and a CPU kernel, and CUDA kernels
are all-or-nothing (all ops when hippo_ext was built with CUDA)."""
from __future__ import annotations

import importlib.machinery
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath

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


ROOT = Path(__file__).resolve().parents[1]
QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


@pytest.fixture(scope="module")
def sdist_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of a source distribution made from this tree, by path inside it. Made with CUDA
    off, as on a machine without nvcc: what it carries must not depend on that."""
    out = tmp_path_factory.mktemp("sdist")
    # --egg-base keeps the metadata out of the source tree.
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out),
                    "sdist", "--dist-dir", str(out)],
                   cwd=ROOT, env={**os.environ, "HIPPO_CPU_ONLY": "1"}, check=True,
                   capture_output=True, timeout=300)
    (archive,) = out.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        return {member.name.split("/", 1)[1]: tar.extractfile(member).read()
                for member in tar.getmembers() if member.isfile()}


def test_sdist_carries_every_kernel_source_and_header(sdist_files: dict[str, bytes]) -> None:
    on_disk = {path.relative_to(ROOT).as_posix() for path in (ROOT / "csrc").rglob("*")
               if path.suffix in {".cpp", ".cu", ".h", ".cuh"}}
    assert on_disk, "no kernel sources found under csrc/"
    assert sorted(on_disk - sdist_files.keys()) == []


def test_sdist_resolves_every_quoted_include(sdist_files: dict[str, bytes]) -> None:
    # setup.py compiles with csrc/ on the include path; a quoted include may also be relative
    # to the including file.
    unresolved = []
    for name, text in sdist_files.items():
        if not name.startswith("csrc/"):
            continue
        for target in QUOTED_INCLUDE.findall(text.decode()):
            beside = (PurePosixPath(name).parent / target).as_posix()
            if f"csrc/{target}" not in sdist_files and beside not in sdist_files:
                unresolved.append(f"{name}: {target}")
    assert unresolved == []


def test_sdist_carries_the_build_and_set_up_files(sdist_files: dict[str, bytes]) -> None:
    wanted = {"setup.py", "pyproject.toml", "requirements.txt", "Makefile", "CMakeLists.txt",
              "README.md", "python/hippo/cli.py", "hippo_ext/__init__.py", "tests/conftest.py"}
    assert sorted(wanted - sdist_files.keys()) == []
    assert not [name for name in sdist_files if name.endswith((".so", ".pyc"))]


def _requirement_names(lines: list[str], prefix: str = "") -> set[str]:
    """The distribution names of requirement lines (after `prefix`, such as "Requires-Dist:"),
    without versions, markers or extras; comments and blank lines skipped."""
    return {re.split(r"[<>=!~ ;\[]", line[len(prefix):].strip(), maxsplit=1)[0].lower()
            for line in lines if line.startswith(prefix) and line[len(prefix):].strip()
            and not line.strip().startswith("#")}


def test_sdist_declares_the_runtime_dependencies(sdist_files: dict[str, bytes]) -> None:
    """`pip install .` must bring what `import hippo` and the hippo command import."""
    metadata = sdist_files["PKG-INFO"].decode()
    names = _requirement_names(metadata.splitlines(), "Requires-Dist:")
    assert {"torch", "transformers", "decord", "opencv-python-headless", "pillow", "tqdm",
            "numpy"} <= names
    assert "Provides-Extra: bench" in metadata


def test_the_pinned_environment_installs_every_declared_dependency(
        sdist_files: dict[str, bytes]) -> None:
    """requirements.txt (what make and CI install) must hold every dependency setup.py declares,
    or CI would test without one that users get."""
    declared = _requirement_names(sdist_files["PKG-INFO"].decode().splitlines(), "Requires-Dist:")
    pinned = _requirement_names((ROOT / "requirements.txt").read_text().splitlines())
    assert sorted(declared - pinned) == []


SETUP_WITHOUT_TORCH = """
import runpy, sys
sys.modules["torch"] = None  # what an isolated build environment gives setup.py: no torch
sys.argv[0] = "setup.py"
runpy.run_path("setup.py", run_name="__main__")
"""


def test_an_isolated_build_stops_and_says_how_to_build() -> None:
    """`pip install .` without --no-build-isolation must not fetch some other torch (gigabytes of
    a CUDA build) and compile against it in silence: torch is no build requirement, and setup.py
    without a torch stops with the command that builds against the environment's."""
    # the [build-system] table's requires list (read without tomllib, which Python 3.10 lacks)
    table = re.search(r"^\[build-system\]$(.*?)(?=^\[|\Z)",
                      (ROOT / "pyproject.toml").read_text(), re.S | re.M)
    listed = re.search(r"^requires\s*=\s*\[(.*?)\]", table.group(1), re.S | re.M)
    requires = re.findall(r"\"([^\"]+)\"", listed.group(1))
    assert "setuptools>=64" in requires
    assert "torch" not in _requirement_names(requires)
    done = subprocess.run([sys.executable, "-c", SETUP_WITHOUT_TORCH, "--name"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "pip install --no-build-isolation ." in done.stderr
    assert "Traceback" not in done.stderr


LOAD_CMAKE_LIBRARY = """
import sys, torch
library, dispatch_keys, ops = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
torch.ops.load_library(library)
for key in dispatch_keys:
    missing = [op for op in ops
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"hippo_ext::{op}", key)]
    assert not missing, f"no {key} kernel for {missing}"
x, w = torch.randn(3, 7), torch.randn(7)
want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
torch.testing.assert_close(torch.ops.hippo_ext.rms_norm(x, w, 1e-6), want)
"""
CAN_COMPILE_CUDA = torch.version.cuda is not None and shutil.which("nvcc") is not None


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.parametrize("with_cuda", [False, pytest.param(True, marks=pytest.mark.skipif(
    not CAN_COMPILE_CUDA, reason="needs a CUDA torch and nvcc (no GPU)"))], ids=["cpu", "cuda"])
def test_cmake_build_registers_every_op_for_cpp_consumers(tmp_path: Path, with_cuda: bool) -> None:
    """CMakeLists.txt (for libtorch applications) globs the same sources as setup.py: its library
    must build, load without hippo_ext's Python package and register every op, for CUDA too
    where a CUDA torch and nvcc are present (no GPU needed), and need no Python (a libtorch
    application may have none)."""
    def run(args: list[str]) -> None:
        done = subprocess.run(args, capture_output=True, text=True, timeout=2400)
        output = (done.stdout + done.stderr)[-4000:]
        assert done.returncode == 0, f"{' '.join(args[:3])} failed:\n{output}"

    # The configure line CMakeLists.txt documents; it must find a CUDA torch's toolkit and nvrtc
    # by itself. One CUDA target: the flags are under test, not every architecture.
    cuda = ["-DHIPPO_WITH_CUDA=ON", "-DTORCH_CUDA_ARCH_LIST=9.0a"] if with_cuda else [
        "-DHIPPO_WITH_CUDA=OFF"]
    run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), *cuda,
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
         *(["-GNinja"] if shutil.which("ninja") else [])])
    run(["cmake", "--build", str(tmp_path), "--parallel", str(os.cpu_count() or 1)])
    (library,) = tmp_path.glob("libhippo_ext.*")
    keys = "CPU,CUDA" if with_cuda else "CPU"
    run([sys.executable, "-c", LOAD_CMAKE_LIBRARY, str(library), keys, *hippo_ext.OP_NAMES])
    if shutil.which("nm"):
        symbols = subprocess.run(["nm", "-D", str(library)], capture_output=True, text=True,
                                 check=True).stdout.split()
        python_symbols = [name for name in symbols if name.startswith(("Py", "_Py"))]
        assert not python_symbols, f"the libtorch library uses Python: {python_symbols[:5]}"


def test_the_distribution_carries_the_package_version(sdist_files: dict[str, bytes]) -> None:
    import hippo

    assert f"Version: {hippo.__version__}\n" in sdist_files["PKG-INFO"].decode()


IMPORT_HIPPO_EXT = """
import sys
# An editable install's finder maps hippo_ext's modules to the source tree whatever sys.path
# says: take it out, so that the copy in the working directory is the one imported.
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
try:
    import hippo_ext
except ImportError as error:
    print(error)
"""


@pytest.mark.parametrize("library", ["missing", "corrupt"])
def test_a_library_that_does_not_load_says_how_to_build_one(tmp_path: Path, library: str) -> None:
    """hippo_ext's Python files beside no compiled library, or beside one that cannot load (a
    build for another torch fails alike, naming a C++ symbol): one message saying to rebuild."""
    package = tmp_path / "hippo_ext"
    package.mkdir()
    for source in (ROOT / "hippo_ext").glob("*.py"):
        shutil.copy(source, package)
    if library == "corrupt":
        (package / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not a library")
    done = subprocess.run([sys.executable, "-c", IMPORT_HIPPO_EXT], cwd=tmp_path, timeout=120,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    message = done.stdout.strip()
    assert "pip install --no-build-isolation ." in message
    if library == "missing":
        assert message.startswith("hippo_ext's compiled library is not built in this tree")
    else:
        assert message.startswith("hippo_ext's compiled library failed to load (")
        assert f"here torch {torch.__version__}" in message


def test_the_packages_install_their_type_marker(tmp_path: Path) -> None:
    """PEP 561: py.typed in both packages as built for a wheel (build_py: no compiling)."""
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                    "build_py", "--build-lib", str(tmp_path / "lib")],
                   cwd=ROOT, env={**os.environ, "HIPPO_CPU_ONLY": "1"}, check=True,
                   capture_output=True, timeout=300)
    for package in ("hippo", "hippo_ext"):
        assert (tmp_path / "lib" / package / "py.typed").is_file(), package

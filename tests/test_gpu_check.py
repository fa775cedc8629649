"""scripts/gpu_check.sh, the one script a device call runs: it must work the first time there
(15 minutes of device time a session, machine start included), so what can be checked without a
GPU is checked here."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _phase(name: str) -> str:
    """The body of one phase of the script's case statement."""
    match = re.search(rf"^    {re.escape(name)}\)\n(.*?)^      ;;", SCRIPT.read_text(), re.M | re.S)
    assert match, f"no phase {name}"
    return match.group(1)


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_file_with_cuda_tests_runs_in_fast_or_speculative():
    """`-m cuda` in those two phases is the only GPU run most CUDA tests get: a test file they do
    not name is never run on a GPU (test_preprocess_vs_hf's and test_pipeline's were not)."""
    named = set(re.findall(r"\btest_\w+", _phase("fast") + _phase("speculative_tests|speculative")))
    for name in named:
        assert (ROOT / "tests" / f"{name}.py").exists(), f"gpu_check.sh names {name}, which is gone"
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
         "-m", "cuda", "tests"], cwd=ROOT, capture_output=True, text=True).stdout
    with_cuda_tests = set(re.findall(r"^tests/(test_\w+)\.py::", collected, re.M))
    assert with_cuda_tests, collected[-2000:]
    assert with_cuda_tests - named == set()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the runtime phase would time")
def test_logs_come_back_in_two_files_and_a_failed_phase_fails_the_run(tmp_path):
    """The device tool returns at most 8 files from $OUT: the script leaves summary.txt and
    logs.tgz there. The runtime phase fails without a GPU, and the run's exit status says so."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), LOGS=str(tmp_path / "logs"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run(["bash", str(SCRIPT), "runtime"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0, run.stdout
    assert "FAILED: runtime" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == ["logs.tgz", "summary.txt"]
    assert "=== runtime" in (out / "summary.txt").read_text()
    with tarfile.open(out / "logs.tgz") as logs:
        assert "./runtime.md" in logs.getnames()


def test_the_phase_list_is_the_case_statement_s():
    """The names checked before any phase runs are the phases the script has."""
    listed = re.search(r'^PHASES="([^"]*)"', SCRIPT.read_text(), re.M).group(1).split()
    labels = re.findall(r"^    ([a-z0-9_|]+)\)$", SCRIPT.read_text(), re.M)
    assert sorted(listed) == sorted(name for label in labels for name in label.split("|"))


@pytest.mark.parametrize("args,code", [(["build", "fast", "speculatve"], 2), (["--help"], 0),
                                       ([], 0)])
def test_a_misspelt_phase_or_help_runs_nothing(tmp_path, args, code):
    """A misspelt last phase was found after the build and the tests had spent their device
    time; it now stops the script before anything runs (no build, no $OUT), as --help does."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), LOGS=str(tmp_path / "logs"))
    run = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == code, run.stdout + run.stderr
    assert "Phases: build toolchain" in run.stdout
    assert ("unknown phase speculatve" in run.stdout) == (code == 2)
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()

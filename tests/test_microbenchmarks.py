"""The benchmarks users read run where the tests run: the op microbenchmarks (`pytest benchmarks
--benchmark-only`, on the CPU at small shapes) with benchmarks/report.py over their JSON, and
bench_runtime.py's CPU smoke test. CI would not otherwise run them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_microbenchmarks_run_and_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q",
         "-p", "no:cacheprovider", f"--benchmark-json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert len(benchmarks) >= 10
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert benchmarks[0]["name"].split("[")[0] in report.stdout


def test_bench_runtime_smoke_test_runs_on_the_cpu() -> None:
    """`bench_runtime.py --tiny`: every variant column and the HF baselines on a tiny model."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_runtime.py"), "--tiny"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ,
                               "PYTHONPATH": f"{ROOT / 'python'}:{ROOT}"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| tiny |")]
    assert any("| decode (1) |" in row for row in rows)
    assert any("| verify (9) |" in row for row in rows)

"""The op microbenchmarks (`pytest benchmarks --benchmark-only`, what users read) run where the
tests run (on the CPU at small shapes), and benchmarks/report.py tables their JSON: CI would not
otherwise collect them."""
from __future__ import annotations

import json
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

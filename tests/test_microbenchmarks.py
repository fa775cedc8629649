"""The benchmarks users read run where the tests run: the op microbenchmarks (`pytest benchmarks
--benchmark-only`, on the CPU at small shapes) with benchmarks/report.py over their JSON, and
bench_runtime.py's CPU smoke test. CI would not otherwise run them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

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
    assert "no floors" in done.stdout.splitlines()[0]  # a CPU run says it is one
    rows = [line for line in done.stdout.splitlines() if line.startswith("| tiny |")]
    assert any("| decode (1) |" in row for row in rows)
    assert any("| verify (9) |" in row for row in rows)
    header = next(line for line in done.stdout.splitlines() if line.startswith("| model |"))
    assert all(row.count("|") == header.count("|") for row in rows)


def test_bench_runtime_tables_hold_the_variants_asked_for(monkeypatch) -> None:
    """A column per variant asked for, in the order asked: unasked ones printed n/a in every
    row, like a step a variant refused."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_runtime
    asked = list(bench_runtime.VARIANTS)[:2][::-1]
    row = bench_runtime.Row("7b", 6400, "decode (1)", 4.0, None, 3.0,
                            {asked[0]: 5.0, asked[1]: None})
    for variants in ([], asked[:1], asked):
        header = bench_runtime.markdown_header(torch.device("cpu"), torch.float32, variants)
        columns = header.splitlines()[2].split(" | ")
        assert [c for c in columns if c.startswith("hippo ") and c != "hippo ms"] == [
            f"hippo {name} ms" for name in variants] + ["hippo / floor"]
        cells = row.cells(variants)
        assert len(cells) == len(columns)
        assert cells[4:4 + len(variants)] == ["5.000", "n/a"][:len(variants)]
    assert bench_runtime.parse_args(["--variants", ",".join(asked)]).variants == asked
    assert bench_runtime.parse_args(["--no-variants"]).variants == []


def test_floor_bandwidth_is_recorded_only_for_the_lent_cards(monkeypatch) -> None:
    """The floors' copy bandwidth: the recorded figure for the lent H100 SXM and H200 only; any
    other card (H100 PCIe or NVL, GH200, A100, L40S: 0.9-4 TB/s) is measured, not given 3.0."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_runtime
    import timing
    monkeypatch.setattr(timing, "measured_copy_bytes_per_s", lambda index: 1.25e12)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cards = {"NVIDIA H100 80GB HBM3": 3.0e12, "NVIDIA H200": 4.3e12, "NVIDIA H200 NVL": 4.3e12,
             "NVIDIA H100 PCIe": 1.25e12, "NVIDIA H100 NVL": 1.25e12,
             "NVIDIA GH200 480GB": 1.25e12, "NVIDIA A100-SXM4-80GB": 1.25e12,
             "NVIDIA L40S": 1.25e12}
    for name, expected in cards.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert timing.hbm_bytes_per_s() == expected, name
        bandwidth, source = bench_runtime.bandwidth(torch.device("cuda"))
        assert bandwidth == expected, name
        assert ("measured" in source) == (expected == 1.25e12), source
    assert bench_runtime.bandwidth(torch.device("cpu")) is None


def test_report_says_which_device_and_bandwidth(tmp_path: Path) -> None:
    """report.py's table says CPU for a CPU run (host clock, no floors) and, for a GPU run, the
    bandwidth its floors used."""
    def report(extra: dict) -> str:
        path = tmp_path / "bench.json"
        path.write_text(json.dumps({
            "datetime": "now", "machine_info": {"cpu": {"brand_raw": "Some CPU"}},
            "benchmarks": [{"name": "test_op[x]", "stats": {"median": 1e-5}, "extra_info": extra}]}))
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(path)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert "Device: CPU (Some CPU)" in report({"impl": "hippo"})
    out = report({"impl": "hippo", "gpu": "NVIDIA H200", "cuda_graph_us": 2.0,
                  "hbm_floor_us": 1.0, "x_floor": 2.0,
                  "hbm_bandwidth": "4.30 TB/s (recorded copy bandwidth of the H200)"})
    assert "Device: NVIDIA H200; floors at 4.30 TB/s" in out
    assert "| impl=hippo |" in out  # the bandwidth is in the header, not in every row

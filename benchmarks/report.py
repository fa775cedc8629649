"""Turn a pytest-benchmark JSON file into the markdown table kept in benchmarks/RESULTS.md.

    pytest benchmarks --benchmark-only --benchmark-json bench.json
    python benchmarks/report.py bench.json
"""
from __future__ import annotations

import json
import sys


def rows(report: dict) -> list[str]:
    lines = ["| benchmark | host median (us) | CUDA-event median, one eager call (us) "
             "| in a CUDA graph, per call (us) | HBM floor (us) | x floor | info |",
             "|---|---|---|---|---|---|---|"]
    skip = {"cuda_event_median_us", "cuda_graph_us", "hbm_floor_us", "x_floor", "gpu",
            "hbm_bandwidth"}
    for bench in report["benchmarks"]:
        extra = bench.get("extra_info", {})
        info = ", ".join(f"{k}={v}" for k, v in extra.items() if k not in skip)
        lines.append(
            f"| {bench['name']} | {bench['stats']['median'] * 1e6:.1f} "
            f"| {extra.get('cuda_event_median_us', '-')} | {extra.get('cuda_graph_us', '-')} "
            f"| {extra.get('hbm_floor_us', '-')} "
            f"| {extra.get('x_floor', '-')} | {info} |")
    return lines


def main(path: str) -> None:
    with open(path) as f:
        report = json.load(f)
    machine = report.get("machine_info", {})
    extras = [b.get("extra_info", {}) for b in report["benchmarks"]]
    gpus = {extra.get("gpu") for extra in extras} - {None}
    cpu = machine.get("cpu", {}).get("brand_raw", "")
    print(f"<!-- {report.get('datetime', '')} {cpu} {', '.join(sorted(gpus))} -->")
    if gpus:
        floors = sorted({extra["hbm_bandwidth"] for extra in extras if "hbm_bandwidth" in extra})
        print(f"Device: {', '.join(sorted(gpus))}; floors at {'; '.join(floors) or 'n/a'}.\n")
    else:
        print(f"Device: CPU ({cpu or 'unknown'}): host-clock times of the CPU kernels, no CUDA "
              "columns and no floors; absolute times count from a GPU run only.\n")
    print("\n".join(rows(report)))


if __name__ == "__main__":
    main(sys.argv[1])

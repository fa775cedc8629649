"""Timing helpers for the op microbenchmarks.

pytest-benchmark times each op with the host clock around a synchronised call; on the GPU we also
record the median of CUDA-event timings (what RESULTS.md quotes) and the op's HBM floor.
"""
from __future__ import annotations

import statistics

import pytest
import torch

import hippo_ext  # noqa: F401

HBM_BYTES_PER_S = 3.0e12  # device-to-device copy, read + write, measured on the H100 (NOTES.md)


def cuda_median_us(fn, warmup: int = 5, reps: int = 50) -> float:
    """Median CUDA-event time of fn() in microseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


@pytest.fixture
def measure(benchmark):
    """measure(fn, device, bytes_moved, **info): time fn with pytest-benchmark and, on CUDA, with
    CUDA events; record the median, the HBM floor and extra info in the benchmark's extra_info."""

    def run(fn, device: str, bytes_moved: int | None = None, **info):
        if device == "cuda":
            def timed():
                fn()
                torch.cuda.synchronize()
            median = cuda_median_us(fn)
            benchmark.extra_info["cuda_event_median_us"] = round(median, 2)
            if bytes_moved is not None:
                floor = bytes_moved / HBM_BYTES_PER_S * 1e6
                benchmark.extra_info["hbm_floor_us"] = round(floor, 2)
                benchmark.extra_info["x_floor"] = round(median / max(floor, 1e-9), 2)
        else:
            timed = fn
        benchmark.extra_info.update(info)
        benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=2)

    return run


def bench_devices() -> list[str]:
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]

"""Timing helpers for the op microbenchmarks.

pytest-benchmark times each call with the host clock (what a Python caller sees, launch overhead
included). On the GPU we also record:
  * cuda_event_median_us: CUDA events around one eager call. When the host needs longer to launch
    the op than the GPU needs to run it, this measures the host, not the kernel.
  * cuda_graph_us: per-call time of back-to-back calls replayed from one CUDA graph, which is how
    the runtime runs these ops (decode and verify steps are graph-captured). With several input
    sets the calls cycle through them, so that repeats are not served from the L2 cache.
and the op's HBM floor (bytes it must move once / the card's measured copy bandwidth).
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import pytest
import torch

import hippo_ext  # noqa: F401

# Device-to-device copy bandwidth, read + write, measured on the lent machines: H100 3.0 TB/s
# (NOTES.md), H200 4.3 TB/s (device/KINDS.md). Other cards fall back to the H100 figure.
HBM_BYTES_PER_S = {"H200": 4.3e12, "H100": 3.0e12}
GRAPH_CALLS = 24


def hbm_bytes_per_s() -> float:
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), 3.0e12)


def cuda_median_us(fn: Callable[[], object], warmup: int = 5, reps: int = 50) -> float:
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


def cuda_graph_us(fns: Sequence[Callable[[], object]], calls: int = GRAPH_CALLS) -> float:
    """Per-call time of `calls` back-to-back calls (cycling through fns) replayed from one graph.
    Captured on its own stream (NOTES.md: graphs sharing the default capture stream can hang)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # warm up outside the capture (lazy init, allocator)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fns[i % len(fns)]()
    return cuda_median_us(graph.replay, warmup=3, reps=20) / calls


@pytest.fixture
def measure(benchmark):
    """measure(fn, device, bytes_moved, graph=..., **info): time fn with pytest-benchmark and, on
    CUDA, with CUDA events; with graph=True (or a list of equivalent callables over distinct
    inputs) also the per-call time inside a CUDA graph. Results go to benchmark.extra_info."""

    def run(fn: Callable[[], object] | Sequence[Callable[[], object]], device: str,
            bytes_moved: int | None = None, graph: bool = False, **info) -> None:
        fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
        first = fns[0]
        if device == "cuda":
            def timed():
                first()
                torch.cuda.synchronize()
            extra = benchmark.extra_info
            extra["cuda_event_median_us"] = round(cuda_median_us(first), 2)
            if graph:
                try:
                    extra["cuda_graph_us"] = round(cuda_graph_us(fns), 2)
                except RuntimeError as error:  # e.g. a baseline that syncs with the host
                    extra["cuda_graph_us"] = f"not capturable: {str(error).splitlines()[0][:60]}"
            if bytes_moved is not None:
                floor = bytes_moved / hbm_bytes_per_s() * 1e6
                extra["hbm_floor_us"] = round(floor, 2)
                best = extra.get("cuda_graph_us")
                best = best if isinstance(best, float) else extra["cuda_event_median_us"]
                extra["x_floor"] = round(best / max(floor, 1e-9), 2)
            extra["gpu"] = torch.cuda.get_device_name()
        else:
            timed = first
        benchmark.extra_info.update(info)
        benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=2)

    return run


def bench_devices() -> list[str]:
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]

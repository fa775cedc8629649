"""GPU timing helpers of the microbenchmarks (a module of its own: the name `conftest` is
ambiguous when tests/ and benchmarks/ are collected in one run)."""
from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence

import torch

from hippo.runtime.cuda_graphs import no_garbage_collection

# Device-to-device copy bandwidth, read + write, measured on the lent machines: H100 3.0 TB/s,
# H200 4.3 TB/s. Other cards fall back to the H100 figure.
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
    Captured on its own stream (graphs sharing the default capture stream were seen to hang)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # warm up outside the capture (lazy init, allocator)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with no_garbage_collection(), torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fns[i % len(fns)]()
    return cuda_median_us(graph.replay, warmup=3, reps=20) / calls


def bench_devices() -> list[str]:
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]


def bench_rows(default: Sequence[int]) -> list[int]:
    """The row counts M a GEMM benchmark runs: `default`, or those of HIPPO_BENCH_ROWS (e.g.
    "1" or "1,9": a short device run)."""
    value = os.environ.get("HIPPO_BENCH_ROWS", "")
    return [int(rows) for rows in value.split(",")] if value else list(default)

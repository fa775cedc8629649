"""GPU timing helpers of the microbenchmarks (a module of its own: the name `conftest` is
ambiguous when tests/ and benchmarks/ are collected in one run)."""
from __future__ import annotations

import functools
import os
import re
import statistics
from collections.abc import Callable, Sequence

import torch

from hippo.runtime.cuda_graphs import no_garbage_collection

# Device-to-device copy bandwidth, read + write, measured on the lent machines: the H100 SXM
# ("NVIDIA H100 80GB HBM3") 3.0 TB/s, the H200 4.3 TB/s. Matched on the whole model name: an
# "H100 PCIe" (HBM2e, 2.0 TB/s peak), "H100 NVL" (3.9) or "GH200" is another card. Any card not
# listed here has its copy bandwidth measured once per process (measured_copy_bytes_per_s).
RECORDED_COPY_BYTES_PER_S = (
    (re.compile(r"\bH100\b.*\b(HBM3|SXM)"), 3.0e12, "H100 SXM"),
    (re.compile(r"(?<![A-Za-z])H200\b"), 4.3e12, "H200"),
)
COPY_BYTES = 512 << 20  # per buffer: far larger than any L2 cache
GRAPH_CALLS = 24


def recorded_copy_bytes_per_s(name: str) -> tuple[float, str] | None:
    """(bytes/s, card) recorded for a device name, or None for a card without a record."""
    return next(((bw, card) for pattern, bw, card in RECORDED_COPY_BYTES_PER_S
                 if pattern.search(name)), None)


def _copy_us() -> float:
    source = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return cuda_median_us(lambda: target.copy_(source), warmup=3, reps=20)


@functools.cache
def measured_copy_bytes_per_s(device_index: int) -> float:
    """Device-to-device copy bandwidth (read + write) of this GPU: median of CUDA-event timed
    copies of COPY_BYTES."""
    with torch.cuda.device(device_index):
        us = _copy_us()
        torch.cuda.empty_cache()  # the two buffers are gone with _copy_us's frame
    return 2 * COPY_BYTES / (us * 1e-6)


def hbm_bandwidth(device: torch.device | int | None = None) -> tuple[float, str]:
    """(bytes/s, where it comes from) for the floors of the current (or given) CUDA device."""
    name = torch.cuda.get_device_name(device)
    recorded = recorded_copy_bytes_per_s(name)
    if recorded is not None:
        return recorded[0], f"recorded copy bandwidth of the {recorded[1]}"
    if isinstance(device, torch.device):
        device = device.index
    index = torch.cuda.current_device() if device is None else device
    return measured_copy_bytes_per_s(index), f"copy bandwidth measured now on {name}"


def hbm_bytes_per_s() -> float:
    return hbm_bandwidth()[0]


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

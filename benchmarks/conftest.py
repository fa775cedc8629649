"""Timing helpers for the op microbenchmarks.

pytest-benchmark times each call with the host clock (what a Python caller sees, launch overhead
included). On the GPU we also record:
  * cuda_event_median_us: CUDA events around one eager call. When the host needs longer to launch
    the op than the GPU needs to run it, this measures the host, not the kernel.
  * cuda_graph_us: per-call time of back-to-back calls replayed from one CUDA graph, which is how
    the runtime runs these ops (decode and verify steps are graph-captured). With several input
    sets the calls cycle through them, so that repeats are not served from the L2 cache.
and the op's HBM floor (bytes it must move once / the card's copy bandwidth: recorded for the
lent H100 SXM and H200, measured on any other card; timing.hbm_bandwidth).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

import hippo_ext  # noqa: F401
from timing import cuda_graph_us, cuda_median_us, hbm_bandwidth


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
                bandwidth, source = hbm_bandwidth()
                floor = bytes_moved / bandwidth * 1e6
                extra["hbm_floor_us"] = round(floor, 2)
                extra["hbm_bandwidth"] = f"{bandwidth / 1e12:.2f} TB/s ({source})"
                best = extra.get("cuda_graph_us")
                best = best if isinstance(best, float) else extra["cuda_event_median_us"]
                extra["x_floor"] = round(best / max(floor, 1e-9), 2)
            extra["gpu"] = torch.cuda.get_device_name()
        else:
            timed = first
        benchmark.extra_info.update(info)
        benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=2)

    return run

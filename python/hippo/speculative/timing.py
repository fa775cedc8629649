"""Busy time of each phase of a generation, measured without adding host synchronisations.

On CUDA a phase is bracketed by two events recorded on the stream that runs it; they are read
after the round's one synchronisation, when they are complete. On the CPU the work is synchronous
and perf_counter brackets it. Overlapped phases (parallel decoding) are each measured on their
own stream, so draft and verify times may add up to more than the wall time.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseClock:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._round: dict[str, float] = defaultdict(float)

    @contextmanager
    def measure(self, phase: str, device: torch.device) -> Iterator[None]:
        """Time the work issued inside the block on the current stream of `device`."""
        if device.type != "cuda":
            started = time.perf_counter()
            yield
            self._add(phase, time.perf_counter() - started)
            return
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream(device))
        yield
        end.record(torch.cuda.current_stream(device))
        self._pending.append((phase, start, end))

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last collect. Call after a synchronisation that covers
        the measured work (CUDA events must be complete)."""
        for phase, start, end in self._pending:
            self._add(phase, start.elapsed_time(end) / 1000.0)
        self._pending.clear()
        latest, self._round = dict(self._round), defaultdict(float)
        return latest

    def _add(self, phase: str, seconds: float) -> None:
        self.totals[phase] += seconds
        self._round[phase] += seconds

"""CUDA graphs of a runtime's decode/verify steps: one graph per step size n, captured the first
time that size runs (or ahead, by LanguageModelRuntime.capture_steps).

Each graph is captured on the runtime's own stream: graphs of two models captured on torch's
shared capture stream hung the GPU when replayed concurrently on two streams (seen on an H100; they
likely shared one cuBLAS workspace). Inputs are copied into static buffers before each replay;
the cache length advances inside the graph, so a replay needs no host sync.
"""
from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

# decoder.py imports this module only when a runtime first uses CUDA graphs: no import cycle.
from hippo.runtime.decoder import persistent_tensors

if TYPE_CHECKING:
    from hippo.runtime.decoder import LanguageModelRuntime


@dataclass
class CapturedStep:
    """One captured step: its graph, its static inputs and its static logits output."""

    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor


@contextmanager
def no_garbage_collection() -> Iterator[None]:
    """Hold Python's garbage collector off for the duration (a graph capture).

    A graph that only the cycle collector can reach is freed whenever allocations pass its
    threshold, and freeing a graph (cudaGraphExecDestroy) while a stream captures is an unsafe
    call in the global capture mode: it invalidates the capture ("operation not permitted when
    stream is capturing", then cudaErrorStreamCaptureInvalidated). Seen on an H200 (2026-11-27)
    in test sequences and in the benchmark, which dropped runtimes whose graphs then referenced
    them back (StepGraphs now holds its runtime weakly); torch's own capture no longer collects
    first. No gc.collect() here: a full collection per capture (0.1 s and more with torch and
    transformers loaded) made adaptive-g decoding several times slower.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# The streams live StepGraphs capture on, per device (by their CUDA handle). torch hands streams
# out round-robin from a pool of 32 per device, so after enough generations a new runtime's
# stream could be a live one's: the draft's and the target's graphs would then share that
# stream's cuBLAS workspace, the hang this module's docstring describes.
_CAPTURE_STREAMS: dict[torch.device, set[int]] = {}
_STREAM_TRIES = 64  # twice the pool: every stream of it is seen once no live owner holds it


def distinct_capture_stream(owner: object, device: torch.device) -> torch.cuda.Stream:
    """A stream of `device` that no other live owner captures on, released when `owner` is
    collected (with more than 32 live owners on one device, a shared one: the pool's size)."""
    in_use = _CAPTURE_STREAMS.setdefault(device, set())
    for _ in range(_STREAM_TRIES):
        stream = torch.cuda.Stream(device=device)
        if stream.cuda_stream not in in_use:
            break
    in_use.add(stream.cuda_stream)
    weakref.finalize(owner, in_use.discard, stream.cuda_stream)
    return stream


class StepGraphs:
    """The captured steps of one runtime, keyed by the number of tokens per step."""

    def __init__(self, runtime: "LanguageModelRuntime") -> None:
        # Weakly: the runtime owns these graphs, and a cycle would leave a dropped runtime's
        # cache and graphs to the cycle collector (see no_garbage_collection).
        self._runtime = weakref.ref(runtime)
        self.stream = distinct_capture_stream(self, runtime.device)
        self.captured: dict[int, CapturedStep] = {}

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Replay the graph for input_ids.shape[1] tokens (capturing it first if needed) on the
        current stream. Returns the static logits buffer, overwritten by the next replay of
        the same step size: clone it if it must survive."""
        step = self.capture(input_ids.shape[1], positions.shape)
        step.input_ids.copy_(input_ids, non_blocking=True)
        step.positions.copy_(positions, non_blocking=True)
        step.graph.replay()
        return step.logits

    def capture(self, count: int, positions_shape: torch.Size) -> CapturedStep:
        """The graph of `count`-token steps, captured now if it is not yet."""
        step = self.captured.get(count)
        if step is None:
            step = self.captured[count] = self._capture(count, positions_shape)
        return step

    @persistent_tensors  # its static buffers outlive the capture
    def _capture(self, count: int, positions_shape: torch.Size) -> CapturedStep:
        runtime = self._runtime()  # alive: only the runtime itself calls into its graphs
        cache = runtime.cache
        device = runtime.device
        input_ids = torch.zeros(cache.batch, count, dtype=torch.int64, device=device)
        positions = torch.zeros(positions_shape, dtype=torch.int64, device=device)
        key_limit = cache.max_seq_len  # the SDPA fallback needs a static window

        # One eager warm-up on the capture stream initialises cuBLAS and allocator state there.
        # It appends at the current length (scratch positions, overwritten later); the length it
        # advanced is restored afterwards.
        saved_length = cache.length.clone()
        current = torch.cuda.current_stream(device)
        try:
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                runtime.step_body(input_ids, positions, key_limit)
            current.wait_stream(self.stream)
            cache.length.copy_(saved_length)

            graph = torch.cuda.CUDAGraph()
            with no_garbage_collection(), torch.cuda.graph(graph, stream=self.stream):
                logits = runtime.step_body(input_ids, positions, key_limit)
        except BaseException:
            # torch.cuda.graph leaves its capture stream current when ending an invalidated
            # capture raises (what an error inside the capture leads to): the caller's stream
            # comes back, and the length the warm-up may have advanced (a failure of that
            # restore, a sticky CUDA error, does not hide the first error).
            torch.cuda.set_stream(current)
            try:
                current.wait_stream(self.stream)
                cache.length.copy_(saved_length)
            except Exception:
                pass
            raise
        return CapturedStep(graph, input_ids, positions, logits)

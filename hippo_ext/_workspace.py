"""Zeroed int32 workspaces shared per (op, device, stream): the semaphores of the ops whose last
block combines the others' partials in the same launch (skinny_linear, decode_attention). The
kernels leave them zeroed; two streams running the same op at once need two workspaces."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor

_SHARED: dict[tuple[str, torch.device, int], torch.Tensor] = {}
# Workspaces that a larger one replaced. A CUDA graph captured while one was current still points
# at it, so it must never be freed (its memory reused by another tensor would not stay zero).
_RETIRED: list[torch.Tensor] = []


def zeroed_int32(numel: int, device: torch.device | str) -> torch.Tensor:
    return torch.zeros(max(1, int(numel)), dtype=torch.int32, device=device)


def _capturing(device: torch.device) -> bool:
    """Whether `device`'s current stream is capturing a CUDA graph (not the current device's:
    the tensors may live on another GPU)."""
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def shared_workspace(op: str, numel: int, device: torch.device) -> torch.Tensor | None:
    """The shared workspace of `op` for the current stream of `device`, grown on demand (to at
    least `numel`, with room to spare), or None when it would have to be allocated inside a
    CUDA-graph capture: a tensor allocated there belongs to the graph's memory pool, so callers
    that capture pass their own."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (op, device, stream)
    workspace = _SHARED.get(key)
    if workspace is None or workspace.numel() < numel:
        if device.type == "cuda" and _capturing(device):
            return None
        fresh = zeroed_int32(max(numel, 1 << 12), device)
        if isinstance(fresh, FakeTensor):
            # Made while tracing under a fake mode (torch.export, make_fx, FakeTensorMode): it
            # holds no memory, and kept here it would hand every later eager call a fake
            # workspace, and with it a fake result. Dynamo traces this code symbolically and
            # replays the store with a real tensor, so torch.compile still shares one.
            return fresh
        if workspace is not None:
            _RETIRED.append(workspace)
        workspace = _SHARED[key] = fresh
    return workspace

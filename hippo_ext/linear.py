"""A linear layer for the few rows of a decode or verify step (M <= 32 on the tensor-core path)."""
from __future__ import annotations

import torch

__all__ = ["skinny_linear", "skinny_linear_workspace"]

ROWS_PER_BLOCK = 64  # output features per thread block of the CUDA kernel (csrc/linear.h)
_WORKSPACES: dict[tuple[torch.device, int], torch.Tensor] = {}


def skinny_linear_workspace(out_features: int, device: torch.device | str) -> torch.Tensor:
    """Zeroed split-K semaphores for GEMMs of up to `out_features` outputs on `device`. The
    kernel leaves them zeroed; a caller that runs GEMMs on several streams at once (a draft and
    a target) needs one workspace per stream."""
    blocks = max(1, -(-int(out_features) // ROWS_PER_BLOCK))
    return torch.zeros(blocks, dtype=torch.int32, device=device)


def _shared_workspace(out_features: int, device: torch.device) -> torch.Tensor:
    """A workspace per (device, stream), grown on demand. Allocating one inside a CUDA-graph
    capture would tie it to the graph's memory: capture callers pass their own."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream)
    workspace = _WORKSPACES.get(key)
    needed = max(1, -(-out_features // ROWS_PER_BLOCK))
    if workspace is None or workspace.numel() < needed:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("skinny_linear: pass workspace= (skinny_linear_workspace) when "
                               "capturing a CUDA graph")
        workspace = _WORKSPACES[key] = skinny_linear_workspace(max(out_features, 1 << 16),
                                                               device)
    return workspace


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  workspace: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for x [..., K] with few rows (decode and verify steps).

    On CUDA, bf16/fp16 inputs with at most 32 rows and K a multiple of 32 run a tensor-core
    kernel that streams the weight once and splits K across blocks by a plan independent of the
    number of rows: row m of the result is bitwise the same whatever M is (a verify step's rows
    equal single-token steps'). With the environment variable HIPPO_SKINNY_KERNEL=fma, M <= 16
    runs an FMA kernel instead (one warp per two outputs, no split of K; rows independent of M
    up to 16; opt-in until measured). Other shapes and dtypes, and the CPU, use ATen's linear.

    Args:
        x: [..., K], contiguous. weight: [N, K], contiguous, of x's dtype. bias: [N] or None.
        workspace: int32 zeros from :func:`skinny_linear_workspace`, one per stream; default:
            a shared one per device and stream (must exist before any CUDA-graph capture).
    """
    if workspace is None:
        workspace = _shared_workspace(weight.size(0), x.device)
    return torch.ops.hippo_ext.skinny_linear.default(x, weight, bias, workspace)


@torch.library.register_fake("hippo_ext::skinny_linear")
def _skinny_linear_fake(x, weight, bias, workspace):
    return x.new_empty(*x.shape[:-1], weight.size(0))

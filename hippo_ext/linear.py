"""A linear layer for the few rows of a decode or verify step (M <= 32 on the tensor-core path)."""
from __future__ import annotations

import torch

from hippo_ext._fake import register_fake
from hippo_ext._workspace import shared_workspace, zeroed_int32

__all__ = ["skinny_linear", "skinny_linear_workspace"]

ROWS_PER_BLOCK = 64  # output features per thread block of the CUDA kernel (csrc/linear.h)


def skinny_linear_workspace(out_features: int, device: torch.device | str) -> torch.Tensor:
    """Zeroed split-K semaphores for GEMMs of up to `out_features` outputs on `device`. The
    kernel leaves them zeroed; a caller that runs GEMMs on several streams at once (a draft and
    a target) needs one workspace per stream."""
    return zeroed_int32(-(-int(out_features) // ROWS_PER_BLOCK), device)


SKINNY_LINEAR_IMPLS = ("auto", "mma", "fma")  # skinny_linear's impl: which CUDA kernel


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  workspace: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """``x @ weight.T + bias`` for x [..., K] with few rows (decode and verify steps).

    On CUDA, bf16/fp16 inputs with at most 32 rows and K a multiple of 32 run a tensor-core
    kernel that streams the weight once and splits K across blocks by a plan independent of the
    number of rows: row m of the result is bitwise the same whatever M is (a verify step's rows
    equal single-token steps'). With impl="fma" (or impl="auto" and the environment variable
    HIPPO_SKINNY_KERNEL=fma), M <= 16 runs an FMA kernel instead (1-8 warps per two outputs, K
    sliced among them inside the block by a plan independent of the number of rows; rows
    independent of M up to 16). On an H200 (2026-11-28) it made whole decode steps 8-30% faster
    than cuBLAS and steps of 5 and 9 rows 1.2-2.7x slower: the runtime's decode steps ask for
    it by name (fma_decode).
    Other shapes and dtypes on CUDA use ATen's linear. The CPU computes each output of up to
    32 rows as one dot product summed in an order set by K alone (fp32 accumulation), so
    there too row m does not depend on M (ATen's linear's would: BLAS picks its kernel by M);
    more rows (a prefill) take ATen's linear.
    On Hopper, where programmatic dependent launch is on (unless HIPPO_PDL=0), the FMA kernel
    loads its first weights and its bias before the previous kernel in the stream has
    finished: neither may be written by the kernel launched just before.

    Args:
        x: [..., K], contiguous. weight: [N, K], contiguous, of x's dtype. bias: [N] or None.
        workspace: int32 zeros from :func:`skinny_linear_workspace`, one per stream; default:
            a shared one per device and stream (must exist before any CUDA-graph capture).
        impl: the CUDA kernel, one of SKINNY_LINEAR_IMPLS: "auto" (HIPPO_SKINNY_KERNEL decides;
            tensor cores unless it says "fma"), "mma" (tensor cores) or "fma" (the FMA kernel
            for M <= 16, tensor cores beyond). Rows do not depend on M with "mma", nor with
            "fma" up to M = 16; the two kernels round differently.
    """
    if workspace is None:
        out_features = weight.shape[0] if weight.dim() > 0 else 0  # the op reports a bad shape
        workspace = shared_workspace("skinny_linear", -(-out_features // ROWS_PER_BLOCK),
                                     x.device)
        if workspace is None:
            raise RuntimeError("skinny_linear: pass workspace= (skinny_linear_workspace) when "
                               "capturing a CUDA graph")
    return torch.ops.hippo_ext.skinny_linear.default(x, weight, bias, workspace, impl)


@register_fake("skinny_linear", dims={"weight": 2})
def _skinny_linear_fake(x, weight, bias, workspace, impl="auto"):
    return x.new_empty(*x.shape[:-1], weight.size(0))

"""hippo_ext: the CUDA/CPU kernels of HIPPO, as torch custom ops (torch.ops.hippo_ext.*).

Each op has one schema (csrc/ops.cpp), a CPU reference and a CUDA kernel, and a fake for
torch.compile. The functions below are thin typed wrappers; on CUDA they validate index values
(a host sync) unless called with check=False, which is what code inside CUDA graphs does.
"""
from __future__ import annotations

import torch

from hippo_ext import _library  # noqa: F401  (loads the compiled ops, or says how to build them)
from hippo_ext._device_support import kernels_unsupported
from hippo_ext.activation import silu_and_mul
from hippo_ext.attention import decode_attention, decode_attention_workspace
from hippo_ext.fused_linear import add_rms_norm_linear, qkv_projection, silu_and_mul_linear
from hippo_ext.kv_compaction import kv_compact_, kv_gather
from hippo_ext.linear import skinny_linear, skinny_linear_workspace
from hippo_ext.normalization import add_rms_norm, rms_norm
from hippo_ext.rotary_embedding import rotary_kv_append, rotary_tables
from hippo_ext.token_selection import SelectedTokens, select_visual_tokens
from hippo_ext.verification import verify_greedy, verify_sampling, verify_tree_greedy

OP_NAMES = (
    "select_visual_tokens",
    "verify_greedy",
    "verify_sampling",
    "verify_tree_greedy",
    "kv_gather",
    "kv_compact_",
    "decode_attention",
    "rms_norm",
    "add_rms_norm",
    "silu_and_mul",
    "rotary_kv_append",
    "rotary_tables",
    "skinny_linear",
    "add_rms_norm_linear",
    "silu_and_mul_linear",
    "qkv_projection",
)


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether hippo_ext::op_name has a kernel registered for dispatch_key ("CPU", "CUDA");
    False also when this build does not define the op at all."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"hippo_ext::{op_name}",
                                                              dispatch_key)
    except RuntimeError:  # "operator hippo_ext::... does not exist"
        return False


def cuda_kernels_built() -> bool:
    """True when this build of hippo_ext registered CUDA kernels for every op."""
    return all(has_kernel(name, "CUDA") for name in OP_NAMES)


__all__ = [
    "OP_NAMES",
    "SelectedTokens",
    "add_rms_norm",
    "add_rms_norm_linear",
    "cuda_kernels_built",
    "decode_attention",
    "decode_attention_workspace",
    "has_kernel",
    "kernels_unsupported",
    "kv_compact_",
    "kv_gather",
    "qkv_projection",
    "rms_norm",
    "rotary_kv_append",
    "rotary_tables",
    "select_visual_tokens",
    "silu_and_mul",
    "silu_and_mul_linear",
    "skinny_linear",
    "skinny_linear_workspace",
    "verify_greedy",
    "verify_sampling",
    "verify_tree_greedy",
]

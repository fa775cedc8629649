"""Which kernels a runtime's steps run: the attention backend, the fused layer path and the
GEMMs (cuBLAS, skinny_linear, the FMA kernel for decode steps, the prologue ops), each option's
default on a device, and the refusal of a combination that cannot run or cannot keep its promise
(step_invariant's bit-for-bit rows).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

import hippo_ext
from hippo.errors import HippoError

STEP_ATTENTION_BACKENDS = ("sdpa", "hippo_ext")
# skinny_linear's tensor-core kernel takes up to 32 rows (batch x tokens); it hands larger steps
# to cuBLAS, whose rows depend on the step size.
STEP_INVARIANT_MAX_TOKENS = 32
# With HIPPO_SKINNY_KERNEL=fma its FMA kernel takes up to 16 rows and more run tensor cores,
# which round otherwise: a step_invariant runtime's steps then hold at most 16 rows.
SKINNY_FMA_MAX_ROWS = 16
# The tensor-core kernel takes K % 32 == 0; other widths run cuBLAS.
SKINNY_KEY_BLOCK = 32
# The GEMMs with the norm or gating in front of them, and RoPE behind q/k/v (gemm_prologues=True).
GEMM_PROLOGUE_OPS = ("qkv_projection", "add_rms_norm_linear", "silu_and_mul_linear")
# Steps of at most this many rows (batch x tokens) run those ops; wider steps (verify steps,
# batched decode steps, prefill of more than one token) run the norms, gating and RoPE apart
# around cuBLAS. The ops' CUDA kernel does plain FMAs whose cost grows with every row, where
# cuBLAS's stays flat up to 17 rows: with it, a 5-token verify step of the 0.5B model took 2.2x
# as long as with cuBLAS (H200, 2026-11-27). fma_decode's GEMMs take the FMA kernel in the same
# steps: one row, where it beat cuBLAS (H200, 2026-11-28: 0.5B decode step 0.76 ms against 0.98,
# 7B 4.22 against 4.57; verify steps of 5 and 9 tokens 1.2-2.7x slower).
FMA_GEMM_MAX_ROWS = 1

DECODE_ATTENTION_CUDA_DTYPES = (torch.bfloat16, torch.float16)
DECODE_ATTENTION_CUDA_HEAD_DIMS = (64, 80, 128)


def decode_attention_supports(device: torch.device, dtype: torch.dtype,
                              head_dim: int) -> bool:
    """Whether hippo_ext.decode_attention has a kernel for this device, dtype and head dim (its
    CUDA kernel takes bf16/fp16 and head dims 64, 80, 128; the CPU reference takes all)."""
    if hippo_ext.kernels_unsupported(device) is not None:
        return False
    return device.type != "cuda" or (dtype in DECODE_ATTENTION_CUDA_DTYPES
                                     and head_dim in DECODE_ATTENTION_CUDA_HEAD_DIMS)


def choose_step_attention(requested: str | None, device: torch.device, dtype: torch.dtype,
                          head_dim: int, step_invariant: bool = False) -> str:
    """hippo_ext on CUDA where its kernel applies, SDPA otherwise (and on the CPU by default,
    where it is what HF runs, unless step_invariant asks for the CPU reference's rows)."""
    if requested is None:
        wanted = device.type == "cuda" or step_invariant
        use_kernel = wanted and decode_attention_supports(device, dtype, head_dim)
        return "hippo_ext" if use_kernel else "sdpa"
    if requested not in STEP_ATTENTION_BACKENDS:
        raise HippoError(f"unknown step_attention {requested!r}; choose one of "
                         f"{STEP_ATTENTION_BACKENDS}")
    if requested == "hippo_ext" and not decode_attention_supports(device, dtype, head_dim):
        raise HippoError(
            f"step_attention='hippo_ext' has no kernel for {device.type}, {dtype}, head dim "
            f"{head_dim} (CUDA: bf16/fp16, head dim 64/80/128, a GPU the build covers); "
            "use step_attention='sdpa'")
    return requested


def widest_output(layers: Sequence[nn.Module], lm_head: nn.Module) -> int:
    """The most output features of any GEMM of a step (the output head, normally)."""
    mlp, attention = layers[0].mlp, layers[0].self_attn
    qkv = sum(p.out_features for p in (attention.q_proj, attention.k_proj, attention.v_proj))
    return max(qkv, attention.o_proj.out_features, 2 * mlp.gate_proj.out_features,
               mlp.down_proj.out_features, lm_head.out_features)


def check_step_invariance_possible(device: torch.device, step_attention: str,
                                   fused: bool) -> None:
    """step_invariant rests on hippo_ext's kernels, whose rows do not depend on the step size
    (on CUDA and in the CPU references; cuBLAS, CPU BLAS and SDPA give no such promise)."""
    if step_attention != "hippo_ext" or not fused:
        raise HippoError(
            "step_invariant=True needs step_attention='hippo_ext' and the fused layer path (got "
            f"device {device.type}, step_attention={step_attention!r}, fused={fused}): its "
            "guarantee rests on hippo_ext's kernels (CUDA: bf16/fp16, head dim 64, 80 or 128)")


def step_invariant_max_rows() -> int:
    """The most rows (batch x tokens) a step_invariant step may hold: those skinny_linear's
    kernel of the moment keeps independent of the row count (read when the step runs, as the
    kernel reads HIPPO_SKINNY_KERNEL when it is launched or captured)."""
    fma = os.environ.get("HIPPO_SKINNY_KERNEL") == "fma"
    return SKINNY_FMA_MAX_ROWS if fma else STEP_INVARIANT_MAX_TOKENS


def check_row_invariant_gemm_widths(layers: Sequence[nn.Module], lm_head: nn.Module,
                                    device: torch.device) -> None:
    """On CUDA skinny_linear hands GEMMs whose K is not a multiple of 32 to cuBLAS, whose rows
    depend on the step size: step_invariant could not hold for them."""
    if device.type != "cuda":
        return
    attention, mlp = layers[0].self_attn, layers[0].mlp
    widths = {attention.q_proj.in_features, attention.o_proj.in_features,
              mlp.down_proj.in_features, lm_head.in_features}
    odd = sorted(k for k in widths if k % SKINNY_KEY_BLOCK)
    if odd:
        raise HippoError(f"step_invariant=True needs GEMM input widths that are multiples of "
                         f"{SKINNY_KEY_BLOCK} on CUDA (skinny_linear's kernel), got {odd}")


def check_gemm_prologues_possible(requested: bool, fused: bool, step_invariant: bool,
                                  device: torch.device) -> None:
    """gemm_prologues replaces ops of the fused layer path in decode steps; wider steps run
    cuBLAS, whose rows depend on the step size, which step_invariant rules out."""
    if not requested:
        return
    if not fused:
        raise HippoError("gemm_prologues=True needs the fused layer path (fused=True)")
    if step_invariant:
        raise HippoError("gemm_prologues=True cannot be combined with step_invariant=True")
    reason = hippo_ext.kernels_unsupported(device)
    if reason is not None:
        raise HippoError(f"gemm_prologues=True cannot run: {reason}")


def fused_layers_unsupported(device: torch.device, text_model: nn.Module) -> str | None:
    """Why the fused layer path cannot run here, or None when it can."""
    reason = hippo_ext.kernels_unsupported(device)
    if reason is not None:
        return reason
    activation = getattr(text_model.config, "hidden_act", None)
    if activation not in ("silu", "swish"):
        return f"the MLP activation is {activation!r}, not SiLU"
    return None


def choose_fused(requested: bool | None, device: torch.device, text_model: nn.Module) -> bool:
    """Fused layers wherever they can run (default), HF's modules otherwise."""
    reason = fused_layers_unsupported(device, text_model)
    if requested and reason is not None:
        raise HippoError(f"fused=True cannot run: {reason}; use fused=False")
    return reason is None if requested is None else requested


def choose_fma_decode(requested: bool | None, device: torch.device, fused: bool,
                      skinny_gemm: bool, gemm_prologues: bool) -> bool:
    """fma_decode: on CUDA's fused path by default, where no other option picks the GEMMs;
    asked for where one does (or without the fused path), an error."""
    conflict = ("skinny_gemm" if skinny_gemm else "gemm_prologues" if gemm_prologues
                else None)
    if requested:
        if not fused:
            raise HippoError("fma_decode=True needs the fused layer path (fused=True)")
        if conflict is not None:
            raise HippoError(f"fma_decode=True cannot be combined with {conflict}=True (or "
                             "step_invariant=True): that option chooses the GEMMs itself")
        return True
    if requested is None:
        return device.type == "cuda" and fused and conflict is None
    return False

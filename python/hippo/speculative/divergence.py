"""Where a greedy generation parts from the target's own, and whether it parted at a near-tie.

Greedy speculative decoding emits exactly the target's argmax tokens, but "the target's logits"
differ by rounding with the shape of the step that computes them: a verify step over g + 1
tokens and a one-token step may round the same logit differently (cuBLAS and CPU BLAS pick their
kernels, and so the order of their sums, by the number of rows; on CUDA the runtime's one-token
steps run their GEMMs on skinny_linear's FMA kernel, fma_decode). Where the target's two best
logits lie within that rounding of each other, it can flip the argmax, and the two outputs part
there (`step_invariant=True` rules it out). Any other parting is a bug.
This module tells the two apart: it recomputes the target's logits at the first differing token
exactly as AR computed them (a replica of AR's runtime: same options, same cache size, eager
one-token steps, which graph replay equals bit for bit) and measures the gap between the two
tokens in rounding steps of the model's dtype. Tests and benchmarks use it to check
losslessness at scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hippo.models.base import PreparedPrompt
from hippo.runtime.decoder import LanguageModelRuntime
from hippo.runtime.prefix_reuse import prefill_prompt

# A gap of at most this many rounding steps of the logits' dtype counts as a tie. In bf16 and
# fp16 the logits are rounded to the dtype at the end, so the two computations differ by a step
# or two; in fp32 the differently ordered sums of every layer add up to several steps (seen on
# the CPU: 3 to 8 at hidden sizes of 64 to 256; more with K): 64 of them is still under 1e-5 of
# the logit, far below what a wrong token or position gives.
NEAR_TIE_STEPS = {torch.bfloat16: 2.0, torch.float16: 2.0, torch.float32: 64.0}


@dataclass(frozen=True)
class Parting:
    """The first generated token where two greedy outputs differ."""

    index: int            # position in the generated tokens
    expected: int | None  # the target's own (AR) token there (None: it ended before)
    got: int | None       # the other output's token (None: it ended before)
    # logit(expected) - logit(got) in rounding steps of the dtype at their magnitude; inf when
    # one output ended early. Never negative when recomputed as AR computed it: negative means
    # the recomputation disagrees with AR's own choice.
    margin_steps: float
    dtype: torch.dtype

    @property
    def near_tie(self) -> bool:
        return 0.0 <= self.margin_steps <= NEAR_TIE_STEPS.get(self.dtype, 2.0)

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        if self.margin_steps < 0:
            kind = "the recomputation disagrees with AR's own choice"
        else:
            kind = "a near-tie" if self.near_tie else "NOT a near-tie"
        return (f"parted at token {self.index} ({self.expected} vs {self.got}): "
                f"{self.margin_steps:.3g} {dtype} rounding steps, {kind}")


def first_difference(expected: list[int], got: list[int]) -> int | None:
    """Index of the first token where the two differ (or where the shorter one ends); None if
    they are equal."""
    for index, (a, b) in enumerate(zip(expected, got)):
        if a != b:
            return index
    return None if len(expected) == len(got) else min(len(expected), len(got))


def rounding_step(value: float, dtype: torch.dtype) -> float:
    """The spacing of `dtype`'s representable numbers at the magnitude of `value`."""
    exponent = math.frexp(abs(value))[1] if value != 0 else 0  # |value| in [2^(e-1), 2^e)
    return torch.finfo(dtype).eps * 2.0 ** (exponent - 1)


@torch.no_grad()
def target_logits_after(ar_runtime: LanguageModelRuntime, prompt: PreparedPrompt,
                        tokens: list[int]) -> torch.Tensor:
    """The target's next-token logits [V] (float32) after the prompt and `tokens`, computed as
    `ar_runtime` computed them: on an eager replica, a prefill (split at the video's end as AR
    split it, for a prompt about an EncodedVideo: prefix_reuse.py), then one-token steps."""
    runtime = ar_runtime.replica()
    device = runtime.device
    logits = prefill_prompt(runtime, prompt).result.logits[:, -1]
    positions = prompt.generated_positions(0, len(tokens)).to(device)
    for index, token in enumerate(tokens):
        ids = torch.tensor([[token]], device=device)
        logits = runtime.step(ids, positions[..., index:index + 1])[:, -1]
    return logits[0].float()


def find_parting(ar_runtime: LanguageModelRuntime, prompt: PreparedPrompt, expected: list[int],
                 got: list[int]) -> Parting | None:
    """None when `got` equals `expected`, the greedy output `ar_runtime` (the target's runtime
    that produced it, e.g. HippoPipeline.runtime("target") after an AR generation) gave for
    `prompt`; else where and by how much the target's logits separated the two tokens there."""
    index = first_difference(expected, got)
    if index is None:
        return None
    if index >= len(expected) or index >= len(got):  # one ended early: no tie explains that
        return Parting(index, expected[index] if index < len(expected) else None,
                       got[index] if index < len(got) else None, math.inf, ar_runtime.dtype)
    logits = target_logits_after(ar_runtime, prompt, expected[:index])
    mine, other = float(logits[expected[index]]), float(logits[got[index]])
    margin = (mine - other) / rounding_step(max(abs(mine), abs(other)), ar_runtime.dtype)
    return Parting(index, expected[index], got[index], margin, ar_runtime.dtype)

"""The autoregressive baseline: one token per target step through the runtime (graphs on CUDA).

Greedy decoding reproduces HF `generate(do_sample=False)` token for token; sampling applies
temperature, top-k and top-p with HF's own logits warpers, in HF's order, so that the sampled
distribution is the one HF samples from.
"""
from __future__ import annotations

import math
import numbers
import operator
import time
from dataclasses import dataclass, field

import torch

from hippo.errors import HippoError, is_int
from hippo.models.base import PreparedPrompt
from hippo.runtime.decoder import LanguageModelRuntime
from hippo.runtime.prefix_reuse import prefill_prompt
from hippo.streaming import EmittedTokens, FinishReason, StopStrings, TokenCallback


@dataclass
class GenerationResult:
    """tokens: the generated ids (eos included when it stopped the generation).
    prefill_s / decode_s: wall time of the prefill (to the first token) and of the rest.
    reused_prompt_tokens: the prompt's video prefix the cache held from an earlier prompt
        (hippo.runtime.prefix_reuse; 0: prefilled whole).
    finish_reason: why the generation ended (hippo.streaming.FINISH_REASONS)."""

    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: FinishReason | None = None
    reused_prompt_tokens: int = 0

    @property
    def decode_s_per_token(self) -> float | None:
        """None for a single token: nothing was decoded after the prefill."""
        steps = len(self.tokens) - 1
        return self.decode_s / steps if steps > 0 else None


# Logits divided by a smaller temperature can overflow float32 (to inf, then NaN probabilities).
MIN_TEMPERATURE = 1e-6
MAX_SEED = 2**62  # generators are seeded with seed + a small per-device offset, in int64


@dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 is greedy decoding; otherwise sampling with HF's warpers, seeded."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if (value is not None or name == "temperature") and (
                    isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise HippoError(f"{name} must be a number, got {value!r}")
        if self.top_k is not None and not is_int(self.top_k):
            raise HippoError(f"top_k must be an integer, got {self.top_k!r}")
        if self.seed is not None:
            check_seed(self.seed)
        if not 0 <= self.temperature < math.inf:
            raise HippoError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise HippoError(f"temperature {self.temperature} would overflow the scaled logits: "
                             f"use at least {MIN_TEMPERATURE}, or 0 for greedy decoding")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise HippoError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise HippoError(f"top_k must be >= 0, got {self.top_k}")
        if self.temperature == 0.0 and (self.top_k is not None or self.top_p is not None):
            raise HippoError("top_k and top_p shape sampling: they need a temperature > 0 "
                             "(temperature 0 is greedy decoding)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_seed(seed: object) -> None:
    """A generator seed: an integer in [0, MAX_SEED]."""
    if not is_int(seed):
        raise HippoError(f"seed must be an integer, got {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise HippoError(f"seed must be in [0, 2**62], got {seed}")


def new_token_count(value: object, least: int = 1) -> int:
    """max_new_tokens as an int (numpy's too, not 4.5, "4" or True) of at least `least`."""
    if not is_int(value) or value < least:
        raise HippoError(f"max_new_tokens must be an integer of at least {least}, got {value!r}")
    return operator.index(value)


def fed_token_count(max_new_tokens: int) -> int:
    """How many generated tokens a generation of max_new_tokens feeds a model at most: all but
    the last, which is emitted and never fed. It is the room a cache needs after the prompt (a
    draft's after its kept tokens) and the count of generated position ids read (columns 0 ..
    max_new_tokens - 2), autoregressive and speculative alike: no speculative round drafts past
    column max_new_tokens - 2 (sequential rounds cap g at the tokens left but one, parallel ones
    end with a closing round that drafts nothing), so the target feeds at most those columns and
    the draft one fewer. CUDA graphs need no more: capture_steps skips a size the cache has no
    room for, and a size captured when it first runs warms up in the room its step reserved."""
    return max_new_tokens - 1


def eos_id_set(eos_token_id: object, vocab: int) -> set[int]:
    """The stop tokens as a set of ids in [0, vocab): from one id, a list, tuple or set of
    them, or None (no stop token)."""
    if eos_token_id is None:
        return set()
    tokens = eos_token_id if isinstance(eos_token_id, (list, tuple, set, frozenset)) \
        else [eos_token_id]
    if not all(is_int(token) for token in tokens):
        raise HippoError(f"eos_token_id must be a token id, a list of them or None, "
                         f"got {eos_token_id!r}")
    ids = {operator.index(token) for token in tokens}
    outside = sorted(token for token in ids if not 0 <= token < vocab)
    if outside:
        raise HippoError(f"eos_token_id {outside[0]} is not a token id (the vocabulary has "
                         f"{vocab})")
    return ids


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:
    """Logits [..., V] after HF's temperature, top-k and top-p warpers (in that order); removed
    tokens get -inf. Speculative sampling must warp target and draft logits the same way."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    shape = logits.shape
    scores = logits.reshape(-1, shape[-1]).float()
    # HF's warpers take only a Python float temperature and int top_k: the ints and numpy
    # scalars SamplingOptions accepts (temperature=2, top_k=np.int64(5)) failed in the first warp.
    temperature = float(temperature)
    top_k = operator.index(top_k) if top_k is not None else None
    top_p = float(top_p) if top_p is not None else None
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k is not None and top_k != 0:
        scores = TopKLogitsWarper(top_k=top_k)(None, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p=top_p)(None, scores)
    return scores.reshape(shape)


# What non-finite logits usually mean, said by both refusals (after the prompt, and later).
OVERFLOW_HINT = "weights or a dtype that overflow? try bfloat16 or float32 (--dtype)"


def check_finite_logits(logits: torch.Tensor) -> None:
    """Refuse prompt logits that are not finite: a model whose activations overflow its dtype
    (fp16 is the usual one) gives NaN or inf logits, whose argmax is no choice at all (NaN: token
    0 for ever; inf: the lowest of the tied ids), and greedy decoding would emit it in silence,
    speculative decoding agreeing with it token for token. One check of the prefill's last row."""
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return
    nan = int(torch.isnan(logits).sum())
    raise HippoError(f"the model's next-token logits after the prompt are not finite ({nan} NaN, "
                     f"{int((~finite).sum()) - nan} inf of {logits.numel()}, {logits.dtype}): "
                     + OVERFLOW_HINT)


def finite_rows(logits: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """[..., V] logits -> [...] `dtype` (bool, or int64 to join a cat of int64s in one kernel):
    every logit of the row is finite (no NaN, no inf). Stays on the device, three kernels (a row
    sum, whose NaN or inf any non-finite logit makes, summed in float32 so that fp16 rows of
    large finite logits do not overflow it; its abs; a comparison with inf, which NaN and inf
    fail; torch.isfinite would take four after the sum): callers read it with a token they read
    anyway, so the check adds no host synchronisation."""
    total = logits.sum(dim=-1, dtype=torch.float32).abs_()
    return torch.lt(total, math.inf, out=torch.empty(total.shape, dtype=dtype,
                                                     device=total.device))


def non_finite_logits_error(whose: str, new_token: int, dtype: torch.dtype) -> HippoError:
    """The error of logits that turned NaN or inf during a generation; new_token counts the
    generated tokens from 1 (the one the logits were to choose)."""
    return HippoError(f"{whose} next-token logits are not finite (NaN or inf, {dtype}) at new "
                      f"token {new_token}: {OVERFLOW_HINT}")


def choose_next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
                      top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] next tokens: argmax when temperature == 0, else a sample; -1 for a
    row whose logits are not finite (the argmax of NaNs is token 0, of an inf its id: no choice
    at all), so that reading the token refuses it without a host synchronisation of its own."""
    finite = finite_rows(logits)
    if temperature == 0.0:
        token = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(warp_logits(logits, temperature, top_k, top_p), dim=-1)
        # A non-finite row's probabilities are NaN, which torch.multinomial refuses with a bare
        # RuntimeError on the CPU: it draws from ones instead, and its token is -1 below.
        probs = torch.nan_to_num(probs, nan=1.0)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.where(finite, token, -1)


@torch.no_grad()
def generate_autoregressive(runtime: LanguageModelRuntime, prompt: PreparedPrompt,
                            max_new_tokens: int, eos_token_id: int | list[int] | None = None, *,
                            temperature: float = 0.0, top_k: int | None = None,
                            top_p: float | None = None,
                            generator: torch.Generator | None = None,
                            on_tokens: TokenCallback | None = None,
                            stop: StopStrings | None = None) -> GenerationResult:
    """Generate up to max_new_tokens after the prompt, one runtime step per token.

    Stops after an eos token (included, as HF generate does). Generated token j sits at
    `prompt.generated_positions(j, 1)`. The runtime's cache is reset first (or rolled back
    to the prompt's video prefix when it holds it: prefix_reuse.py). A sampling
    generator must live on the runtime's device. on_tokens([token]) is called with each token
    as it is chosen, and stops the generation by returning True; `stop` (a new StopStrings)
    stops it after the token that completes a stop string (hippo.streaming).
    """
    max_new_tokens = _check_request(runtime, prompt, max_new_tokens)
    SamplingOptions(temperature, top_k, top_p)  # validates them
    eos_ids = eos_id_set(eos_token_id, runtime.lm_head.out_features)
    output = EmittedTokens(max_new_tokens, eos_ids, on_tokens, stop)  # checks those two
    synchronize = _synchronizer(runtime.device)

    started = time.perf_counter()
    prefill = prefill_prompt(runtime, prompt)
    logits = prefill.result.logits[:, -1]
    check_finite_logits(logits)
    token = choose_next_token(logits, temperature, top_k, top_p, generator)
    first = int(token.item())  # finite: checked above
    result = GenerationResult(tokens=output.tokens, prefill_s=time.perf_counter() - started,
                              reused_prompt_tokens=prefill.reused)
    output.emit([first])

    positions = prompt.generated_positions(0, fed_token_count(max_new_tokens)).to(runtime.device)
    # The step's CUDA graph is captured before decoding is timed, as speculative decoding
    # captures its steps' (a first capture costs tens of ms: speedups against it would flatter).
    runtime.capture_steps((1,) if max_new_tokens > 1 else ())
    started = time.perf_counter()
    for index in range(max_new_tokens - 1):
        if output.finished:
            break
        logits = runtime.step(token[:, None], positions[..., index:index + 1])
        token = choose_next_token(logits[:, -1], temperature, top_k, top_p, generator)
        value = int(token.item())  # the step's one synchronisation; -1: logits not finite
        if value < 0:
            raise non_finite_logits_error("the model's", len(result.tokens) + 1, logits.dtype)
        output.emit([value])
    synchronize()
    result.decode_s = time.perf_counter() - started
    result.finish_reason = output.finish_reason
    return result


def _check_request(runtime: LanguageModelRuntime, prompt: PreparedPrompt,
                   max_new_tokens: object) -> int:
    """max_new_tokens as an int, once the request is known to fit the runtime's cache."""
    if not isinstance(runtime, LanguageModelRuntime):
        raise HippoError(f"runtime must be a LanguageModelRuntime, got {type(runtime).__name__}")
    if not isinstance(prompt, PreparedPrompt):
        raise HippoError(f"prompt must be a PreparedPrompt (an adapter's prepare()), got "
                         f"{type(prompt).__name__}")
    batches = (runtime.cache.batch, int(prompt.inputs_embeds.shape[0]))
    if batches != (1, 1):
        raise HippoError(f"the autoregressive baseline generates one sequence: it needs a "
                         f"runtime of batch 1 and a prompt of batch 1, got runtime batch "
                         f"{batches[0]} and prompt batch {batches[1]}")
    max_new_tokens = new_token_count(max_new_tokens)
    needed = prompt.length + fed_token_count(max_new_tokens)
    if needed > runtime.cache.max_seq_len:
        raise HippoError(
            "prompt plus max_new_tokens beyond the cache: "
            f"{prompt.length} prompt tokens + {max_new_tokens} new tokens need {needed} "
            f"positions (the last new token is never fed) > max_seq_len "
            f"{runtime.cache.max_seq_len}")
    return max_new_tokens


def _synchronizer(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None

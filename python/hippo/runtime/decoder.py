"""hippo's own step loop for a Qwen2-family language model, on HF's weights.

The weights are borrowed, never copied (q/k/v and gate/up are concatenated once, the HF
parameters becoming views: fused_projections.py), and the arithmetic is HF's: each layer runs
as nine ops, hippo_ext's fused RMSNorm (residual add included), RoPE plus cache append and
SwiGLU gating around four GEMMs and the attention, each rounding where HF's modules round
(`fused=False` runs HF's modules themselves). Around that: a static KV cache (static_cache.py),
prefill from input embeddings with explicit position ids, and decode/verify steps of static
shape that CUDA graphs capture (cuda_graphs.py), on the kernels that kernel_choice.py picks for
the device and the options. Works for Qwen2 (1-D RoPE: LLaVA-OneVision, LLaVA-Video) and for the
text model of Qwen2.5-VL (M-RoPE, position ids [3, B, S]).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import TypedDict, Unpack  # a dependency of torch (typing's is 3.11+)

import hippo_ext
from hippo.devices import check_model_dtype
from hippo.errors import HippoError, check_flag, is_int
from hippo.runtime.fused_projections import fuse_layer_projections
from hippo.runtime.kernel_choice import (FMA_GEMM_MAX_ROWS, check_gemm_prologues_possible,
                                         check_row_invariant_gemm_widths,
                                         check_step_invariance_possible, choose_fma_decode,
                                         choose_fused, choose_step_attention,
                                         step_invariant_max_rows, widest_output)
from hippo.runtime.rope import (apply_rope, is_dynamic_rope, reject_dynamic_rope,
                                reject_step_dependent_rope)
from hippo.runtime.static_cache import StaticKVCache


class RuntimeOptions(TypedDict, total=False):
    """The keyword options of LanguageModelRuntime, as from_hf forwards them."""

    use_cuda_graphs: bool | None
    step_attention: str | None
    fused: bool | None
    skinny_gemm: bool
    fma_decode: bool | None
    gemm_prologues: bool
    step_invariant: bool


MAX_STEP_TOKENS = 64  # decode_attention's query-block limit

# attend(layer index, post-RoPE queries [B, S, Hq, D]) -> attention output [B, S, Hq * D]
AttendFn = Callable[[int, torch.Tensor], torch.Tensor]
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_Function = TypeVar("_Function", bound=Callable[..., Any])


def persistent_tensors(fn: _Function) -> _Function:
    """Run fn with inference mode off (and grad off): the tensors it makes outlive the call (a
    runtime's KV cache and lengths, the fused weights its model's parameters then view, graph
    buffers). Made inside a caller's torch.inference_mode() they would be inference tensors,
    whose in-place updates (every step advances the cache) fail in every later call outside it,
    and a model whose parameters view them could no longer be trained."""
    return torch.inference_mode(False)(torch.no_grad()(fn))


def autocast_off(fn: _Function) -> _Function:
    """Run fn with torch.autocast off (CPU and CUDA): hippo computes in its models' own dtype,
    that of the runtime's cache, rounding point for rounding point as HF's modules do without
    autocast. A caller's autocast (an inference server wrapping every request in it) cast the
    runtime's GEMMs: an fp32 model's q/k/v came out bf16 and its step failed deep inside
    rotary_kv_append (cache dtype Float must match the qkv dtype BFloat16). Cast the model to
    compute in another dtype."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Entering the two contexts costs ~15 us, paid by every decode step: only where needed.
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return cast(_Function, wrapper)  # the signature kept: typed callers see fn's


def check_index_tensor(name: str, value: object, what: str = "an integer tensor") -> None:
    """Token or position ids must be an integer tensor: floats would be cut to integers in
    silence, and embeddings passed as ids (or ids as embeddings) fail deep in the model."""
    if not isinstance(value, torch.Tensor) or value.dtype not in INDEX_DTYPES:
        kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise HippoError(f"{name} must be {what}, got {kind}")


@dataclass
class PrefillResult:
    """logits: [B, S, V] with all_logits=True, else [B, 1, V] (the last prompt token only: the
    full matrix of a video prompt is gigabytes).
    queries: [len(query_layers), Hq, Lq, D] post-RoPE queries of the last Lq prompt tokens at
    the requested layers (batch 1), or None when no layers were requested."""

    logits: torch.Tensor
    queries: torch.Tensor | None


def tensor_version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place write), None for an inference
    tensor (made under torch.inference_mode), which keeps none."""
    return None if tensor.is_inference() else tensor._version


def find_text_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(text decoder, lm_head) of an HF causal LM or VLM: Qwen2ForCausalLM (model.model),
    Qwen2.5-VL / LLaVA-OneVision (model.model.language_model)."""
    lm_head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    text_model = getattr(inner, "language_model", None) if inner is not None else None
    if text_model is None and inner is not None and hasattr(inner, "layers"):
        text_model = inner
    if text_model is None or lm_head is None or not hasattr(text_model, "layers"):
        raise HippoError(
            f"unsupported model type {type(model).__name__}: expected a Qwen2-family causal LM "
            "with .lm_head and .model (.language_model) holding embed_tokens, layers, norm, "
            "rotary_emb")
    return text_model, lm_head


class LanguageModelRuntime:
    """Static-cache prefill and decode/verify steps of a Qwen2-family text decoder.

    Args:
        text_model: the HF text decoder (embed_tokens, layers, norm, rotary_emb), e.g.
            `Qwen2ForCausalLM.model` or `Qwen2_5_VLForConditionalGeneration.model.language_model`.
        lm_head: the HF output head.
        max_seq_len: cache capacity (prompt plus every generated or drafted token).
        batch: batch size of the cache (token selection, the AR baseline and speculative
            decoding use 1). Prompts of different lengths: right-pad them to one prefill with
            all_logits=True, then rollback(torch.tensor(lengths)); each row goes on from its own.
        use_cuda_graphs: capture each step shape as a CUDA graph (default: on CUDA). False runs
            the same step code eagerly, for debugging.
        step_attention: "hippo_ext" (decode_attention over the static cache; default on CUDA
            where its kernel applies: bf16/fp16, head dim 64/80/128) or "sdpa" (masked PyTorch
            attention; default elsewhere, and on the CPU, where it is HF's own path).
        fused: run each layer as hippo_ext ops on fused weights: q/k/v stored as one matrix
            (and bias) and gate/up as one, so a step runs one GEMM for each group, with RMSNorm
            (the residual add fused in), RoPE plus the cache append, and SwiGLU gating each one
            kernel; the ops keep HF's rounding. The HF parameters are replaced by views into
            the fused tensors: no second copy, and the HF model keeps working. Default: on
            wherever hippo_ext has these kernels for the device and the MLP is SiLU-gated.
            False runs HF's own modules (the reference path). Build the runtime after moving
            or casting the model.
        skinny_gemm: run the fused path's GEMMs (and the output head) through
            hippo_ext.skinny_linear, whose rows do not depend on the step size (a verify step's
            logits rows equal single-token steps' for these GEMMs) and which streams the weight
            at decode widths where cuBLAS's tiles starve the GPU; shapes it does not take go to
            cuBLAS inside the op. Off by default: slower than cuBLAS on an H200 (2026-11-26/27,
            benchmarks/RESULTS.md).
        gemm_prologues: run each layer's add_rms_norm before the q/k/v and gate/up GEMMs and
            silu_and_mul before the down GEMM inside those GEMMs, and RoPE with the cache
            append after the q/k/v GEMM (hippo_ext.qkv_projection, add_rms_norm_linear,
            silu_and_mul_linear), in steps of up to FMA_GEMM_MAX_ROWS (batch x tokens)
            rows, i.e. decode steps: on CUDA they then run four kernels fewer per layer, on
            skinny_linear's FMA kernel, whose cost grows with the rows (wider steps keep the
            ops apart around cuBLAS); HF's rounding, though not bit for bit the default path's
            (a norm's sum of squares reduced in another order on CUDA; o_proj and the head on
            skinny_linear's dot products, which sum in another order than cuBLAS or, on the
            CPU, than ATen's linear). The first layer's norm joins its q/k/v GEMM as well (a
            zero residual added), and o_proj and the output head take the same FMA kernel
            (skinny_linear(impl="fma")), so that a decode step runs hippo_ext kernels only,
            five per layer with decode_attention's fused merge, which programmatic dependent
            launch overlaps. Needs the fused layer
            path; opt-in: slower than the default (fma_decode) on an H200, 2026-11-28: 0.5B
            decode step 0.87 against 0.75 ms, 7B 5.86 against 4.29.
        fma_decode: run every GEMM of a decode step (FMA_GEMM_MAX_ROWS rows, batch x tokens) on
            skinny_linear's FMA kernel, wider steps on cuBLAS: on an H200 it took 23% off a
            0.5B decode step and 8% off a 7B one (2026-11-28), where it loses at verify widths.
            None (the default): on for CUDA models on the fused path without skinny_gemm,
            step_invariant or gemm_prologues (which choose their GEMMs themselves), off
            otherwise (on the CPU, skinny_linear's reference is slower than BLAS). True asks
            for it (an error where it cannot run, e.g. beside skinny_gemm); False: cuBLAS.
            A decode step's logits then round as the FMA kernel's dot products do, not as
            cuBLAS's (they were another cuBLAS kernel's than a verify step's before too).
        step_invariant: make a step's logits for each token independent of how many tokens the
            step holds (up to STEP_INVARIANT_MAX_TOKENS = 32 rows of batch x tokens, 16 with
            HIPPO_SKINNY_KERNEL=fma; larger steps are refused), bit
            for bit: a verify step of g + 1 tokens then gives exactly the logits that g + 1
            single-token steps would, so speculative decoding reproduces
            the runtime's own autoregressive output bit for bit, in fp32 as in bf16. Needs
            hippo_ext's decode_attention (on CUDA: bf16/fp16, head dim 64, 80 or 128; on the
            CPU: its reference, chosen then) and the fused layer path; turns on skinny_gemm and
            decode_attention's row-invariant layout (which costs single-token steps some
            attention speed on CUDA; on the CPU, the plain dot products are slower than BLAS).
    """

    @persistent_tensors
    def __init__(self, text_model: nn.Module, lm_head: nn.Module, max_seq_len: int,
                 batch: int = 1, *, use_cuda_graphs: bool | None = None,
                 step_attention: str | None = None, fused: bool | None = None,
                 skinny_gemm: bool = False, fma_decode: bool | None = None,
                 gemm_prologues: bool = False, step_invariant: bool = False) -> None:
        for name, value in (("use_cuda_graphs", use_cuda_graphs), ("fused", fused),
                            ("fma_decode", fma_decode)):
            check_flag(name, value, allow_none=True)
        for name, value in (("skinny_gemm", skinny_gemm), ("gemm_prologues", gemm_prologues),
                            ("step_invariant", step_invariant)):
            check_flag(name, value)
        self.text_model = text_model
        self.lm_head = lm_head
        self.layers = list(text_model.layers)
        self.rotary_emb = text_model.rotary_emb
        self.uses_mrope = hasattr(self.rotary_emb, "mrope_section")
        _reject_unsupported_attention(text_model)

        attention = self.layers[0].self_attn
        self.head_dim = int(attention.head_dim)
        self.num_heads: int = attention.q_proj.out_features // self.head_dim
        self.num_kv_heads: int = attention.k_proj.out_features // self.head_dim
        self.scale = float(attention.scaling)
        weight = text_model.embed_tokens.weight
        self.device: torch.device = weight.device
        self.dtype: torch.dtype = weight.dtype
        check_model_dtype(self.dtype, "the model's dtype")
        self.vocab_rows: int = weight.shape[0]
        self.hidden_size: int = weight.shape[1]

        self.cache = StaticKVCache(len(self.layers), batch, self.num_kv_heads, max_seq_len,
                                   self.head_dim, dtype=self.dtype, device=self.device)
        self.step_attention = choose_step_attention(step_attention, self.device, self.dtype,
                                                    self.head_dim, step_invariant)
        use_fused = choose_fused(fused, self.device, text_model)
        is_cuda = self.device.type == "cuda"
        self.use_cuda_graphs: bool = is_cuda if use_cuda_graphs is None else use_cuda_graphs
        if self.use_cuda_graphs and not is_cuda:
            raise HippoError("use_cuda_graphs=True needs the model on a CUDA device")
        self._graphs = None
        if self.use_cuda_graphs:
            reject_dynamic_rope(self.rotary_emb)
            from hippo.runtime.cuda_graphs import StepGraphs
            self._graphs = StepGraphs(self)
        check_gemm_prologues_possible(gemm_prologues, use_fused, step_invariant, self.device)
        self.gemm_prologues = gemm_prologues
        if step_invariant:
            check_step_invariance_possible(self.device, self.step_attention, use_fused)
            check_row_invariant_gemm_widths(self.layers, lm_head, self.device)
            reject_step_dependent_rope(self.rotary_emb)
            if batch > step_invariant_max_rows():  # every step would be refused, even decode's
                raise HippoError(f"step_invariant=True holds for steps of up to "
                                 f"{step_invariant_max_rows()} rows (batch x tokens): batch "
                                 f"{batch} leaves no step it can take")
            skinny_gemm = True
        self.step_invariant = step_invariant
        if skinny_gemm and not use_fused:
            raise HippoError("skinny_gemm=True needs the fused layer path (fused=True)")
        self.skinny_gemm = skinny_gemm
        self.fma_decode: bool = choose_fma_decode(fma_decode, self.device, use_fused,
                                                  skinny_gemm, gemm_prologues)
        # Split-K semaphores of skinny_linear: one workspace per runtime, hence per stream.
        self._gemm_workspace = (
            hippo_ext.skinny_linear_workspace(widest_output(self.layers, lm_head), self.device)
            if skinny_gemm or gemm_prologues or self.fma_decode else None)
        # The first layer's residual in a step that runs the prologue ops (one row: B = S = 1).
        self._zero_residual = (
            torch.zeros(1, 1, weight.shape[1], dtype=self.dtype, device=self.device)
            if gemm_prologues else None)
        # decode_attention's fused-merge semaphores: also one per runtime, hence per stream.
        self._attention_workspace = (
            hippo_ext.decode_attention_workspace(batch, self.num_kv_heads, self.device)
            if self.step_attention == "hippo_ext" and is_cuda else None)
        # Last, once every check has passed: fusing rewrites the HF model's parameters.
        self.fused = ([fuse_layer_projections(layer) for layer in self.layers]
                      if use_fused else None)
        self._weights_seen = self._weights_now()

    def matches_model(self) -> bool:
        """Whether the model's parameters are still the tensors this runtime was
        built on (same storage, dtype, device and shape). Replacing one (`.to()`,
        load_state_dict(assign=True), `.data =`) leaves the runtime's fused copies, cache dtype
        and captured graphs behind: such a runtime must be rebuilt. Writing into them in place
        (load_state_dict, copy_) is seen by the runtime as it is."""
        return self._weights_now() == self._weights_seen

    def weights_version(self) -> tuple[int, ...]:
        """The version counters of the text model's parameters: an in-place write to any of
        them (load_state_dict, an optimizer step, copy_), which matches_model() accepts, changes
        it, so keys and values cached before it are known to be stale (prefix_reuse.py)."""
        return tuple(tensor_version(t) for t in self.text_model.parameters())

    def _weights_now(self) -> list[tuple]:
        # Parameters only: dynamic RoPE re-registers its inv_freq buffer as contexts grow.
        tensors = [*self.text_model.parameters(), *self.lm_head.parameters()]
        return [(t.data_ptr(), t.dtype, t.device, t.shape) for t in tensors]

    @classmethod
    def from_hf(cls, model: nn.Module, max_seq_len: int, batch: int = 1,
                **options: Unpack[RuntimeOptions]) -> "LanguageModelRuntime":
        """A runtime for the language model inside an HF causal LM or VLM."""
        text_model, lm_head = find_text_model(model)
        return cls(text_model, lm_head, max_seq_len, batch, **options)

    def replica(self, *, use_cuda_graphs: bool = False) -> "LanguageModelRuntime":
        """A runtime on the same weights with the same options and cache size, eager unless
        asked: its logits for the same inputs are this runtime's bit for bit (graph replay
        equals the eager path), so it can recompute what this one computed."""
        return LanguageModelRuntime(
            self.text_model, self.lm_head, self.cache.max_seq_len, self.cache.batch,
            use_cuda_graphs=use_cuda_graphs, step_attention=self.step_attention,
            fused=self.fused is not None, skinny_gemm=self.skinny_gemm,
            fma_decode=self.fma_decode, gemm_prologues=self.gemm_prologues,
            step_invariant=self.step_invariant)

    # ----------------------------------------------------------------------------- public API

    @property
    def length(self) -> int:
        """Valid cache length as a host int (syncs only after a device-tensor rollback)."""
        return self.cache.current_length()

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] token ids -> [B, S, hidden] input embeddings."""
        check_index_tensor("input_ids", input_ids, "an integer tensor of token ids")
        self._check_token_range(input_ids)
        return self.text_model.embed_tokens(input_ids.to(self.device))

    def _check_token_range(self, input_ids: torch.Tensor) -> None:
        """Checked here, not by the lookup: out of range, it is a device-side assert on CUDA and
        an unnamed IndexError on the CPU."""
        if input_ids.numel():
            low, high = torch.aminmax(input_ids.long())
            if int(low) < 0 or int(high) >= self.vocab_rows:
                raise HippoError(f"input_ids must lie in [0, {self.vocab_rows}), got ids from "
                                 f"{int(low)} to {int(high)}")

    def rollback(self, length: int | torch.Tensor) -> None:
        """Forget every cached position from `length` on (int, or a device tensor [B])."""
        self.cache.rollback(length)

    def reset(self) -> None:
        """Empty the cache."""
        self.cache.reset()

    @torch.no_grad()
    @autocast_off
    def prefill(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, *,
                query_layers: Sequence[int] = (), query_len: int = 0,
                all_logits: bool = False) -> PrefillResult:
        """Run the prompt [B, S, hidden] at the current cache length (normally 0) and cache it.

        position_ids: [B, S] (1-D RoPE) or [3, B, S] (M-RoPE; [B, S] is broadcast to the three
        sections as HF does). Prefill runs eagerly with PyTorch SDPA on every device. After a
        rollback to a device tensor [B] of different lengths, each row's prompt continues that
        row's own prefix (its positions are still the caller's to give).
        """
        self._check_prompt_inputs(inputs_embeds, position_ids)
        batch, seq_len, _ = inputs_embeds.shape
        self._check_batch(batch)
        query_layers = self._check_query_request(query_layers, query_len, batch, seq_len)
        positions = self._normalise_positions(position_ids, batch, seq_len)
        start = self.cache.current_length()
        # After a rollback to a device tensor the rows may hold different lengths: each row's
        # prompt then continues its own prefix (start is the longest, known on the host now).
        row_starts = self.cache.length.clone() if self.cache.host_length is None else None
        if row_starts is not None:  # reserve() checks only a length the host knows
            self.cache.check_room(start, seq_len, "prefill")
        queries = {}

        def attend(index: int, q: torch.Tensor) -> torch.Tensor:
            if index in query_layers:  # [Hq, Lq, D] of the last Lq prompt tokens
                queries[index] = q[0, seq_len - query_len:].transpose(0, 1).clone()
            return self._prefill_attention(index, q, start, row_starts)

        with self.cache.restored_on_error():
            self.cache.reserve(seq_len, "prefill")
            self.cache.advance(seq_len)
            hidden = inputs_embeds.to(device=self.device, dtype=self.dtype).contiguous()
            cos, sin = self._rotary_tables(hidden, positions)
            logits = self._logits(hidden, cos, sin, attend, last_only=not all_logits)
        ordered = [queries[layer] for layer in query_layers]
        return PrefillResult(logits, torch.stack(ordered) if ordered else None)

    @torch.no_grad()
    @autocast_off
    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Append n tokens (n = 1: decode; n = g + 1: verify) and return their logits [B, n, V].

        input_ids: [B, n]; position_ids: [B, n] or [3, B, n] (M-RoPE). Each new token attends
        causally within the block and to every cached position; the length advances by n.
        With CUDA graphs the returned tensor is the graph's static output buffer: the next step
        of the same n overwrites it, so clone what must survive.
        """
        # dtype checks (floats would be cut to integers, or fail in the embedding lookup once
        # the cache length had moved), and the id range of ids on the CPU, where it costs no
        # sync; ids already on an accelerator (every step of a decoding loop there) go unchecked.
        check_index_tensor("input_ids", input_ids, "an integer tensor of token ids")
        check_index_tensor("position_ids", position_ids)
        if input_ids.device.type == "cpu":  # MPS and XPU ids: a sync as on CUDA
            self._check_token_range(input_ids)
        batch, count = input_ids.shape
        self._check_batch(batch)
        if not 1 <= count <= MAX_STEP_TOKENS:
            raise HippoError(f"a step takes 1..{MAX_STEP_TOKENS} tokens, got {count}")
        if self.step_invariant and batch * count > step_invariant_max_rows():
            rows = step_invariant_max_rows()
            raise HippoError(f"step_invariant=True holds for steps of up to {rows // batch} "
                             f"tokens, got {count} (at most {rows} rows of batch x tokens, "
                             f"batch {batch})")
        positions = self._normalise_positions(position_ids, batch, count)
        with self.cache.restored_on_error():
            self.cache.reserve(count, "step")
            if self._graphs is not None:
                return self._graphs.run(input_ids, positions)
            return self.step_body(input_ids.to(self.device), positions, self._eager_key_limit())

    @autocast_off
    def capture_steps(self, counts: Iterable[int]) -> None:
        """Capture the CUDA graphs of steps of these token counts now (nothing without CUDA
        graphs), skipping counts the cache has no room for at its current length (all of them
        while that length is known on the device only) and, with step_invariant, counts beyond
        its rows (step_invariant_max_rows(), batch x tokens), which step() refuses.

        Steps are otherwise captured the first time each size runs. Speculative decoding with
        an adaptive g meets new verify sizes mid-generation, and a capture there costs tens of
        milliseconds inside the decode (on an H200, 2026-11-27, a timed 7B/0.5B run that
        captured as it went decoded at 0.97x AR where fixed g = 4 ran at 1.73x).
        """
        try:
            counts = list(counts)
        except TypeError:
            raise HippoError(f"counts must be an iterable of step sizes, got {counts!r}") from None
        for count in counts:
            if not is_int(count) or not 1 <= count <= MAX_STEP_TOKENS:
                raise HippoError(f"a step takes 1..{MAX_STEP_TOKENS} tokens, got {count!r}")
        if self._graphs is None or self.cache.host_length is None:
            return
        room = self.cache.max_seq_len - self.cache.host_length
        for count in counts:
            if count > room or (self.step_invariant
                                and self.cache.batch * count > step_invariant_max_rows()):
                continue
            shape = ((3, self.cache.batch, count) if self.uses_mrope
                     else (self.cache.batch, count))
            with torch.cuda.device(self.device):  # a draft on another GPU captures on its own
                self._graphs.capture(count, torch.Size(shape))

    # ------------------------------------------------------------------- the step, capturable

    def step_body(self, input_ids: torch.Tensor, positions: torch.Tensor,
                  key_limit: int) -> torch.Tensor:
        """The device work of one step: static shapes, no host sync (CUDA graphs capture it).
        The SDPA backend reads keys [0, key_limit), a host bound on the valid length."""
        self.cache.advance(input_ids.shape[1])
        hidden = self.text_model.embed_tokens(input_ids)
        cos, sin = self._rotary_tables(hidden, positions)

        def attend(index: int, q: torch.Tensor) -> torch.Tensor:
            return self._step_attention(index, q, key_limit)

        return self._logits(hidden, cos, sin, attend, last_only=False)

    # ---------------------------------------------------------------------------- internals

    def _eager_key_limit(self) -> int:
        """Key window of the eager SDPA step: on CUDA the graphs' static S_max, so that eager
        and replayed steps do the very same work (bitwise equal); on the CPU the valid length,
        to keep it cheap."""
        if self.device.type == "cuda" or self.cache.host_length is None:
            return self.cache.max_seq_len
        return self.cache.host_length

    def _rotary_tables(self, hidden: torch.Tensor,
                       positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, S, D] in the model dtype (M-RoPE sections merged), contiguous as
        rotary_kv_append takes them. The fused path computes them in one hippo_ext kernel with
        HF's arithmetic where the frequencies are static; HF's module does it otherwise."""
        rope = self.rotary_emb
        if self.fused is not None and not is_dynamic_rope(rope):
            return hippo_ext.rotary_tables(positions, rope.inv_freq,
                                           getattr(rope, "mrope_section", None) or (),
                                           rope.attention_scaling, self.dtype)
        cos, sin = rope(hidden, positions)
        return cos.contiguous(), sin.contiguous()

    def _logits(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: AttendFn, last_only: bool) -> torch.Tensor:
        """Every decoder layer, the final norm and the output head: [B, S, hidden] input
        embeddings -> logits [B, S, V] ([B, 1, V] with last_only). `attend(index, q)` gets the
        layer's post-RoPE queries [B, S, Hq, D] once the layer's keys and values are in the
        cache, and returns the attention output [B, S, Hq * D]."""
        if self.fused is None:
            return self.lm_head(self._run_hf_layers(hidden, cos, sin, attend, last_only))
        gemms = self._step_gemms(hidden)  # one choice for the whole step
        residual = None
        for index in range(len(self.layers)):
            hidden, residual = self._fused_layer(index, hidden, residual, cos, sin, attend,
                                                 gemms)
        if last_only:
            hidden, residual = hidden[:, -1:].contiguous(), residual[:, -1:].contiguous()
        # The final norm stays apart from the output head even with the prologue ops: the head's
        # thousands of blocks would each redo the norm's row reduction.
        norm = self.text_model.norm
        normed = hippo_ext.add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)[0]
        return self._linear(normed, self.lm_head.weight, self.lm_head.bias, gemms)

    def _fused_layer(self, index: int, delta: torch.Tensor, residual: torch.Tensor | None,
                     cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn,
                     gemms: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer as four hippo_ext ops, four GEMMs and the attention, with HF's
        arithmetic (with gemms "prologues", the norms, gating and RoPE inside the GEMMs). The
        residual stream is carried beside the layer's output `delta` so that each residual add
        fuses into the next RMSNorm. Returns (delta, residual)."""
        layer, fused = self.layers[index], self.fused[index]
        norm = layer.input_layernorm
        if gemms == "prologues":  # norm, q/k/v GEMM, RoPE and the cache append: one op
            # The first layer's input is the embedding itself: rms_norm(x) is exactly
            # add_rms_norm(x, 0), and the residual stream it returns is x.
            q, residual = hippo_ext.qkv_projection(
                delta, self._zero_residual if residual is None else residual, norm.weight,
                norm.variance_epsilon, fused.qkv_weight, fused.qkv_bias, cos, sin,
                self.cache.tensor, index, self.cache.length, check=False)
        elif residual is None:  # the first layer: its input is the embedding itself
            residual = delta
            normed = hippo_ext.rms_norm(delta, norm.weight, norm.variance_epsilon)
            q = self._rotary_append(
                self._linear(normed, fused.qkv_weight, fused.qkv_bias, gemms), cos, sin, index)
        else:
            qkv, residual = self._norm_linear(delta, residual, norm, fused.qkv_weight,
                                              fused.qkv_bias, gemms)
            q = self._rotary_append(qkv, cos, sin, index)
        o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
        delta = self._linear(attend(index, q), o_proj.weight, o_proj.bias, gemms)
        gate_up, residual = self._norm_linear(delta, residual, layer.post_attention_layernorm,
                                              fused.gate_up_weight, None, gemms)
        return self._gated_linear(gate_up, down_proj.weight, down_proj.bias, gemms), residual

    def _step_gemms(self, hidden: torch.Tensor) -> str:
        """How this step ([B, S, hidden] input) runs its GEMMs: "prologues" (the GEMM prologue
        ops, the other GEMMs on the FMA kernel) with gemm_prologues, and "fma" (every GEMM on
        skinny_linear's FMA kernel) with fma_decode, in steps of up to FMA_GEMM_MAX_ROWS rows;
        "default" (cuBLAS, or skinny_linear's own choice with skinny_gemm) otherwise."""
        if hidden.shape[0] * hidden.shape[1] > FMA_GEMM_MAX_ROWS:
            return "default"
        if self.gemm_prologues:
            return "prologues"
        return "fma" if self.fma_decode else "default"

    def _rotary_append(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       index: int) -> torch.Tensor:
        """RoPE on the q/k/v rows, keys and values into layer `index` of the cache; returns q."""
        return hippo_ext.rotary_kv_append(qkv, cos, sin, self.cache.tensor, index,
                                          self.cache.length, check=False)

    def _norm_linear(self, delta: torch.Tensor, residual: torch.Tensor, norm: nn.Module,
                     weight: torch.Tensor, bias: torch.Tensor | None,
                     gemms: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(the GEMM of RMSNorm(delta + residual), delta + residual): one op with the GEMM
        prologues, add_rms_norm then the GEMM otherwise."""
        if gemms == "prologues":
            return hippo_ext.add_rms_norm_linear(delta, residual, norm.weight,
                                                 norm.variance_epsilon, weight, bias)
        normed, residual = hippo_ext.add_rms_norm(delta, residual, norm.weight,
                                                  norm.variance_epsilon)
        return self._linear(normed, weight, bias, gemms), residual

    def _gated_linear(self, gate_up: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None, gemms: str) -> torch.Tensor:
        """The down projection of the SwiGLU gating of gate_up [..., 2I]: one op with the GEMM
        prologues."""
        if gemms == "prologues":
            return hippo_ext.silu_and_mul_linear(gate_up, weight, bias)
        return self._linear(hippo_ext.silu_and_mul(gate_up), weight, bias, gemms)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                gemms: str) -> torch.Tensor:
        """A GEMM of the fused path: skinny_linear's FMA kernel in a step whose GEMMs take it
        (gemms "fma", or "prologues", as the prologue ops'); otherwise cuBLAS, or
        skinny_linear with skinny_gemm=True."""
        if gemms != "default":
            return hippo_ext.skinny_linear(x, weight, bias, workspace=self._gemm_workspace,
                                           impl="fma")
        if not self.skinny_gemm:
            return F.linear(x, weight, bias)
        return hippo_ext.skinny_linear(x, weight, bias, workspace=self._gemm_workspace)

    def _run_hf_layers(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       attend: AttendFn, last_only: bool) -> torch.Tensor:
        """The reference path (fused=False): HF's own modules, op for op."""
        write_positions = self.cache.write_positions(hidden.shape[1])
        for index, layer in enumerate(self.layers):
            attention = layer.self_attn
            residual = hidden
            normed = layer.input_layernorm(hidden)
            heads_shape = (*normed.shape[:2], -1, self.head_dim)
            q, k, v = (projection(normed).view(heads_shape).transpose(1, 2)
                       for projection in (attention.q_proj, attention.k_proj, attention.v_proj))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.cache.write(index, k, v, write_positions)
            hidden = residual + attention.o_proj(attend(index, q.transpose(1, 2)))
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        if last_only:
            hidden = hidden[:, -1:]
        return self.text_model.norm(hidden)

    def _prefill_attention(self, index: int, q: torch.Tensor, start: int,
                           row_starts: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, S, Hq, D] of prompt positions [start, start + S), whose keys and values are
        cached already: causal attention over the cache's first start + S positions. With
        row_starts [B] (rows of different lengths, start the longest), row b's prompt sits at
        [row_starts[b], row_starts[b] + S) and sees its own prefix only."""
        batch, seq_len, _, _ = q.shape
        end = start + seq_len
        keys, values = self.cache.keys(index)[:, :, :end], self.cache.values(index)[:, :, :end]
        q = q.transpose(1, 2)
        if row_starts is not None:
            key_pos = torch.arange(end, device=self.device)
            query_pos = row_starts[:, None] + torch.arange(seq_len, device=self.device)
            mask = (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                 scale=self.scale, enable_gqa=True)
        elif start == 0:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True,
                                                 scale=self.scale, enable_gqa=True)
        else:  # continuing a cached prefix: each new token sees the prefix and itself causally
            key_pos = torch.arange(end, device=self.device)
            query_pos = torch.arange(start, end, device=self.device)
            mask = key_pos[None, :] <= query_pos[:, None]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                 scale=self.scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(batch, seq_len, -1)

    def _step_attention(self, index: int, q: torch.Tensor, key_limit: int) -> torch.Tensor:
        """q [B, n, Hq, D] of the n newest positions, whose keys and values are cached."""
        batch, count, _, _ = q.shape
        if self.step_attention == "hippo_ext":
            out = hippo_ext.decode_attention(q.contiguous(), self.cache.tensor, index,
                                             self.cache.length, scale=self.scale,
                                             row_invariant=self.step_invariant,
                                             workspace=self._attention_workspace, check=False)
            return out.reshape(batch, count, -1)
        # Masked SDPA over a static key window: query i sees keys [0, length - count + i].
        key_pos = torch.arange(key_limit, device=self.device)
        query_pos = self.cache.length[:, None] - count + torch.arange(count, device=self.device)
        mask = (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), self.cache.keys(index)[:, :, :key_limit],
            self.cache.values(index)[:, :, :key_limit], attn_mask=mask, scale=self.scale,
            enable_gqa=True)
        return out.transpose(1, 2).reshape(batch, count, -1)

    def _normalise_positions(self, position_ids: torch.Tensor, batch: int,
                             seq_len: int) -> torch.Tensor:
        """Position ids on the device, [3, B, S] for M-RoPE and [B, S] for 1-D RoPE."""
        positions = position_ids.to(device=self.device, dtype=torch.int64)
        if self.uses_mrope and positions.dim() == 2:
            positions = positions[None].expand(3, *positions.shape)
        expected = (3, batch, seq_len) if self.uses_mrope else (batch, seq_len)
        if tuple(positions.shape) != expected:
            kind = "M-RoPE [3, B, S]" if self.uses_mrope else "1-D RoPE [B, S]"
            raise HippoError(f"position ids of shape {tuple(position_ids.shape)} do not fit "
                             f"{kind} with B={batch}, S={seq_len}")
        return positions

    def _check_prompt_inputs(self, inputs_embeds: object, position_ids: object) -> None:
        """A prompt's embeddings [B, S, hidden] (floating, S >= 1) and integer position ids
        (their shape is checked against B and S by _normalise_positions)."""
        if not isinstance(inputs_embeds, torch.Tensor):
            raise HippoError(f"inputs_embeds must be a tensor [B, S, {self.hidden_size}], got "
                             f"{type(inputs_embeds).__name__}")
        shape = tuple(inputs_embeds.shape)
        if len(shape) != 3 or not inputs_embeds.is_floating_point():
            raise HippoError(f"inputs_embeds must be a floating tensor [B, S, {self.hidden_size}] "
                             f"(embeddings, not token ids), got {inputs_embeds.dtype} {shape}")
        if shape[2] != self.hidden_size:
            raise HippoError(f"inputs_embeds of width {shape[2]} do not fit this model's hidden "
                             f"size {self.hidden_size} (a prompt prepared for another model?)")
        if shape[1] < 1:
            raise HippoError("inputs_embeds holds no token (S = 0): a prompt needs at least one")
        check_index_tensor("position_ids", position_ids)

    def _check_batch(self, batch: int) -> None:
        if batch != self.cache.batch:
            raise HippoError(f"batch {batch} does not match the runtime's batch "
                             f"{self.cache.batch}")

    def _check_query_request(self, query_layers: Sequence[int], query_len: int, batch: int,
                             seq_len: int) -> tuple[int, ...]:
        layers = tuple(query_layers) if isinstance(query_layers, Iterable) else None
        if layers is None or isinstance(query_layers, str) or not all(map(is_int, layers)):
            raise HippoError(f"query_layers must be a sequence of layer indices, got "
                             f"{query_layers!r}")
        layers = tuple(int(layer) for layer in layers)
        if not layers:
            return layers
        if batch != 1:
            raise HippoError("queries for token selection are returned for batch 1 only")
        if not is_int(query_len) or not 1 <= query_len <= seq_len:
            raise HippoError(f"query_len must be in 1..{seq_len} (the prompt), got {query_len}")
        bad = [layer for layer in layers if not 0 <= layer < len(self.layers)]
        if bad:
            raise HippoError(f"query layers {bad} out of range 0..{len(self.layers) - 1}")
        return layers


def _reject_unsupported_attention(text_model: nn.Module) -> None:
    layer_types = getattr(text_model.config, "layer_types", None) or ()
    if "sliding_attention" in layer_types:
        raise HippoError("sliding-window attention layers are not supported by hippo's runtime "
                         "(set use_sliding_window=False, as Qwen2 checkpoints ship)")

"""HippoPipeline: (video, prompt) -> tokens, text and statistics, losslessly faster than the
target alone.

One generation: the target prefills the whole prompt (returning the queries token preservation
needs); the visual tokens worth keeping are selected (preserve.py); the draft gets a cache of the
kept tokens (speculative/draft_cache.py); then sequential or parallel speculative decoding runs
until eos, a stop string or max_new_tokens (or until an on_tokens callback asks). mode="ar" runs
the target alone through the same runtime, the baseline every speedup is measured against.
"""
from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import hippo_ext
from hippo.devices import resolve_device
from hippo.errors import HippoError, check_flag, check_positive_rate
from hippo.models.base import PreparedPrompt, VideoEmbedding, VideoLLMAdapter
from hippo.models.pairing import check_compatible
from hippo.models.preprocess import check_frames
from hippo.preserve import KeptTokens, PreservationOptions, kept_prompt_length, preserve_tokens
from hippo.runtime import LanguageModelRuntime, generate_autoregressive, prefill_prompt
from hippo.runtime.autoregressive import (check_finite_logits, eos_id_set, fed_token_count,
                                          new_token_count)
from hippo.runtime.decoder import autocast_off
from hippo.runtime.kernel_choice import step_invariant_max_rows
from hippo.runtime.rope import rope_switches_within
from hippo.speculative.acceptance import SamplingOptions, TokenAcceptance
from hippo.speculative.decoder import decode_after_prefill
from hippo.speculative.draft_cache import (DRAFT_PREFILLS, compact_to_kept, copy_kept_cache,
                                           prefill_full, prefill_pruned)
from hippo.speculative.draft_length import DraftLength
from hippo.speculative.statistics import GenerationStats
from hippo.streaming import (EmittedTokens, FinishReason, StopStrings, TokenCallback,
                             check_token_callback, stop_strings)
from hippo.video import VideoInfo, load_video

MODES = ("ar", "sequential", "parallel")
DEFAULT_FRAMES = 16
USE_TARGET_EOS = "target"
RUNTIME_OPTIONS = ("use_cuda_graphs", "step_invariant", "gemm_prologues", "draft_device")
# Which runtimes run the fused GEMM ops, by HippoOptions.gemm_prologues.
GEMM_PROLOGUE_ROLES = {"none": (), "draft": ("draft",), "both": ("target", "draft")}
# Caches are sized in whole granules of positions, so that a request a few tokens longer than the
# last one reuses its runtime (a rebuild allocates a new cache and captures every graph again).
CACHE_GRANULE = 256


@dataclass(frozen=True)
class HippoOptions:
    """How HippoPipeline decodes.

    mode: "parallel" (HIPPO: drafting overlaps verification), "sequential" (draft g, then
        verify) or "ar" (the target alone).
    gamma: draft tokens per round: an int in 1..32 (fixed), or "auto": at most max_gamma
        (default 12), from step times and the acceptance measured while generating: in parallel
        mode PEARL's g near T_target / T_draft, in sequential mode the g that maximises expected
        tokens per second.
    draft_prefill: "pruned" (the draft prefills the kept tokens only) or "full+compact" (it
        prefills everything beside the target, then compacts its cache to the kept tokens).
    preservation: which visual tokens the draft keeps (keep ratio, method, weights, layers...).
    draft_device: where the draft runs (default: where its model is); another GPU, for example.
    use_cuda_graphs / step_invariant: passed to both runtimes (see LanguageModelRuntime).
        step_invariant=True makes the output the runtime's own AR output bit for bit (CPU, and
        CUDA in bf16/fp16), near-ties of the target's top logits included; without it a verify
        step rounds differently from one-token steps and may pick the other token of a tie.
        Verify steps must then fit its rows: gamma (max_gamma when "auto") at most 31, 15 with
        HIPPO_SKINNY_KERNEL=fma.
    gemm_prologues: the runtimes that run the norms, gating and RoPE inside their GEMMs (see
        LanguageModelRuntime): "none", "draft" (the small, launch-bound model, where fewer
        kernels pay most) or "both"; opt-in, measured slower on an H200 (2026-11-28: 0.5B
        decode step 0.87 against 0.75 ms, 7B 5.86 against 4.29).
    draft_priority: run the draft's steps on a high-priority CUDA stream, so that in parallel
        mode on one GPU its small kernels take SMs ahead of the target's verify step, which
        slowed them from 1.1 to 1.8 ms a step on an H200 (2026-11-27, benchmarks/RESULTS.md).
        Opt-in until measured; no effect on the CPU or on the tokens.
    """

    mode: str = "parallel"
    gamma: int | str = "auto"
    max_gamma: int = 12
    draft_prefill: str = "pruned"
    preservation: PreservationOptions = field(default_factory=PreservationOptions)
    draft_device: str | torch.device | None = None
    use_cuda_graphs: bool | None = None
    step_invariant: bool = False
    gemm_prologues: str = "none"
    draft_priority: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.preservation, PreservationOptions):
            raise HippoError("preservation must be a PreservationOptions, got "
                             f"{type(self.preservation).__name__}")
        if self.mode not in MODES:
            raise HippoError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.draft_prefill not in DRAFT_PREFILLS:
            raise HippoError(f"unknown draft_prefill {self.draft_prefill!r}; choose one of "
                             f"{', '.join(DRAFT_PREFILLS)}")
        for name in ("step_invariant", "draft_priority", "use_cuda_graphs"):
            check_flag(name, getattr(self, name), allow_none=name == "use_cuda_graphs")
        DraftLength(self.gamma, max_gamma=self.max_gamma)  # validates both
        most = step_invariant_max_rows()
        if self.step_invariant and self.largest_gamma + 1 > most:
            raise HippoError(f"step_invariant=True covers verify steps of up to {most} tokens: "
                             f"gamma (max_gamma when 'auto') at most {most - 1}, got "
                             f"{self.largest_gamma}")
        if self.gemm_prologues not in GEMM_PROLOGUE_ROLES:
            raise HippoError(f"unknown gemm_prologues {self.gemm_prologues!r}; choose one of "
                             f"{', '.join(GEMM_PROLOGUE_ROLES)}")
        if self.step_invariant and self.gemm_prologues != "none":
            # Their fused GEMMs run single-token steps only, wider ones cuBLAS: rows would differ.
            raise HippoError(f"step_invariant cannot be combined with gemm_prologues "
                             f"{self.gemm_prologues!r}")

    @property
    def largest_gamma(self) -> int:
        return self.max_gamma if self.gamma == "auto" else int(self.gamma)


@dataclass
class HippoOutput:
    """tokens: the generated ids; text: their text (None without a tokenizer); stats: the
    generation's statistics; finish_reason: why it ended (hippo.streaming.FINISH_REASONS)."""

    tokens: list[int]
    text: str | None
    stats: GenerationStats
    finish_reason: FinishReason


@dataclass(frozen=True, eq=False)
class EncodedVideo:
    """A video decoded and embedded by each model of a pipeline (HippoPipeline.encode_video), to
    ask it several questions: each generation from it skips decoding and the vision towers.

    frames: (T, H, W) of the frames sampled. fps: the rate they were sampled at, as given to the
    models (None: the family's default). embeddings: each model's VideoEmbedding, by role
    ("target", and "draft" for a pair); they live on the models' devices. reuse_prefix: the
    target's cache keeps the prompt's prefix up to the video's end for the next question
    (hippo.runtime.prefix_reuse), which is then prefilled from the text after the video.
    """

    frames: tuple[int, int, int]
    fps: float | None
    embeddings: dict[str, VideoEmbedding]
    reuse_prefix: bool = True


class HippoPipeline:
    """A target video-LLM and its draft (same family, shared tokenizer).

    draft=None makes the target its own draft (self-speculation): a second runtime over the
    same weights whose cache is a compacted copy of the target's.
    Runtimes (and their CUDA graphs) are kept between generations and rebuilt only when a
    generation needs a longer cache or the model's weights were replaced or moved (`.to()`).
    """

    def __init__(self, target: VideoLLMAdapter, draft: VideoLLMAdapter | None = None,
                 options: HippoOptions | None = None, **overrides: object) -> None:
        for role, model in (("target", target), ("draft", draft)):
            if not isinstance(model, VideoLLMAdapter) and (role == "target" or model is not None):
                raise HippoError(f"the {role} must be a model adapter (hippo.models.load_adapter"
                                 f"(preset or checkpoint directory)), got {type(model).__name__}")
        if options is not None and not isinstance(options, HippoOptions):
            raise HippoError(f"options must be a HippoOptions, got {type(options).__name__}")
        self.options = _with_overrides(options or HippoOptions(), overrides)
        self.target = target
        self.draft = draft
        self.self_speculative = draft is None
        if draft is not None:
            check_compatible(target, draft)
        # Selection layers beyond the target's depth are refused now, not after its prefill.
        self.options.preservation.selection_layers(len(target.text_model.layers))
        # The target's own vocabulary: its choices are never cut to a narrower draft's table.
        self.vocab = target.vocab_size
        check_draft_model_options(self.options, has_draft=draft is not None)
        if self.options.draft_device is not None and draft is not None:
            draft.model.to(resolve_device(self.options.draft_device))
        if draft is not None:
            check_lane_devices(target.device, draft.device, self.options.mode)
        check_kernels_run(self._models().values(), self.options.mode)
        check_rope_lossless(target, self.options.mode)
        self._runtimes: dict[str, LanguageModelRuntime] = {}
        # Held by a generation: the runtimes' caches are one generation's state. Shared, with
        # the runtimes, by the pipelines made by with_options, so that two threads using them
        # (or this one) take turns instead of corrupting each other's caches.
        self._lock = _RuntimesInUse()

    # --------------------------------------------------------------------------- public API

    def runtime(self, role: str) -> LanguageModelRuntime | None:
        """The language-model runtime of "target" or "draft" as the last generation left it
        (None before one needed it); shared with pipelines made by with_options."""
        if role not in ("target", "draft"):
            raise HippoError(f"role must be 'target' or 'draft', got {role!r}")
        return self._runtimes.get(role)

    def release(self) -> None:
        """Free the runtimes' KV caches and CUDA graphs (they never shrink: after one very long
        request its cache stays allocated); the next generation builds what it needs. Also
        releases them for the pipelines with_options shares them with; waits for a generation
        under way in another thread."""
        with self._lock:
            self._runtimes.clear()

    def with_options(self, **overrides: object) -> "HippoPipeline":
        """The same pair under other options (mode, gamma, keep ratio, ...). The runtimes, their
        caches and CUDA graphs are shared when the options they depend on stay the same; the
        pipelines sharing them then run one generation at a time (threads take turns)."""
        pipeline = HippoPipeline(self.target, self.draft, _with_overrides(self.options, overrides))
        if all(getattr(pipeline.options, name) == getattr(self.options, name)
               for name in RUNTIME_OPTIONS):
            pipeline._runtimes, pipeline._lock = self._runtimes, self._lock
        return pipeline

    @autocast_off  # the vision towers too: generate_prepared's tokens must be generate's
    def encode_video(self, video: str | Path | torch.Tensor, *, num_frames: int | None = None,
                     fps: float | None = None, start: float | None = None,
                     end: float | None = None, reuse_prefix: bool = True) -> EncodedVideo:
        """Decode a video and run each model's vision tower on it once, for any number of
        prompts: generate(encoded, prompt) and prepare(encoded, prompt) then skip both.
        Arguments as in prepare(). Frames whose visual tokens alone overflow a model's context
        are refused before they are decoded; each prompt's fit is checked when it is asked.

        reuse_prefix: the target's cache keeps the prompt up to the video's end between
        questions, so that a question following one about the same video prefills only its own
        text (AR and speculative decoding alike, which stay equal token for token). That split
        prefill may round differently from a prefill of the whole prompt: False prefills each
        prompt whole and gives generate(video, prompt)'s tokens bit for bit."""
        check_flag("reuse_prefix", reuse_prefix)
        if isinstance(video, EncodedVideo):
            raise HippoError("this video is encoded already: ask it questions with "
                             "generate(encoded, prompt) or prepare(encoded, prompt)")
        num_frames = _frame_count(video, num_frames, fps, start, end, encoded_ok=False)
        admit = functools.partial(self._admit_frames,
                                  text_tokens={role: 0 for role in self._models()})
        return self._encode(video, num_frames, fps, start, end, admit, reuse_prefix)

    @autocast_off  # the vision towers too: generate_prepared's tokens must be generate's
    def prepare(self, video: str | Path | torch.Tensor | EncodedVideo, prompt: str | list[int], *,
                num_frames: int | None = None, fps: float | None = None,
                start: float | None = None, end: float | None = None,
                max_new_tokens: int = 0) -> tuple[PreparedPrompt, PreparedPrompt | None]:
        """(target prompt, draft prompt or None when self-speculating) for (video, prompt):
        frames are decoded once, each model embeds them with its own vision tower. A video file
        is sampled at num_frames uniform frames or at fps frames per second (not both;
        DEFAULT_FRAMES when neither is given), between start and end seconds when given.
        Decoded frames (uint8 RGB [T, H, W, 3]) are used as given: fps is then the rate they
        were sampled at, which spaces Qwen2.5-VL's temporal positions (None: 2 frames per
        second, one second per temporal patch, as qwen-vl-utils assumes for a list of frames;
        a file sampled at num_frames gets the count over its duration instead, so pass that
        rate to get the same positions from its frames). An EncodedVideo (encode_video()) is
        used as it was sampled and embedded: no sampling argument goes with it.
        max_new_tokens: the tokens to be generated after the prompt; frames whose visual tokens
        plus the prompt's text and these cannot fit a model's context are refused before they
        are decoded."""
        if isinstance(video, EncodedVideo):
            self._check_encoded(video, num_frames=num_frames, fps=fps, start=start, end=end)
        else:
            num_frames = _frame_count(video, num_frames, fps, start, end)
        new_tokens = new_token_count(max_new_tokens, least=0)
        # The prompt's text is encoded first: a bad prompt is refused before the video is read,
        # and its length counts towards the context before any frame is decoded.
        text_tokens = self.text_tokens(prompt)
        admit = functools.partial(self._admit_frames, text_tokens=text_tokens, new_tokens=new_tokens)
        if isinstance(video, EncodedVideo):
            admit(*video.frames)
            encoded = video
        else:
            # Embedded for this prompt alone: prefilled whole, as the HF forward runs it.
            encoded = self._encode(video, num_frames, fps, start, end, admit, reuse_prefix=False)
        # Only the target's prefill reuses a prefix: a draft prefills its kept tokens alone.
        target_prompt = self.target.prepare_embedded(encoded.embeddings["target"], prompt,
                                                     share_prefix=encoded.reuse_prefix)
        if self.draft is None:
            return target_prompt, None
        draft_prompt = self.draft.prepare_embedded(encoded.embeddings["draft"], prompt)
        _check_same_layout(target_prompt, draft_prompt)
        return target_prompt, draft_prompt

    def _encode(self, video: str | Path | torch.Tensor, num_frames: int | None,
                fps: float | None, start: float | None, end: float | None,
                admit: Callable[[int, int, int], None], reuse_prefix: bool) -> EncodedVideo:
        """The frames (decoded from a file, or as given, after admit(T, H, W)) through each
        model's vision tower."""
        if isinstance(video, torch.Tensor):
            check_frames(video)
            admit(*video.shape[:3])
            frames = video
        else:
            sources: list[VideoInfo] = []
            frames = load_video(video, num_frames=num_frames, fps=fps, start=start, end=end, admit=admit,
                                on_info=sources.append)
            fps = _sampled_rate(sources[-1], fps, frames.shape[0], start, end)
        embeddings = {role: model.embed_video(frames, fps) for role, model in self._models().items()}
        return EncodedVideo(frames=tuple(frames.shape[:3]), fps=fps, embeddings=embeddings,
                            reuse_prefix=reuse_prefix)

    def _check_encoded(self, video: EncodedVideo, **sampling: object) -> None:
        """An EncodedVideo was sampled when it was encoded, by this pair's models."""
        given = [name for name, value in sampling.items() if value is not None]
        if given:
            raise HippoError(f"{', '.join(given)}: this video was sampled when it was encoded "
                             "(give the sampling to encode_video())")
        for role, model in self._models().items():
            embedding = video.embeddings.get(role)
            if embedding is None or embedding.adapter is not model:
                raise HippoError(f"this EncodedVideo was not made by this pipeline's {role} model: "
                                 "encode the video with this pipeline's encode_video() (pipelines "
                                 "made by with_options share their models and their encodings)")

    def _models(self) -> dict[str, VideoLLMAdapter]:
        """The pair's models by role (no "draft" when self-speculating)."""
        return {role: model for role, model in (("target", self.target), ("draft", self.draft))
                if model is not None}

    def _running_models(self) -> dict[str, VideoLLMAdapter]:
        """The models this mode runs over the generation's positions, whose contexts must hold
        them: the target, and a draft model in the speculative modes (its positions are the
        target's); mode "ar" never runs the draft."""
        models = self._models()
        if self.options.mode == "ar":
            models.pop("draft", None)
        return models

    def text_tokens(self, prompt: str | list[int]) -> dict[str, int]:
        """Each model's count of the prompt's tokens that are not visual, by role; a prompt
        that cannot be asked (not UTF-8, ids outside the vocabulary, placeholders in it, or
        text that the target and the draft tokenize differently) is refused here, before any
        frame is decoded."""
        ids = {role: adapter.prompt_ids(0, prompt) for role, adapter in self._models().items()}
        if "draft" in ids and ids["draft"] != ids["target"]:
            raise HippoError(
                "target and draft make different token ids of this prompt's text (target: "
                f"{len(ids['target'])} text tokens, draft: {len(ids['draft'])}): their chat "
                "templates or tokenizers treat it differently; give the draft the target's")
        return {role: len(role_ids) for role, role_ids in ids.items()}

    def _admit_frames(self, count: int, height: int, width: int, *, text_tokens: dict[str, int],
                      new_tokens: int = 0) -> None:
        """Refuse, before decoding or embedding them, frames whose visual tokens plus the
        prompt's text and the tokens to be generated would overflow a model's context (a long
        video at one frame per second). _check_context_fits checks the prepared prompt again."""
        for role, adapter in self._running_models().items():
            if adapter.max_positions is None:
                continue
            visual, text = adapter.visual_tokens(count, height, width), text_tokens[role]
            total = visual + text + new_tokens
            if total <= adapter.max_positions:
                continue
            with_new = f" and {new_tokens} new tokens" if new_tokens else ""
            raise HippoError(
                f"context too long: {count} frames of {width}x{height} make {visual} visual tokens; "
                f"with the prompt's {text} text tokens{with_new} that is {total}, beyond the "
                f"{adapter.max_positions} positions of the {role} ({adapter.family}): ask for fewer "
                f"frames (num_frames, a lower fps or a time window)"
                f"{', fewer new tokens' if new_tokens else ''} or a shorter prompt")

    @torch.no_grad()
    @autocast_off
    def generate(self, video: str | Path | torch.Tensor | EncodedVideo, prompt: str | list[int],
                 max_new_tokens: int = 64, *, num_frames: int | None = None,
                 fps: float | None = None, start: float | None = None, end: float | None = None,
                 temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 eos_token_id: int | list[int] | None | str = USE_TARGET_EOS,
                 on_tokens: TokenCallback | None = None,
                 stop: str | Sequence[str] | None = None) -> HippoOutput:
        """Generate up to max_new_tokens after (video, prompt); stops after eos (included), or
        after the token that completes one of the `stop` strings in the text (included).

        video: a file path, frames [T, H, W, 3] uint8 RGB already decoded (fps: the rate they
        were sampled at), or an EncodedVideo (encode_video(): several questions about one video
        decode and embed it once); num_frames, fps, start and end as in prepare(). eos_token_id:
        the target's by default; None never stops early. Sampling (temperature > 0) is seeded
        by `seed` when given: reproducible where the rounds do not depend on timing (mode
        "ar", or a fixed gamma; parallel mode on a CPU only); with gamma "auto" or parallel
        mode on CUDA, runs may differ (each one distribution-exact). on_tokens(tokens) is called
        with each group of tokens as it is emitted (streaming; see hippo.streaming): the groups
        concatenate to the output's tokens; returning True stops the generation after them. It
        must not start another generation on this pipeline (or one sharing its runtimes).
        """
        started = time.perf_counter()
        # Every argument is checked before the video is read.
        max_new_tokens = new_token_count(max_new_tokens, least=1)
        sampling = SamplingOptions(temperature, top_k, top_p, seed)
        eos_ids = self.eos_ids(eos_token_id)
        check_token_callback(on_tokens)
        stop = self._stop_strings(stop)
        target_prompt, draft_prompt = self.prepare(video, prompt, num_frames=num_frames, fps=fps,
                                                   start=start, end=end,
                                                   max_new_tokens=max_new_tokens)
        output = self._generate_prepared(target_prompt, draft_prompt, max_new_tokens, sampling,
                                         eos_ids, on_tokens, stop)
        output.stats.total_s = time.perf_counter() - started
        return output

    @torch.no_grad()
    @autocast_off
    def generate_prepared(self, target_prompt: PreparedPrompt, draft_prompt: PreparedPrompt | None,
                          max_new_tokens: int, sampling: SamplingOptions,
                          eos_ids: set[int] | None, *,
                          on_tokens: TokenCallback | None = None,
                          stop: str | Sequence[str] | None = None) -> HippoOutput:
        """generate() after prepare(): the language-model part alone (what benchmarks time).
        eos_ids: a set of stop ids (eos_ids() gives the target's), or None for none; on_tokens
        and stop as in generate()."""
        max_new_tokens = new_token_count(max_new_tokens, least=1)
        self._check_prepared(target_prompt, draft_prompt)
        if not isinstance(sampling, SamplingOptions):
            raise HippoError(f"sampling must be a SamplingOptions, got {type(sampling).__name__}")
        check_token_callback(on_tokens)
        return self._generate_prepared(target_prompt, draft_prompt, max_new_tokens, sampling,
                                       self.eos_ids(eos_ids), on_tokens, self._stop_strings(stop))

    def _check_prepared(self, target_prompt: object, draft_prompt: object) -> None:
        """The prompts of prepare(): the draft's is needed by a draft model's speculative
        decoding, and must lay the video out as the target's does."""
        if not isinstance(target_prompt, PreparedPrompt):
            raise HippoError(f"target_prompt must be a PreparedPrompt (from prepare()), got "
                             f"{type(target_prompt).__name__}")
        if self.self_speculative or self.options.mode == "ar":
            return  # the draft prompt is not used
        if not isinstance(draft_prompt, PreparedPrompt):
            raise HippoError(f"draft_prompt must be the draft's PreparedPrompt (from prepare()), "
                             f"got {type(draft_prompt).__name__}")
        _check_same_layout(target_prompt, draft_prompt, "pass the two prompts of one prepare() call")

    def _generate_prepared(self, target_prompt: PreparedPrompt,
                           draft_prompt: PreparedPrompt | None, max_new_tokens: int,
                           sampling: SamplingOptions, eos_ids: set[int],
                           on_tokens: TokenCallback | None,
                           stop: tuple[str, ...]) -> HippoOutput:
        """generate_prepared() on checked arguments (one at a time per set of runtimes)."""
        for role, adapter in self._running_models().items():
            _check_context_fits(adapter, role, target_prompt.length + max_new_tokens)
        with self._lock:
            started = time.perf_counter()
            stop_at = StopStrings(self.target.tokenizer, stop) \
                if stop and self.target.tokenizer is not None else None
            try:
                if self.options.mode == "ar":
                    stats, tokens, reason = self._generate_autoregressive(
                        target_prompt, max_new_tokens, sampling, eos_ids, on_tokens, stop_at)
                else:
                    stats, tokens, reason = self._generate_speculative(
                        target_prompt, draft_prompt, max_new_tokens, sampling, eos_ids,
                        on_tokens, stop_at)
            except BaseException:
                self._finish_device_work()
                raise
            stats.total_s = time.perf_counter() - started
        text = self.target.tokenizer.decode(tokens) if self.target.tokenizer is not None else None
        return HippoOutput(tokens, text, stats, reason)

    # ---------------------------------------------------------------------------- internals

    def _finish_device_work(self) -> None:
        """After a generation failed mid-way (an error, KeyboardInterrupt): wait for the work it
        issued on the lanes' streams, the full draft prefill's side stream or a capture stream,
        which nothing joins then. Left running, a target step still queued there would advance
        the shared cache's length and write its keys after the next generation's reset."""
        for device in {runtime.device for runtime in self._runtimes.values()}:
            if device.type == "cuda":
                try:
                    torch.cuda.synchronize(device)
                except Exception:  # noqa: BLE001 - a broken context: the first error is the one
                    pass

    def _stop_strings(self, stop: object) -> tuple[str, ...]:
        """The stop strings, checked (they are matched in the target tokenizer's text)."""
        strings = stop_strings(stop)
        if strings and self.target.tokenizer is None:
            raise HippoError("stop strings are matched in the text, and the target has no "
                             "tokenizer to decode it: stop on token ids (eos_token_id) instead")
        return strings

    def eos_ids(self, eos_token_id: int | list[int] | tuple[int, ...] | set[int] | frozenset[int]
                | None | str = USE_TARGET_EOS) -> set[int]:
        """The stop tokens: the target's own by default, none for None; one id or a list, tuple
        or set of them."""
        if isinstance(eos_token_id, str) and eos_token_id == USE_TARGET_EOS:
            eos_token_id = self.target.eos_token_ids or None
        return eos_id_set(eos_token_id, self.vocab)

    def _runtime(self, role: str, model: VideoLLMAdapter, capacity: int) -> LanguageModelRuntime:
        """The role's runtime with room for `capacity` positions (rebuilt when too small, with
        room rounded up to whole CACHE_GRANULEs, or when the model's weights were replaced or
        moved since it was built)."""
        runtime = self._runtimes.get(role)
        if runtime is None or runtime.cache.max_seq_len < capacity or not runtime.matches_model():
            self._runtimes.pop(role, None)
            del runtime  # free the old cache and graphs before allocating the new ones
            capacity = -(-capacity // CACHE_GRANULE) * CACHE_GRANULE
            runtime = LanguageModelRuntime.from_hf(
                model.model, capacity, use_cuda_graphs=self.options.use_cuda_graphs,
                step_invariant=self.options.step_invariant,
                gemm_prologues=role in GEMM_PROLOGUE_ROLES[self.options.gemm_prologues])
            self._runtimes[role] = runtime
        return runtime

    def _generate_autoregressive(self, prompt: PreparedPrompt, max_new_tokens: int,
                                 sampling: SamplingOptions, eos_ids: set[int],
                                 on_tokens: TokenCallback | None, stop: StopStrings | None
                                 ) -> tuple[GenerationStats, list[int], FinishReason]:
        runtime = self._runtime("target", self.target,
                                prompt.length + fed_token_count(max_new_tokens))
        generator = None
        if not sampling.greedy and sampling.seed is not None:
            generator = torch.Generator(runtime.device).manual_seed(sampling.seed)
        result = generate_autoregressive(
            runtime, prompt, max_new_tokens, list(eos_ids) or None,
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
            generator=generator, on_tokens=on_tokens, stop=stop)
        steps = max(len(result.tokens) - 1, 0)
        stats = GenerationStats(mode="ar", prompt_tokens=prompt.length, target_steps=steps,
                                reused_prompt_tokens=result.reused_prompt_tokens,
                                rounds=steps, tokens=len(result.tokens),
                                prefill_s=result.prefill_s, verify_s=result.decode_s,
                                decode_s=result.decode_s)
        assert result.finish_reason is not None  # a finished generation says why
        return stats, result.tokens, result.finish_reason

    def _generate_speculative(self, target_prompt: PreparedPrompt,
                              draft_prompt: PreparedPrompt | None, max_new_tokens: int,
                              sampling: SamplingOptions, eos_ids: set[int],
                              on_tokens: TokenCallback | None, stop: StopStrings | None
                              ) -> tuple[GenerationStats, list[int], FinishReason]:
        options = self.options
        preservation = options.preservation
        stats = GenerationStats(mode=options.mode, prompt_tokens=target_prompt.length)
        fed = fed_token_count(max_new_tokens)
        kept_length = kept_prompt_length(target_prompt, preservation.keep_ratio)
        target = self._runtime("target", self.target, target_prompt.length + fed)
        draft_capacity = kept_length + fed
        if options.draft_prefill == "full+compact":
            draft_capacity = max(draft_capacity, target_prompt.length)
        draft_model = self.target if self.self_speculative else self.draft
        draft = self._runtime("draft", draft_model, draft_capacity)
        acceptance = TokenAcceptance(sampling, self.vocab)
        output = EmittedTokens(max_new_tokens, eos_ids, on_tokens, stop)

        kept, first_token = self._prefill(target, draft, target_prompt, draft_prompt,
                                          acceptance, stats, output)
        if kept is not None:  # None: the first token ended the generation
            stats.draft_prompt_tokens = kept.length
            decode_after_prefill(
                target, draft, first_token, target_prompt.generated_positions(0, fed),
                mode=options.mode, acceptance=acceptance,
                draft_length=DraftLength(options.gamma, max_gamma=options.max_gamma,
                                         mode=options.mode),
                max_new_tokens=max_new_tokens, eos_ids=eos_ids, stats=stats,
                draft_priority=options.draft_priority, output=output)
        stats.tokens = len(output.tokens)
        assert output.finish_reason is not None  # a finished generation says why
        return stats, output.tokens, output.finish_reason

    def _prefill(self, target: LanguageModelRuntime, draft: LanguageModelRuntime,
                 target_prompt: PreparedPrompt, draft_prompt: PreparedPrompt | None,
                 acceptance: TokenAcceptance, stats: GenerationStats,
                 output: EmittedTokens) -> tuple[KeptTokens | None, torch.Tensor]:
        """Target prefill, its first token emitted into `output`, token selection and the
        draft's cache; (kept tokens, or None when the first token ended the generation, and the
        target's first token [1])."""
        options, preservation = self.options, self.options.preservation
        full_draft = options.draft_prefill == "full+compact" and draft_prompt is not None
        overlap = _SideStream(draft.device)
        if full_draft:  # issued first, on its own stream: it overlaps the target prefill
            # Without a side stream (the CPU) it runs here and now, and is the draft's time.
            timed = _timed(stats, "draft_prefill", draft.device) if overlap.stream is None \
                else nullcontext()
            with timed, overlap:
                prefill_full(draft, draft_prompt)
        with _timed(stats, "prefill", target.device):
            layers = preservation.selection_layers(len(target.layers))
            query_len = preservation.text_query_len(target_prompt)
            prefill = prefill_prompt(target, target_prompt,
                                     query_layers=layers if preservation.needs_queries else (),
                                     query_len=query_len if preservation.needs_queries else 0)
            result, stats.reused_prompt_tokens = prefill.result, prefill.reused
            check_finite_logits(result.logits[:, -1])
            first_token = acceptance.choose(result.logits[:, -1])
            first = int(first_token.item())  # read anyway by the decoding to come
            # Handed over now, before the selection and the draft's prefill (streaming's first
            # token comes as soon as AR's would, not after this block's wait for a full draft
            # prefill's side stream). The callback's time is not the prefill's, as in AR.
            handed = time.perf_counter()
            output.emit([first])
            callback_s = time.perf_counter() - handed
        stats.prefill_s -= callback_s
        if output.finished:  # the first token ended the generation: no draft is needed
            overlap.join()
            return None, first_token
        with _timed(stats, "selection", target.device):
            keys = None
            if preservation.needs_queries:
                keys = target.cache.layer_keys(layers, target_prompt.length)
            kept = preserve_tokens(target_prompt, preservation, result.queries, keys)
        # The draft's part beyond what overlapped the target's prefill.
        with _timed(stats, "draft_prefill", draft.device):
            overlap.join()
            if self.self_speculative:
                draft.reset()
                copy_kept_cache(target, draft, kept.positions)
            elif full_draft:
                compact_to_kept(draft, kept.positions)
            else:
                prefill_pruned(draft, draft_prompt, kept.positions)
        return kept, first_token


class _RuntimesInUse:
    """The lock a generation holds on its runtimes: threads take turns, and the thread holding
    it is refused (a generation or release() started from an on_tokens callback would wait
    for itself for ever)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: int | None = None

    def __enter__(self) -> None:
        if self._holder == threading.get_ident():
            raise HippoError("the pipeline's runtimes are in use by the generation this thread is "
                             "running (called from its on_tokens callback?): collect the tokens, "
                             "and generate or release after it returns")
        self._lock.acquire()
        self._holder = threading.get_ident()

    def __exit__(self, *exc: object) -> None:
        self._holder = None
        self._lock.release()


def check_lane_devices(target: torch.device, draft: torch.device, mode: str) -> None:
    """Parallel decoding overlaps the draft with the target's verification on CUDA streams,
    ordered by events on both sides: a CPU on either side has none (a CPU target cannot wait on
    a CUDA draft; a CPU draft's early verification would read the target's logits before its
    stream wrote them). Both lanes on the CPU, or both on CUDA GPUs."""
    if mode == "parallel" and target.type != draft.type:
        raise HippoError(f"parallel decoding needs the target and the draft both on CUDA or both "
                         f"on the CPU (or mode='sequential'); the target is on {target}, the "
                         f"draft on {draft}")


def _sampled_rate(source: VideoInfo, fps: float | None, count: int, start: float | None,
                  end: float | None) -> float | None:
    """The rate of `count` frames decoded from `source`, which spaces Qwen2.5-VL's temporal
    positions (as qwen-vl-utils gives HF's processor the sampled rate): `fps` up to the clip's
    own (a higher one gives every frame), or `count` frames over the clip or its window; `fps`
    as asked where the clip records no rate."""
    if source.fps <= 0:
        return fps
    if fps is not None:
        return min(fps, source.fps)
    first = 0.0 if start is None else start
    last = source.duration if end is None else min(end, source.duration)
    return count / (last - first) if last > first else None


def _frame_count(video: object, num_frames: int | None, fps: float | None,
                 start: float | None, end: float | None, encoded_ok: bool = True) -> int | None:
    """The sampling arguments checked; the frame count a file is sampled at (None: by fps).
    encoded_ok: whether the caller takes an EncodedVideo too (its error names it then)."""
    if not isinstance(video, (str, Path, torch.Tensor)):
        frames = "decoded frames (a uint8 tensor [T, H, W, 3])"
        kinds = (f"a file path, {frames} or an EncodedVideo (encode_video())" if encoded_ok
                 else f"a file path or {frames}")
        raise HippoError(f"video must be {kinds}, got {type(video).__name__}")
    if num_frames is not None and fps is not None:
        raise HippoError("give num_frames or fps, not both")
    if isinstance(video, torch.Tensor):
        if num_frames is not None:
            # Never ignored in silence: the frames given are the frames used.
            raise HippoError("num_frames samples a video file; with decoded frames pass the ones "
                             f"to use (frames[indices]), got num_frames={num_frames!r}")
        if start is not None or end is not None:
            raise HippoError("start and end cut a video file; cut decoded frames yourself")
    if fps is not None:  # every family, decoded frames too (LLaVA's positions ignore it)
        check_positive_rate("fps", fps)
    return DEFAULT_FRAMES if num_frames is None and fps is None else num_frames


def check_rope_lossless(target: VideoLLMAdapter, mode: str) -> None:
    """Speculative decoding is lossless only if a verify step of g + 1 tokens gives the target
    logits that g + 1 one-token steps (its AR output, HF `generate`) give. A RoPE whose
    frequencies HF picks per call from its largest position (longrope switching to its long
    factors inside the context the pipeline admits) breaks that in silence: refused here."""
    if mode == "ar":
        return
    rotary = target.text_model.rotary_emb
    limit = target.max_positions
    if rope_switches_within(rotary, limit if limit is not None else 2**62):
        raise HippoError(f"{mode} decoding would not be lossless with the target's rope_type "
                         f"{rotary.rope_type!r}: HF switches its frequencies by the largest "
                         "position of each call, so verify steps crossing the switch differ from "
                         "autoregressive decoding; use mode='ar'")


def check_kernels_run(models: Iterable[VideoLLMAdapter], mode: str) -> None:
    """Speculative decoding runs hippo_ext ops (token selection, KV compaction, verification)
    on each model's device, so a device they do not run on is refused here, not at the first
    launch. mode="ar" needs none (its runtime runs HF's modules there)."""
    if mode == "ar":
        return
    for device in {model.device for model in models}:
        reason = hippo_ext.kernels_unsupported(device)
        if reason is not None:
            raise HippoError(f"{mode} decoding on {device} needs hippo_ext's kernels, which "
                             f"cannot run there: {reason}. Use mode='ar', or the CPU")


@contextmanager
def _timed(stats: GenerationStats, name: str, device: torch.device) -> Iterator[None]:
    """Add the wall time of the block, its device work included, to stats.<name>_s."""
    started = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    setattr(stats, f"{name}_s", getattr(stats, f"{name}_s") + time.perf_counter() - started)


class _SideStream:
    """A stream of `device` that starts after the work issued so far (nothing on the CPU);
    `with side:` issues work on it, join() makes the current stream wait for it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._context: torch.cuda.StreamContext | None = None

    def __enter__(self) -> "_SideStream":
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            self._context = torch.cuda.stream(self.stream)
            self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)
            self._context = None

    def join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


def check_draft_model_options(options: HippoOptions, has_draft: bool) -> None:
    """Options that only a draft model of its own uses, refused for self-speculation (the
    target drafting over its pruned cache); the command line checks them before any model
    loads."""
    if has_draft:
        return
    if options.draft_device is not None:
        raise HippoError("a draft device needs a draft model (self-speculation drafts with "
                         "the target, on the target's device)")
    if options.draft_prefill != "pruned":
        raise HippoError("self-speculation (no draft model) copies the target's kept cache; "
                         "draft_prefill does not apply: leave it at 'pruned'")


def _with_overrides(options: HippoOptions, overrides: dict) -> HippoOptions:
    """options with the named fields replaced (and validated again); unknown names refused."""
    unknown = sorted(set(overrides) - set(HippoOptions.__dataclass_fields__))
    if unknown:
        raise HippoError(f"unknown option {unknown[0]!r}; HippoOptions has "
                         f"{', '.join(HippoOptions.__dataclass_fields__)}")
    return replace(options, **overrides) if overrides else options


def _check_context_fits(adapter: VideoLLMAdapter, role: str, length: int) -> None:
    """The prompt plus every new token must fit the trained context of a model that runs."""
    limit = adapter.max_positions
    if limit is not None and length > limit:
        raise HippoError(
            f"context too long: {length} tokens (prompt plus max_new_tokens) exceed the "
            f"{role}'s {limit} positions ({adapter.family}); use fewer frames or ask for fewer "
            f"tokens")


def _check_same_layout(target: PreparedPrompt, draft: PreparedPrompt,
                       remedy: str = "their vision preprocessing must match (same patch and "
                                     "merge sizes, same image size)") -> None:
    """Selection indices of the target's prompt must mean the same tokens in the draft's."""
    if not torch.equal(target.input_ids.cpu(), draft.input_ids.cpu()) or target.grid != draft.grid:
        raise HippoError(
            "target and draft turn this video into different token layouts "
            f"(target: {target.length} tokens, grid {target.grid}; draft: {draft.length} tokens, "
            f"grid {draft.grid}): {remedy}")

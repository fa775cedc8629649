"""What every model adapter hands to the runtime: one prepared (video, prompt) pair, and the
Qwen2-family language model it runs on. One adapter file per model family implements it."""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from hippo.models.chat_format import ChatFormat
    from hippo.models.presets import Preset


class HippoError(RuntimeError):
    """An error a user can cause (bad video, prompt too long, unsupported model, ...): one clear
    message, no traceback needed."""


@contextmanager
def errors_prefixed(prefix: str) -> Iterator[None]:
    """HippoErrors raised inside start with `prefix: `: which file or checkpoint is at fault,
    where the code that found the fault does not know (a target and a draft each have one)."""
    try:
        yield
    except HippoError as err:
        raise HippoError(f"{prefix}: {err}") from err


def check_utf8(prompt: str, name: str = "the prompt") -> None:
    """Python keeps bytes of a command line or file that are not UTF-8 as lone surrogates,
    which tokenizers reject with a TypeError: say what is wrong instead."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise HippoError(f"{name} is not valid UTF-8 (character {error.start} is a lone "
                         "surrogate, from bytes that were not UTF-8): pass the text in UTF-8 "
                         "(check the terminal's or the shell's encoding)") from None


def is_int(value: object) -> bool:
    """An integer (Python's or numpy's), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_rate(name: str, rate: object) -> None:
    """A rate (frames per second) must be a finite positive number (not a bool)."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not (math.isfinite(rate) and rate > 0):
        raise HippoError(f"{name} must be a positive number, got {rate!r}")


def short_repr(value: object, limit: int = 80) -> str:
    """repr(value) for an error message, cut after `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def device_name(device: str | torch.device) -> str:
    """The GPU's model name for a CUDA device, "CPU" otherwise (what reports print)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


# The dtypes hippo's kernels take (fp32 on the CPU; bf16 and fp16 everywhere): a float64 or
# float8 model would fail inside its first prefill (rotary_tables' dtype check).
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_model_dtype(dtype: object, what: str = "dtype") -> None:
    """Refuse a model dtype hippo's kernels do not take, naming the ones they do."""
    if dtype not in MODEL_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in MODEL_DTYPES)
        raise HippoError(f"{what} must be one of {names}, got {dtype!r}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Where to run: `device` checked (cpu or an existing CUDA GPU), or by default the GPU when
    one is present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise HippoError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from err
    if resolved.type not in ("cpu", "cuda"):
        raise HippoError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise HippoError(f"device {device!r}: no CUDA GPU is available here (use cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise HippoError(f"device {device!r}: this machine has {torch.cuda.device_count()} "
                             "CUDA GPU(s)")
    return resolved


@dataclass
class PreparedPrompt:
    """A (video, prompt) pair, ready for the language model.

    input_ids: [1, S] int64 token ids of the whole prompt (visual placeholders included).
    inputs_embeds: [1, S, hidden] with the visual embeddings merged in.
    position_ids: [3, 1, S] (Qwen2.5-VL's M-RoPE: temporal, height, width) or [1, S] (1-D RoPE).
    rope_delta: generated token j (0-based, after the prompt) sits at position S + j + rope_delta
        in every M-RoPE section, i.e. right after the last prompt token's position (as HF
        `generate` continues); 0 for 1-D RoPE.
    visual_start, num_visual: the visual span, prompt positions [visual_start, visual_start +
        num_visual); its first T*Hg*Wg tokens are the grid in (t, y, x) order, the rest (e.g.
        LLaVA-OneVision's newline) sit outside the grid.
    grid: (T, Hg, Wg) of the grid tokens.
    visual_features: [T, Hg, Wg, C] features of the grid tokens for the local semantic scores.
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    rope_delta: int
    visual_start: int
    num_visual: int
    grid: tuple[int, int, int]
    visual_features: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def generated_positions(self, start: int, count: int) -> torch.Tensor:
        """Position ids of generated tokens start .. start+count-1, shaped like position_ids."""
        base = self.length + self.rope_delta + start
        positions = torch.arange(base, base + count, device=self.position_ids.device)[None]
        if self.position_ids.dim() == 3:
            return positions[None].expand(self.position_ids.shape[0], 1, count)
        return positions


class PromptTokenizer:
    """The small tokenizer interface hippo needs: text <-> ids and the special ids that must agree
    between a target and its draft. Wraps an HF tokenizer (real checkpoints) or stands alone
    (tiny presets, see presets.ByteTokenizer)."""

    vocab_size: int  # number of ids the tokenizer can produce
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def fingerprint(self) -> tuple[tuple[str, object], ...]:
        """What must be equal for two tokenizers to be interchangeable, as (what, value) pairs
        (named in the error when they differ). The pad id is not among them: hippo never puts
        one in a prompt (batch 1), so tokenizers that differ in it alone make the same ids."""
        return (("size", self.vocab_size), ("eos id", self.eos_token_id))


class HFPromptTokenizer(PromptTokenizer):
    """An HF tokenizer loaded from a local checkpoint directory."""

    def __init__(self, tokenizer: "PreTrainedTokenizerBase") -> None:
        self.hf = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self._contents: tuple[tuple[str, object], ...] | None = None  # see fingerprint()

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def fingerprint(self) -> tuple[tuple[str, object], ...]:
        # The whole vocabulary (tokens of one size may differ), then the tokenization model: two
        # tokenizers with one vocabulary but other BPE merges (or merge options) split the same
        # text into other ids. Hashed once (a real tokenizer's serialisation takes a while).
        if self._contents is None:
            self._contents = (("vocabulary", hash(frozenset(self.hf.get_vocab().items()))),
                              ("merges or model options", _model_hash(self.hf)))
        return super().fingerprint() + self._contents


def _model_hash(tokenizer: "PreTrainedTokenizerBase") -> int | None:
    """A hash of a tokenizers-backed tokenizer's model as the tokenizers library serialises it
    (BPE: its vocabulary, its merges in their order, i.e. their priority, and its options such
    as ignore_merges; Unigram: its pieces' scores); None for other tokenizers. Pickling the model
    alone takes a tenth of parsing the whole tokenizer's JSON (0.1 s vs 1.6 s at 152k ids)."""
    import pickle

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else hash(pickle.dumps(backend.model))


class VideoLLMAdapter:
    """One model family: turns (frames, prompt) into a PreparedPrompt and exposes the Qwen2-family
    language model that the runtime runs on.

    Subclasses set: model (the HF *ForConditionalGeneration), tokenizer (PromptTokenizer or None),
    prompt_prefix_ids / prompt_suffix_ids (chat-format ids around the video and the user text), and
    implement from_preset(), from_pretrained(), prompt_ids(), visual_tokens(), prepare() and
    generate_kwargs()."""

    family: str = ""
    model: torch.nn.Module
    tokenizer: PromptTokenizer | None
    prompt_prefix_ids: list[int]
    prompt_suffix_ids: list[int]
    chat: ChatFormat | None = None  # a checkpoint's chat format (text prompts are tokenized in it)

    def __init__(self, model: torch.nn.Module, tokenizer: PromptTokenizer | None,
                 prompt_prefix_ids: list[int], prompt_suffix_ids: list[int],
                 chat: ChatFormat | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompt_prefix_ids = list(prompt_prefix_ids)
        self.prompt_suffix_ids = list(prompt_suffix_ids)
        self.chat = chat

    # -- construction (each family) ---------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    seed: int = 0) -> "VideoLLMAdapter":
        """A tiny random model of this family (hippo.models.presets), built offline."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device = "cpu") -> "VideoLLMAdapter":
        """A checkpoint of this family from a local directory (nothing is downloaded)."""
        raise NotImplementedError

    # -- what the runtime uses -------------------------------------------------------------------
    @property
    def text_model(self) -> torch.nn.Module:
        """The HF Qwen2-family decoder: embed_tokens, layers, norm, rotary_emb."""
        return self.model.model.language_model

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self.model.lm_head

    @property
    def vocab_size(self) -> int:
        """Width of the logits (may exceed the tokenizer's size: checkpoints pad their vocabulary)."""
        return int(self.model.lm_head.out_features)

    @property
    def eos_token_id(self) -> int | None:
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            return int(self.tokenizer.eos_token_id)
        eos = self.model.generation_config.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        return None if eos is None else int(eos)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a generation, as HF `generate` stops: eos_token_id (the
        tokenizer's), then generation_config.json's eos_token_id, an id or a list
        (Qwen2.5-VL-Instruct's is [<|im_end|>, <|endoftext|>])."""
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        configured = configured if isinstance(configured, (list, tuple)) else [configured]
        ids += [int(i) for i in configured if is_int(i) and int(i) not in ids]
        return ids

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def special_token_ids(self) -> dict[str, int | None]:
        """Ids that must agree between target and draft (video and image placeholders, vision
        start and end, eos; not pad, which no prompt holds: see PromptTokenizer.fingerprint)."""
        cfg = self.model.config
        return {"video_token_id": getattr(cfg, "video_token_id", None),
                "image_token_id": getattr(cfg, "image_token_id", None),
                "vision_start_token_id": getattr(cfg, "vision_start_token_id", None),
                "vision_end_token_id": getattr(cfg, "vision_end_token_id", None),
                "eos_token_id": self.eos_token_id}

    # -- prompts -----------------------------------------------------------------------------------
    @property
    def text_separator(self) -> str:
        """The chat format's text between the video and a prompt given as text."""
        return self.chat.separator if self.chat is not None else ""

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """The user's text as token ids: a str needs a tokenizer; a list of ids is taken as is."""
        if not isinstance(prompt, (str, list, tuple)):
            raise HippoError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise HippoError(f"{self.family} model has no tokenizer: pass the prompt as token ids")
            check_utf8(prompt)
            ids = self.tokenizer.encode(self.text_separator + prompt)
        else:
            if not all(is_int(i) for i in prompt):
                raise HippoError("a prompt given as a list must hold integer token ids")
            ids = [int(i) for i in prompt]
        if any(i < 0 or i >= self.vocab_size for i in ids):
            raise HippoError(f"prompt token ids must lie in [0, {self.vocab_size})")
        placeholders = {self.special_token_ids()[k] for k in ("video_token_id", "image_token_id")} - {None}
        if placeholders.intersection(ids):
            raise HippoError("the prompt must not contain video or image placeholder tokens; the adapter adds them")
        return ids

    def ids_after_video(self, prompt: str | list[int]) -> list[int]:
        """The ids after the video: the user's text and the chat suffix. A text prompt of a
        checkpoint with a chat format is rendered and tokenized with the suffix as one string, as
        HF's processor tokenizes the whole prompt; ids are taken as they are."""
        if isinstance(prompt, str) and self.chat is not None and self.tokenizer is not None:
            check_utf8(prompt)
            return self.encode_prompt(self.tokenizer.encode(self.chat.after_video(prompt)))
        return self.encode_prompt(prompt) + self.prompt_suffix_ids

    def prompt_ids(self, num_visual: int, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids with num_visual video placeholders, as the HF processor lays
        them out for this family (chat text, video, the user's text)."""
        raise NotImplementedError

    def text_tokens(self, prompt: str | list[int]) -> int:
        """How many prompt tokens are not visual: known before any frame is decoded, so that a
        request beyond the context is refused cheaply (and a bad prompt before the video)."""
        return len(self.prompt_ids(0, prompt))

    def prepare(self, frames: torch.Tensor, prompt: str | list[int], fps: float | None = None) -> PreparedPrompt:
        """The prompt's embeddings, positions and visual-token layout. fps: the rate the frames
        were sampled at, for families whose positions depend on it (None: the family's default)."""
        raise NotImplementedError

    def generate_kwargs(self, frames: torch.Tensor, prompt: str | list[int], fps: float | None = None) -> dict:
        """Keyword arguments for the HF model's `generate` (and forward) on the same inputs."""
        raise NotImplementedError

    def visual_tokens(self, num_frames: int, height: int, width: int) -> int:
        """How many prompt tokens num_frames frames of height x width become (known before any
        frame is decoded, so that a request beyond the context is refused cheaply)."""
        raise NotImplementedError

    @property
    def max_positions(self) -> int | None:
        """The language model's trained context (None where the config does not say)."""
        limit = getattr(self.text_model.config, "max_position_embeddings", None)
        return int(limit) if limit is not None else None


def check_text_config(model: torch.nn.Module) -> None:
    """check_text_config_values on the language model's config."""
    check_text_config_values(model.model.language_model.config)


def check_text_config_values(config: object) -> None:
    """Values of a language model's config that would load, then fail in the first prompt (or,
    for a kv head count of 0, in transformers' model construction): grouped-query attention
    shares each kv head among num_attention_heads / num_key_value_heads query heads (the counts
    must divide), and a context of max_position_embeddings positions must hold at least one."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and not (is_int(limit) and limit > 0):
        raise HippoError(f"config.json: max_position_embeddings must be a positive integer (the "
                         f"model's context), got {limit!r}")
    eps = getattr(config, "rms_norm_eps", None)
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)
                            or not math.isfinite(eps) or eps < 0):
        raise HippoError(f"config.json: rms_norm_eps must be a finite number >= 0, got {eps!r}")
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kv_heads is None:  # transformers' rule: as many as the query heads
        kv_heads = heads
    if not (is_int(heads) and is_int(kv_heads) and heads > 0 and kv_heads > 0 and heads % kv_heads == 0):
        raise HippoError(f"config.json: num_attention_heads ({heads}) must be a positive multiple of "
                         f"num_key_value_heads ({kv_heads})")


def check_token_ids_in_vocabulary(model: torch.nn.Module, fields: dict[str, str]) -> None:
    """The special ids an adapter places in prompts (video placeholders, vision start / end) must
    index the embedding table: a checkpoint whose config.json names an id beyond it would load,
    then fail deep in the embedding lookup of the first prompt. `fields` maps the config
    attribute to the name config.json gives it (LLaVA's video_token_id is video_token_index)."""
    config, rows = model.config, model.get_input_embeddings().num_embeddings
    for attribute, field in fields.items():
        value = getattr(config, attribute, None)
        if not is_int(value) or not 0 <= value < rows:
            raise HippoError(f"config.json: {field} is {value!r}, not a token id of this model "
                             f"(its vocabulary holds ids 0 to {rows - 1}): correct {field} in "
                             "config.json")


def visual_span(input_ids: torch.Tensor, token_id: int) -> tuple[int, int]:
    """(start, count) of the one contiguous run of `token_id` in input_ids [1, S]."""
    hits = (input_ids[0] == token_id).nonzero().flatten()
    if hits.numel() == 0:
        raise HippoError("the prompt holds no video placeholder tokens")
    start, count = int(hits[0]), int(hits.numel())
    if int(hits[-1]) != start + count - 1:
        raise HippoError("the video placeholder tokens are not contiguous (does the prompt contain the video token?)")
    return start, count


def check_compatible(target: VideoLLMAdapter, draft: VideoLLMAdapter) -> int:
    """Target and draft must be of one family and share a tokenizer and its special ids. Returns
    the shared vocabulary size (the smaller logits width: checkpoints of one family may pad their
    embedding tables differently, e.g. Qwen2.5-VL 7B 152064 vs 3B 151936, and the tokenizer never
    emits ids beyond either)."""
    # A draft of another family differs in everything below; listing it all would bury the cause.
    if type(target) is not type(draft):
        raise HippoError(f"target is {target.family} but draft is {draft.family}: a draft must be "
                         "of the target's family")
    problems = []
    tokenizers = tokenizer_difference(target.tokenizer, draft.tokenizer)
    if tokenizers is not None:
        problems.append(tokenizers)
    t_ids, d_ids = target.special_token_ids(), draft.special_token_ids()
    for name in t_ids:
        if t_ids[name] != d_ids[name]:
            problems.append(f"{name} {t_ids[name]} vs {d_ids[name]}")
    shared = min(target.vocab_size, draft.vocab_size)
    t_tok = target.tokenizer
    tokens = t_tok.vocab_size if t_tok is not None else max(target.vocab_size, draft.vocab_size)
    if shared < tokens:
        problems.append(f"vocab size {target.vocab_size} vs {draft.vocab_size}")
    if target.prompt_prefix_ids != draft.prompt_prefix_ids or target.prompt_suffix_ids != draft.prompt_suffix_ids:
        problems.append("chat-format ids around the prompt (their chat templates differ: give "
                        "the draft the target's chat template)")
    elif tokenizers is None and target.tokenizer is not None:
        text = _text_ids_difference(target, draft)
        if text is not None:
            problems.append(text)
    if problems:
        raise HippoError("target and draft are not a compatible pair: " + "; ".join(problems))
    return shared


# Text prompts on which chat templates that agree around a prompt may still differ: the text
# between the video and the prompt, the prompt trimmed or not, characters merging across it.
PROBE_PROMPTS = ("What moves?", "  Is it spaced?\n ")


def _text_ids_difference(target: VideoLLMAdapter, draft: VideoLLMAdapter) -> str | None:
    """Why the two chat formats make other ids of a text prompt (None if they agree on the probe
    prompts): both prompts must hold the same ids, which speculative decoding would otherwise
    only find out after both models have embedded the video."""
    for probe in PROBE_PROMPTS:
        try:
            same = target.ids_after_video(probe) == draft.ids_after_video(probe)
        except HippoError:  # a template refusing a probe: prepare() compares the user's prompt
            continue
        if not same:
            return (f"chat templates (they make different ids of a text prompt such as {probe!r}: "
                    "give the draft the target's chat template)")
    return None


def tokenizer_difference(target: PromptTokenizer | None, draft: PromptTokenizer | None) -> str | None:
    """Why the target's and the draft's tokenizers are not interchangeable; None if they are."""
    if target is None and draft is None:
        return None
    if target is None or draft is None:
        missing, present = ("target", "draft") if target is None else ("draft", "target")
        return f"the {missing} has no tokenizer but the {present} has one"
    t_parts, d_parts = dict(target.fingerprint()), dict(draft.fingerprint())
    if t_parts.keys() != d_parts.keys():  # tokenizers of different kinds (a preset's and a file's)
        return "tokenizers differ (of different kinds)"
    for what, value in t_parts.items():
        if value != d_parts[what]:
            if what == "size":
                return f"tokenizers differ ({target.vocab_size} vs {draft.vocab_size} ids)"
            if what == "eos id":
                return f"tokenizers differ (eos id {target.eos_token_id} vs {draft.eos_token_id})"
            return f"tokenizers differ (same size, different {what})"
    return None


def find_checkpoint_file(path: str, *names: str) -> str | None:
    """The path of the first of `names` that exists in the checkpoint directory; None if none does."""
    import os

    return next((os.path.join(path, name) for name in names if os.path.isfile(os.path.join(path, name))),
                None)


def read_checkpoint_json(path: str, *names: str) -> dict:
    """The first of `names` that exists in the checkpoint directory, parsed; {} if none does."""
    file = find_checkpoint_file(path, *names)
    return read_json_object(file) if file is not None else {}


def read_json_object(file: str) -> dict:
    """A checkpoint's JSON file, which must hold an object. The file is the user's: whatever is
    wrong with it is one message naming it."""
    import json

    try:
        with open(file, encoding="utf-8") as f:
            content = json.load(f)
    except RecursionError as err:  # json recurses once per nesting level ([[[[... x 100000)
        raise HippoError(f"cannot read {file}: its JSON is nested too deeply") from err
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise HippoError(f"cannot read {file}: {err}") from err
    if not isinstance(content, dict):
        raise HippoError(f"{file} must hold a JSON object, got {type(content).__name__}")
    return content


def load_local_tokenizer(path: str) -> PromptTokenizer | None:
    """The checkpoint's own tokenizer, from the local directory only; None if it ships none."""
    import os

    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        with transformers_quiet():  # it reads config.json too, whose warnings hippo reports itself
            return HFPromptTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
    except Exception as err:  # noqa: BLE001  malformed tokenizer files fail with any type
        # (KeyError, TypeError, tokenizers' bare Exception): the user's files are at fault.
        raise HippoError(f"cannot load the tokenizer in {path}: {type(err).__name__}: {err}") from err


def preset_for_family(name: str, family: str) -> Preset:
    """The named tiny preset, which must belong to `family`."""
    from hippo.models.presets import get_preset

    preset = get_preset(name)
    if preset.family != family:
        raise HippoError(f"preset {name!r} is a {preset.family} model, not {family}")
    return preset


def build_random_model(model_class: type[torch.nn.Module], config: PretrainedConfig,
                       tokenizer: PromptTokenizer, dtype: torch.dtype,
                       device: str | torch.device, seed: int) -> torch.nn.Module:
    """A randomly initialised HF model (seeded), generating with the tokenizer's eos/pad ids.
    The weights depend on `seed` alone: they are drawn in float32 on the CPU from a forked
    generator, whatever the caller's global RNG state, torch.set_default_dtype and
    torch.set_default_device (which gave other weights, or a model on meta that cannot be
    moved), and the caller's random stream goes on as if nothing had been drawn."""
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float32)
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(seed)
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device=device, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@dataclass
class LocalCheckpoint:
    """What every family's adapter takes from a local checkpoint directory."""

    model: torch.nn.Module
    tokenizer: PromptTokenizer | None
    prompt_prefix_ids: list[int]
    prompt_suffix_ids: list[int]
    chat: ChatFormat | None = None  # None without a tokenizer: prompts are token ids then


def load_local_checkpoint(model_class: type[torch.nn.Module], path: str, dtype: torch.dtype, label: str,
                          builtin_chat: ChatFormat, video_placeholder: str,
                          check_model: Callable[[torch.nn.Module], None] | None = None
                          ) -> LocalCheckpoint:
    """The checkpoint's tokenizer and the chat-format ids it makes of its own chat template (or
    the family's built-in format; see chat_format.py), then its weights (see load_local_model).
    config.json and the tokenizer come before the weights so that the ids the tokenizer gives
    are checked against the weightless skeleton, with the family's config checks, before the
    weights load."""
    from hippo.models.chat_format import checkpoint_chat_format

    # config.json first: the tokenizer's loader parses it too, and would be blamed for its faults.
    config = load_local_config(model_class, path, label)
    tokenizer = load_local_tokenizer(path)
    # transformers skips a generation_config.json it cannot parse in silence, and with it the
    # eos ids that stop a generation: read it here first, so that it is one clear error.
    read_checkpoint_json(path, "generation_config.json")
    chat = checkpoint_chat_format(path, tokenizer, video_placeholder, builtin_chat)
    prefix, suffix = chat_ids(tokenizer, chat.prefix, chat.suffix)

    def check_skeleton(skeleton: torch.nn.Module) -> None:
        if check_model is not None:
            with errors_prefixed(path):  # which of a target and a draft is wrong
                check_model(skeleton)
        check_tokenizer_fits_embeddings(skeleton, path, tokenizer, prefix + suffix)

    model = load_local_model(model_class, path, dtype, label, config=config,
                             check_model=check_skeleton)
    return LocalCheckpoint(model, tokenizer, prefix, suffix, chat if tokenizer is not None else None)


def check_tokenizer_fits_embeddings(model: torch.nn.Module, path: str, tokenizer: PromptTokenizer | None,
                                    chat_format_ids: list[int]) -> None:
    """The tokenizer's ids that the adapter feeds the model on its own (the chat-format ids
    around the prompt, eos) must index the input embeddings: a tokenizer of a larger model would
    load, then fail in the embedding lookup of the first prompt (an IndexError). The user's
    prompt ids are checked as they are encoded; the placeholder ids config.json names, by the
    family's check_model (check_token_ids_in_vocabulary)."""
    if tokenizer is None:
        return
    rows = model.get_input_embeddings().num_embeddings
    for role, ids in (("the chat template", chat_format_ids), ("eos", [tokenizer.eos_token_id])):
        beyond = [token for token in ids if token is not None and not 0 <= token < rows]
        if beyond:
            raise HippoError(f"{path}: the tokenizer gives {role} token id {max(beyond)}, but the "
                             f"weights embed ids 0 to {rows - 1} only: tokenizer and weights seem "
                             "to come from different models")


@contextmanager
def transformers_quiet() -> Iterator[None]:
    """transformers draws "Loading weights: 0%|...|" on stderr while loading and logs warnings
    and a load report (missing or mismatched tensors, a config value out of range), which would
    put lines before hippo's one-line errors; hippo reports what matters itself. The caller's
    settings are restored after, for the models a script of theirs loads later."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_local_config(model_class: type[torch.nn.Module], path: str,
                      label: str) -> PretrainedConfig:
    """The checkpoint directory's config.json, parsed by the family's config class; whatever is
    wrong with it is one message naming it."""
    import os

    if not os.path.isdir(path):
        raise HippoError(f"no checkpoint directory at {path}")
    try:
        with transformers_quiet():
            return model_class.config_class.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001  transformers' validation raises many types
        raise HippoError(f"cannot read the {label} config.json in {path}: "
                         f"{type(err).__name__}: {err}") from err


def load_local_model(model_class: type[torch.nn.Module], path: str, dtype: torch.dtype, label: str,
                     config: PretrainedConfig | None = None,
                     check_model: Callable[[torch.nn.Module], None] | None = None
                     ) -> torch.nn.Module:
    """from_pretrained on a local directory only (nothing is ever downloaded), with `config`
    (load_local_config's) when already read. Every parameter must come from the checkpoint:
    transformers would otherwise initialise what is missing at random and carry on. check_model
    (the family's config checks) runs on a weightless skeleton first, so that a wrong
    config.json is refused before the weights load (minutes for a 7B)."""
    if config is None:
        config = load_local_config(model_class, path, label)
    try:
        with transformers_quiet():
            with errors_prefixed(path):
                check_not_quantized(config)
                check_activations_known(config)
                # Before the skeleton: a kv head count of 0 fails inside its construction.
                check_text_config_values(config.get_text_config())
            with torch.device("meta"):
                skeleton = model_class(config)
            # What config.json says wrongly first, then whether it fits the weights at all.
            if check_model is not None:
                check_model(skeleton)
            check_config_fits_weights(skeleton, path)
            del skeleton
            # ignore_mismatched_sizes: a tensor whose shape differs from the config's is then
            # listed in info (named below) instead of failing with "see the report above".
            model, info = model_class.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                      output_loading_info=True,
                                                      ignore_mismatched_sizes=True)
    except HippoError:
        raise
    except Exception as err:  # noqa: BLE001  corrupt weights or a config that does not fit them
        # (safetensors, transformers and torch each raise their own types): the user's files
        # are at fault whatever the type, so it is one clear message either way.
        raise HippoError(f"cannot load the {label} checkpoint in {path}: "
                         f"{type(err).__name__}: {err}") from err
    for kind in ("missing_keys", "mismatched_keys"):
        names = sorted(_describe_loading_entry(entry) for entry in info.get(kind) or ())
        if names:
            shown = first_few(names, "; ")
            raise HippoError(f"the {label} checkpoint in {path} does not fit its config.json "
                             f"({kind.replace('_', ' ')}: {shown})")
    return model


def check_not_quantized(config: PretrainedConfig) -> None:
    """hippo's runtime borrows a model's plain Linear weights (bf16, fp16 or fp32) and runs its
    own kernels on them: the packed weights of a quantized checkpoint (AWQ, GPTQ, bitsandbytes,
    FP8, ...) have no kernels in hippo. Refused by name from config.json, before transformers
    asks for its quantization library (whose install would only lead to a failure later)."""
    for where, part in (("", config), ("text_config.", config.get_text_config())):
        quantization = getattr(part, "quantization_config", None)
        if quantization:
            method = (quantization.get("quant_method") if isinstance(quantization, dict)
                      else getattr(quantization, "quant_method", None))
            raise HippoError(f"config.json: {where}quantization_config ({method or 'unnamed'}): "
                             "quantized checkpoints are not supported; hippo runs bf16, fp16 or "
                             "fp32 weights (use the unquantized checkpoint)")


def check_activations_known(config: object, where: str = "") -> None:
    """Every hidden_act in the config and its sub-configs (text, vision) must name an activation
    transformers has: building the model would otherwise fail with a bare KeyError naming only
    the value."""
    from transformers import PretrainedConfig
    from transformers.activations import ACT2FN

    act = getattr(config, "hidden_act", None)
    if act is not None and (not isinstance(act, str) or act not in ACT2FN):
        known = ", ".join(sorted(ACT2FN))
        raise HippoError(f"config.json: {where}hidden_act {act!r} is not an activation transformers "
                         f"knows ({known})")
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            check_activations_known(value, f"{where}{name}.")


def first_few(items: list[str], separator: str, shown: int = 3) -> str:
    """The first `shown` items joined, and how many more there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return separator.join(items[:shown]) + more


def _describe_loading_entry(entry: object) -> str:
    """A tensor name of from_pretrained's loading info; mismatched ones come as (name,
    checkpoint shape, config shape)."""
    if isinstance(entry, tuple) and len(entry) == 3:
        name, stored, described = entry
        return (f"{name} is {list(stored)} in the checkpoint, {list(described)} by the config")
    return str(entry)


def check_config_fits_weights(skeleton: torch.nn.Module, path: str) -> None:
    """Compare the parameter count that config.json describes (the model built from it on the
    meta device) with the tensors in the checkpoint's weight files (safetensors headers, or
    pytorch_model*.bin memory-mapped), before anything is allocated: a config missing its size
    fields falls back to transformers' defaults (a 72B-sized Qwen2.5-VL), which would exhaust
    memory rather than fail. Loading relies on this bound (it lets transformers go on past
    mismatched shapes, so that hippo can name them)."""
    check_shards_present(path)
    stored = stored_parameter_count(path)
    described = sum(p.numel() for p in skeleton.parameters())
    if stored is not None and described > stored:
        raise HippoError(f"config.json in {path} describes {described:,} parameters but the "
                         f"weights hold {stored:,}: the config does not fit the weights (size "
                         "fields missing from config.json take transformers' defaults)")


def stored_parameter_count(path: str) -> int | None:
    """How many numbers the checkpoint's weight files hold (safetensors preferred, as
    transformers does); None where it has neither kind (from_pretrained then says so)."""
    import glob
    import os

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        from safetensors import safe_open

        stored = 0
        for file in files:
            with safe_open(file, framework="pt") as weights:
                stored += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
        return stored
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        return None
    stored = 0
    for file in files:  # mapped, not read: only the shapes are looked at
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(state, dict):
            raise HippoError(f"{file} holds no state dict of tensors")
        stored += sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    return stored


def check_shards_present(path: str) -> None:
    """Every weight file a sharded checkpoint's index names must be there: one missing would
    otherwise read as a config that does not fit its weights."""
    import os

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(path, index_name)
        if not os.path.isfile(index_path):
            continue
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise HippoError(f"{index_path} has no weight_map of tensor names to file names")
        shards = sorted(set(weight_map.values()))
        missing = [shard for shard in shards if not os.path.isfile(os.path.join(path, shard))]
        if missing:
            shown = first_few(missing, ", ")
            raise HippoError(f"{path} lacks {len(missing)} of the {len(shards)} weight files "
                             f"that {index_name} lists: {shown}")


def chat_ids(tokenizer: PromptTokenizer | None, prefix: str, suffix: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat text around the prompt (none without a tokenizer)."""
    if tokenizer is None:
        return [], []
    return tokenizer.encode(prefix), tokenizer.encode(suffix)


"""What every model adapter hands to the runtime: one prepared (video, prompt) pair, and the
Qwen2-family language model it runs on. One adapter file per model family implements it
(loading a checkpoint: checkpoint.py; the tokenizer interface: tokenizer.py; whether a target
and a draft pair up: pairing.py)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch

from hippo.errors import HippoError, check_flag, check_utf8, is_int

if TYPE_CHECKING:
    from hippo.models.chat_format import ChatFormat
    from hippo.models.tokenizer import PromptTokenizer


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
    prefix_source: when set, the video embedding this prompt was made from: its first
        prefix_length tokens (the text before the video, then the video) are those of every
        prompt made from it, so a runtime whose cache still holds them from such a prompt
        prefills only the rest (hippo.runtime.prefill_prompt). None: prefilled whole.
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    rope_delta: int
    visual_start: int
    num_visual: int
    grid: tuple[int, int, int]
    visual_features: torch.Tensor
    prefix_source: "VideoEmbedding | None" = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def prefix_length(self) -> int:
        """Tokens up to the video's last: the same in every prompt about the same video."""
        return self.visual_start + self.num_visual

    def generated_positions(self, start: int, count: int) -> torch.Tensor:
        """Position ids of generated tokens start .. start+count-1, shaped like position_ids."""
        base = self.length + self.rope_delta + start
        positions = torch.arange(base, base + count, device=self.position_ids.device)[None]
        if self.position_ids.dim() == 3:
            return positions[None].expand(self.position_ids.shape[0], 1, count)
        return positions


@dataclass(frozen=True, eq=False)
class VideoEmbedding:
    """One model's embedding of one video, to be merged into any number of prompts
    (VideoLLMAdapter.prepare_embedded): several questions about a video run its vision tower once.

    embeddings: [N, hidden] what fills the prompt's N video placeholders (the model's dtype).
    grid: (T, Hg, Wg) of the grid tokens, the first T*Hg*Wg of the N.
    visual_features: [T, Hg, Wg, C] features of the grid tokens for the local semantic scores.
    frames: (T, H, W) of the frames embedded, which the context checks count from.
    position_inputs: what the family's positions need besides the prompt's ids (Qwen2.5-VL:
        video_grid_thw and, when the frames' rate was given, second_per_grid_ts).
    adapter: the adapter that made it; only that one merges it (another model's embeddings of
        the same width would otherwise pass unnoticed).
    """

    embeddings: torch.Tensor
    grid: tuple[int, int, int]
    visual_features: torch.Tensor
    frames: tuple[int, int, int]
    position_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    adapter: "VideoLLMAdapter | None" = field(default=None, repr=False)

    @property
    def num_visual(self) -> int:
        return int(self.embeddings.shape[0])

    def __copy__(self) -> "VideoEmbedding":
        return VideoEmbedding(**{f.name: getattr(self, f.name) for f in fields(self)})

    def __deepcopy__(self, memo: dict) -> "VideoEmbedding":
        """A copy of the tensors for the same adapter: the models are never copied with it
        (a copy of them would be another model, whose pipeline refuses the embedding)."""
        memo[id(self.adapter)] = self.adapter
        copied = {f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields(self)}
        return VideoEmbedding(**copied)

    def __reduce__(self) -> object:
        raise HippoError("a VideoEmbedding (and an EncodedVideo) names the live model that made "
                         "it and cannot be pickled or saved: save its tensors (embeddings, "
                         "visual_features, position_inputs), or encode the video again")


class VideoLLMAdapter:
    """One model family: turns (frames, prompt) into a PreparedPrompt and exposes the Qwen2-family
    language model that the runtime runs on.

    Subclasses set: model (the HF *ForConditionalGeneration), tokenizer (PromptTokenizer or None),
    prompt_prefix_ids / prompt_suffix_ids (chat-format ids around the video and the user text), and
    implement from_preset(), from_pretrained(), prompt_ids(), visual_tokens(), embed_video(),
    positions() and generate_kwargs()."""

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
        self.prompt_ids(0, prompt)  # a bad prompt is refused before the vision tower runs
        return self.prepare_embedded(self.embed_video(frames, fps), prompt)

    def embed_video(self, frames: torch.Tensor, fps: float | None = None) -> VideoEmbedding:
        """Frames [T, H, W, 3] uint8 through this model's preprocessing and vision tower, ready
        for prepare_embedded (fps as in prepare)."""
        raise HippoError(f"the {self.family} adapter has no vision tower: it embeds no video")

    def positions(self, input_ids: torch.Tensor, video: VideoEmbedding) -> tuple[torch.Tensor, int]:
        """(position_ids, rope_delta) of a prompt holding `video` (PreparedPrompt's fields)."""
        raise NotImplementedError

    @torch.no_grad()
    def prepare_embedded(self, video: VideoEmbedding, prompt: str | list[int], *,
                         share_prefix: bool = False) -> PreparedPrompt:
        """prepare() for a video this adapter embedded already (embed_video): the prompt's ids,
        the video's embeddings merged into its placeholders, and positions, as the HF forward
        computes them. The embedding is read, never modified. share_prefix: the prompt names
        the embedding as its prefix_source, so that a runtime still holding the prefix of an
        earlier prompt about the video prefills only the text after it."""
        self.check_own_embedding(video)
        check_flag("share_prefix", share_prefix)
        vlm = self.model.model
        ids = self.prompt_ids(video.num_visual, prompt)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        embeds = vlm.get_input_embeddings()(input_ids)
        if video.embeddings.dtype != embeds.dtype:
            # Cast in silence, they would be another dtype's vision tower's values.
            raise HippoError(f"this video was embedded in {video.embeddings.dtype}, and the model "
                             f"is now {embeds.dtype} (.to()): embed it again")
        merged = video.embeddings.to(embeds.device, embeds.dtype)
        _, video_mask = vlm.get_placeholder_mask(input_ids, inputs_embeds=embeds, video_features=merged)
        embeds = embeds.masked_scatter(video_mask, merged)
        position_ids, rope_delta = self.positions(input_ids, video)
        start, count = visual_span(input_ids, self.model.config.video_token_id)
        return PreparedPrompt(input_ids=input_ids, inputs_embeds=embeds, position_ids=position_ids,
                              rope_delta=rope_delta, visual_start=start, num_visual=count,
                              grid=video.grid,
                              visual_features=video.visual_features.to(embeds.device, embeds.dtype),
                              prefix_source=video if share_prefix else None)

    def check_own_embedding(self, video: object) -> None:
        """Only embeddings this adapter made are merged into its prompts."""
        if not isinstance(video, VideoEmbedding):
            raise HippoError(f"video must be a VideoEmbedding (from embed_video()), got "
                             f"{type(video).__name__}")
        if video.adapter is not self:
            raise HippoError(f"this video was embedded by another model (a {video.adapter.family} "
                             f"adapter): embed it with this {self.family} model's embed_video()"
                             if video.adapter is not None else
                             "this VideoEmbedding names no adapter: make it with embed_video()")

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


def visual_span(input_ids: torch.Tensor, token_id: int) -> tuple[int, int]:
    """(start, count) of the one contiguous run of `token_id` in input_ids [1, S]."""
    hits = (input_ids[0] == token_id).nonzero().flatten()
    if hits.numel() == 0:
        raise HippoError("the prompt holds no video placeholder tokens")
    start, count = int(hits[0]), int(hits.numel())
    if int(hits[-1]) != start + count - 1:
        raise HippoError("the video placeholder tokens are not contiguous (does the prompt contain the video token?)")
    return start, count



"""Semantic-aware token preservation: which visual tokens the draft model gets to see.

HIPPO keeps the visual tokens whose score fuses the target's *global* text-to-video attention
(recomputed from its cached keys and the post-RoPE queries of the last prompt tokens, at a few
layers) with *local* semantics of the visual features (temporal novelty, spatial complexity);
`hippo_ext.select_visual_tokens` does all of it in one op. For ablations the same interface offers
attention-only selection (SpecVLM-style), uniform and random selection.

Everything stays on the target's device: the kept positions are a device tensor of a size known
on the host, so the draft prefill that follows needs no host synchronisation.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

import hippo_ext
from hippo_ext.token_selection import kept_count, per_frame_quotas
from hippo.errors import HippoError, is_int
from hippo.models.base import PreparedPrompt
from hippo.runtime.autoregressive import check_seed

SELECTION_METHODS = ("hippo", "attention", "uniform", "random")
ATTENTION_ONLY_WEIGHTS = (1.0, 0.0, 0.0)


@dataclass(frozen=True)
class PreservationOptions:
    """How many and which visual tokens the draft keeps.

    keep_ratio: fraction of the grid's visual tokens kept (0.1: 90% pruned). Tokens outside the
        grid (LLaVA-OneVision's newline) are always kept.
    method: "hippo" (fused global + local scores), "attention" (global attention only, as
        SpecVLM), "uniform" (evenly spaced) or "random" (seeded).
    weights: (w_global, w_temporal, w_spatial) of the "hippo" fusion.
    layers: target layers whose queries give the global score; None picks three spread over the
        depth (the first and last quarter's boundaries and the middle; fewer where they coincide,
        in models of under three layers).
    query_len: how many of the last prompt tokens act as text queries; None takes every prompt
        token after the video (the question and the chat suffix), at least one.
    per_frame: a quota per grid frame instead of a global top-k (Qwen2.5-VL: a grid frame is a
        temporal patch of two sampled frames).
    seed: the generator seed of "random", in [0, 2**62].
    """

    keep_ratio: float = 0.1
    method: str = "hippo"
    weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    layers: tuple[int, ...] | None = None
    query_len: int | None = None
    per_frame: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in SELECTION_METHODS:
            raise HippoError(f"unknown selection method {self.method!r}; choose one of "
                             f"{', '.join(SELECTION_METHODS)}")
        if not _is_number(self.keep_ratio) or not 0.0 <= self.keep_ratio <= 1.0:
            raise HippoError(f"keep_ratio must be a number in [0, 1], got {self.keep_ratio!r}")
        weights = tuple(self.weights) if isinstance(self.weights, (tuple, list)) else ()
        if len(weights) != 3 or not all(_is_number(w) and 0 <= w < math.inf for w in weights):
            raise HippoError(f"weights must be three finite non-negative numbers, got {self.weights!r}")
        if sum(weights) == 0:  # every score 0: the first tokens would win every tie
            raise HippoError(f"weights must not all be 0 (global, temporal, spatial), got {self.weights!r}")
        if self.query_len is not None and (not is_int(self.query_len) or self.query_len < 1):
            raise HippoError(f"query_len must be an integer of at least 1, got {self.query_len!r}")
        if self.layers is not None and not (isinstance(self.layers, (tuple, list))
                                            and all(is_int(layer) for layer in self.layers)):
            raise HippoError(f"layers must be a tuple of layer indices, got {self.layers!r}")
        check_seed(self.seed)
        if not isinstance(self.per_frame, bool):
            raise HippoError(f"per_frame must be True or False, got {self.per_frame!r}")
        # Lists are accepted, kept as tuples: the options stay immutable (a caller's list changed
        # later cannot undo the checks above) and hashable, as a frozen dataclass promises.
        object.__setattr__(self, "weights", weights)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def needs_queries(self) -> bool:
        """Whether selection reads the target's attention (its prefill must return queries)."""
        return self.method in ("hippo", "attention")

    def selection_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.layers is not None:
            bad = [layer for layer in self.layers if not 0 <= layer < num_layers]
            if bad or not self.layers:
                raise HippoError(f"selection layers {list(self.layers)} must be a non-empty "
                                 f"subset of 0..{num_layers - 1}")
            return tuple(self.layers)
        return tuple(sorted({num_layers // 4, num_layers // 2, (3 * num_layers) // 4}))

    def text_query_len(self, prompt: PreparedPrompt) -> int:
        after_video = prompt.length - (prompt.visual_start + prompt.num_visual)
        wanted = self.query_len if self.query_len is not None else max(1, after_video)
        return min(wanted, prompt.length)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class KeptTokens:
    """The draft's view of the prompt.

    visual: kept indices into the visual span (grid indices ascending, then out-of-grid tokens).
    positions: the prompt positions the draft keeps, ascending: every text position and the kept
        visual ones; int64 on the target's device. Its length is the draft prompt's length.
    """

    visual: torch.Tensor
    positions: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.positions.numel())


def grid_tokens(prompt: PreparedPrompt) -> int:
    frames, height, width = prompt.grid
    return frames * height * width


def num_kept_grid_tokens(prompt: PreparedPrompt, keep_ratio: float) -> int:
    """How many grid tokens the keep ratio keeps, as select_visual_tokens counts them."""
    return kept_count(grid_tokens(prompt), keep_ratio)


def kept_prompt_length(prompt: PreparedPrompt, keep_ratio: float) -> int:
    """The draft prompt's length, known on the host before selection runs: every text token,
    the kept grid tokens and the out-of-grid visual tokens."""
    out_of_grid = prompt.num_visual - grid_tokens(prompt)
    return (prompt.length - prompt.num_visual + num_kept_grid_tokens(prompt, keep_ratio)
            + out_of_grid)


def select_kept_visual(prompt: PreparedPrompt, options: PreservationOptions,
                       queries: torch.Tensor | None = None,
                       keys: torch.Tensor | None = None) -> torch.Tensor:
    """Kept indices into the visual span (see KeptTokens.visual).

    queries: [layers, Hq, Lq, D] post-RoPE queries of the last Lq prompt tokens at the selection
    layers; keys: [layers, Hkv, S, D] the target's cached keys of the prompt at the same layers.
    Both are needed by "hippo" and "attention" only.
    """
    device = prompt.visual_features.device
    if options.needs_queries:
        if queries is None or keys is None:
            raise HippoError(f"selection method {options.method!r} needs the target's queries "
                             "and keys")
        weights = options.weights if options.method == "hippo" else ATTENTION_ONLY_WEIGHTS
        selected = hippo_ext.select_visual_tokens(
            queries, keys.to(queries.dtype), prompt.visual_features.to(queries.device),
            prompt.visual_start, prompt.num_visual, keep_ratio=options.keep_ratio,
            per_frame=options.per_frame, weights=weights)
        return selected.kept
    count = num_kept_grid_tokens(prompt, options.keep_ratio)
    if options.method == "uniform":
        grid = _uniform_indices(prompt.grid, count, options.per_frame)
    else:
        grid = _random_indices(prompt.grid, count, options.per_frame, options.seed)
    # Host tensors, made on the CPU whatever torch.set_default_device says (the random
    # selector's generator is a CPU one), then moved to the prompt's device.
    out_of_grid = torch.arange(grid_tokens(prompt), prompt.num_visual, device="cpu")
    return torch.cat([grid, out_of_grid]).to(device)


def kept_prompt_positions(prompt: PreparedPrompt, visual: torch.Tensor) -> torch.Tensor:
    """Every text position of the prompt plus the kept visual ones, ascending (device int64)."""
    device = visual.device
    start, end = prompt.visual_start, prompt.visual_start + prompt.num_visual
    before = torch.arange(0, start, device=device)
    after = torch.arange(end, prompt.length, device=device)
    return torch.cat([before, visual.to(torch.int64) + start, after])


def preserve_tokens(prompt: PreparedPrompt, options: PreservationOptions,
                    queries: torch.Tensor | None = None,
                    keys: torch.Tensor | None = None) -> KeptTokens:
    """Select the visual tokens to keep and the draft's prompt positions."""
    visual = select_kept_visual(prompt, options, queries, keys)
    return KeptTokens(visual=visual, positions=kept_prompt_positions(prompt, visual))


def _evenly_spaced(total: int, count: int) -> torch.Tensor:
    """count distinct indices of [0, total) spread evenly (the centres of count equal bins)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device="cpu")
    centres = torch.arange(count, dtype=torch.float64, device="cpu") + 0.5
    return (centres * total / count).floor().long()


def _uniform_indices(grid: tuple[int, int, int], count: int, per_frame: bool) -> torch.Tensor:
    frames, height, width = grid
    per = height * width
    if not per_frame:
        return _evenly_spaced(frames * per, count)
    chosen = [_evenly_spaced(per, quota) + t * per
              for t, quota in enumerate(per_frame_quotas(frames, count))]
    return torch.cat(chosen)


def _random_indices(grid: tuple[int, int, int], count: int, per_frame: bool,
                    seed: int) -> torch.Tensor:
    frames, height, width = grid
    per = height * width
    generator = torch.Generator().manual_seed(seed)
    if not per_frame:
        return torch.randperm(frames * per, generator=generator, device="cpu")[:count].sort().values
    chosen = [torch.randperm(per, generator=generator, device="cpu")[:quota].sort().values + t * per
              for t, quota in enumerate(per_frame_quotas(frames, count))]
    return torch.cat(chosen)

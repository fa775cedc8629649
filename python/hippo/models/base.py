"""What every model adapter hands to the runtime: one prepared (video, prompt) pair, and the
Qwen2-family language model it runs on. One adapter file per model family implements it."""
from __future__ import annotations

from dataclasses import dataclass

import torch


class HippoError(RuntimeError):
    """An error a user can cause (bad video, prompt too long, unsupported model, ...): one clear
    message, no traceback needed."""


@dataclass
class PreparedPrompt:
    """A (video, prompt) pair, ready for the language model.

    input_ids: [1, S] int64 token ids of the whole prompt (visual placeholders included).
    inputs_embeds: [1, S, hidden] with the visual embeddings merged in.
    position_ids: [3, 1, S] (Qwen2.5-VL's M-RoPE: temporal, height, width) or [1, S] (1-D RoPE).
    rope_delta: generated token j (0-based, after the prompt) sits at position S + j + rope_delta
        in every M-RoPE section (0 for 1-D RoPE).
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

"""One model's side of a speculative decoder: its runtime, the stream its steps run on, and its
copy of the generated sequence.

Token j of the generation (0-based, after the prompt) lives in column j of the lane's `tokens`
buffer and sits at `positions[..., j]`: the target's positions, also for a pruned draft whose
cache is shorter (kept tokens keep their original positions; new ones continue the target's).
`fed` counts the generated tokens the model has consumed, so its cache holds
`prompt_length + fed` positions; rolling back is a change of that length only.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from hippo.runtime.decoder import LanguageModelRuntime


UNKNOWN_TOKEN = 0  # what a lane embeds for a token beyond its table (see Lane.table_rows)


class Lane:
    def __init__(self, runtime: LanguageModelRuntime, prompt_length: int,
                 positions: torch.Tensor, capacity: int, *, high_priority: bool = False) -> None:
        self.runtime = runtime
        self.device = runtime.device
        self.prompt_length = prompt_length
        self.positions = positions[..., :capacity].to(self.device)
        self.tokens = torch.zeros(1, capacity, dtype=torch.int64, device=self.device)
        self.fed = 0
        # Checkpoints of one family pad their tables differently: a token of the target's that a
        # narrower draft cannot embed is fed to it as UNKNOWN_TOKEN (it conditions the draft's
        # guesses only; the target, which verifies them, sees the real token).
        self.table_rows = runtime.text_model.embed_tokens.num_embeddings
        # Its own stream, so that the draft's steps overlap the target's (parallel decoding).
        # A high-priority stream's blocks are scheduled ahead of a normal one's as SMs free up
        # (graph replays take the priority of the stream they are launched into).
        self.stream = (torch.cuda.Stream(self.device, priority=-1 if high_priority else 0)
                       if self.device.type == "cuda" else None)

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]

    def on_stream(self) -> AbstractContextManager[object]:
        """Context that issues work on the lane's own stream (nothing on the CPU)."""
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def main_stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream(self.device) if self.stream is not None else None

    def fork(self) -> None:
        """Let the lane's stream start after everything issued so far on the main stream."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def join(self, main: torch.cuda.Stream | None) -> None:
        """Make `main` (a stream of any device) wait for the lane's stream."""
        if self.stream is not None and main is not None:
            main.wait_stream(self.stream)

    def feed(self, end: int) -> torch.Tensor:
        """Run one step over the generated tokens [fed, end) and return their logits [1, n, V]
        (a static buffer with CUDA graphs: the next step of the same size overwrites it)."""
        start, self.fed = self.fed, end
        return self.runtime.step(self.tokens[:, start:end], self.positions[..., start:end])

    def rollback(self, fed: int) -> None:
        """Keep only the first `fed` generated tokens in the cache."""
        if fed < self.fed:
            self.runtime.rollback(self.prompt_length + fed)
            self.fed = fed

    def write_token(self, column: int, token: int) -> None:
        """Set a generated token known on the host (a correction) without a synchronisation."""
        self.tokens[:, column].fill_(token if token < self.table_rows else UNKNOWN_TOKEN)

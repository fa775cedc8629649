"""The tokenizer interface hippo needs (text <-> ids, and what must agree between a target and
its draft), and its implementation over an HF tokenizer."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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

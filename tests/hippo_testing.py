"""Helpers shared by the test files (a module of its own: the name `conftest` is ambiguous when
tests/ and benchmarks/ are collected in one run)."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
Outputs = TypeVar("Outputs")
FMA_SLICES_ENV = "HIPPO_SKINNY_FMA_SLICES"


def use_fma_slices(monkeypatch: pytest.MonkeyPatch, slices: str) -> None:
    """skinny_linear's FMA kernel (and the fused GEMM ops on it) with K sliced among `slices`
    warps per output pair ("1", "8", ...: capped at K's warp steps of 256), or with its own plan
    (from N, K and the SM count) for "planned"."""
    monkeypatch.delenv(FMA_SLICES_ENV, raising=False)
    if slices != "planned":
        monkeypatch.setenv(FMA_SLICES_ENV, slices)


def capture_cuda_graph(fn: Callable[[], Outputs], warmup: bool = True) -> tuple[torch.cuda.CUDAGraph, Outputs]:
    """fn() captured into a CUDA graph, and the outputs it returned inside the capture (the
    buffers each replay rewrites). As the runtime captures: on a side stream, after one eager
    call there unless warmup=False (for ops whose in-place writes the test counts), and with
    Python's cycle collector held off (it could free another graph mid-capture)."""
    from hippo.runtime.cuda_graphs import no_garbage_collection  # imported where a GPU captures

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    if warmup:
        with torch.cuda.stream(stream):
            fn()
        stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with no_garbage_collection(), torch.cuda.graph(graph, stream=stream):
        outputs = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, outputs


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN never passes a < comparison)."""
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of token samples against probs (normalised here); inf when a token of
    probability 0 was drawn."""
    counts = torch.bincount(samples.cpu(), minlength=probs.numel()).double()
    expected = counts.sum() * probs.double() / probs.double().sum()
    if bool(((expected == 0) & (counts > 0)).any()):
        return math.inf
    mask = expected > 0
    return float(((counts - expected) ** 2 / expected)[mask].sum())


def chi_square_critical(df: int, z: float = 4.75) -> float:
    """Wilson-Hilferty quantile of chi2(df) at the normal quantile z (4.75: about 1e-6)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


# The byte-level BPE tokenizer of bpe_tokenizer(): Qwen2's special tokens and split pattern.
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", "<image>", "<video>"]
QWEN_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
              r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
CORPUS = ["You are a helpful assistant.", "system\n", "user\n", "assistant\n", "user ",
          "What moves?\n", "Question?\nAnswer briefly.", "  spaced out  \n", "?\n", ".\n"] * 4


def bpe_tokenizer():
    """A byte-level BPE tokenizer as Qwen2's (its pre-tokenizer, NFC, special tokens), trained on
    a small corpus: 400 ids, so that "?\n" is one token as in the real vocabulary."""
    from tokenizers import (
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import Qwen2Tokenizer

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})
    assert tokenizer.tokenize("Question?\nAnswer") == ["Question", "?Ċ", "Answer"]  # "?\n" is one
    return tokenizer

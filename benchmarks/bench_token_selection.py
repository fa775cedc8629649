"""select_visual_tokens against its eager PyTorch equivalent.

CUDA: the issue's shape — 64 frames x 14x14 grid (N = 12544), C = 3584 features, 4 layers x 28
query heads x 32 queries over 4 KV heads (D = 128), S = N + 78 prompt tokens read as a strided view
of a static cache, keeping 10%, bf16. CPU: a small shape so the file runs in seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from timing import bench_devices
from hippo_ext import select_visual_tokens
from hippo_ext.token_selection import reference_select_visual_tokens


@dataclass(frozen=True)
class Shape:
    layers: int
    q_heads: int
    kv_heads: int
    num_queries: int
    head_dim: int
    frames: int
    grid_h: int
    grid_w: int
    channels: int
    text_before: int
    text_after: int
    keep_ratio: float = 0.1


SHAPES = {
    "cuda": Shape(4, 28, 4, 32, 128, 64, 14, 14, 3584, 14, 64),
    "cpu": Shape(2, 4, 2, 8, 32, 4, 6, 6, 64, 10, 20),
}


def make_problem(device: str):
    shape = SHAPES[device]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    grid_tokens = shape.frames * shape.grid_h * shape.grid_w
    seq_len = shape.text_before + grid_tokens + shape.text_after
    # The keys are one slice of a [layers, 2, B, Hkv, S_max, D] static cache, as in the runtime.
    cache = torch.randn(shape.layers, 2, 1, shape.kv_heads, seq_len + 256, shape.head_dim,
                        generator=gen, device=device, dtype=dtype)
    keys = cache[:, 0, 0, :, :seq_len]
    queries = torch.randn(shape.layers, shape.q_heads, shape.num_queries, shape.head_dim,
                          generator=gen, device=device, dtype=dtype)
    features = torch.randn(shape.frames, shape.grid_h, shape.grid_w, shape.channels,
                           generator=gen, device=device, dtype=dtype)
    num_keep = round(shape.keep_ratio * grid_tokens)
    args = dict(queries=queries, keys=keys, features=features, visual_start=shape.text_before,
                num_visual=grid_tokens, num_keep=num_keep)
    bytes_moved = sum(t.numel() * t.element_size() for t in (queries, keys, features))
    info = dict(shape=str(shape), dtype=str(dtype), seq_len=seq_len, grid_tokens=grid_tokens,
                num_keep=num_keep)
    return args, bytes_moved, info


@pytest.mark.parametrize("device", bench_devices())
def test_select_visual_tokens_op(measure, device):
    args, bytes_moved, info = make_problem(device)
    scale = 1 / math.sqrt(args["queries"].shape[-1])
    measure(lambda: select_visual_tokens(**args, scale=scale), device, bytes_moved=bytes_moved,
            graph=True, impl="hippo_ext", **info)


@pytest.mark.parametrize("device", bench_devices())
def test_select_visual_tokens_eager(measure, device):
    args, bytes_moved, info = make_problem(device)
    scale = 1 / math.sqrt(args["queries"].shape[-1])
    measure(lambda: reference_select_visual_tokens(**args, scale=scale), device,
            bytes_moved=bytes_moved, graph=True,
            impl="eager (per-layer attention, cosine_similarity)", **info)

"""kv_gather and kv_compact_ against eager PyTorch (index_select + copy_).

On CUDA, the caches of the issue at 12.6k tokens keeping 10% of the video plus the text around
it: a 7B-class target (28 layers, 4 KV heads, head dim 128) and a 0.5B-class draft (24 layers,
2 KV heads, head dim 64), bf16, B = 1. On the CPU, a small cache so the file runs in seconds.
bytes_moved counts each slot that must move once read and once written.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import hippo_ext
from timing import bench_devices


@dataclass(frozen=True)
class CacheShape:
    name: str
    layers: int
    heads: int
    positions: int  # prompt length: text prefix + video + text suffix
    head_dim: int
    prefix: int = 64  # text before the video (kept, and already in place)
    suffix: int = 32  # text after the video (kept)
    keep: float = 0.10  # share of the video tokens kept


CUDA_SHAPES = [
    CacheShape("target-7b", layers=28, heads=4, positions=12_600, head_dim=128),
    CacheShape("draft-0.5b", layers=24, heads=2, positions=12_600, head_dim=64),
]
CPU_SHAPES = [CacheShape("small", layers=4, heads=2, positions=2_000, head_dim=64)]
SHAPES = CUDA_SHAPES if bench_devices() == ["cuda"] else CPU_SHAPES


def kept_positions(shape: CacheShape, gen: torch.Generator) -> torch.Tensor:
    """[1, K]: the text prefix, a sorted random 10% of the video, the text suffix."""
    video = shape.positions - shape.prefix - shape.suffix
    chosen = torch.randperm(video, generator=gen)[: int(video * shape.keep)].sort().values
    return torch.cat([
        torch.arange(shape.prefix),
        shape.prefix + chosen,
        torch.arange(shape.positions - shape.suffix, shape.positions),
    ])[None]


def make_inputs(shape: CacheShape, device: str):
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(shape.layers, 2, 1, shape.heads, shape.positions, shape.head_dim,
                        device=device, dtype=torch.bfloat16)
    index = kept_positions(shape, gen).to(device)
    return cache, index


def slot_bytes(cache: torch.Tensor) -> int:
    """Bytes of one token slot across all layers, keys and values and heads."""
    return cache.numel() // cache.size(4) * cache.element_size()


@pytest.mark.parametrize("impl", ["hippo", "eager"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("device", bench_devices())
def test_kv_gather(benchmark, measure, device, shape, impl):
    benchmark.group = f"kv_gather {shape.name}"
    cache, index = make_inputs(shape, device)
    count = index.size(1)
    dst = torch.empty_like(cache)  # a second static cache of the same capacity

    if impl == "hippo":
        def fn():
            hippo_ext.kv_gather(cache, index, dst, check=False)
    else:
        def fn():
            dst[:, :, :, :, :count].copy_(cache.index_select(4, index[0]))

    fn()
    assert torch.equal(dst[:, :, :, :, :count], cache[:, :, :, :, index[0]])
    measure(fn, device, bytes_moved=2 * count * slot_bytes(cache), graph=True, impl=impl, shape=shape.name, K=count)


@pytest.mark.parametrize("impl", ["hippo", "eager"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("device", bench_devices())
def test_kv_compact(benchmark, measure, device, shape, impl):
    benchmark.group = f"kv_compact_ {shape.name}"
    cache, index = make_inputs(shape, device)
    count = index.size(1)
    expected = cache[:, :, :, :, index[0]].clone()

    if impl == "hippo":
        def fn():
            hippo_ext.kv_compact_(cache, index, check=False)
    else:
        def fn():  # index_select materialises the kept slots first, so the overlap is harmless
            cache[:, :, :, :, :count].copy_(cache.index_select(4, index[0]))

    fn()
    assert torch.equal(cache[:, :, :, :, :count], expected)
    # Repeated calls keep moving the same number of slots (the contents no longer matter).
    # The text prefix is already in place: hippo skips it, so it is not counted as moved.
    moved = int((index[0] != torch.arange(count, device=device)).sum())
    measure(fn, device, bytes_moved=2 * moved * slot_bytes(cache), graph=True, impl=impl, shape=shape.name, K=count)

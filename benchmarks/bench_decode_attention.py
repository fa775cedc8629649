"""decode_attention vs PyTorch SDPA (masked over S_max, and sliced to the exact length).

On CUDA: the model shapes of the issue (one layer, bf16). On the CPU: small shapes, fp32.
bytes_moved = K and V of the valid length + query + output, for every implementation, so
x_floor compares them against the same KV-read floor.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from hippo_ext import decode_attention, decode_attention_workspace
from timing import bench_devices


@dataclass(frozen=True)
class Shape:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int
    max_seq: int
    length: int
    q_len: int
    batch: int = 1


CUDA_SHAPES = [
    Shape("7b_verify_12.6k_of_16k", 28, 4, 128, 16384, 12600, 9),
    Shape("7b_decode_12.6k_of_16k", 28, 4, 128, 16384, 12600, 1),
    Shape("0.5b_decode_1.3k_of_16k", 14, 2, 64, 16384, 1300, 1),
    Shape("7b_verify_6.4k_of_8k", 28, 4, 128, 8192, 6400, 9),
]
CPU_SHAPES = [
    Shape("small_decode", 4, 2, 64, 512, 300, 1),
    Shape("small_verify", 4, 2, 64, 512, 300, 9),
]
IMPLS = ["hippo", "sdpa_masked", "sdpa_exact"]


def _cases():
    for device in bench_devices():
        for shape in CUDA_SHAPES if device == "cuda" else CPU_SHAPES:
            for impl in IMPLS:
                yield pytest.param(device, shape, impl, id=f"{device}-{shape.name}-{impl}")


def _inputs(shape: Shape, device: str):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # On the GPU, several layers, so that back-to-back calls cycling through them read HBM rather
    # than an L2-resident layer (one 7B layer at 16k is 34 MB; an H200's L2 holds 60 MB).
    layers = 4 if device == "cuda" else 1
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(shape.batch, shape.q_len, shape.q_heads, shape.head_dim, generator=gen)
    cache = torch.randn(layers, 2, shape.batch, shape.kv_heads, shape.max_seq, shape.head_dim,
                        generator=gen)
    length = torch.full((shape.batch,), shape.length, dtype=torch.int32)
    return query.to(device, dtype), cache.to(device, dtype), length.to(device)


def _block_visibility(shape: Shape, keys: int, device: str) -> torch.Tensor:
    """[Lq, keys] bool: the prefix plus the causal query block ending at position length - 1."""
    prefix = shape.length - shape.q_len
    positions = torch.arange(keys, device=device)
    last_seen = prefix + torch.arange(shape.q_len, device=device)
    return positions[None, :] <= last_seen[:, None]


def _implementation(impl: str, shape: Shape, query, cache, length, device: str, layer: int):
    if impl == "hippo":
        # Its own semaphores (the fused merge's, HIPPO_DECODE_ATTENTION_FUSED_MERGE=1), as the
        # runtime passes them: the timing graph is captured on a stream of its own.
        workspace = decode_attention_workspace(shape.batch, shape.kv_heads, device)
        return lambda: decode_attention(query, cache, layer, length, workspace=workspace,
                                        check=False)
    q = query.transpose(1, 2)  # [B, Hq, Lq, D]
    if impl == "sdpa_masked":
        keys, values = cache[layer, 0], cache[layer, 1]  # every S_max position, masked
        mask = _block_visibility(shape, shape.max_seq, device)
    else:
        keys = cache[layer, 0, :, :, :shape.length]
        values = cache[layer, 1, :, :, :shape.length]
        mask = _block_visibility(shape, shape.length, device)
    return lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                  enable_gqa=True)


@pytest.mark.parametrize("device,shape,impl", list(_cases()))
def test_decode_attention(measure, device, shape, impl):
    query, cache, length = _inputs(shape, device)
    fns = [_implementation(impl, shape, query, cache, length, device, layer)
           for layer in range(cache.size(0))]
    element = query.element_size()
    kv_bytes = 2 * shape.batch * shape.kv_heads * shape.length * shape.head_dim * element
    bytes_moved = kv_bytes + 2 * query.numel() * element
    # Graph timing for both: the runtime captures its steps, and SDPA deserves the same footing.
    measure(fns, device, bytes_moved=bytes_moved, graph=True, impl=impl, shape=shape.name)

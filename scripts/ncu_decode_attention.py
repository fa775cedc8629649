"""Drive decode_attention at the benchmark's model shapes for Nsight Compute (one process).

    PYTHONPATH=. ncu --clock-control none -k regex:"split_kernel|combine_kernel" \
        --section SpeedOfLight --section WarpStateStats python scripts/ncu_decode_attention.py

(`scripts/gpu_check.sh build ncu` runs it.)

Each shape runs twice (the second launch is the one to read: caches and clocks warm).
"""
from __future__ import annotations

import sys

import torch

import hippo_ext

SHAPES = {  # name: (q heads, kv heads, head dim, S_max, length, Lq)
    "7b_verify_12.6k": (28, 4, 128, 16384, 12600, 9),
    "7b_decode_12.6k": (28, 4, 128, 16384, 12600, 1),
    "0.5b_decode_1.3k": (14, 2, 64, 16384, 1300, 1),
}


def run(name: str) -> None:
    q_heads, kv_heads, head_dim, max_seq, length, q_len = SHAPES[name]
    query = torch.randn(1, q_len, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(1, 2, 1, kv_heads, max_seq, head_dim, device="cuda", dtype=torch.bfloat16)
    lengths = torch.full((1,), length, device="cuda", dtype=torch.int32)
    for _ in range(2):
        hippo_ext.decode_attention(query, cache, 0, lengths)
    torch.cuda.synchronize()


if __name__ == "__main__":
    for shape in sys.argv[1:] or SHAPES:
        run(shape)

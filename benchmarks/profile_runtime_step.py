"""Where a runtime step spends its GPU time: decode (1 token) against verify (g+1 tokens).

    PYTHONPATH=python python benchmarks/profile_runtime_step.py --model 7b --context 6400 --tokens 1,9

Runs the step eagerly (no CUDA graph, so the profiler sees every op) on a randomly initialised
model of the benchmark shapes (bench_runtime.py) and prints, per step size, the CUDA kernels that
take the most time. Measured on 2026-11-26 (H200, RESULTS.md): the 7B verify step of 5-9 tokens
costs twice the decode step although its attention is ~1 ms of it; this tells which kernels differ.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench_runtime import build_model  # same folder: run as a script from the repository root
from hippo.runtime import LanguageModelRuntime


def profile_step(runtime: LanguageModelRuntime, context: int, count: int, reps: int,
                 rows: int) -> str:
    ids = torch.randint(0, runtime.text_model.config.vocab_size, (1, count), device="cuda")
    positions = torch.arange(context, context + count, device="cuda")[None]
    for _ in range(3):  # warm-up: cuBLAS heuristics, allocator
        runtime.step(ids, positions)
        runtime.rollback(context)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            runtime.step(ids, positions)
            runtime.rollback(context)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)
    return f"## {count} token(s) per step, {reps} steps\n{table}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="7b", help="7b or 0.5b")
    parser.add_argument("--context", type=int, default=6400)
    parser.add_argument("--tokens", default="1,9", help="comma list of step sizes")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_runtime_step.py needs a CUDA GPU")
    model = build_model(args.model, torch.device("cuda"), torch.bfloat16)
    runtime = LanguageModelRuntime.from_hf(model, args.context + 128, use_cuda_graphs=False)
    hidden = torch.randn(1, args.context, model.config.hidden_size, device="cuda",
                         dtype=torch.bfloat16)
    runtime.prefill(hidden, torch.arange(args.context, device="cuda")[None])
    for count in (int(n) for n in args.tokens.split(",")):
        print(profile_step(runtime, args.context, count, args.reps, args.rows))


if __name__ == "__main__":
    main()

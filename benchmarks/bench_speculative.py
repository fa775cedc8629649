"""Time per round of HIPPO decoding, sequential vs parallel, with the measured MAT beside every
figure.

A plain script: `python benchmarks/bench_speculative.py --help`.

It builds a synthetic agreement pair (hippo.models.agreement: the real per-step costs of a
Qwen2-7B-shaped target and a Qwen2-0.5B-shaped draft, with the agreement set by eps) and a
synthetic video prompt (frames x 14 x 14 visual tokens with random features, as a 384-px
LLaVA-OneVision frame after pooling gives 196 tokens, between two stretches of text). For each
eps it runs, on the same prompt and after one warm-up generation each (CUDA graphs captured):
  * hippo's AR baseline (the target alone, one graph step per token);
  * sequential speculative decoding and parallel (HIPPO) decoding at each requested g, and
    parallel with adaptive g (with --draft-priority, each parallel setting again with the draft
    on a high-priority stream);
and prints one markdown table: MAT and acceptance, decode time per token and its speedup over
AR, time per round and the busy time of its draft and verify parts (which overlap in parallel
mode), and the prefill-stage times (target prefill, selection, draft prefill). Greedy outputs are
checked against AR: where one parts from it, the `parting` column gives the target's logit gap
between the two tokens there, in rounding steps (bf16 on a GPU: a near-tie is at most 2).

`--preset tiny` runs tiny fp32 models on the CPU as a smoke test (host clock).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from hippo.models.agreement import (QWEN2_0_5B, QWEN2_7B, TINY_DRAFT, TINY_TARGET,
                                    AgreementPair, synthetic_prompt)
from hippo.cli import add_gemm_prologues_argument
from hippo.devices import device_name
from hippo.pipeline import HippoPipeline
from hippo.preserve import PreservationOptions
from hippo.report import markdown_table, rounded, stats_row
from hippo.speculative.acceptance import SamplingOptions
from hippo.speculative.divergence import Parting, find_parting

PRESETS = {
    # target, draft, dtype, device, frames, grid, eps values, vocab
    "7b": dict(target=QWEN2_7B, draft=QWEN2_0_5B, dtype=torch.bfloat16, device="cuda",
               frames=32, grid=(14, 14), eps=(0.003, 0.01, 0.03), vocab=152064),
    "tiny": dict(target=TINY_TARGET, draft=TINY_DRAFT, dtype=torch.float32, device="cpu",
                 frames=4, grid=(6, 6), eps=(0.1, 0.3, 0.6), vocab=1000),
}


def _run(pipeline: HippoPipeline, target_prompt, draft_prompt, new_tokens: int):
    output = pipeline.generate_prepared(target_prompt, draft_prompt, new_tokens,
                                        SamplingOptions(), set())
    return output


def _row(label: str, gamma, eps: float, output, baseline, parting: Parting | None) -> dict:
    """The shared statistics row (hippo.report), plus the per-round split this script is for."""
    s = output.stats
    rounds = max(s.rounds, 1)
    row = stats_row(label, s, baseline, gamma=gamma, eps=eps)
    row.update({"round ms": round(1e3 * s.decode_s / rounds, 3),
                "draft ms/round": round(1e3 * s.draft_s / rounds, 3),
                "verify ms/round": round(1e3 * s.verify_s / rounds, 3),
                "mean g": rounded(s.mean_gamma), "matches_ar": parting is None,
                "parting": "" if parting is None else parting.describe()})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    parser.add_argument("--eps", type=float, nargs="*", help="agreement knob values")
    parser.add_argument("--gammas", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--frames", type=int, help="video frames (default: the preset's)")
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--draft-priority", action="store_true",
                        help="also time each parallel setting with the draft on a high-priority "
                             "stream (HippoOptions.draft_priority), in the same run")
    add_gemm_prologues_argument(parser)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the 7b preset needs a GPU; use --preset tiny on the CPU")

    eps_values = args.eps or preset["eps"]
    started = time.perf_counter()
    pair = AgreementPair(preset["target"], preset["draft"], eps=eps_values[0],
                         vocab=preset["vocab"], dtype=preset["dtype"], device=preset["device"])
    frames = args.frames or preset["frames"]
    prompts = [synthetic_prompt(adapter, frames=frames, grid=preset["grid"])
               for adapter in (pair.target, pair.draft)]
    device = device_name(preset["device"])
    print(f"# {args.preset}: {device}, {preset['dtype']}, prompt {prompts[0].length} "
          f"tokens ({frames} frames), keep ratio {args.keep_ratio}, {args.new_tokens} new "
          f"tokens; built in {time.perf_counter() - started:.1f} s")

    base = HippoPipeline(pair.target, pair.draft, mode="ar",
                         preservation=PreservationOptions(keep_ratio=args.keep_ratio),
                         gemm_prologues=args.gemm_prologues)
    configs = [("ar", "ar", 1)]
    configs += [(f"sequential g={g}", "sequential", g) for g in args.gammas]
    configs += [(f"parallel g={g}", "parallel", g) for g in args.gammas]
    configs += [("parallel g=auto", "parallel", "auto")]
    if args.draft_priority:
        configs += [(f"{label}, draft priority", mode, gamma)
                    for label, mode, gamma in configs if mode == "parallel"]
    pipelines = {label: base.with_options(mode=mode, gamma=gamma,
                                          draft_priority=label.endswith("draft priority"))
                 for label, mode, gamma in configs}
    rows = []
    for eps in eps_values:
        pair.set_eps(eps)
        reference, baseline = None, None
        for label, _, gamma in configs:
            pipeline = pipelines[label]
            # Warm-up of the same length (graphs captured): a shorter one sizes the caches
            # smaller, and the timed run would rebuild them and capture again inside its timing.
            _run(pipeline, *prompts, args.new_tokens)
            output = _run(pipeline, *prompts, args.new_tokens)
            if reference is None:  # the AR row
                reference, baseline = output.tokens, output.stats
                ar_runtime = pipeline.runtime("target")
            # Greedy output differs from AR's only at a near-tie of the target's logits (bf16
            # rounding of verify vs decode steps); anything else is a bug, and says so.
            parting = find_parting(ar_runtime, prompts[0], reference, output.tokens)
            rows.append(_row(label, gamma, eps, output, baseline, parting))
        print(markdown_table([r for r in rows if r["eps"] == eps]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(preset=args.preset, device=device, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

"""`hippo demo`: HIPPO on the embedded default, in about five seconds on an idle 2-core CPU.

A tiny Qwen2.5-VL-architecture target and draft built from presets and made into a synthetic
agreement pair (hippo.models.agreement: two independent random models would agree on almost
nothing), the project's sample video, and one prompt. It runs the target alone (AR), sequential
speculative decoding and HIPPO (parallel), checks that all three emit the same tokens, and prints
the statistics. The weights are synthetic: the text is meaningless, the timings and the
acceptance are real.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from hippo.assets import SAMPLE_FRAMES, sample_video_path
from hippo.models.agreement import agreement_adapters
from hippo.devices import resolve_device
from hippo.errors import HippoError, is_int
from hippo.pipeline import HippoPipeline
from hippo.report import markdown_table, stats_row
from hippo.video import load_video

TARGET_PRESET, DRAFT_PRESET = "demo-qwen2.5-vl", "tiny-qwen2.5-vl-draft"
PROMPT = "describe the moving square"
METHODS = (("AR (target alone)", dict(mode="ar")),
           ("sequential SD", dict(mode="sequential", gamma=6)),
           ("HIPPO (parallel)", dict(mode="parallel", gamma="auto")))


@dataclass
class DemoResult:
    rows: list[dict]
    identical: bool
    table: str


def run_demo(*, device: str | torch.device | None = None, eps: float = 0.1, frames: int = 16,
             max_new_tokens: int = 96, keep_ratio: float = 0.1, progress: bool = True,
             echo: Callable[[str], None] = print) -> DemoResult:
    """Build the pair, run the three methods (after one warm-up each: graphs get captured),
    compare their tokens, and return the table."""
    from tqdm import tqdm

    where = resolve_device(device)
    video = _sample_video(frames)  # before the models are built: a bad count fails at once
    echo(f"hippo demo: synthetic weights ({TARGET_PRESET} target, {DRAFT_PRESET} draft, "
         f"agreement eps {eps}); the text is meaningless, timings and acceptance are measured. "
         f"Device: {where}.")
    target, draft, _ = agreement_adapters(TARGET_PRESET, DRAFT_PRESET, eps, device=where)
    base = HippoPipeline(target, draft)
    rows, outputs, baseline = [], [], None
    # No bar where stderr is no terminal (a log, a pipe): what it draws there stays, before any
    # error line. On a terminal the `with` clears it before an error propagates.
    with tqdm(METHODS, desc="methods", disable=None if progress else True, leave=False) as bar:
        for label, options in bar:
            pipeline = _configured(base, options, keep_ratio)
            # Warm-up of the same length (graphs captured): a shorter one sizes the caches
            # smaller, and the timed run would rebuild them and capture again inside its timing.
            pipeline.generate(video, PROMPT, max_new_tokens)
            out = pipeline.generate(video, PROMPT, max_new_tokens)
            baseline = baseline or out.stats
            outputs.append(out.tokens)
            rows.append(stats_row(label, out.stats, baseline))
    identical = all(tokens == outputs[0] for tokens in outputs)
    table = markdown_table(rows)
    echo(table)
    echo(f"\noutputs identical to the target's own greedy decoding: {identical}")
    echo(f"first tokens (synthetic weights, so no meaningful text): {outputs[0][:16]}")
    if where.type == "cpu":
        echo("On a CPU the draft and the target share the cores, so HIPPO's parallel rounds run "
             "one side after the other; their overlap needs a GPU (two CUDA streams).")
    else:
        echo("The demo's models are tiny: on a GPU a step of either costs about the same chain of "
             "kernel launches, so drafting cannot pay here. `hippo bench --preset 7b` times "
             "7B/0.5B model shapes.")
    if not identical:
        raise HippoError("speculative output differs from the target's own: this is a bug")
    return DemoResult(rows, identical, table)


def _sample_video(frames: int) -> torch.Tensor:
    """`frames` frames of the sample clip, which has SAMPLE_FRAMES."""
    if is_int(frames) and frames > SAMPLE_FRAMES:
        raise HippoError(f"the demo's sample video has {SAMPLE_FRAMES} frames: ask for at most "
                         f"{SAMPLE_FRAMES} (--frames), got {frames}")
    return load_video(sample_video_path(), num_frames=frames)


def _configured(base: HippoPipeline, options: dict, keep_ratio: float) -> HippoPipeline:
    preservation = replace(base.options.preservation, keep_ratio=keep_ratio)
    return base.with_options(preservation=preservation, **options)

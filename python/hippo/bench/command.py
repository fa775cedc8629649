"""`hippo bench`: the end-to-end benchmark on a preset, or a benchmark set from a local
directory (`--dataset NAME --root DIR`)."""
from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from hippo.cli import (add_gemm_prologues_argument, check_at_least_one, check_model_source, flag,
                       refuse_options)
from hippo.devices import device_name
from hippo.errors import HippoError
from hippo.speculative.draft_length import MAX_DRAFT_LENGTH


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from hippo.bench.end_to_end import METHODS, PRESETS

    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="tiny (CPU) or 7b (GPU: Qwen2-7B target, Qwen2-0.5B draft, bf16); "
                             "default: 7b with a GPU, tiny without")
    parser.add_argument("--frames", type=int, nargs="+", help="frame counts (7b preset: 196 visual tokens each; tiny: 36)")
    parser.add_argument("--eps", type=float, nargs="+", help="agreement knob values to sweep")
    parser.add_argument("--gamma", type=int,
                        help=f"draft tokens per round of sequential SD and HF assisted (default "
                             f"{PRESET_DEFAULTS['gamma']}); HIPPO's adaptive g goes up to this "
                             f"or 12, whichever is larger")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: all")
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    parser.add_argument("--out-dir", default="hippo-bench", help="where the results go: bench.json and bench.png, or <dataset>.json")
    add_gemm_prologues_argument(parser, default=None)
    parser.add_argument("--draft-priority", action="store_const", const=True, default=None,
                        help="HIPPO's draft on a high-priority CUDA stream (opt-in)")
    sets = parser.add_argument_group("benchmark sets (instead of a preset)")
    sets.add_argument("--dataset", help="videomme, mvbench, longvideobench, mlvu, lvbench or vdc")
    sets.add_argument("--root", help="the benchmark set's local directory")
    sets.add_argument("--target", help=f"checkpoint directory or preset (default "
                                       f"{SET_DEFAULTS['target']})")
    sets.add_argument("--draft", help=f"default {SET_DEFAULTS['draft']}")
    sets.add_argument("--limit", type=int, help="questions per set")
    sets.add_argument("--max-new-tokens", type=int,
                      help=f"default {SET_DEFAULTS['max_new_tokens']}")
    sets.add_argument("--num-frames", type=int, help=f"default {SET_DEFAULTS['num_frames']}")


# Options of one kind of run only, and their defaults (None: decided by the run). argparse leaves
# them None unless given, so that an option of the other kind is refused rather than ignored.
PRESET_DEFAULTS = dict(preset=None, frames=None, eps=None, gamma=12, new_tokens=None, methods=None,
                       gemm_prologues="none", draft_priority=False)
SET_DEFAULTS = dict(root=None, target="tiny-qwen2.5-vl", draft="tiny-qwen2.5-vl-draft",
                    limit=None, max_new_tokens=64, num_frames=16)


def _apply_mode_defaults(args: argparse.Namespace) -> None:
    """Refuse the options of the kind of run not chosen; fill in the chosen kind's defaults."""
    unused, used = (PRESET_DEFAULTS, SET_DEFAULTS) if args.dataset else (SET_DEFAULTS, PRESET_DEFAULTS)
    refuse_options([flag(name) for name in unused if getattr(args, name) is not None],
                   "a preset run (no --dataset)" if args.dataset else "--dataset runs")
    for name, default in used.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def run_bench(args: argparse.Namespace) -> list[dict]:
    _apply_mode_defaults(args)
    check_at_least_one(args, "new_tokens", "gamma", "limit", "max_new_tokens", "num_frames",
                       "frames")
    if args.new_tokens is not None and args.new_tokens < 2:  # decode times start after the first
        raise HippoError(f"--new-tokens must be at least 2: decoding is timed after the "
                         f"prefill's token, got {args.new_tokens}")
    if args.gamma is not None and args.gamma > MAX_DRAFT_LENGTH:  # no 'auto' here, unlike generate
        raise HippoError(f"--gamma must be at most {MAX_DRAFT_LENGTH}, got {args.gamma}")
    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HippoError(f"--out-dir {out_dir}: cannot make the folder ({err.strerror})") from err
    try:  # a folder that exists but takes no files would fail only after the whole run
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise HippoError(f"--out-dir {out_dir}: cannot write there ({err.strerror or err})") from err
    if args.dataset:
        return _run_dataset(args, out_dir)
    from hippo.bench.end_to_end import METHODS, PRESETS, run_end_to_end
    from hippo.bench.plot import plot_speedup_vs_mat
    from hippo.report import markdown_table

    name = args.preset or ("7b" if torch.cuda.is_available() else "tiny")
    preset = PRESETS[name]
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise HippoError("the 7b preset needs a CUDA GPU; use --preset tiny on a CPU")
    device = device_name(preset.device)
    print(f"hippo bench --preset {name}: synthetic agreement pairs (random weights; acceptance "
          f"measured, never faked) on {device}")
    rows = run_end_to_end(preset, frames=tuple(args.frames or ()) or None,
                          eps_values=tuple(args.eps or ()) or None, gamma=args.gamma,
                          new_tokens=args.new_tokens, methods=tuple(args.methods or METHODS),
                          keep_ratio=args.keep_ratio, gemm_prologues=args.gemm_prologues,
                          draft_priority=args.draft_priority)
    print(markdown_table(rows))
    report = dict(preset=name, device=device, dtype=str(preset.dtype),
                  target=asdict(preset.target), draft=asdict(preset.draft),
                  run=dict(frames=list(args.frames or preset.frames),
                           eps=list(args.eps or preset.eps), vocab=preset.vocab,
                           grid=list(preset.grid),
                           new_tokens=args.new_tokens or preset.new_tokens, gamma=args.gamma,
                           methods=list(dict.fromkeys(args.methods or METHODS)),
                           keep_ratio=args.keep_ratio, gemm_prologues=args.gemm_prologues,
                           draft_priority=args.draft_priority),
                  environment=_environment(), rows=rows)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=1))
    figure = plot_speedup_vs_mat(rows, out_dir / "bench.png", f"hippo bench {name} ({device})")
    if figure is None:
        # An earlier run's figure would read as this run's.
        (out_dir / "bench.png").unlink(missing_ok=True)
        print(f"wrote {out_dir / 'bench.json'} (no figure: matplotlib is not installed; "
              "pip install matplotlib, or the bench extra: pip install '.[bench]')")
    else:
        print(f"wrote {out_dir / 'bench.json'} and {figure}")
    return rows


def _run_dataset(args: argparse.Namespace, out_dir: Path) -> list[dict]:
    from hippo.bench.dataset_runner import run_benchmark_set
    from hippo.report import markdown_table

    if not args.root:
        raise HippoError("--dataset needs --root, the benchmark set's local directory")
    check_model_source("--target", args.target)  # before the questions' models load
    check_model_source("--draft", args.draft)
    summary, rows = run_benchmark_set(
        args.dataset, args.root, target=args.target, draft=args.draft, limit=args.limit,
        max_new_tokens=args.max_new_tokens, num_frames=args.num_frames,
        keep_ratio=args.keep_ratio)
    print(markdown_table(rows))
    print(markdown_table([summary]))
    run = dict(root=str(Path(args.root).expanduser().resolve()), target=args.target,
               draft=args.draft, limit=args.limit, max_new_tokens=args.max_new_tokens,
               num_frames=args.num_frames, keep_ratio=args.keep_ratio)
    report = dict(summary=summary, run=run, environment=_environment(), rows=rows)
    (out_dir / f"{args.dataset}.json").write_text(json.dumps(report, indent=1))
    if rows and summary["run"] == 0:
        raise HippoError(f"none of the {len(rows)} questions could be run; the first: "
                         f"{rows[0]['skipped']}")
    return rows


def _environment() -> dict:
    """What produced the numbers: `hippo info`'s installation report (versions, kernels, GPUs,
    decoders) with torch's bare version, the threads and the date, so that a JSON file read later
    (or beside another) says where it came from."""
    from hippo.info import installation_report

    return dict(installation_report(), torch=torch.__version__, cuda=torch.version.cuda,
                threads=torch.get_num_threads(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

"""The `hippo` command: `hippo demo`, `hippo generate`, `hippo bench`.

Every error a user can cause (a missing path, an unsupported model, a mismatched pair, an
unreadable video, a context too long) is printed as one line on stderr with a non-zero exit
status, never as a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

EXIT_USER_ERROR = 2


def _gamma(text: str) -> int | str:
    return text if text == "auto" else int(text)


def add_gemm_prologues_argument(parser: argparse.ArgumentParser, default: str | None = "none") -> None:
    """--gemm-prologues: which runtimes run the norms, gating and RoPE inside their GEMMs
    (HippoOptions.gemm_prologues; opt-in kernels, measured slower on an H200: 2026-11-27,
    benchmarks/RESULTS.md)."""
    parser.add_argument("--gemm-prologues", choices=("none", "draft", "both"), default=default,
                        help="runtimes with the norms, gating and RoPE inside the GEMMs of their "
                             "single-token steps (opt-in kernels; slower than the default on an "
                             "H200 so far)")


def _add_decoding_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("ar", "sequential", "parallel"), default="parallel")
    parser.add_argument("--gamma", type=_gamma, default="auto",
                        help="draft tokens per round: an int, or 'auto' (measured: PEARL's "
                             "T_target/T_draft in parallel mode, the best expected tokens/s in "
                             "sequential mode)")
    parser.add_argument("--keep-ratio", type=float, default=0.1,
                        help="fraction of visual tokens the draft keeps (default 0.1: 90%% pruned)")
    parser.add_argument("--selection", choices=("hippo", "attention", "uniform", "random"),
                        default="hippo")
    parser.add_argument("--draft-prefill", choices=("pruned", "full+compact"), default="pruned")
    parser.add_argument("--draft-priority", action="store_true",
                        help="run the draft's steps on a high-priority CUDA stream (parallel "
                             "mode on one GPU; opt-in, not yet measured)")
    add_gemm_prologues_argument(parser)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hippo", description=(
        "HIPPO: lossless speculative decoding for video LLMs"))
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="HIPPO on the embedded default (synthetic weights)")
    demo.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    demo.add_argument("--eps", type=float, default=0.1, help="agreement of the synthetic pair")
    demo.add_argument("--frames", type=int, default=16)
    demo.add_argument("--max-new-tokens", type=int, default=96)

    gen = commands.add_parser("generate", help="answer a prompt about a video with real checkpoints")
    gen.add_argument("--target", required=True, help="local checkpoint directory (or a preset)")
    gen.add_argument("--draft", help="the draft's checkpoint directory; omitted: the target "
                                     "drafts for itself over its pruned cache")
    gen.add_argument("--video", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--frames", type=int, help="frames sampled uniformly (default 16)")
    gen.add_argument("--fps", type=float, help="sample by rate instead of a frame count")
    gen.add_argument("--start", type=float, help="sample from this second on (default: 0)")
    gen.add_argument("--end", type=float, help="sample up to this second (default: the end)")
    _add_decoding_options(gen)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int,
                     help="seeds sampling: the same tokens again with --mode ar or a fixed --gamma "
                          "(not with --gamma auto, nor in parallel mode on a GPU: see README)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--device", help="where the target runs (default: cuda when present)")
    gen.add_argument("--draft-device", help="where the draft runs (default: the target's)")
    gen.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    gen.add_argument("--json", action="store_true", help="print one JSON object")

    from hippo.bench.command import add_bench_arguments

    add_bench_arguments(commands.add_parser(
        "bench", help="end-to-end benchmark: HF, HF assisted, hippo AR, sequential SD, HIPPO"))
    return parser


def _generate(args: argparse.Namespace) -> None:
    import torch

    from hippo.models import HippoError, load_adapter, resolve_device
    from hippo.pipeline import HippoPipeline
    from hippo.preserve import PreservationOptions

    if args.frames is not None and args.fps is not None:
        raise HippoError("give --frames or --fps, not both")
    _check_utf8(args.prompt)
    device = resolve_device(args.device)
    draft_device = resolve_device(args.draft_device) if args.draft_device else None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    target = load_adapter(args.target, dtype=dtype, device=device)
    if target.tokenizer is None:  # the Python API takes prompts as token ids instead
        raise HippoError(f"{args.target} has no tokenizer (tokenizer.json, tokenizer_config.json "
                         "or vocab.json): hippo generate needs one to encode --prompt")
    draft = load_adapter(args.draft, dtype=dtype, device=draft_device or device) \
        if args.draft else None
    pipeline = HippoPipeline(
        target, draft, mode=args.mode, gamma=args.gamma, draft_prefill=args.draft_prefill,
        draft_device=draft_device, gemm_prologues=args.gemm_prologues,
        draft_priority=args.draft_priority,
        preservation=PreservationOptions(keep_ratio=args.keep_ratio, method=args.selection))
    out = pipeline.generate(args.video, args.prompt, args.max_new_tokens, num_frames=args.frames,
                            fps=args.fps, start=args.start, end=args.end,
                            temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    stats = out.stats.as_dict()
    if args.json:
        print(json.dumps({"text": out.text, "tokens": out.tokens, "stats": stats}))
        return
    print(out.text if out.text is not None else out.tokens)
    print(f"\n{out.stats.tokens} tokens, MAT {out.stats.mean_accepted_tokens:.2f}, acceptance "
          f"{out.stats.acceptance_rate:.2f}, {out.stats.tokens_per_s:.1f} tokens/s "
          f"({args.mode}; prefill {1e3 * out.stats.prefill_s:.0f} ms, selection "
          f"{1e3 * out.stats.selection_s:.1f} ms, draft {1e3 * out.stats.draft_s:.0f} ms, "
          f"verify {1e3 * out.stats.verify_s:.0f} ms)", file=sys.stderr)


def _check_utf8(prompt: str) -> None:
    """Python keeps bytes of the command line that are not UTF-8 as lone surrogates, which
    tokenizers reject with a TypeError: say what is wrong instead."""
    from hippo.models import HippoError

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise HippoError(f"--prompt is not valid UTF-8 (byte {error.start} of it): pass the text "
                         "in UTF-8 (check the terminal's or the shell's encoding)") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from hippo.models.base import HippoError

    try:
        if args.command == "demo":
            from hippo.demo import run_demo

            run_demo(device=args.device, eps=args.eps, frames=args.frames,
                     max_new_tokens=args.max_new_tokens)
        elif args.command == "generate":
            _generate(args)
        else:
            from hippo.bench.command import run_bench

            run_bench(args)
    except BrokenPipeError:  # the reader went away (`hippo ... | head`): nothing left to say
        _silence_stdout()
        return 1
    except (HippoError, ValueError, OSError) as error:  # OSError: paths (missing, not a folder, ...)
        print(f"hippo {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (MemoryError, RuntimeError) as error:
        if _has_non_finite_probabilities(error):
            # A checkpoint whose logits overflow its dtype (fp16 is the usual one): the user's
            # choice of model or dtype, so one line, not a traceback.
            print(f"hippo {args.command}: error: the model's next-token probabilities are not "
                  f"finite (NaN or inf logits: weights or a dtype that overflow?; try --dtype "
                  f"bfloat16 or float32) ({_one_line(error)})", file=sys.stderr)
            return EXIT_USER_ERROR
        if not _is_out_of_memory(error):
            raise
        # A model, cache or video too large for the device: the user's choice of sizes.
        print(f"hippo {args.command}: error: out of memory ({_one_line(error)}); ask for fewer "
              "frames or new tokens, or use a smaller model or dtype", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail a second time."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (captured, replaced): nothing to flush
        pass


# How allocation failures read where torch raises a plain RuntimeError: its CPU allocator, a
# kernel's launch or cuBLAS's workspace.
_OUT_OF_MEMORY_MARKERS = ("can't allocate memory", "CUDA error: out of memory",
                          "CUBLAS_STATUS_ALLOC_FAILED")


# How sampling reads NaN or inf probabilities: torch.multinomial (AR) and verify_sampling.
_NON_FINITE_MARKERS = ("probability tensor contains either `inf`, `nan` or element < 0",
                       "must be finite and non-negative (probabilities)")


def _has_non_finite_probabilities(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in _NON_FINITE_MARKERS)


def _is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if isinstance(error, MemoryError) or (torch is not None
                                          and isinstance(error, torch.OutOfMemoryError)):
        return True
    return any(marker in str(error) for marker in _OUT_OF_MEMORY_MARKERS)


_MAX_ERROR_CHARS = 600


def _one_line(error: BaseException) -> str:
    """The error's message on one line: its lines joined (transformers' validation errors name
    the field on the first line and the reason on the next), cut at _MAX_ERROR_CHARS."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if not text:
        return type(error).__name__
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS - 3].rstrip() + "..."


if __name__ == "__main__":
    sys.exit(main())

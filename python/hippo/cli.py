"""The `hippo` command: `hippo demo`, `hippo generate`, `hippo bench`, `hippo info`.

Every error a user can cause (a missing path, an unsupported model, a mismatched pair, an
unreadable video, a context too long) is printed as one line on stderr with a non-zero exit
status, never as a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from hippo.pipeline import HippoOptions, HippoPipeline
    from hippo.streaming import IncrementalText

EXIT_USER_ERROR = 2
STDIN = "-"  # --prompt -: the questions are read from stdin


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage block it prints first would bury the
    message; -h shows it). Subcommand parsers are made of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {_single_line(message)}; "
                                   f"see {self.prog} -h\n")


def _gamma(text: str) -> int | str:
    """--gamma's syntax; its range is HippoOptions's to check."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be 'auto' or a positive integer") from None


def flag(name: str) -> str:
    """The command-line flag of an argparse destination: "max_new_tokens" -> "--max-new-tokens"."""
    return "--" + name.replace("_", "-")


def refuse_options(flags: Sequence[str], where: str) -> None:
    """Refuse options given where they do nothing, rather than ignore them: one error that names
    them all."""
    from hippo.errors import HippoError

    if flags:
        verb = "applies" if len(flags) == 1 else "apply"
        raise HippoError(f"{', '.join(flags)} {verb} only to {where}")


def check_at_least_one(args: argparse.Namespace, *names: str) -> None:
    """Refuse count options (ints, or lists of them) below 1, named by their flags."""
    from hippo.errors import HippoError

    for name in names:
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and value < 1:
                raise HippoError(f"{flag(name)} must be at least 1, got {value}")


def check_model_source(option: str, source: str | None) -> None:
    """A model option that is neither a preset nor a directory, refused before any model loads
    (a 7B checkpoint takes minutes) and named by its flag; load_adapter checks the rest."""
    from hippo.errors import HippoError
    from hippo.models.presets import PRESETS

    if source is not None and source not in PRESETS and not os.path.isdir(source):
        raise HippoError(f"{option} {source}: no such checkpoint directory, nor a preset "
                         f"({', '.join(sorted(PRESETS))})")


def add_gemm_prologues_argument(parser: argparse.ArgumentParser, default: str | None = "none") -> None:
    """--gemm-prologues: which runtimes run the norms, gating and RoPE inside their GEMMs
    (HippoOptions.gemm_prologues; opt-in kernels, measured slower on an H200: 2026-11-28,
    benchmarks/RESULTS.md)."""
    parser.add_argument("--gemm-prologues", choices=("none", "draft", "both"), default=default,
                        help="runtimes with the norms, gating and RoPE inside the GEMMs of their "
                             "single-token steps (opt-in kernels; slower than the default on an "
                             "H200 so far)")


def _add_decoding_options(parser: argparse.ArgumentParser) -> None:
    # The draft's options default to None, so that one given with --mode ar is refused rather
    # than ignored; HippoOptions' and PreservationOptions' own defaults apply otherwise.
    parser.add_argument("--mode", choices=("ar", "sequential", "parallel"), default="parallel",
                        help="ar: the target alone; sequential or parallel (the default) "
                             "speculative decoding")
    parser.add_argument("--gamma", type=_gamma,
                        help="draft tokens per round: an int, or 'auto' (the default; measured: "
                             "PEARL's T_target/T_draft in parallel mode, the best expected "
                             "tokens/s in sequential mode)")
    parser.add_argument("--keep-ratio", type=float,
                        help="fraction of visual tokens the draft keeps (default 0.1: 90%% pruned)")
    parser.add_argument("--selection", choices=("hippo", "attention", "uniform", "random"),
                        help="how the kept visual tokens are chosen (default hippo)")
    parser.add_argument("--draft-prefill", choices=("pruned", "full+compact"),
                        help="default pruned")
    parser.add_argument("--draft-priority", action="store_const", const=True,
                        help="run the draft's steps on a high-priority CUDA stream (parallel "
                             "mode on one GPU; opt-in, not yet measured)")
    add_gemm_prologues_argument(parser)


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="hippo", description=(
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
    gen.add_argument("--prompt", required=True, action="append",
                     help="the question; repeat it to ask several about the video, which is "
                          "then decoded, embedded and prefilled once and answered in turn (the "
                          "prefill split at the video's end may round a near-tie otherwise "
                          "than the question alone: see README); - reads the questions from "
                          "stdin, one per line, answering each as it comes")
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
    gen.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    gen.add_argument("--stop", action="append", metavar="TEXT",
                     help="stop after the token that completes TEXT (kept); repeat for several; "
                          "a newline in bash: --stop $'\\n'")
    gen.add_argument("--device", help="where the target runs (default: cuda when present)")
    gen.add_argument("--draft-device", help="where the draft runs (default: the target's)")
    gen.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                     help="default: bfloat16 for checkpoints, float32 for presets")
    gen.add_argument("--step-invariant", action="store_true",
                     help="verify steps round exactly as one-token steps, so the output is the "
                          "target's AR output bit for bit even at near-ties of its top logits "
                          "(CPU; CUDA in bf16/fp16; costs some speed)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object (one line per --prompt)")

    commands.add_parser("info", help="versions, hippo_ext's kernels and whether they run on each "
                                     "GPU, video decoders (for bug reports)")

    from hippo.bench.command import add_bench_arguments

    add_bench_arguments(commands.add_parser(
        "bench", help="end-to-end benchmark: HF, HF assisted, hippo AR, sequential SD, HIPPO"))
    return parser


def _demo(args: argparse.Namespace) -> None:
    from hippo.demo import run_demo

    check_at_least_one(args, "max_new_tokens")
    run_demo(device=args.device, eps=args.eps, frames=args.frames,
             max_new_tokens=args.max_new_tokens)


def _generate(args: argparse.Namespace) -> None:
    import torch

    from hippo.models import HippoError, load_adapter, resolve_device
    from hippo.pipeline import HippoPipeline

    # Everything that needs no model is checked first: loading a 7B pair takes minutes.
    options = _checked_generate_options(args)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    target = load_adapter(args.target, dtype=dtype, device=device)
    if target.tokenizer is None:  # the Python API takes prompts as token ids instead
        raise HippoError(f"{args.target} has no tokenizer (tokenizer.json, tokenizer_config.json "
                         "or vocab.json): hippo generate needs one to encode --prompt")
    draft = load_adapter(args.draft, dtype=dtype, device=options.draft_device or device) \
        if args.draft else None
    pipeline = HippoPipeline(target, draft, options)
    sampling = dict(num_frames=args.frames, fps=args.fps, start=args.start, end=args.end)
    if args.prompt == [STDIN]:  # the video first: the questions come while it is kept
        video = pipeline.encode_video(args.video, **sampling)
        for prompt in _questions_from_stdin():
            _answer(args, pipeline, video, prompt, {})
        return
    video = args.video
    if len(args.prompt) > 1:  # one decode and one vision-tower run for all the questions
        for prompt in args.prompt:  # each refused, if it must be, before any is answered
            pipeline.text_tokens(prompt)
        video, sampling = pipeline.encode_video(args.video, **sampling), {}
        for prompt in args.prompt:  # and each fits the context with its new tokens
            pipeline.prepare(video, prompt, max_new_tokens=args.max_new_tokens)
    for number, prompt in enumerate(args.prompt):
        if len(args.prompt) > 1 and not args.json:  # which question the text below answers
            blank_line = "\n" if number else ""
            print(f"{blank_line}[{number + 1}/{len(args.prompt)}] {prompt}", file=sys.stderr,
                  flush=True)
        _answer(args, pipeline, video, prompt, sampling)


def _questions_from_stdin() -> Iterator[str]:
    """Each non-blank line of stdin as it is read (undecodable bytes kept as surrogates, for the
    UTF-8 check to name)."""
    from hippo.errors import check_utf8

    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    typed = sys.stdin.isatty()  # someone at a terminal: say when the next question is awaited
    while True:
        if typed:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input (Ctrl-D at a terminal)
            return
        question = line.rstrip("\r\n")
        if question.strip():
            check_utf8(question, "a question read from stdin")
            yield question


def _answer(args: argparse.Namespace, pipeline: HippoPipeline, video: object, prompt: str,
            sampling: dict) -> None:
    """One generation: its text printed as it comes and its statistics, or one JSON line."""
    from hippo.streaming import IncrementalText

    # The text is printed as the tokens are emitted, unless it is wanted as JSON.
    text = None if args.json else IncrementalText(pipeline.target.tokenizer)
    try:
        out = pipeline.generate(video, prompt, args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                stop=args.stop, **sampling,
                                on_tokens=_printer(text) if text is not None else None)
    finally:
        if text is not None and text.tokens:  # what a failure left unfinished ends its line
            print(text.finish(), flush=True)
    stats = out.stats.as_dict()
    if args.json:
        print(json.dumps({"prompt": prompt, "text": out.text, "tokens": out.tokens,
                          "finish_reason": out.finish_reason, "stats": stats}), flush=True)
        return
    reused = out.stats.reused_prompt_tokens
    kept = f" after {reused} prompt tokens kept from the last question" if reused else ""
    print(f"\n{out.stats.tokens} tokens (ended by {out.finish_reason.replace('_', ' ')}), "
          f"MAT {_two_places(out.stats.mean_accepted_tokens)}, "
          f"acceptance {_two_places(out.stats.acceptance_rate)}, {out.stats.tokens_per_s:.1f} tokens/s "
          f"({args.mode}; prefill {1e3 * out.stats.prefill_s:.0f} ms{kept}, selection "
          f"{1e3 * out.stats.selection_s:.1f} ms, draft {1e3 * out.stats.draft_s:.0f} ms, "
          f"verify {1e3 * out.stats.verify_s:.0f} ms)", file=sys.stderr)


def _printer(text: IncrementalText) -> Callable[[list[int]], None]:
    """An on_tokens callback printing the text of the tokens as they come."""
    def print_tokens(tokens: list[int]) -> None:
        piece = text.push(tokens)
        if piece:
            print(piece, end="", flush=True)
    return print_tokens


def _two_places(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.2f}"


# generate's options that shape the draft's side, by the HippoOptions (or PreservationOptions)
# field they set; None unless given. --draft and --draft-device join them in the check that
# --mode ar (the target alone) takes none.
_DRAFT_FIELDS = dict(gamma="gamma", draft_prefill="draft_prefill", draft_priority="draft_priority")
_PRESERVATION_FIELDS = dict(keep_ratio="keep_ratio", selection="method")
_SAMPLING_ONLY = ("top_k", "top_p", "seed")


def _checked_generate_options(args: argparse.Namespace) -> HippoOptions:
    """Every check of generate's options that needs no model (contradictions, the prompt, the
    sampling and decoding options, the draft's device, the video and its sampling request, the
    model paths), in the library's own validators; the HippoOptions to decode with."""
    from hippo.models import resolve_device
    from hippo.errors import HippoError, check_utf8
    from hippo.pipeline import DEFAULT_FRAMES, HippoOptions, check_draft_model_options
    from hippo.preserve import PreservationOptions
    from hippo.runtime.autoregressive import SamplingOptions
    from hippo.streaming import stop_strings
    from hippo.video import check_video_request

    _refuse_contradictions(args)
    for prompt in args.prompt:  # before any model loads
        check_utf8(prompt, "--prompt")
    if STDIN in args.prompt and len(args.prompt) > 1:
        raise HippoError("--prompt - reads the questions from stdin: give no other --prompt")
    check_at_least_one(args, "max_new_tokens")
    SamplingOptions(args.temperature, args.top_k, args.top_p, args.seed)  # validates them
    stop_strings(args.stop)  # validates them
    preservation = PreservationOptions(**_given(args, _PRESERVATION_FIELDS))
    draft_device = resolve_device(args.draft_device) if args.draft_device else None
    options = HippoOptions(mode=args.mode, preservation=preservation, draft_device=draft_device,
                           gemm_prologues=args.gemm_prologues,
                           step_invariant=args.step_invariant, **_given(args, _DRAFT_FIELDS))
    check_draft_model_options(options, has_draft=args.draft is not None)
    frames = DEFAULT_FRAMES if args.frames is None and args.fps is None else args.frames
    check_video_request(args.video, frames, args.fps, start=args.start, end=args.end)
    check_model_source("--target", args.target)
    check_model_source("--draft", args.draft)
    return options


def _refuse_contradictions(args: argparse.Namespace) -> None:
    """Options that do nothing in the run asked for are refused, not ignored: the draft's with
    --mode ar, sampling's with greedy decoding, --frames with --fps."""
    from hippo.models import HippoError

    if args.frames is not None and args.fps is not None:
        raise HippoError("give --frames or --fps, not both")
    if args.mode == "ar":
        draft_only = ("draft", "draft_device", *_DRAFT_FIELDS, *_PRESERVATION_FIELDS)
        given = [flag(name) for name in draft_only if getattr(args, name) is not None]
        if args.gemm_prologues == "draft":  # "both" and "none" speak of the target too
            given.append("--gemm-prologues draft")
        refuse_options(given, "speculative decoding (--mode sequential or parallel), not --mode ar")
    if args.temperature == 0:  # exactly: a bad temperature is SamplingOptions' to report
        refuse_options([flag(name) for name in _SAMPLING_ONLY if getattr(args, name) is not None],
                       "sampling (--temperature > 0; 0 is greedy decoding)")


def _given(args: argparse.Namespace, fields: dict[str, str]) -> dict:
    """{field: value} of the options given on the command line (argparse left the others None)."""
    return {field: getattr(args, name) for name, field in fields.items()
            if getattr(args, name) is not None}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        import hippo_ext  # noqa: F401  (every command needs it)
    except ImportError as error:  # a missing or stale build: its message says how to rebuild
        print(f"hippo: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    args = _parser().parse_args(argv)
    from hippo.errors import HippoError

    try:
        if args.command == "demo":
            _demo(args)
        elif args.command == "generate":
            _generate(args)
        elif args.command == "info":
            from hippo.info import print_report

            print_report()
        else:
            from hippo.bench.command import run_bench

            run_bench(args)
    except BrokenPipeError:  # the reader went away (`hippo ... | head`): nothing left to say
        _silence_stdout()
        return 1
    except HippoError as error:
        message = _with_flag_names(_single_line(str(error)), _command_flags(args),
                                   verbatim=_wrapped_message(error))
        print(f"hippo {args.command}: error: {_cut(message) or type(error).__name__}",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except (ValueError, OSError) as error:  # OSError: paths (missing, not a folder, ...)
        print(f"hippo {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (MemoryError, RuntimeError) as error:
        if _has_non_finite_probabilities(error):
            # A checkpoint whose logits overflow its dtype (fp16 is the usual one): the user's
            # choice of model or dtype, so one line, not a traceback.
            whose = "the model's" if getattr(args, "mode", None) == "ar" else \
                "a model's (the target's or the draft's)"
            print(f"hippo {args.command}: error: {whose} next-token probabilities are not "
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
    return _cut(_single_line(str(error))) or type(error).__name__


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS - 3].rstrip() + "..."


def _wrapped_message(error: BaseException) -> str | None:
    """The message of the first exception not hippo's that a HippoError was raised from (a
    decoder's, JSON's, transformers'), on one line: text hippo quotes, whose words are not its
    parameters ("invalid start byte" is no --start)."""
    from hippo.errors import HippoError

    cause = error.__cause__
    while isinstance(cause, HippoError):
        cause = cause.__cause__
    if cause is None:
        return None
    return _single_line(str(cause)) or None


def _single_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


# The library's messages name the Python API's parameters; each command's flag for them, so that
# what the command prints names what its user types. Applied to HippoErrors only: their text is
# the library's own.
_API_FLAGS = {
    "demo": dict(num_frames="--frames", max_new_tokens="--max-new-tokens"),
    "generate": dict(num_frames="--frames", fps="--fps", start="--start", end="--end",
                     max_new_tokens="--max-new-tokens",
                     keep_ratio="--keep-ratio", gamma="--gamma", draft_prefill="--draft-prefill",
                     temperature="--temperature", top_k="--top-k", top_p="--top-p", seed="--seed",
                     step_invariant="--step-invariant", gemm_prologues="--gemm-prologues",
                     stop="--stop"),
    "info": {},
    "bench": dict(num_frames="--num-frames", max_new_tokens="--max-new-tokens",
                  keep_ratio="--keep-ratio", gamma="--gamma"),
}


def _command_flags(args: argparse.Namespace) -> dict[str, str]:
    """_API_FLAGS of the command run; a preset bench names its token and frame counts
    --new-tokens and --frames (--max-new-tokens and --num-frames are a --dataset run's)."""
    flags = _API_FLAGS[args.command]
    if args.command == "bench" and not getattr(args, "dataset", None):
        flags = dict(flags, max_new_tokens="--new-tokens", num_frames="--frames")
    return flags


def _with_flag_names(message: str, flags: dict[str, str], verbatim: str | None = None) -> str:
    """message with each parameter name of `flags` that stands as a word of its own replaced by
    its flag; names inside a path, a quoted string or a longer name (max_gamma) stay as they are,
    and so does `verbatim`, another library's message that hippo's quotes."""
    if not flags:
        return message
    if verbatim and verbatim in message:
        head, _, tail = message.partition(verbatim)
        return _with_flag_names(head, flags) + verbatim + _with_flag_names(tail, flags)
    word = re.compile(r"(?<![\w/.'\"-])(" + "|".join(map(re.escape, flags)) + r")(?![\w/'\"-])")
    return word.sub(lambda match: flags[match.group(1)], message)


if __name__ == "__main__":
    sys.exit(main())

"""The `hippo` command: demo, generate and bench run on a CPU, and every user error is one line on
stderr with exit status 2, never a traceback."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from hippo.assets import sample_video_path
from hippo.cli import EXIT_USER_ERROR, main

PAIR = ["--target", "tiny-qwen2.5-vl", "--draft", "tiny-qwen2.5-vl-draft"]


def _generate(*extra: str, pair: list[str] = PAIR) -> list[str]:
    return ["generate", *pair, "--video", str(sample_video_path()), "--prompt", "what moves?",
            "--frames", "4", "--max-new-tokens", "10", *extra]


def _generate_ar(*extra: str) -> list[str]:
    """The target alone: --mode ar takes no draft option."""
    return _generate("--mode", "ar", *extra, pair=PAIR[:2])


def test_demo_runs_and_checks_its_outputs(capsys):
    assert main(["demo", "--max-new-tokens", "24", "--frames", "4"]) == 0
    out = capsys.readouterr().out
    assert "synthetic weights" in out
    assert "outputs identical to the target's own greedy decoding: True" in out
    for method in ("AR (target alone)", "sequential SD", "HIPPO (parallel)"):
        assert method in out
    assert "| MAT |" in out
    # The closing note of the device it ran on (the demo takes the GPU when there is one).
    notes = {"cpu": "On a CPU the draft and the target share the cores", "cuda": "on a GPU a step"}
    ran_on = "cuda" if torch.cuda.is_available() else "cpu"
    assert all((note in out) == (device == ran_on) for device, note in notes.items()), out


def test_generate_prints_json_and_matches_ar(capsys):
    assert main(_generate("--json", "--mode", "parallel", "--gamma", "3")) == 0
    hippo = json.loads(capsys.readouterr().out)
    assert main(_generate_ar("--json")) == 0
    ar = json.loads(capsys.readouterr().out)
    assert hippo["tokens"] == ar["tokens"] and len(ar["tokens"]) <= 10
    assert main(_generate("--json", "--draft-priority")) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == ar["tokens"]
    # Step-invariant kernels on both sides (on the CPU: hippo_ext's references).
    assert main(_generate("--json", "--step-invariant", "--gamma", "3")) == 0
    invariant = json.loads(capsys.readouterr().out)["tokens"]
    assert main(_generate_ar("--json", "--step-invariant")) == 0
    assert invariant == json.loads(capsys.readouterr().out)["tokens"]
    assert {"mean_accepted_tokens", "acceptance_rate", "tokens_per_s"} <= set(hippo["stats"])


def _stream_spy(monkeypatch, capsys, fail_at: int | None = None) -> list[str]:
    """Wraps the on_tokens callback that `hippo generate` hands the pipeline: records what stdout
    holds after each call (so that the text is seen arriving while the generation runs), and
    raises a HippoError at call `fail_at`."""
    from hippo.errors import HippoError
    from hippo.pipeline import HippoPipeline

    generate, seen = HippoPipeline.generate, []

    def spying_generate(self, *args, on_tokens=None, **kwargs):
        def spy(tokens):
            on_tokens(tokens)
            seen.append(capsys.readouterr().out)
            if len(seen) == fail_at:
                raise HippoError("stopped on purpose")
        return generate(self, *args, on_tokens=spy if on_tokens else None, **kwargs)

    monkeypatch.setattr(HippoPipeline, "generate", spying_generate)
    return seen


def test_generate_prints_the_text_as_it_is_generated(capsys, monkeypatch):
    """The text on stdout is the JSON's, printed piece by piece as rounds end; a failure part-way
    ends the line of what was printed, and says why on stderr."""
    assert main(_generate("--json", "--gamma", "2", "--max-new-tokens", "16")) == 0
    expected = json.loads(capsys.readouterr().out)["text"]
    seen = _stream_spy(monkeypatch, capsys)
    assert main(_generate("--gamma", "2", "--max-new-tokens", "16")) == 0
    rest = capsys.readouterr().out
    assert "".join(seen) + rest == expected + "\n"
    assert len(seen) > 2 and sum(bool(piece) for piece in seen) > 2, seen  # arrived in pieces
    seen = _stream_spy(monkeypatch, capsys, fail_at=3)
    assert main(_generate("--gamma", "2", "--max-new-tokens", "16")) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    printed = "".join(seen) + captured.out
    assert printed.endswith("\n") and expected.startswith(printed[:-1]), (printed, expected)
    assert captured.err.strip() == "hippo generate: error: stopped on purpose"


def test_generate_stops_at_a_stop_string(capsys):
    """--stop (repeatable) ends the text after the token that completes one of them; an empty
    one is refused by its flag's name."""
    assert main(_generate("--json", "--gamma", "2", "--max-new-tokens", "24")) == 0
    free = json.loads(capsys.readouterr().out)
    stop = next(free["text"][i:i + 2] for i in range(1, len(free["text"]) - 1)
                if "\ufffd" not in free["text"][i:i + 2])
    assert main(_generate("--json", "--gamma", "2", "--max-new-tokens", "24",
                          "--stop", "\x00none", "--stop", stop)) == 0
    out = json.loads(capsys.readouterr().out)
    assert (free["finish_reason"], out["finish_reason"]) == ("max_new_tokens", "stop_string")
    assert out["text"].endswith(stop) and out["text"].count(stop) == 1
    assert out["tokens"] == free["tokens"][:len(out["tokens"])]
    assert main(_generate("--gamma", "2", "--max-new-tokens", "24", "--stop", stop)) == 0
    assert capsys.readouterr().out == out["text"] + "\n"
    _assert_one_line_error(capsys, _generate("--stop", ""), "--stop must be a non-empty string")

def test_generate_answers_several_prompts_about_one_decoding_of_the_video(capsys, monkeypatch):
    """--prompt repeated: each question answered in turn as it would be alone (a JSON line each,
    or the texts with a header per question on stderr), the video decoded once."""
    from hippo import pipeline

    questions = ["what moves?", "what colour is it?", "why?"]
    alone = []
    for question in questions:
        argv = _generate("--json", "--gamma", "2")
        argv[argv.index("what moves?")] = question
        assert main(argv) == 0
        alone.append(json.loads(capsys.readouterr().out))
    decoded = []
    load_video = pipeline.load_video
    monkeypatch.setattr(pipeline, "load_video",
                        lambda *args, **kwargs: decoded.append(1) or load_video(*args, **kwargs))
    several = [argument for question in questions[1:] for argument in ("--prompt", question)]
    assert main(_generate("--json", "--gamma", "2", *several)) == 0
    lines = capsys.readouterr().out.splitlines()
    answers = [json.loads(line) for line in lines]
    assert [answer["prompt"] for answer in answers] == questions and len(decoded) == 1
    assert [answer["tokens"] for answer in answers] == [answer["tokens"] for answer in alone]
    assert main(_generate("--gamma", "2", *several)) == 0
    captured = capsys.readouterr()
    assert captured.out == "".join(answer["text"] + "\n" for answer in alone)
    headers = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert headers == [f"[{n}/3] {question}" for n, question in enumerate(questions, 1)]
    assert captured.err.count(" tokens (ended by ") == 3
    assert captured.err.count(" prompt tokens kept from the last question") == 2
    assert [answer["stats"]["reused_prompt_tokens"] > 0 for answer in answers] == [False, True, True]
    # A bad question among them is one clear error, by its flag's name, before any answer.
    _assert_one_line_error(capsys, _generate("--prompt", "\ud800"), "--prompt is not valid UTF-8")
    assert len(decoded) == 2  # one per run that answered


def test_generate_sampling_and_self_speculation(capsys):
    # Rounds that do not depend on timing (README): a fixed g (with --gamma auto, g follows
    # measured step times) and sequential mode (on a GPU, a parallel draft runs ahead for as
    # long as the verdict takes), so that a seed repeats the run on any device.
    args = ["generate", "--target", "tiny-llava-onevision", "--video", str(sample_video_path()),
            "--prompt", "hi", "--frames", "3", "--max-new-tokens", "8", "--temperature", "0.7",
            "--top-p", "0.9", "--seed", "3", "--gamma", "3", "--mode", "sequential", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == first["tokens"]


def test_several_prompts_one_beyond_the_context_answer_none(capsys, monkeypatch):
    """A question that cannot fit the context with --max-new-tokens is refused before any
    question is answered (as one --prompt alone would be): no answer, one error line."""
    from hippo.models import load_adapter
    from hippo.models.qwen2_5_vl import Qwen2_5_VLAdapter

    target = load_adapter("tiny-qwen2.5-vl")
    fits = target.visual_tokens(4, 112, 112) + target.text_tokens("what moves?") + 10
    monkeypatch.setattr(Qwen2_5_VLAdapter, "max_positions", property(lambda self: fits))
    argv = _generate("--json", "--gamma", "2", "--prompt", "what moves, and why, and where to?")
    assert main(argv) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert captured.out == "", captured.out
    assert "context too long" in captured.err and len(captured.err.strip().splitlines()) == 1


def _assert_one_line_error(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"hippo {argv[0]}: error:"), err
    assert needle in err, err


def test_user_errors_are_one_line(capsys, tmp_path):
    missing = ["generate", *PAIR, "--video", str(tmp_path / "none.mp4"), "--prompt", "hi"]
    _assert_one_line_error(capsys, missing, "none.mp4")
    corrupt = tmp_path / "bad.mp4"
    corrupt.write_bytes(b"\x00" * 64)
    _assert_one_line_error(capsys, ["generate", *PAIR, "--video", str(corrupt), "--prompt", "x"],
                           "bad.mp4")
    _assert_one_line_error(capsys, _generate()[:1] + ["--target", str(tmp_path / "nowhere"),
                                                      *_generate()[5:]], "nowhere")
    unsupported = tmp_path / "bert"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _assert_one_line_error(capsys, _generate()[:1] + ["--target", str(unsupported),
                                                      *_generate()[5:]], "unsupported model")
    mismatched = ["generate", "--target", "tiny-qwen2.5-vl", "--draft", "tiny-qwen2.5-vl-v640",
                  *_generate()[5:]]
    _assert_one_line_error(capsys, mismatched, "tokenizers differ")
    _assert_one_line_error(capsys, _generate("--max-new-tokens", "40000"), "context too long")
    # "été" typed in a Latin-1 terminal: bytes that are not UTF-8 reach Python as surrogates.
    latin1 = b"\xe9t\xe9".decode("utf-8", "surrogateescape")
    _assert_one_line_error(capsys, [*_generate()[:8], latin1, *_generate()[9:]], "--prompt is not valid UTF-8")
    _assert_one_line_error(capsys, ["bench", "--dataset", "mlvu", "--out-dir", str(tmp_path)],
                           "--root")


def test_bench_tiny_writes_table_json_and_plot(capsys, tmp_path):
    argv = ["bench", "--preset", "tiny", "--eps", "0.1", "1.0", "--new-tokens", "16",
            "--gamma", "4", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| frames | prompt_tokens | eps | method |" in out
    report = json.loads((tmp_path / "bench.json").read_text())
    methods = {row["method"] for row in report["rows"]}
    assert methods == {"hf_generate", "hf_assisted", "hippo_ar", "sequential", "hippo"}
    assert all(row["matches_ar"] for row in report["rows"] if row["method"] != "hf_assisted")
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert out.endswith(f"wrote {tmp_path / 'bench.json'} and {tmp_path / 'bench.png'}\n")
    high, low = (next(r for r in report["rows"] if r["method"] == "sequential" and r["eps"] == e)
                 for e in (0.1, 1.0))
    assert high["MAT"] > low["MAT"]  # the knob moves acceptance


def test_bench_json_says_how_it_was_run(tmp_path):
    """bench.json alone must say what produced its numbers: the options that change them
    (new tokens, keep ratio, ...) and the versions and date, not only the preset's shapes."""
    argv = ["bench", "--preset", "tiny", "--eps", "0.1", "--new-tokens", "6", "--gamma", "3",
            "--keep-ratio", "0.25", "--methods", "hippo_ar", "sequential", "sequential",
            "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["run"] == dict(frames=[4], eps=[0.1], vocab=1000, grid=[6, 6], new_tokens=6,
                                 gamma=3, methods=["hippo_ar", "sequential"], keep_ratio=0.25,
                                 gemm_prologues="none", draft_priority=False)
    environment = report["environment"]
    assert environment["torch"] == torch.__version__ and environment["hippo"]
    assert environment["transformers"] and environment["date"][:2] == "20"


def test_bench_dataset_json_says_how_it_was_run(tmp_path):
    import shutil

    from hippo.assets import make_synthetic_video
    from hippo.bench.datasets import read_dataset

    root = tmp_path / "lvbench"
    shutil.copytree(Path(__file__).parent / "fixtures" / "datasets" / "lvbench", root)
    make_synthetic_video(read_dataset("lvbench", root)[0].video, num_frames=8, height=56,
                         width=56, fps=4.0)
    argv = ["bench", "--dataset", "lvbench", "--root", str(root), "--max-new-tokens", "4",
            "--num-frames", "4", "--keep-ratio", "0.5", "--out-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "lvbench.json").read_text())
    assert report["run"] == dict(root=str(root.resolve()), target="tiny-qwen2.5-vl",
                                 draft="tiny-qwen2.5-vl-draft", limit=None, max_new_tokens=4,
                                 num_frames=4, keep_ratio=0.5)
    assert (report["summary"]["device"], report["summary"]["dtype"]) == ("CPU", "float32")
    assert report["environment"]["torch"] == torch.__version__
    assert report["summary"]["graded"] == 2  # the two questions run, both with answers
    assert all(len(row["prefill/selection/draft prefill ms"]) == 3
               for row in report["rows"] if "skipped" not in row)


def test_bench_without_matplotlib_writes_the_json_and_says_why_no_figure(capsys, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    argv = ["bench", "--preset", "tiny", "--eps", "0.1", "--new-tokens", "8", "--gamma", "4",
            "--methods", "hippo_ar", "sequential", "--out-dir", str(tmp_path)]
    (tmp_path / "bench.png").write_bytes(b"an earlier run's figure")  # not left beside the JSON
    assert main(argv) == 0
    assert "no figure: matplotlib is not installed" in capsys.readouterr().out
    assert (tmp_path / "bench.json").exists() and not (tmp_path / "bench.png").exists()


def test_the_bench_figure_says_what_its_methods_left_out():
    from hippo.bench.plot import _why_empty

    assert "add hf_generate to --methods" in _why_empty([{"method": "hippo", "pair_MAT": 2.0}])
    assert "add sequential to --methods" in _why_empty(
        [{"method": "hippo", "pair_MAT": None, "x hf_generate": 1.7}])


def test_the_bench_figure_draws_each_method_s_speedup_against_the_pair_s_mat(tmp_path, monkeypatch):
    """One line per (method, frames), its points in MAT order; rows without the pair's MAT or a
    speedup over HF generate are left out. The figure is closed once written."""
    import matplotlib.pyplot as plt

    from hippo.bench.plot import plot_speedup_vs_mat

    drawn = []
    subplots = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: drawn.append(subplots(*a, **k)) or drawn[-1])
    rows = [dict(method="hippo", frames=4, pair_MAT=3.0, **{"x hf_generate": 2.0}),
            dict(method="hippo", frames=4, pair_MAT=1.5, **{"x hf_generate": 1.2}),
            dict(method="sequential", frames=4, pair_MAT=1.5, **{"x hf_generate": 1.1}),
            dict(method="hippo", frames=8, pair_MAT=2.0, **{"x hf_generate": 1.8}),
            dict(method="hippo_ar", frames=4, pair_MAT=None, **{"x hf_generate": 1.3}),
            dict(method="hf_generate", frames=4, pair_MAT=1.5)]
    path = plot_speedup_vs_mat(rows, str(tmp_path / "speedup.png"), "the title")
    assert path == tmp_path / "speedup.png" and path.stat().st_size > 1000
    figure, axes = drawn[0]
    assert figure.number not in plt.get_fignums()
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for line in axes.get_lines()}
    one = [label for label, (_, y) in lines.items() if label.startswith("_")]
    assert len(one) == 1 and lines.pop(one[0])[1] == [1.0, 1.0]  # the no-speedup line
    assert lines == {"hippo (4 frames)": ([1.5, 3.0], [1.2, 2.0]),
                     "hippo (8 frames)": ([2.0], [1.8]),
                     "sequential (4 frames)": ([1.5], [1.1])}
    assert [text.get_text() for text in axes.get_legend().get_texts()] == sorted(lines)
    assert axes.get_title() == "the title"
    assert axes.get_xlabel() == "measured MAT (sequential SD, same pair)"
    assert axes.get_ylabel() == "decode speedup over HF generate"
    # Nothing to draw: no legend, the reason written in its place.
    drawn.clear()
    plot_speedup_vs_mat(rows[-2:], tmp_path / "empty.png", "empty")
    figure, axes = drawn[0]
    assert axes.get_legend() is None
    assert [text.get_text() for text in axes.texts] == [
        "no MAT of the pair was measured (the x axis: add sequential to --methods)"]


def test_bench_rows_by_hand():
    """What one (frames, eps) measurement becomes in bench.json and its table: each method's g,
    its MAT beside the pair's (sequential SD's), rounded times, whether it matches hippo's AR,
    and its decode speedup over each baseline (the baseline's time per token over its own)."""
    from hippo.bench.end_to_end import _rows

    measured = {
        "hf_generate": dict(tokens=[1, 2, 3], total_s=1.23456, per_token=0.04, mat=1.0,
                            acceptance=None),
        "hf_assisted": dict(tokens=[1, 2, 4], total_s=0.9, per_token=0.02, mat=None,
                            acceptance=None),
        "hippo_ar": dict(tokens=[1, 2, 3], total_s=0.5, per_token=0.01, mat=1.0, acceptance=None,
                         phases_ms=[1.5, 0.0, 0.0]),
        "sequential": dict(tokens=[1, 2, 3], total_s=0.3, per_token=0.005, mat=2.3456,
                           acceptance=0.61234, phases_ms=[1.5, 0.25, 0.5], parting=""),
        "hippo": dict(tokens=[1, 2, 5], total_s=0.23456, per_token=0.0041234, mat=3.14159,
                      acceptance=0.5, phases_ms=[1.5, 0.25, 0.5], parting="parts at token 2"),
    }
    rows = {row["method"]: row for row in _rows(measured, 4, 150, 0.5, 6)}
    assert list(rows) == list(measured)
    assert rows["hippo"] == {
        "frames": 4, "prompt_tokens": 150, "eps": 0.5, "method": "hippo", "gamma": "auto",
        "MAT": 3.14, "pair_MAT": 2.35, "acceptance": 0.5, "ms/token": 4.123, "total_s": 0.235,
        "matches_ar": False, "parting": "parts at token 2",
        "prefill/selection/draft prefill ms": [1.5, 0.25, 0.5],
        "x hf_generate": 9.7, "x hippo_ar": 2.43, "x hf_assisted": 4.85}
    assert {name: row["gamma"] for name, row in rows.items()} == dict(
        hf_generate="-", hf_assisted=6, hippo_ar="-", sequential=6, hippo="auto")
    assert {name: row["matches_ar"] for name, row in rows.items()} == dict(
        hf_generate=True, hf_assisted=False, hippo_ar=True, sequential=True, hippo=False)
    assert rows["sequential"]["acceptance"] == 0.612 and rows["sequential"]["MAT"] == 2.35
    assert rows["hf_generate"]["total_s"] == 1.235 and rows["hf_assisted"]["MAT"] is None
    assert rows["hf_generate"]["prefill/selection/draft prefill ms"] == "-"
    assert rows["hf_generate"]["parting"] == ""
    assert {k: v for k, v in rows["hippo_ar"].items() if k.startswith("x ")} == {
        "x hf_generate": 4.0, "x hf_assisted": 2.0}
    assert "x hf_generate" not in rows["hf_generate"]
    # Without sequential SD there is no pair MAT to put beside the others.
    del measured["sequential"]
    assert all(row["pair_MAT"] is None for row in _rows(measured, 4, 150, 0.5, 6))


def test_bench_configures_each_method_and_runs_every_frames_eps_pair(monkeypatch):
    """hippo's three methods share the options given; sequential SD drafts g, HIPPO g="auto" up
    to max(g, 12); every (frames, eps) is run with the pair at that eps, the preset's where none
    are given (the measurements are faked here: what they are measured with is under test)."""
    from hippo.bench import end_to_end

    runs = []

    def measured(pair, pipelines, prompts, new_tokens, gamma, methods):
        runs.append(dict(eps=pair.eps, pipelines=pipelines, lengths=[p.length for p in prompts],
                         new_tokens=new_tokens, gamma=gamma, methods=methods))
        return {"hippo_ar": dict(tokens=[1], total_s=0.1, per_token=0.0125, mat=1.0,
                                 acceptance=None)}

    monkeypatch.setattr(end_to_end, "_measure_all", measured)
    lines, preset = [], end_to_end.PRESETS["tiny"]
    rows = end_to_end.run_end_to_end(
        preset, frames=(2, 4), gamma=4, new_tokens=5, methods=("hippo_ar", "hippo"),
        keep_ratio=0.25, gemm_prologues="draft", draft_priority=True, progress=False,
        echo=lines.append)
    pairs = [(count, eps) for count in (2, 4) for eps in preset.eps]
    assert [(row["frames"], row["eps"]) for row in rows] == pairs
    assert [run["eps"] for run in runs] == [eps for _, eps in pairs]
    assert lines == [f"frames {count}, eps {eps}: hippo_ar 12.5 ms/token" for count, eps in pairs]
    short, long = runs[0]["lengths"], runs[-1]["lengths"]
    assert short[0] == rows[0]["prompt_tokens"] == 16 + 2 * 36 + 32 and long[0] == short[0] + 72
    assert all(run["new_tokens"] == 5 and run["gamma"] == 4 for run in runs)
    assert runs[0]["methods"] == ("hippo_ar", "hippo")
    options = {name: pipeline.options for name, pipeline in runs[0]["pipelines"].items()}
    assert {name: (o.mode, o.gamma) for name, o in options.items()} == dict(
        hippo_ar=("ar", "auto"), sequential=("sequential", 4), hippo=("parallel", "auto"))
    assert options["hippo"].max_gamma == 12  # max(g, 12)
    assert all((o.preservation.keep_ratio, o.gemm_prologues, o.draft_priority) == (0.25, "draft", True)
               for o in options.values())
    # Frames and new tokens left out: the preset's.
    runs.clear()
    end_to_end.run_end_to_end(preset, eps_values=(0.5,), progress=False, echo=lines.append)
    assert [(run["lengths"][0], run["new_tokens"]) for run in runs] == [(16 + 4 * 36 + 32, 64)]


def test_the_bench_presets_are_what_their_names_say():
    """7b: Qwen2-7B / 0.5B shapes and vocabulary, bf16 on a GPU, 196 tokens a frame (a 384-px
    LLaVA-OneVision frame); tiny: the CPU pair. eps grows along a preset (MAT falls)."""
    from hippo.bench.end_to_end import PRESETS, TOKENS_PER_FRAME
    from hippo.models.agreement import QWEN2_0_5B, QWEN2_7B, QWEN2_VOCAB, TINY_DRAFT, TINY_TARGET

    big, tiny = PRESETS["7b"], PRESETS["tiny"]
    assert (big.target, big.draft, big.vocab, big.device, big.dtype) == (
        QWEN2_7B, QWEN2_0_5B, QWEN2_VOCAB, "cuda", torch.bfloat16)
    assert big.grid == TOKENS_PER_FRAME == (14, 14)
    assert (tiny.target, tiny.draft, tiny.device, tiny.dtype) == (TINY_TARGET, TINY_DRAFT, "cpu",
                                                                 torch.float32)
    for preset in PRESETS.values():
        assert list(preset.eps) == sorted(set(preset.eps)) and preset.eps[0] > 0
        assert preset.new_tokens >= 2 and all(count > 0 for count in preset.frames)


def test_bench_needs_two_new_tokens(capsys, tmp_path):
    """Decoding is timed after the prefill's token: with one, every speedup would be noise."""
    assert main(["bench", "--preset", "tiny", "--new-tokens", "1", "--out-dir",
                 str(tmp_path)]) == EXIT_USER_ERROR
    assert "--new-tokens must be at least 2" in capsys.readouterr().err


def test_bench_runs_with_the_opt_in_gemm_prologues_and_draft_priority(capsys, tmp_path):
    argv = ["bench", "--preset", "tiny", "--eps", "0.1", "--new-tokens", "8", "--gamma", "4",
            "--methods", "hippo_ar", "sequential", "hippo", "--gemm-prologues", "both",
            "--draft-priority", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {row["method"] for row in rows} == {"hippo_ar", "sequential", "hippo"}
    assert all(row["matches_ar"] and not row["parting"] for row in rows)


@pytest.mark.parametrize("argv", [["demo", "--frames", "0"], ["bench", "--preset", "tiny",
                                                                  "--new-tokens", "0"],
                                  ["bench", "--preset", "tiny", "--gamma", "0"],
                                  _generate("--gamma", "0")])
def test_bad_numbers_are_one_line_errors(capsys, argv, tmp_path):
    assert main(argv + (["--out-dir", str(tmp_path)] if argv[0] == "bench" else [])) \
        == EXIT_USER_ERROR
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bench_gamma_beyond_the_longest_draft_is_named_without_auto(capsys, tmp_path):
    """bench's --gamma takes no 'auto' (generate's does): its message must not offer one."""
    argv = ["bench", "--preset", "tiny", "--gamma", "40", "--out-dir", str(tmp_path)]
    assert main(argv) == EXIT_USER_ERROR
    assert capsys.readouterr().err.strip() == "hippo bench: error: --gamma must be at most 32, got 40"


@pytest.mark.parametrize("dataset", ["mlvu", "lvbench"])
def test_bench_runs_a_benchmark_set_from_a_local_copy(capsys, tmp_path, dataset):
    """The set's published layout (a fixture), one video present and the others missing: the
    present one runs through AR and HIPPO with matching outputs, the rest are skipped."""
    import shutil

    from hippo.assets import make_synthetic_video
    from hippo.bench.datasets import read_dataset

    root = tmp_path / dataset
    shutil.copytree(Path(__file__).parent / "fixtures" / "datasets" / dataset, root)
    questions = read_dataset(dataset, root)
    make_synthetic_video(questions[0].video, num_frames=8, height=56, width=56, fps=4.0)
    argv = ["bench", "--dataset", dataset, "--root", str(root), "--max-new-tokens", "8",
            "--num-frames", "4", "--out-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / f"{dataset}.json").read_text())
    summary = report["summary"]
    present = sum(1 for q in questions if q.video == questions[0].video)
    assert summary["run"] == present and summary["skipped"] == len(questions) - present
    assert summary["all_matched_ar"] is True and summary["MAT"] >= 1.0
    from hippo.bench.datasets import chosen_letter

    graded = [row["correct"] for row in report["rows"] if row.get("correct") is not None]
    assert summary["accuracy"] == (round(sum(graded) / len(graded), 3) if graded else None)
    for row in report["rows"]:  # graded against the set's answer, not only summed
        if row.get("correct") is not None:
            assert row["correct"] == (chosen_letter(row["answer"]) == row["expected"])
    out = capsys.readouterr().out
    assert "| question | task |" in out and "| dataset |" in out  # the rows, then the summary


def test_a_benchmark_set_decodes_a_video_once_for_its_questions(tmp_path, monkeypatch):
    """Video-MME asks several questions about each clip, listed together: the clip is decoded
    and embedded once for them, and every row is what it is with the clip decoded anew."""
    import shutil

    from hippo.assets import synthetic_frames, write_video
    from hippo.bench import dataset_runner
    from hippo.bench.datasets import read_dataset

    root = tmp_path / "videomme"
    shutil.copytree(Path(__file__).parent / "fixtures" / "datasets" / "videomme", root)
    questions = read_dataset("videomme", root)
    frames = synthetic_frames(8, 56, 56)
    for index, video in enumerate(sorted({question.video for question in questions})):
        write_video(video, frames if index == 0 else 255 - frames, fps=4.0)
    decoded = []
    load_video = dataset_runner.load_video
    monkeypatch.setattr(dataset_runner, "load_video",
                        lambda path, **kwargs: decoded.append(path) or load_video(path, **kwargs))

    def run() -> list[dict]:
        _, rows = dataset_runner.run_benchmark_set(
            "videomme", str(root), target="tiny-qwen2.5-vl", draft="tiny-qwen2.5-vl-draft",
            max_new_tokens=6, num_frames=4, progress=False)
        return [{key: row[key] for key in ("question", "tokens", "answer", "matched_ar")}
                for row in rows]

    reused = run()
    assert [path.name for path in decoded] == ["fFjv93ACGo8.mp4", "Bq7DMH3Mx-A.mp4"]
    # A LastVideo that forgets its key: every question decodes its clip anew.
    monkeypatch.setattr(dataset_runner.LastVideo, "key",
                        property(lambda self: None, lambda self, value: None), raising=False)
    decoded.clear()
    assert run() == reused and len(decoded) == len(questions) == 3


def test_generate_reads_the_questions_from_stdin(capsys, monkeypatch):
    """--prompt -: one question per non-blank line of stdin, each answered as it is read (the
    video decoded, embedded and prefilled once), as the same questions given by --prompt."""
    import io

    questions = ["what moves?", "what colour is it?"]
    several = [argument for question in questions for argument in ("--prompt", question)]
    argv = _generate("--json", "--gamma", "2")
    at = argv.index("--prompt")
    given = [*argv[:at], *several, *argv[at + 2:]]
    assert main(given) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    monkeypatch.setattr(sys, "stdin", io.StringIO("what moves?\n\n   \nwhat colour is it?\r\n"))
    from_stdin = [*argv[:at], "--prompt", "-", *argv[at + 2:]]
    assert main(from_stdin) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["prompt"] for a in answers] == questions
    assert [a["tokens"] for a in answers] == [a["tokens"] for a in expected]
    assert answers[1]["stats"]["reused_prompt_tokens"] > 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("what moves?\nbad \udc80 bytes\n"))
    assert main(from_stdin) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1  # the first was answered before the bad line
    assert "a question read from stdin is not valid UTF-8" in captured.err
    _assert_one_line_error(capsys, [*from_stdin, "--prompt", "why?"],
                           "--prompt - reads the questions from stdin: give no other --prompt")


def test_generate_asks_for_each_question_at_a_terminal(capsys, monkeypatch):
    """At a terminal, "> " on stderr says the next question is awaited (stdout keeps the
    answers alone); from a pipe or a file nothing is written between them."""
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    argv = _generate("--mode", "ar", pair=PAIR[:2])
    argv[argv.index("what moves?")] = "-"
    monkeypatch.setattr(sys, "stdin", Terminal("what moves?\nwhy?\n"))
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err.count("> ") == 3  # before each question, and before the end of input
    assert captured.out.count("\n") == 2  # the two answers' lines, nothing else


def test_bench_runs_a_question_whose_video_is_a_folder_of_frames(capsys, tmp_path, monkeypatch):
    """MVBench's episodic_reasoning clips are folders of JPEG frames in the official layout."""
    from PIL import Image

    from hippo.assets import synthetic_frames
    from hippo.bench import dataset_runner

    samplings = []

    def recording_load_video(*args, **kwargs):
        samplings.append(kwargs.get("sampling"))
        return load_video(*args, **kwargs)

    load_video = dataset_runner.load_video
    monkeypatch.setattr(dataset_runner, "load_video", recording_load_video)

    root = tmp_path / "mvbench"
    (root / "json").mkdir(parents=True)
    (root / "json" / "episodic_reasoning.json").write_text(json.dumps([{
        "video": "s01e02_seg02_clip_03", "question": "Who speaks first?",
        "candidates": ["Ross", "Rachel"], "answer": "Rachel", "start": 1.0, "end": 3.0}]))
    folder = root / "video" / "tvqa" / "frames_fps3_hq" / "s01e02_seg02_clip_03"
    folder.mkdir(parents=True)
    for index, frame in enumerate(synthetic_frames(12, 56, 56)):  # 4 s at 3 frames per second
        Image.fromarray(frame).save(folder / f"{index + 1:05d}.jpg")
    argv = ["bench", "--dataset", "mvbench", "--root", str(root), "--max-new-tokens", "6",
            "--num-frames", "4", "--out-dir", str(tmp_path / "out")]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "mvbench.json").read_text())["summary"]
    assert summary["run"] == 1 and summary["all_matched_ar"] is True
    assert samplings == ["segment_midpoints"]  # MVBench's own rule reaches the video loader
    # Its rows bound the clip (seconds 1 to 3: frames 3 to 8); 7 frames repeat some of the six
    # (as MVBench's own code does); a window past the clip's 4 s skips the question.
    argv[argv.index("4")] = "7"
    assert main(argv) == 0
    (root / "json" / "episodic_reasoning.json").write_text(json.dumps([{
        "video": "s01e02_seg02_clip_03", "question": "Who speaks first?",
        "candidates": ["Ross", "Rachel"], "answer": "Rachel", "start": 5.0, "end": 9.0}]))
    assert main(argv) == EXIT_USER_ERROR
    report = json.loads((tmp_path / "out" / "mvbench.json").read_text())
    assert "the window 5-9 s starts after the video ends (4 s)" in report["rows"][0]["skipped"]


def test_a_benchmark_set_with_no_runnable_question_is_an_error(capsys, tmp_path):
    """Every video missing: the skipped rows are still written, and the run fails."""
    import shutil

    root = tmp_path / "mlvu"
    shutil.copytree(Path(__file__).parent / "fixtures" / "datasets" / "mlvu", root)
    argv = ["bench", "--dataset", "mlvu", "--root", str(root), "--out-dir", str(tmp_path / "out")]
    assert main(argv) == EXIT_USER_ERROR
    assert "none of the" in capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "mlvu.json").read_text())["summary"]
    assert summary["run"] == 0 and summary["all_matched_ar"] is None


def test_a_benchmark_set_with_no_questions_is_an_error(capsys, tmp_path):
    """An annotation file without a multiple-choice question (an empty list) exited 0 with an
    all-n/a summary."""
    root = tmp_path / "mvbench"
    (root / "json").mkdir(parents=True)
    (root / "json" / "action_sequence.json").write_text("[]")
    argv = ["bench", "--dataset", "mvbench", "--root", str(root), "--out-dir", str(tmp_path / "out")]
    assert main(argv) == EXIT_USER_ERROR
    assert "hold no multiple-choice question" in capsys.readouterr().err


BAD_OPTIONS = {  # argv, what the one-line error says
    "unknown_device": (_generate("--device", "gpu"), "unknown device"),
    "meta_device": (_generate("--device", "meta"), "not supported"),
    "unknown_draft_device": (_generate("--draft-device", "banana"), "unknown device"),
    "demo_unknown_device": (["demo", "--device", "foo"], "unknown device"),
    "tiny_temperature": (_generate_ar("--temperature", "1e-45"), "--temperature 1e-45"),
    "nan_temperature": (_generate("--temperature", "nan"), "temperature"),
    "seed_out_of_range": (_generate("--temperature", "1", "--seed", "99999999999999999999"),
                          "seed"),
    "bench_negative_frames": (["bench", "--preset", "tiny", "--frames", "-1"], "--frames"),
    "bench_zero_frames": (["bench", "--preset", "tiny", "--frames", "0"], "--frames"),
    "bench_infinite_eps": (["bench", "--preset", "tiny", "--eps", "inf"], "eps"),
    "demo_infinite_eps": (["demo", "--eps", "inf"], "eps"),
    "frames_and_fps": (_generate("--fps", "1"), "--frames or --fps, not both"),
    "window_reversed": (_generate("--start", "3", "--end", "1"), "ends (1 s) before it starts"),
    "window_past_the_video": (_generate("--start", "60"), "starts after the video ends (4 s)"),
    # Finite, but times the frame rate beyond a float: an OverflowError traceback before.
    "window_far_past_the_video": (_generate("--start", "1e308"), "starts after the video ends"),
    "negative_start": (_generate("--start", "-1"), "--start must be a number of seconds >= 0"),
    "infinite_end": (_generate("--end", "inf"), "--end must be a number of seconds >= 0"),
    "window_too_short": (_generate("--start", "1", "--end", "1.5"), "holds 2 frames, 4 requested"),
    "top_k_when_greedy": (_generate("--top-k", "3"), "--top-k applies only to sampling"),
    "top_p_when_greedy": (_generate_ar("--top-p", "0.5"), "--top-p applies only to sampling"),
    # Options of the other kind of bench run are refused, not ignored.
    "bench_preset_options_with_a_dataset": (
        ["bench", "--dataset", "mlvu", "--root", ".", "--preset", "tiny", "--frames", "8"],
        "--preset, --frames apply only to a preset run"),
    "bench_dataset_options_without_one": (["bench", "--preset", "tiny", "--num-frames", "4"],
                                          "--num-frames applies only to --dataset runs"),
    "bench_draft_priority_with_a_dataset": (
        ["bench", "--dataset", "mlvu", "--root", ".", "--draft-priority"],
        "--draft-priority applies only to a preset run"),
    "bench_gemm_prologues_with_a_dataset": (
        ["bench", "--dataset", "mlvu", "--root", ".", "--gemm-prologues", "both"],
        "--gemm-prologues applies only to a preset run"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options_are_one_line_errors(capsys, tmp_path, case):
    argv, needle = BAD_OPTIONS[case]
    if argv[0] == "bench":
        argv = argv + ["--out-dir", str(tmp_path / "out")]
    _assert_one_line_error(capsys, argv, needle)


@pytest.mark.parametrize("error", ["cuda", "python", "torch_host", "kernel", "cublas"])
def test_out_of_memory_is_a_one_line_error(capsys, monkeypatch, error):
    """A model, cache or video too large for the device is the user's choice of sizes."""
    import torch

    from hippo.pipeline import HippoPipeline

    def exhausted(*args, **kwargs):
        if error == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\n"
                                         "GPU 0 has a total capacity of 79.19 GiB")
        if error == "python":
            raise MemoryError()
        if error == "torch_host":  # what the CPU allocator raises: a plain RuntimeError
            torch.empty(2**61, dtype=torch.uint8)
        raise RuntimeError({"kernel": "CUDA error: out of memory\nCUDA kernel errors might be",
                            "cublas": "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                                      "cublasCreate(handle)"}[error])

    monkeypatch.setattr(HippoPipeline, "generate", exhausted)
    _assert_one_line_error(capsys, _generate(), "out of memory")


def test_other_runtime_errors_are_not_disguised(monkeypatch):
    from hippo.pipeline import HippoPipeline

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(HippoPipeline, "generate", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(_generate())


def test_cuda_device_without_a_gpu_is_a_one_line_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _assert_one_line_error(capsys, _generate("--device", "cuda"), "no CUDA GPU")
    _assert_one_line_error(capsys, ["demo", "--device", "cuda:3"], "no CUDA GPU")


def test_bench_out_dir_that_is_a_file_is_a_one_line_error(capsys, tmp_path):
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder")
    _assert_one_line_error(capsys, ["bench", "--preset", "tiny", "--out-dir", str(taken)],
                           "--out-dir")


def test_the_hippo_command_is_installed():
    """`pip install .` puts a `hippo` executable beside the interpreter (the console script);
    running it shows the three subcommands."""
    import subprocess
    import sys
    from importlib import metadata

    try:
        metadata.distribution("hippo")
    except metadata.PackageNotFoundError:
        pytest.skip("hippo is not pip-installed here (an in-place build, as on the GPU machine)")
    script = Path(sys.executable).with_name("hippo")
    assert script.exists(), f"no {script}: reinstall with pip install --no-build-isolation -e ."
    help_text = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                               timeout=120, check=True).stdout
    assert all(command in help_text for command in ("demo", "generate", "bench"))


def test_a_corrupt_video_prints_one_line_even_from_native_code(capfd, tmp_path):
    """The decoders' native loggers (decord's C++ one, FFmpeg's) write to file descriptor 2
    directly, past sys.stderr: at the descriptor level too the error is one line."""
    corrupt = tmp_path / "zeros.mp4"
    corrupt.write_bytes(b"\x00" * 64)
    assert main(["generate", "--target", "tiny-qwen2.5-vl", "--video", str(corrupt),
                 "--prompt", "hi"]) == EXIT_USER_ERROR
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hippo generate: error:"), err


def test_one_line_joins_an_error_s_lines_and_cuts_long_ones():
    from hippo.cli import _one_line

    # transformers' validation errors name the field on one line and the reason on the next.
    error = ValueError("Validation error for field 'hidden_size':\n  TypeError: expected int, got str\n")
    assert _one_line(error) == "Validation error for field 'hidden_size': TypeError: expected int, got str"
    long = _one_line(RuntimeError("x" * 5000))
    assert len(long) == 600 and long.endswith("...")
    assert _one_line(KeyError()) == "KeyError"


@pytest.mark.parametrize("option", ["--methods", "--frames", "--eps"])
def test_a_list_option_given_no_values_is_refused(capsys, option):
    """`--methods` with nothing after it used to run every method: an empty list is a mistake."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--preset", "tiny", option])
    assert exit_info.value.code == 2
    assert f"argument {option}: expected at least one argument" in capsys.readouterr().err


@pytest.mark.parametrize("sampling", [("--temperature", "0.7"), ()])
@pytest.mark.parametrize("mode", ["ar", "sequential"])
def test_non_finite_logits_are_a_one_line_error(capsys, monkeypatch, mode, sampling):
    """A checkpoint whose logits overflow (fp16 is the usual cause) can neither be sampled from
    nor decoded greedily (the argmax of NaNs is token 0): one line that says so, in AR and in
    speculative decoding alike."""
    import hippo.models

    load = hippo.models.load_adapter

    def overflowing(*args, **kwargs):
        adapter = load(*args, **kwargs)
        adapter.lm_head.weight.data.fill_(float("nan"))
        return adapter

    monkeypatch.setattr(hippo.models, "load_adapter", overflowing)
    argv = _generate_ar(*sampling) if mode == "ar" else \
        _generate(*sampling, "--mode", mode, "--gamma", "3")
    _assert_one_line_error(capsys, argv, "next-token logits after the prompt are not finite")


def test_a_draft_whose_logits_are_not_finite_is_a_one_line_error_when_sampling(capsys,
                                                                               monkeypatch):
    """The target's logits are finite (its prefill passes the check), the draft's are NaN:
    sampling, the round that tests its first candidate names the draft and that token (the
    second new one); greedy, its proposals are only rejected, and the output is the target's."""
    import hippo.models

    load = hippo.models.load_adapter

    def draft_overflowing(name, *args, **kwargs):
        adapter = load(name, *args, **kwargs)
        if name == PAIR[3]:
            adapter.lm_head.weight.data.fill_(float("nan"))
        return adapter

    assert main(_generate_ar("--max-new-tokens", "8")) == 0
    expected = capsys.readouterr().out
    monkeypatch.setattr(hippo.models, "load_adapter", draft_overflowing)
    _assert_one_line_error(capsys, _generate("--temperature", "0.7", "--mode", "sequential",
                                             "--gamma", "3"),
                           "the draft's next-token logits are not finite (NaN or inf, "
                           "torch.float32) at new token 2")
    assert main(_generate("--mode", "sequential", "--gamma", "3", "--max-new-tokens", "8")) == 0
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize("sampling", [("--temperature", "0.7"), ()])
@pytest.mark.parametrize("mode", ["ar", "parallel"])
def test_logits_turning_non_finite_mid_generation_are_a_one_line_error(capsys, monkeypatch, mode,
                                                                         sampling):
    """The prompt's logits are finite, the target's turn NaN from its third step on: greedy
    decoding printed token 0 for ever and exited 0; now one line names the model and the
    token."""
    import hippo.models
    from hippo.runtime.decoder import LanguageModelRuntime

    load, targets = hippo.models.load_adapter, []

    def recorded(name, *args, **kwargs):
        adapter = load(name, *args, **kwargs)
        if name == PAIR[1]:
            targets.append(adapter)
        return adapter

    step, calls = LanguageModelRuntime.step, []

    def spoilt_step(self, *args, **kwargs):
        logits = step(self, *args, **kwargs)
        if self.lm_head is targets[0].lm_head:
            calls.append(1)
            if len(calls) >= 3:
                logits = torch.full_like(logits, float("nan"))
        return logits

    monkeypatch.setattr(hippo.models, "load_adapter", recorded)
    monkeypatch.setattr(LanguageModelRuntime, "step", spoilt_step)
    argv = _generate_ar(*sampling) if mode == "ar" else _generate(*sampling, "--mode", mode)
    whose = "the model's" if mode == "ar" else "the target's"
    _assert_one_line_error(capsys, argv, f"{whose} next-token logits are not finite")


@pytest.mark.parametrize("argv, needle", [
    (_generate("--gamma", "abc"), "argument --gamma: must be 'auto' or a positive integer"),
    (_generate("--frames", "many"), "argument --frames: invalid int value: 'many'"),
    (_generate("--dtype", "int8"), "argument --dtype: invalid choice: 'int8'"),
    (["generate", *PAIR, "--prompt", "hi"], "the following arguments are required: --video"),
    (["bench", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
])
def test_argument_errors_are_one_line_without_the_usage_block(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"hippo {argv[0]}: error: {needle}") and err.endswith(
        f"; see hippo {argv[0]} -h\n"), err


def test_a_progress_bar_leaves_no_trace_before_the_error_line(capsys, monkeypatch):
    """stderr captured here, as in a log or a pipe: no bar is drawn where no terminal shows it,
    and an error raised while a method runs is the only line."""
    from hippo.errors import HippoError
    from hippo.pipeline import HippoPipeline

    def failing(*args, **kwargs):
        raise HippoError("the method failed")

    monkeypatch.setattr(HippoPipeline, "generate", failing)
    _assert_one_line_error(capsys, ["demo", "--frames", "2", "--max-new-tokens", "4"],
                           "the method failed")
    _assert_one_line_error(capsys, ["demo", "--frames", "2", "--max-new-tokens", "0"],
                           "--max-new-tokens must be at least 1, got 0")


def _mvbench_copy(root: Path) -> Path:
    """An MVBench layout with one question on a 56x56 clip of 8 frames."""
    from hippo.assets import make_synthetic_video

    (root / "json").mkdir(parents=True)
    (root / "json" / "action_count.json").write_text(json.dumps([{
        "video": "a.mp4", "question": "How many?", "candidates": ["1", "2"], "answer": "2"}]))
    make_synthetic_video(root / "video" / "perception" / "videos" / "a.mp4", num_frames=8,
                         height=56, width=56, fps=4.0)
    return root


def test_a_question_whose_context_overflows_is_skipped_not_fatal(capsys, tmp_path):
    """The context check runs where the runner skips unrunnable questions: the set's report is
    written, and the one error line (no bar before it) says why none could run."""
    root = _mvbench_copy(tmp_path / "mvbench")
    argv = ["bench", "--dataset", "mvbench", "--root", str(root), "--num-frames", "2",
            "--max-new-tokens", "40000", "--out-dir", str(tmp_path / "out")]
    _assert_one_line_error(capsys, argv, "none of the 1 questions could be run; the first: "
                                         "context too long")
    [row] = json.loads((tmp_path / "out" / "mvbench.json").read_text())["rows"]
    assert row["skipped"].startswith("context too long"), row


def _frame_folder(folder: Path) -> Path:
    from PIL import Image

    from hippo.assets import synthetic_frames

    folder.mkdir()
    for index, frame in enumerate(synthetic_frames(4, 56, 56)):
        Image.fromarray(frame).save(folder / f"{index:03d}.png")
    return folder


@pytest.fixture
def no_model_loads(monkeypatch):
    """load_adapter fails the test if called: for checks that must come before any model loads
    (a 7B one takes minutes)."""
    import hippo.models

    def load_adapter(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(hippo.models, "load_adapter", load_adapter)


CHECKED_BEFORE_LOADING = {  # argv, what the one-line error says (the flag, not the API's name)
    "top_p": (_generate("--temperature", "1", "--top-p", "2"), "--top-p must be in (0, 1]"),
    "top_k": (_generate("--temperature", "1", "--top-k", "-1"), "--top-k must be >= 0"),
    "temperature": (_generate("--temperature", "-1"), "--temperature must be >= 0"),
    "keep_ratio": (_generate("--keep-ratio", "2"), "--keep-ratio must be a number in [0, 1]"),
    "gamma": (_generate("--gamma", "40"), "--gamma must be 'auto' or an int in 1..32"),
    "max_new_tokens": (_generate("--max-new-tokens", "0"), "--max-new-tokens must be at least 1"),
    "frames": (_generate("--frames", "0"), "--frames must be at least 1, got 0"),
    "fps": (["generate", *PAIR, "--video", str(sample_video_path()), "--prompt", "hi", "--fps",
             "0"], "--fps must be a positive number"),
    "window": (_generate("--start", "3", "--end", "1"), "ends (1 s) before it starts"),
    "missing_video": (["generate", *PAIR, "--video", "/no/such/clip.mp4", "--prompt", "hi"],
                      "video file not found: /no/such/clip.mp4"),
    "missing_draft": (_generate(pair=["--target", "tiny-qwen2.5-vl", "--draft", "/no/draft"]),
                      "--draft /no/draft: no such checkpoint directory"),
    "missing_target": (_generate(pair=["--target", "/no/target"]),
                       "--target /no/target: no such checkpoint directory"),
    # Options that contradict the run asked for are refused, not ignored.
    "seed_when_greedy": (_generate("--seed", "3"), "--seed applies only to sampling"),
    "draft_options_with_ar": (
        _generate("--mode", "ar", "--gamma", "3", "--keep-ratio", "0.2", "--selection", "uniform",
                  "--draft-prefill", "full+compact", "--draft-device", "cpu", "--draft-priority"),
        "--draft, --draft-device, --gamma, --draft-prefill, --draft-priority, --keep-ratio, "
        "--selection apply only to speculative decoding (--mode sequential or parallel), "
        "not --mode ar"),
    "gamma_with_ar": (_generate_ar("--gamma", "3"), "--gamma applies only to speculative"),
    "step_invariance_with_gemm_prologues": (
        _generate("--step-invariant", "--gemm-prologues", "draft"),
        "--step-invariant cannot be combined with --gemm-prologues 'draft'"),
    "draft_gemm_prologues_with_ar": (_generate_ar("--gemm-prologues", "draft"),
                                     "--gemm-prologues draft applies only to speculative"),
    # Options that only a draft model of its own uses, without one (self-speculation).
    "draft_device_without_draft": (_generate("--draft-device", "cpu", pair=PAIR[:2]),
                                   "a draft device needs a draft model"),
    "full_draft_prefill_without_draft": (_generate("--draft-prefill", "full+compact",
                                                   pair=PAIR[:2]),
                                         "--draft-prefill does not apply"),
}


@pytest.mark.parametrize("case", list(CHECKED_BEFORE_LOADING))
def test_generate_checks_its_options_before_loading_a_model(capsys, no_model_loads, case):
    argv, needle = CHECKED_BEFORE_LOADING[case]
    _assert_one_line_error(capsys, argv, needle)


def test_late_library_errors_name_the_flags(capsys, tmp_path):
    """Errors raised once frames or models are at hand name the flags too."""
    no_rate = ["generate", *PAIR, "--video", str(_frame_folder(tmp_path / "frames")),
               "--prompt", "hi", "--fps", "1"]
    _assert_one_line_error(capsys, no_rate, "sample it with --frames instead of --fps")
    _assert_one_line_error(capsys, _generate("--max-new-tokens", "40000"),
                           "ask for fewer frames (--frames, a lower --fps or a time window)")


def test_quoted_library_messages_keep_their_words(capsys, tmp_path):
    """Another library's message that hippo's quotes is not hippo's API: its words stay (the
    UTF-8 decoder's "invalid start byte" read "invalid --start byte")."""
    checkpoint = tmp_path / "latin1"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_bytes(b'\xff{"model_type": "qwen2_5_vl"}')
    argv = ["generate", "--target", str(checkpoint), "--video", str(sample_video_path()),
            "--prompt", "hi", "--mode", "ar"]
    _assert_one_line_error(capsys, argv, "invalid start byte")
    from hippo.cli import _with_flag_names

    flags = {"start": "--start", "fps": "--fps"}
    assert _with_flag_names("start must be >= 0: invalid start byte, fps", flags,
                            verbatim="invalid start byte") == \
        "--start must be >= 0: invalid start byte, --fps"


def test_a_preset_bench_names_its_own_flags(capsys, tmp_path):
    """A preset run's token count is --new-tokens: --max-new-tokens is a --dataset run's, refused
    in a preset run, so the message must not send the user there."""
    argv = ["bench", "--preset", "tiny", "--frames", "1", "--eps", "0.1", "--new-tokens",
            "1000000000", "--methods", "hippo_ar", "--out-dir", str(tmp_path)]
    _assert_one_line_error(capsys, argv, "(prompt plus --new-tokens)")


def test_a_preset_bench_error_is_one_line_after_its_progress_bar(capsys, monkeypatch, tmp_path):
    """stderr captured, as in a log: the preset bench draws no bar there, so the error stands
    alone."""
    from hippo.errors import HippoError
    from hippo.pipeline import HippoPipeline

    def failing(*args, **kwargs):
        raise HippoError("the method failed")

    monkeypatch.setattr(HippoPipeline, "generate_prepared", failing)
    _assert_one_line_error(capsys, ["bench", "--preset", "tiny", "--frames", "1", "--eps", "0.1",
                                    "--new-tokens", "4", "--out-dir", str(tmp_path)],
                           "the method failed")


def test_an_out_dir_that_takes_no_files_is_refused_before_the_run(capsys, monkeypatch, tmp_path):
    """A folder that exists but cannot be written (read-only, another user's) failed only when
    the report was written, after the whole benchmark, without naming --out-dir."""
    import tempfile

    from hippo.bench import end_to_end

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def never(*args, **kwargs):
        raise AssertionError("the benchmark ran before --out-dir was checked")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(end_to_end, "run_end_to_end", never)
    _assert_one_line_error(capsys, ["bench", "--preset", "tiny", "--out-dir", str(tmp_path)],
                           f"--out-dir {tmp_path}: cannot write there (Permission denied)")


def test_flag_names_leave_paths_and_longer_names_alone():
    from hippo.cli import _with_flag_names

    flags = {"fps": "--fps", "gamma": "--gamma", "num_frames": "--frames"}
    assert _with_flag_names("cannot decode /data/fps/gamma.mp4 or 'fps': num_frames, a lower "
                            "fps; max_gamma", flags) == \
        "cannot decode /data/fps/gamma.mp4 or 'fps': --frames, a lower --fps; max_gamma"


def test_the_demo_says_how_many_frames_its_video_has(capsys):
    _assert_one_line_error(capsys, ["demo", "--frames", "100"],
                           "the demo's sample video has 16 frames: ask for at most 16 (--frames), "
                           "got 100")


def test_the_demo_takes_all_of_its_sample_video_s_frames():
    """--frames 16 (the default) is the whole clip, not one too many."""
    from hippo.assets import SAMPLE_FRAMES
    from hippo.demo import _sample_video

    assert _sample_video(SAMPLE_FRAMES).shape[0] == SAMPLE_FRAMES == 16


def test_each_demo_method_runs_as_labelled_with_the_keep_ratio_asked_for():
    from hippo.demo import METHODS, _configured
    from hippo.models import load_adapter
    from hippo.pipeline import HippoPipeline

    base = HippoPipeline(load_adapter("tiny-qwen2.5-vl"), load_adapter("tiny-qwen2.5-vl-draft"))
    configured = {label: _configured(base, options, 0.25).options for label, options in METHODS}
    assert {label: (o.mode, o.gamma) for label, o in configured.items()} == {
        "AR (target alone)": ("ar", "auto"), "sequential SD": ("sequential", 6),
        "HIPPO (parallel)": ("parallel", "auto")}
    assert all(o.preservation.keep_ratio == 0.25 for o in configured.values())
    assert base.options.preservation.keep_ratio != 0.25  # the base pipeline is left as it was


def test_an_unwritable_cache_folder_is_named(capsys, tmp_path, monkeypatch):
    """$HIPPO_CACHE_DIR below a regular file: the sample video cannot be written there."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("HIPPO_CACHE_DIR", str(tmp_path / "a_file" / "sub"))
    _assert_one_line_error(capsys, ["demo", "--frames", "2"],
                           "cannot write the sample video " + str(tmp_path / "a_file" / "sub"))
    assert main(["demo", "--frames", "2"]) == EXIT_USER_ERROR
    assert "(Not a directory): point $HIPPO_CACHE_DIR at a writable folder" in \
        capsys.readouterr().err


def test_a_hippo_ext_that_does_not_import_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "hippo_ext", None)  # import hippo_ext raises ImportError
    assert main(["info"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("hippo: error: ") and len(err.strip().splitlines()) == 1


def test_tables_show_rates_over_nothing_as_n_a():
    from hippo.report import markdown_table

    table = markdown_table([{"method": "AR", "MAT": 1.0, "acceptance": None},
                            {"method": "HIPPO", "MAT": 2.5, "acceptance": 0.8, "speedup": 1.4}])
    assert table.splitlines() == ["| method | MAT | acceptance | speedup |", "|---|---|---|---|",
                                  "| AR | 1.0 | n/a |  |", "| HIPPO | 2.5 | 0.8 | 1.4 |"]
    assert markdown_table([]) == ""


def test_a_stats_row_by_hand():
    """The demo's table row: each column from the statistics, in order, rounded as labelled,
    and the decode speedup as the baseline's time per token over the row's."""
    from hippo.report import in_ms, ratio, rounded, stats_row
    from hippo.speculative.statistics import GenerationStats

    stats = GenerationStats("parallel", tokens=11, target_steps=3, drafted=9, accepted=7, prefill_s=0.01234,
                            selection_s=0.0004567, draft_prefill_s=0.00321, draft_s=0.04567,
                            verify_s=0.07891, decode_s=0.123456, total_s=0.75)
    baseline = GenerationStats("ar", tokens=11, decode_s=0.3, total_s=0.5)
    row = stats_row("HIPPO", stats, baseline, gamma=4)
    assert list(row.items()) == [
        ("method", "HIPPO"), ("gamma", 4), ("tokens", 11), ("MAT", 3.33), ("acceptance", 0.778),
        ("prefill ms", 12.3), ("selection ms", 0.46), ("draft prefill ms", 3.2),
        ("draft ms", 45.7), ("verify ms", 78.9), ("decode ms/token", 12.346),
        ("tokens/s", 14.7), ("decode speedup", 2.43)]
    # AR over one token: the rates over nothing are None (n/a in a table), no speedup column
    # without a baseline.
    alone = stats_row("AR", GenerationStats("ar", tokens=1, total_s=0.5))
    assert (alone["MAT"], alone["acceptance"], alone["decode ms/token"]) == (None, None, None)
    assert "decode speedup" not in alone
    assert (rounded(None), rounded(2.345678), rounded(2.345678, 3)) == (None, 2.35, 2.346)
    assert (in_ms(None), in_ms(0.0123456), in_ms(0.0123456, 1)) == (None, 12.346, 12.3)
    assert (ratio(3.0, 0.7), ratio(3.0, 0.7, 3), ratio(None, 1.0), ratio(1.0, None),
            ratio(1.0, 0.0), ratio(0.0, 2.0)) == (4.29, 4.286, None, None, None, 0.0)


def test_generate_prints_the_text_and_a_stats_line(capsys):
    """Without --json: the text on stdout, and one line of counts and rates on stderr (the text
    alone can be piped on); rates over nothing (AR's acceptance) read n/a."""
    argv = _generate("--mode", "sequential", "--gamma", "3")
    assert main([*argv, "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{run['text']}\n"
    stats = run["stats"]
    line = captured.err.strip()
    ended = run["finish_reason"].replace("_", " ")
    assert line.startswith(f"{stats['tokens']} tokens (ended by {ended}), "
                           f"MAT {stats['mean_accepted_tokens']:.2f}, "
                           f"acceptance {stats['acceptance_rate']:.2f}, "), line
    assert "tokens/s (sequential; prefill " in line and line.endswith(" ms)"), line
    assert main(_generate_ar()) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and ", MAT 1.00, acceptance n/a, " in captured.err
    assert "(ar; prefill " in captured.err


def test_gamma_auto_is_a_draft_option(capsys, no_model_loads):
    """--gamma auto is given like a number: taken for speculative decoding, refused with --mode
    ar (where it would do nothing) like any other --gamma."""
    from hippo.cli import _checked_generate_options, _parser

    options = _checked_generate_options(_parser().parse_args(_generate("--gamma", "auto")))
    assert options.gamma == "auto"
    assert _checked_generate_options(_parser().parse_args(_generate("--gamma", "5"))).gamma == 5
    _assert_one_line_error(capsys, _generate_ar("--gamma", "auto"),
                           "--gamma applies only to speculative decoding")


def test_generate_with_gamma_auto_matches_ar(capsys):
    assert main(_generate("--json", "--gamma", "auto", "--mode", "sequential")) == 0
    auto = json.loads(capsys.readouterr().out)["tokens"]
    assert main(_generate_ar("--json")) == 0
    assert auto == json.loads(capsys.readouterr().out)["tokens"]


def test_a_target_without_a_tokenizer_is_a_one_line_error(capsys, monkeypatch):
    """hippo generate encodes --prompt: a checkpoint without a tokenizer is named, not a
    traceback from encoding with None."""
    import hippo.models

    load = hippo.models.load_adapter

    def without_tokenizer(*args, **kwargs):
        adapter = load(*args, **kwargs)
        adapter.tokenizer = None
        return adapter

    monkeypatch.setattr(hippo.models, "load_adapter", without_tokenizer)
    _assert_one_line_error(capsys, _generate_ar(), "tiny-qwen2.5-vl has no tokenizer")


def test_defaults_of_demo_and_generate(monkeypatch):
    """What a command runs with when an option is left out (the defaults its -h promises)."""
    import hippo.demo
    from hippo.errors import HippoError
    from hippo.pipeline import HippoPipeline

    calls = []
    monkeypatch.setattr(hippo.demo, "run_demo", lambda **kwargs: calls.append(kwargs))
    assert main(["demo"]) == 0
    assert calls == [dict(device=None, eps=0.1, frames=16, max_new_tokens=96)]

    def recording(pipeline, video, prompt, max_new_tokens, **kwargs):
        calls.append((pipeline.options.mode, max_new_tokens, kwargs))
        raise HippoError("recorded")

    monkeypatch.setattr(HippoPipeline, "generate", recording)
    assert main(["generate", *PAIR, "--video", str(sample_video_path()), "--prompt", "hi"]) \
        == EXIT_USER_ERROR
    mode, max_new_tokens, kwargs = calls[1]
    assert (mode, max_new_tokens) == ("parallel", 128)
    assert callable(kwargs.pop("on_tokens"))  # the text is streamed
    assert kwargs == dict(num_frames=None, fps=None, start=None, end=None, temperature=0.0,
                          top_k=None, top_p=None, seed=None, stop=None)


def test_a_reader_that_goes_away_ends_the_command_quietly(capsys, monkeypatch, tmp_path):
    """`hippo ... | head`: exit status 1, no error line, and stdout pointed at /dev/null so that
    flushing it at exit does not fail again."""
    import os

    import hippo.info

    def broken_pipe():
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(hippo.info, "print_report", broken_pipe)
    with open(tmp_path / "stdout", "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        saved = os.dup(stdout.fileno())
        try:
            assert main(["info"]) == 1
            now, null = os.fstat(stdout.fileno()), os.stat(os.devnull)
            assert (now.st_dev, now.st_ino) == (null.st_dev, null.st_ino)
        finally:
            os.dup2(saved, stdout.fileno())
            os.close(saved)
    assert capsys.readouterr().err == ""


def test_an_interrupt_exits_with_status_130(capsys, monkeypatch):
    """Ctrl-C: the shell's convention (128 + SIGINT), no traceback."""
    import hippo.info

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(hippo.info, "print_report", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err == ""


def test_each_command_names_its_own_flags(capsys, monkeypatch, tmp_path):
    """A library message's max_new_tokens is generate's --max-new-tokens (a preset bench's
    --new-tokens), its num_frames a benchmark set run's --num-frames (generate's --frames)."""
    from hippo.errors import HippoError
    from hippo.pipeline import HippoPipeline

    def failing(*args, **kwargs):
        raise HippoError("max_new_tokens and num_frames")

    monkeypatch.setattr(HippoPipeline, "generate", failing)
    _assert_one_line_error(capsys, _generate(), "error: --max-new-tokens and --frames")
    root = _mvbench_copy(tmp_path / "mvbench")
    argv = ["bench", "--dataset", "mvbench", "--root", str(root), "--num-frames", "2",
            "--max-new-tokens", "40000", "--out-dir", str(tmp_path / "out")]
    monkeypatch.undo()
    _assert_one_line_error(capsys, argv, "ask for fewer frames (--num-frames, a lower fps")
    from hippo.cli import _with_flag_names

    # `hippo info` has no flags to name: its messages stay as they are.
    message = "gamma failed (see above): 1 - 2"
    assert _with_flag_names(message, {}) == message


def test_an_error_raised_from_another_quotes_only_what_it_says(capsys, tmp_path):
    """A HippoError raised from an OSError says what it means to (the strerror), without the
    OSError's own text appended."""
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder")
    assert main(["bench", "--preset", "tiny", "--out-dir", str(taken)]) == EXIT_USER_ERROR
    assert capsys.readouterr().err == \
        f"hippo bench: error: --out-dir {taken}: cannot make the folder (File exists)\n"


def test_an_error_of_exactly_the_longest_length_is_not_cut():
    from hippo.cli import _MAX_ERROR_CHARS, _one_line

    assert _one_line(RuntimeError("x" * _MAX_ERROR_CHARS)) == "x" * _MAX_ERROR_CHARS
    assert _one_line(RuntimeError("x" * (_MAX_ERROR_CHARS + 1))).endswith("x...")


def test_the_draft_loads_where_it_runs(monkeypatch):
    """The draft's model loads on --draft-device, else on the target's device (not the default
    one: `--device cpu` on a GPU machine keeps both models on the CPU)."""
    import hippo.models
    from hippo.errors import HippoError

    devices = []

    def recording(name, *args, device=None, **kwargs):
        devices.append((name, device))
        if name == PAIR[3]:  # the draft: recorded, no need to run
            raise HippoError("recorded")
        return load(name, *args, device=device, **kwargs)

    load, resolve = hippo.models.load_adapter, hippo.models.resolve_device
    monkeypatch.setattr(hippo.models, "load_adapter", recording)
    assert main(_generate("--device", "cpu", "--mode", "sequential")) == EXIT_USER_ERROR
    # A second GPU, which a machine without one resolves too here (the draft is not loaded).
    monkeypatch.setattr(hippo.models, "resolve_device",
                        lambda device: torch.device(device) if device == "cuda:1" else resolve(device))
    assert main(_generate("--device", "cpu", "--draft-device", "cuda:1", "--mode", "sequential")) \
        == EXIT_USER_ERROR
    cpu = torch.device("cpu")
    assert devices == [(PAIR[1], cpu), (PAIR[3], cpu), (PAIR[1], cpu),
                       (PAIR[3], torch.device("cuda", 1))]


@pytest.mark.parametrize("gpu", [False, True])
def test_bench_runs_the_preset_asked_for_else_the_device_s(capsys, monkeypatch, tmp_path, gpu):
    """No --preset: 7b with a GPU, tiny without; --preset tiny is tiny on a GPU too; the 7b
    preset on a machine without one is one line that says so, before anything runs. (The GPU is
    simulated: run_end_to_end records the preset it is given.)"""
    from hippo.bench import end_to_end
    from hippo.errors import HippoError

    ran = []

    def recording(preset, **kwargs):
        ran.append(preset)
        raise HippoError("recorded")

    monkeypatch.setattr(end_to_end, "run_end_to_end", recording)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Simulated GPU")
    for preset in ([], ["--preset", "tiny"], ["--preset", "7b"]):
        argv = ["bench", *preset, "--out-dir", str(tmp_path)]
        if preset == ["--preset", "7b"] and not gpu:
            _assert_one_line_error(capsys, argv, "the 7b preset needs a CUDA GPU; use --preset "
                                                 "tiny on a CPU")
            continue
        assert main(argv) == EXIT_USER_ERROR
        name = preset[1] if preset else ("7b" if gpu else "tiny")
        assert ran.pop() is end_to_end.PRESETS[name]
        assert capsys.readouterr().out.startswith(
            f"hippo bench --preset {name}: synthetic agreement pairs (random weights; acceptance "
            f"measured, never faked) on {'Simulated GPU' if name == '7b' else 'CPU'}\n")
    assert ran == []


@pytest.mark.parametrize("option", ["--target", "--draft"])
def test_bench_checks_a_set_s_models_before_loading_them(capsys, no_model_loads, tmp_path, option):
    _assert_one_line_error(capsys, ["bench", "--dataset", "mlvu", "--root", str(tmp_path),
                                    option, "/no/model", "--out-dir", str(tmp_path / "out")],
                           f"{option} /no/model: no such checkpoint directory, nor a preset")


def test_bench_defaults(monkeypatch, tmp_path):
    """What a preset run and a benchmark set run use when their options are left out (the
    defaults -h promises)."""
    from hippo.bench import dataset_runner, end_to_end
    from hippo.bench.end_to_end import METHODS
    from hippo.errors import HippoError

    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        raise HippoError("recorded")

    monkeypatch.setattr(end_to_end, "run_end_to_end", recording)
    monkeypatch.setattr(dataset_runner, "run_benchmark_set", recording)
    assert main(["bench", "--preset", "tiny", "--out-dir", str(tmp_path)]) == EXIT_USER_ERROR
    assert calls.pop() == dict(frames=None, eps_values=None, gamma=12, new_tokens=None,
                               methods=METHODS, keep_ratio=0.1, gemm_prologues="none",
                               draft_priority=False)
    assert main(["bench", "--dataset", "mlvu", "--root", str(tmp_path), "--out-dir",
                 str(tmp_path)]) == EXIT_USER_ERROR
    assert calls.pop() == dict(target="tiny-qwen2.5-vl", draft="tiny-qwen2.5-vl-draft",
                               limit=None, max_new_tokens=64, num_frames=16, keep_ratio=0.1)
    # The bounds themselves are taken: two new tokens, the longest draft.
    assert main(["bench", "--preset", "tiny", "--new-tokens", "2", "--gamma", "32", "--out-dir",
                 str(tmp_path)]) == EXIT_USER_ERROR
    assert (calls[-1]["new_tokens"], calls[-1]["gamma"]) == (2, 32)
    # Values given reach the run as given.
    assert main(["bench", "--preset", "tiny", "--frames", "2", "3", "--eps", "0.5", "--methods",
                 "hippo", "--out-dir", str(tmp_path)]) == EXIT_USER_ERROR
    assert (calls[-1]["frames"], calls[-1]["eps_values"], calls[-1]["methods"]) == \
        ((2, 3), (0.5,), ("hippo",))


def test_bench_json_says_what_ran_given_or_by_default(capsys, monkeypatch, tmp_path):
    """bench.json's run is what the benchmark ran with: the values given, else the preset's
    (the rows are faked here: only the report is under test)."""
    from hippo.bench import end_to_end

    preset = end_to_end.PRESETS["tiny"]
    monkeypatch.setattr(end_to_end, "run_end_to_end", lambda *args, **kwargs: [])
    assert main(["bench", "--preset", "tiny", "--out-dir", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "bench.json").read_text())["run"]
    assert (run["frames"], run["eps"], run["new_tokens"], run["gamma"]) == \
        (list(preset.frames), list(preset.eps), preset.new_tokens, 12)
    argv = ["bench", "--preset", "tiny", "--frames", "2", "3", "--eps", "0.5", "--new-tokens", "7",
            "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    run = json.loads((tmp_path / "bench.json").read_text())["run"]
    assert (run["frames"], run["eps"], run["new_tokens"]) == ([2, 3], [0.5], 7)

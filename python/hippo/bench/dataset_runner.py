"""`hippo bench --dataset NAME --root DIR`: HIPPO over the questions of a benchmark set stored
locally, against the target's own AR decoding of each: per-set MAT, speedup, whether every
output matched AR (the losslessness check, on real prompts), and the accuracy of the chosen
option letters where the set has answers (the target's own: HIPPO does not change outputs)."""
from __future__ import annotations

import torch

from hippo.bench.datasets import VideoQuestion, chosen_letter, read_dataset
from hippo.models import load_adapter
from hippo.devices import device_name, resolve_device
from hippo.errors import HippoError
from hippo.pipeline import EncodedVideo, HippoPipeline
from hippo.preserve import PreservationOptions
from hippo.report import in_ms, ratio, rounded
from hippo.speculative.acceptance import SamplingOptions
from hippo.video import load_video


def run_benchmark_set(name: str, root: str, *, target: str, draft: str | None,
                      limit: int | None = None, max_new_tokens: int = 64, num_frames: int = 16,
                      keep_ratio: float = 0.1, device: str | torch.device | None = None,
                      progress: bool = True) -> tuple[dict, list[dict]]:
    """(summary, one row per question). Questions whose video is missing or unreadable are
    reported as skipped, not fatal: a local copy of a set is often partial."""
    from tqdm import tqdm

    questions = read_dataset(name, root, limit=limit)
    if not questions and limit != 0:  # an all-n/a summary would pass for a run
        raise HippoError(f"the {name} annotations under {root} hold no multiple-choice "
                         "question hippo can run")
    where = resolve_device(device)
    target_adapter = load_adapter(target, device=where)
    draft_adapter = load_adapter(draft, device=where) if draft else None
    autoregressive = HippoPipeline(target_adapter, draft_adapter, mode="ar")
    hippo = autoregressive.with_options(mode="parallel", gamma="auto",
                                        preservation=PreservationOptions(keep_ratio=keep_ratio))
    rows, videos = [], LastVideo(hippo)
    # No bar where stderr is no terminal (a log, a pipe): what it draws there stays, before any
    # error line. On a terminal the `with` clears it before an error propagates.
    with tqdm(questions, desc=name, disable=None if progress else True, leave=False) as bar:
        for question in bar:
            rows.append(_run_question(question, autoregressive, hippo, max_new_tokens,
                                      num_frames, videos))
    summary = _summary(name, rows)
    # Where and in what the numbers were made (the models' own, not the options that asked).
    summary.update(device=device_name(where),
                   dtype=str(target_adapter.dtype).removeprefix("torch."))
    return summary, rows


class LastVideo:
    """The last video a set's question was asked about, decoded and embedded: the sets ask
    several questions about one clip, listed together (Video-MME three per video), and each
    after the first skips the decoding and the vision towers (its tokens are the same)."""

    def __init__(self, pipeline: HippoPipeline) -> None:
        self.pipeline = pipeline
        self.key: tuple | None = None
        self.encoded: EncodedVideo | None = None

    def encoded_for(self, question: VideoQuestion, num_frames: int) -> EncodedVideo:
        key = (question.video, question.start, question.end, question.assumed_fps,
               question.sampling, num_frames)
        if key != self.key:
            self.key = self.encoded = None  # a failure below leaves nothing half-made
            # A question's window may hold fewer frames than asked: repeat some, as the sets'
            # own evaluation code does, rather than skip the question.
            frames = load_video(question.video, num_frames=num_frames, start=question.start,
                                end=question.end, assumed_fps=question.assumed_fps,
                                repeat_frames=True, sampling=question.sampling)
            # Each question prefilled whole: its AR and HIPPO rows time the same prefill.
            self.encoded = self.pipeline.encode_video(frames, reuse_prefix=False)
            self.key = key
        return self.encoded


def _run_question(question: VideoQuestion, autoregressive: HippoPipeline, hippo: HippoPipeline,
                  max_new_tokens: int, num_frames: int, videos: LastVideo) -> dict:
    row = dict(question=question.question_id, task=question.task)
    try:
        video = videos.encoded_for(question, num_frames)
        # max_new_tokens too: a question whose context would overflow is skipped here, rather
        # than refused by generate_prepared, outside this try, aborting the whole set.
        prompts = hippo.prepare(video, question.prompt, max_new_tokens=max_new_tokens)
    except HippoError as error:
        return dict(row, skipped=str(error).splitlines()[0])
    greedy, eos = SamplingOptions(), hippo.eos_ids()
    ar = autoregressive.generate_prepared(*prompts, max_new_tokens, greedy, eos)
    out = hippo.generate_prepared(*prompts, max_new_tokens, greedy, eos)
    ar_s, hippo_s = ar.stats.decode_s_per_token, out.stats.decode_s_per_token
    return dict(row, tokens=out.stats.tokens, MAT=rounded(out.stats.mean_accepted_tokens),
                acceptance=rounded(out.stats.acceptance_rate, 3),
                ar_ms_per_token=in_ms(ar_s), hippo_ms_per_token=in_ms(hippo_s),
                speedup=ratio(ar_s, hippo_s),
                matched_ar=out.tokens == ar.tokens, answer=out.text, expected=question.answer,
                # what HIPPO adds before decoding (the speedups above are of decoding alone)
                **{"prefill/selection/draft prefill ms": [round(1e3 * t, 2) for t in (
                    out.stats.prefill_s, out.stats.selection_s, out.stats.draft_prefill_s)]},
                correct=_is_correct(out.text, question.answer),
                _steps=out.stats.target_steps, _ar_s=ar.stats.decode_s,
                _hippo_s=out.stats.decode_s)


def _is_correct(output: str | None, expected: str | None) -> bool | None:
    """Whether the answer chose the expected option; None where the set gives no answer."""
    return None if expected is None else chosen_letter(output) == expected


def _summary(name: str, rows: list[dict]) -> dict:
    done = [row for row in rows if "skipped" not in row]
    tokens = sum(row["tokens"] - 1 for row in done)
    steps = sum(row.pop("_steps") for row in done)
    ar_s = sum(row.pop("_ar_s") for row in done)
    hippo_s = sum(row.pop("_hippo_s") for row in done)
    graded = [row["correct"] for row in done if row["correct"] is not None]
    return dict(dataset=name, questions=len(rows), run=len(done), skipped=len(rows) - len(done),
                graded=len(graded),  # run with a known answer: accuracy's denominator
                accuracy=round(sum(graded) / len(graded), 3) if graded else None,
                MAT=round(tokens / steps, 2) if steps else None,
                speedup=round(ar_s / hippo_s, 2) if hippo_s else None,
                all_matched_ar=all(row["matched_ar"] for row in done) if done else None)

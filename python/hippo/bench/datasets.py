"""Readers of six published video-benchmark annotation layouts, so `hippo bench --dataset NAME
--root DIR` runs on a local copy of a set exactly as its authors (or lmms-eval) lay it out, with
no conversion step. Every reader yields VideoQuestion: the prompt is built here, in one format
for every multiple-choice set, so the sets differ only in their questions.

`root` is the directory passed to read_dataset; video paths are returned whether or not the
file exists (a local copy is often partial: the runner reports missing videos). A video name
without an extension is looked up as .mp4, .mkv, .webm, .avi, .MP4 in each listed folder; when
none exists the first folder's .mp4 path is returned. A multiple-choice answer that names none of
the options (an erratum some older copies carry) is read as unknown (answer None): the question
still serves for speed and losslessness.

videomme (Video-MME, HF lmms-lab/Video-MME)
    annotations: videomme/*.parquet (the hub's videomme/test-00000-of-00001.parquet), or a
        .jsonl/.json export of the same rows in videomme/, or *.parquet/*.jsonl/*.json in root;
        all files matching the first pattern that matches are read.
    fields: videoID, question_id, question, options (["A. ...", ...]), answer (letter),
        task_type; `duration` is the short/medium/long class, not seconds, so duration is None.
    videos: data/<videoID>.mp4 (lmms-eval), else videos/<videoID>.mp4.

mvbench (MVBench, HF OpenGVLab/MVBench)
    annotations: json/<task>.json, each a list of {video, question, candidates, answer} where
        answer is the text of one candidate (converted to its letter here).
    videos: video/<folder of the task>/<video>, the folders of the official evaluation code
        (Ask-Anything video_chat2 mvbench.ipynb, _MVBENCH_VIDEO_DIRS below), then
        video/data0613/<folder> (the re-released clips), then the lmms-eval copy's (the hub's
        "video" revision: <folder>/<video> at the root, some folders renamed,
        _MVBENCH_LMMS_EVAL_DIRS) and its data0613/<folder>; a task not listed looks in video/.
        In the official layout episodic_reasoning is folders of frames (read as videos by
        hippo.video; the lmms-eval copy has mp4 clips) and fine_grained_pose's NTU
        clips are not on the hub's main branch. The bounded tasks (_MVBENCH_BOUNDED_TASKS, as
        the official code flags them) ask about the rows' start..end seconds of a longer video:
        frames are sampled inside that window when the video is in the official folders (the
        lmms-eval copy's clips of those tasks are already cut to it), and the TVQA frame
        folders are read at their 3 frames per second. Frames are the middles of equal
        segments of the clip (or window), as the official code's get_index takes them
        (repeated where the window is short). Its window ends are rounded to the nearest
        frame, hippo's to the frames on screen, which can differ by a frame.

longvideobench (LongVideoBench, HF longvideobench/LongVideoBench)
    annotations: lvb_val.json, else lvb_test_wo_gt.json (answers None): a list of {id,
        video_path, question, candidates, correct_choice (0-based index), duration (s),
        question_category}.
    videos: videos/<video_path>.

mlvu (MLVU dev, HF MLVU/MVLU: the folder holding json/ and video/, or the repository root
        with them under MLVU/)
    annotations: json/<n>_<task>.json (else MLVU/json/...), each a list of {video, question,
        candidates, answer (candidate text), question_type, duration (s)}; entries without
        candidates (the open-ended 8_sub_scene and 9_summary) are skipped.
    videos: video/<n>_<task>/<video>, else video/<video>, beside the json/ folder.

lvbench (LVBench, HF THUDM/LVBench)
    annotations: video_info.meta.jsonl, else data/video_info.meta.jsonl (the official repo):
        one line per video {key, qa: [{uid, question, answer (letter), question_type (list)}]},
        the options embedded in the question as lines "(A) ...".
    videos: <key>.mp4 in root, videos/ or all_videos/; else what the official download
        (scripts/download.sh: video2dataset) writes: <shard>/<index>.mp4 anywhere under root,
        each beside a <index>.json whose "url" holds the YouTube id that is the key.

vdc (VDC, Video Detailed Captions of AuroraCap, HF wchai/Video-Detailed-Caption)
    annotations: VDC*.jsonl, else VDC*.json (VDC_1k.jsonl), annotations/VDC*.jsonl (older
        revisions), or detailed_test/*.parquet (lmms-eval's wchai/lmms_VDC_test); the first file
        only: one object per video with video_id and/or video_name (the file name) and its
        captions.
    videos: videos/, videos/videos/, Test_Videos/ (lmms-eval) or root, named video_name or
        video_id. One detailed-captioning question per video; answer None.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from hippo.errors import HippoError

DATASETS = ("videomme", "mvbench", "longvideobench", "mlvu", "lvbench", "vdc")


@dataclass(frozen=True)
class VideoQuestion:
    dataset: str  # one of DATASETS
    question_id: str  # unique within the dataset
    video: Path  # absolute path of the video (may not exist: the runner checks)
    prompt: str  # the question, its options one per line ("A. ...") and the answer instruction
    answer: str | None  # the ground-truth letter, or None (captioning / unknown)
    task: str = ""  # task / category / question type where the format has one
    duration: float | None = None  # seconds, where the format has it
    # The part of the video the question is about, in seconds (None: from the start / to the
    # end), and the frame rate of a frame folder, which records none: load_video's arguments.
    start: float | None = None
    end: float | None = None
    assumed_fps: float | None = None
    # How the set's own evaluation spreads its frames (hippo.video.FRAME_SAMPLINGS).
    sampling: str = "uniform"


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".MP4")
_ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# VDC has no fixed prompt (lmms-eval draws one at random per call); a fixed one keeps runs
# comparable.
_CAPTION_PROMPT = ("Provide a faithfully detailed description of this video in more than three "
                   "sentences.")
_OPTION_LABEL = re.compile(r"^\(?([A-Z])[.):]\s*")
_EMBEDDED_OPTION = re.compile(r"^\s*\([A-Z]\)\s*", re.MULTILINE)

# Task -> video folder under video/, from the official MVBench evaluation code.
_MVBENCH_VIDEO_DIRS = {
    "action_sequence": "star/Charades_v1_480",
    "action_prediction": "star/Charades_v1_480",
    "action_antonym": "ssv2_video",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test",
    "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_v1_480",
    "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation",
    "action_localization": "sta/sta_video",
    "scene_transition": "scene_qa/video",
    "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation",
    "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos",
    "fine_grained_pose": "nturgbd",
    "character_order": "perception/videos",
    "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/frames_fps3_hq",
    "counterfactual_inference": "clevrer/video_validation",
}
# The tasks whose rows' start/end seconds bound the clip (the official code's bound flag); the
# official layout keeps their full videos.
_MVBENCH_BOUNDED_TASKS = frozenset({"action_sequence", "action_prediction", "object_interaction",
                                    "action_localization", "episodic_reasoning"})
_MVBENCH_FRAME_FOLDER_FPS = {"episodic_reasoning": 3.0}  # tvqa/frames_fps3_hq
# Where the lmms-eval copy (the hub's "video" revision) names a task's folder differently.
_MVBENCH_LMMS_EVAL_DIRS = {
    "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment",
    "object_interaction": "star/Charades_segment",
    "action_localization": "sta/sta_video_segment",
    "fine_grained_pose": "nturgbd_convert",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "action_antonym": "ssv2_video_mp4",
}
# A YouTube id in a watch, short or youtu.be URL.
_YOUTUBE_ID = re.compile(r"(?:[?&]v=|youtu\.be/|/shorts/|/embed/)([A-Za-z0-9_-]{11})")

_Convert = Callable[[int, dict], list[VideoQuestion]]


def read_dataset(name: str, root: str | Path, *, limit: int | None = None) -> list[VideoQuestion]:
    """The questions of benchmark `name` stored under `root` (layouts: module docstring), in
    file order, the first `limit` of them when given (only the files needed are parsed).

    Raises HippoError (one clear message) for an unknown name (listing the known ones), a
    missing root directory, no annotation file where the format puts it (saying which
    files/patterns were looked for), or an annotation file that cannot be parsed (saying which
    file and why, in one line)."""
    reader = _READERS.get(name)
    if reader is None:
        raise HippoError(f"unknown dataset {name!r}: known ones are {', '.join(DATASETS)}")
    if limit is not None and limit < 0:
        raise HippoError(f"limit must be >= 0, got {limit}")
    directory = Path(root).expanduser().resolve()
    if not directory.is_dir():
        raise HippoError(f"{name} root {directory} is not a directory")
    return list(itertools.islice(reader(directory), limit))


# --- readers: each finds its annotation files at once (so a missing one fails even with
# limit=0) and returns a lazy iterator over the questions.


def _read_videomme(root: Path) -> Iterator[VideoQuestion]:
    files = _find_annotations(root, "Video-MME", "videomme/*.parquet", "videomme/*.jsonl",
                              "videomme/*.json", "*.parquet", "*.jsonl", "*.json")

    def convert(index: int, row: dict) -> list[VideoQuestion]:
        options = _options(row["options"], "options")
        return [VideoQuestion(
            dataset="videomme", question_id=str(row["question_id"]),
            video=_find_video([root / "data", root / "videos"], str(row["videoID"])),
            prompt=_choice_prompt(row["question"], options),
            answer=_answer_letter(row["answer"], options, "letter"),
            task=str(row.get("task_type") or ""), duration=_seconds(row.get("duration")))]

    return _questions(files, convert)


def _read_mvbench(root: Path) -> Iterator[VideoQuestion]:
    files = _find_annotations(root, "MVBench", "json/*.json")

    def questions(path: Path) -> Iterator[VideoQuestion]:
        task = path.stem
        official = _MVBENCH_VIDEO_DIRS.get(task, "")
        renamed = _MVBENCH_LMMS_EVAL_DIRS.get(task, official)
        official_folders = [root / "video" / official, root / "video" / "data0613" / official]
        folders = [*official_folders, root / renamed, root / "data0613" / renamed]

        def convert(index: int, row: dict) -> list[VideoQuestion]:
            options = _options(row["candidates"], "candidates")
            video = _find_video(folders, str(row["video"]))
            bounded = task in _MVBENCH_BOUNDED_TASKS and any(
                video.is_relative_to(folder) for folder in official_folders)
            return [VideoQuestion(
                dataset="mvbench", question_id=f"{task}/{index}", video=video,
                prompt=_choice_prompt(row["question"], options),
                answer=_answer_letter(row["answer"], options, "text"), task=task,
                start=_window_seconds(row, "start") if bounded else None,
                end=_window_seconds(row, "end") if bounded else None,
                assumed_fps=_MVBENCH_FRAME_FOLDER_FPS.get(task), sampling="segment_midpoints")]

        return _questions([path], convert)

    return itertools.chain.from_iterable(questions(path) for path in files)


def _read_longvideobench(root: Path) -> Iterator[VideoQuestion]:
    files = _find_annotations(root, "LongVideoBench", "lvb_val.json", "lvb_test_wo_gt.json")

    def convert(index: int, row: dict) -> list[VideoQuestion]:
        options = _options(row["candidates"], "candidates")
        return [VideoQuestion(
            dataset="longvideobench", question_id=str(row["id"]),
            video=_find_video([root / "videos"], str(row["video_path"])),
            prompt=_choice_prompt(row["question"], options),
            answer=_answer_letter(row.get("correct_choice"), options, "index"),
            task=str(row.get("question_category") or ""), duration=_seconds(row.get("duration")))]

    return _questions(files[:1], convert)


def _read_mlvu(root: Path) -> Iterator[VideoQuestion]:
    files = _find_annotations(root, "MLVU", "json/*.json", "MLVU/json/*.json")

    def questions(path: Path) -> Iterator[VideoQuestion]:
        videos = path.parent.parent / "video"
        folders = [videos / path.stem, videos]
        default_task = path.stem.split("_", 1)[-1]  # "1_plotQA" -> "plotQA"

        def convert(index: int, row: dict) -> list[VideoQuestion]:
            options = _options(row.get("candidates") or [], "candidates")
            if not options:  # open-ended task (sub-scene captioning, summary)
                return []
            return [VideoQuestion(
                dataset="mlvu", question_id=f"{path.stem}/{index}",
                video=_find_video(folders, str(row["video"])),
                prompt=_choice_prompt(row["question"], options),
                answer=_answer_letter(row["answer"], options, "text"),
                task=str(row.get("question_type") or default_task),
                duration=_seconds(row.get("duration")))]

        return _questions([path], convert)

    return itertools.chain.from_iterable(questions(path) for path in files)


def _read_lvbench(root: Path) -> Iterator[VideoQuestion]:
    files = _find_annotations(root, "LVBench", "video_info.meta.jsonl",
                              "data/video_info.meta.jsonl")
    folders = [root, root / "videos", root / "all_videos"]
    downloaded = functools.cache(lambda: _video2dataset_index(root))  # scanned on a first miss

    def convert(index: int, row: dict) -> list[VideoQuestion]:
        key = str(row["key"])
        video = _find_video(folders, key)
        if not video.exists():
            video = downloaded().get(key, video)
        questions = []
        for qa in row["qa"]:
            question, options = _split_embedded_options(qa["question"])
            kinds = qa.get("question_type") or []
            questions.append(VideoQuestion(
                dataset="lvbench", question_id=str(qa["uid"]), video=video,
                prompt=_choice_prompt(question, options),
                answer=_answer_letter(qa["answer"], options, "letter"),
                task=", ".join(kinds) if isinstance(kinds, list) else str(kinds)))
        return questions

    return _questions(files[:1], convert)


def _read_vdc(root: Path) -> Iterator[VideoQuestion]:
    files = _find_annotations(root, "VDC", "VDC*.jsonl", "VDC*.json", "annotations/VDC*.jsonl",
                              "detailed_test/*.parquet")
    folders = [root / "videos", root / "videos" / "videos", root / "Test_Videos", root]

    def convert(index: int, row: dict) -> list[VideoQuestion]:
        video_id = row.get("video_id") or row.get("video_name")
        if video_id is None:
            raise KeyError("video_id")
        video_id = str(video_id)
        return [VideoQuestion(
            dataset="vdc", question_id=video_id,
            video=_find_video(folders, str(row.get("video_name") or video_id)),
            prompt=_CAPTION_PROMPT, answer=None, task="detailed")]

    return _questions(files[:1], convert)


_READERS: dict[str, Callable[[Path], Iterator[VideoQuestion]]] = {
    "videomme": _read_videomme, "mvbench": _read_mvbench, "longvideobench": _read_longvideobench,
    "mlvu": _read_mlvu, "lvbench": _read_lvbench, "vdc": _read_vdc,
}


# --- shared helpers


def _find_annotations(root: Path, label: str, *patterns: str) -> list[Path]:
    """The files of the first pattern (relative to root) that matches any, sorted: the
    patterns go from the published layout to accepted variants."""
    for pattern in patterns:
        files = sorted(path for path in root.glob(pattern) if path.is_file())
        if files:
            return files
    raise HippoError(f"no {label} annotations under {root}: looked for {', '.join(patterns)}")


def _questions(files: Iterable[Path], convert: _Convert) -> Iterator[VideoQuestion]:
    """convert(index, row) over the rows of each file, a file parsed only when reached; a row
    the converter cannot read (missing field, bad answer) becomes one HippoError naming the
    file and the entry."""
    for path in files:
        for index, row in enumerate(_load_rows(path)):
            if not isinstance(row, dict):
                raise _parse_error(path, f"entry {index} is a {type(row).__name__}, not an object")
            try:
                questions = convert(index, row)
            except KeyError as error:
                raise _parse_error(path, f"entry {index} has no field {error.args[0]!r}") from None
            except (TypeError, ValueError, IndexError) as error:
                raise _parse_error(path, f"entry {index}: {error}") from None
            yield from questions


# What json.loads raises on a malformed file; a deeply nested one ("[[[[...") exhausts the
# decoder's recursion limit.
_JSON_ERRORS = (json.JSONDecodeError, RecursionError)


def _load_rows(path: Path) -> list:
    """The rows of a .parquet, .jsonl (one object a line) or .json (a list) file."""
    if path.suffix == ".parquet":
        return _load_parquet(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise _parse_error(path, str(error)) from None
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except _JSON_ERRORS as error:
                    raise _parse_error(path, f"line {number}: {_json_error(error)}") from None
        return rows
    try:
        rows = json.loads(text)
    except _JSON_ERRORS as error:
        raise _parse_error(path, _json_error(error)) from None
    if not isinstance(rows, list):
        raise _parse_error(path, "expected a JSON list of questions, found a "
                                 f"{type(rows).__name__}")
    return rows


def _load_parquet(path: Path) -> list[dict]:
    """pyarrow is imported only here: only Video-MME ships parquet, and it has JSON exports."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise HippoError(f"reading {path} needs pyarrow: pip install pyarrow, or use a "
                         ".json/.jsonl export of the same rows") from None
    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise _parse_error(path, str(error)) from None


def _json_error(error: Exception) -> str:
    return "nested too deeply to decode" if isinstance(error, RecursionError) else str(error)


def _parse_error(path: Path, why: str) -> HippoError:
    first_line = why.strip().splitlines()[0] if why.strip() else "unreadable"
    return HippoError(f"cannot parse {path}: {first_line}")


def _find_video(folders: list[Path], name: str) -> Path:
    """The first existing file (or frame folder) named `name` in `folders`, trying the usual
    extensions when the name has none; else the path it would have in the first folder."""
    candidates = [name] if Path(name).suffix else [name, *(name + ext for ext in _VIDEO_EXTENSIONS)]
    for folder in folders:
        for candidate in candidates:
            if (folder / candidate).exists():
                return folder / candidate
    return folders[0] / (name if Path(name).suffix else name + _VIDEO_EXTENSIONS[0])


def _options(value: object, field: str) -> list:
    """A row's answer options, which must be a list: a string (a list written as its text)
    would read as one option per character."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{field} must be a list of options, got a {type(value).__name__}")
    return list(value)


def _choice_prompt(question: str, options: list) -> str:
    """The question, its options one per line as "A. text" (dropping a label an option already
    carries, as Video-MME's "A. ..." does), then the instruction to answer with the letter."""
    if not options:
        raise ValueError("no options")
    if len(options) > len(_LETTERS):
        raise ValueError(f"{len(options)} options, more than there are letters")
    lines = [str(question).strip()]
    for letter, option in zip(_LETTERS, options):
        text = str(option).strip()
        label = _OPTION_LABEL.match(text)
        if label and label[1] == letter:
            text = text[label.end():]
        lines.append(f"{letter}. {text}")
    return "\n".join([*lines, _ANSWER_INSTRUCTION])


def chosen_letter(output: str | None) -> str | None:
    """The option letter a model's answer starts with ("B", "(B) ...", "**B**", "Answer: B.",
    "The correct answer is B"), or None. Only the start is read: a letter inside a sentence is
    no choice, nor are the words "A" and "I" opening one ("A person ...", "I think ..."),
    though "A is ..." and "A because ..." choose A."""
    if not output:
        return None
    text = output.strip().replace("*", "")
    match = _CHOICE.match(text)
    if match is None:
        return None
    rest = text[match.end(1):]
    sentence = _SENTENCE_WORD.match(rest)
    if match[1] in "AI" and sentence and sentence[1] not in _CHOICE_WORDS:
        return None
    return match[1]


_CHOICE = re.compile(r"(?i:(?:the\s+|my\s+|final\s+)*(?:best\s+|correct\s+|right\s+)?"
                     r"(?:answer|option|choice)(?:\s+is)?\s*:?\s*)?"
                     r"[(\[]?([A-Z])(?:$|[\s.,:;)\]])")
_SENTENCE_WORD = re.compile(r"\s+([a-z]+)")  # a lower-case word after the letter
_CHOICE_WORDS = frozenset({"is", "because", "since", "as", "and", "would", "seems", "fits"})


def _answer_letter(answer: object, options: list, form: str) -> str | None:
    """The ground-truth letter from the form the format stores: "letter" (Video-MME, LVBench),
    "index" 0-based (LongVideoBench) or "text" of the option (MVBench, MLVU); None when it names
    no option (a test split without answers, or an erratum)."""
    if form == "text":
        index = next((i for i, option in enumerate(options)
                      if str(option).strip() == str(answer).strip()), -1)
    elif form == "index":
        index = answer if isinstance(answer, int) and not isinstance(answer, bool) else -1
    else:
        letter = str(answer).strip().strip("().").upper()
        index = _LETTERS.find(letter) if len(letter) == 1 else -1
    if not 0 <= index < len(options):
        return None  # an erratum of the copy: the question still serves (module docstring)
    return _LETTERS[index]


def _video2dataset_index(root: Path) -> dict[str, Path]:
    """{YouTube id: video} over the files video2dataset writes under root: <index>.mp4 beside
    <index>.json, whose "url" names the source."""
    index: dict[str, Path] = {}
    for sidecar in root.rglob("*.json"):
        video = next((sidecar.with_suffix(ext) for ext in _VIDEO_EXTENSIONS
                      if sidecar.with_suffix(ext).is_file()), None)
        if video is None:
            continue
        try:
            url = json.loads(sidecar.read_text(encoding="utf-8")).get("url", "")
        except (OSError, UnicodeDecodeError, *_JSON_ERRORS, AttributeError):
            continue  # not a sidecar
        found = _YOUTUBE_ID.search(str(url))
        if found:
            index.setdefault(found[1], video)
    return index


def _split_embedded_options(text: str) -> tuple[str, list[str]]:
    """LVBench's "question\\n(A) ...\\n(B) ..." -> ("question", ["...", "..."])."""
    first = _EMBEDDED_OPTION.search(text)
    if first is None:
        raise ValueError("no '(A) ...' options in the question")
    options = [option.strip() for option in _EMBEDDED_OPTION.split(text[first.start():])[1:]]
    return text[:first.start()].strip(), options


def _seconds(value: object) -> float | None:
    """A duration in seconds when the field is a number (Video-MME's is a class name)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _window_seconds(row: dict, field: str) -> float | None:
    """MVBench's start or end: None when absent, else a finite number of seconds (a numeric
    string too). Anything else is an error: dropping it would sample the whole video instead
    of the window the question asks about."""
    value = row.get(field)
    if value is None:
        return None
    try:
        seconds = float(value) if isinstance(value, str) else _seconds(value)
    except ValueError:
        seconds = None
    if seconds is None or not math.isfinite(seconds):
        raise ValueError(f"{field} must be a number of seconds, got {value!r}")
    return seconds

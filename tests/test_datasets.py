"""hippo.bench.datasets: each published annotation layout (tiny synthetic copies under
fixtures/datasets/<name>/, videos referenced but absent) reads into the expected questions, and
every way a local copy can be wrong raises one clear HippoError."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pyarrow.parquet  # a declared dependency (requirements.txt): no skip
import pytest

from hippo.bench.datasets import DATASETS, VideoQuestion, chosen_letter, read_dataset
from hippo.models.base import HippoError

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def read(name: str, **kwargs) -> list[VideoQuestion]:
    return read_dataset(name, FIXTURES / name, **kwargs)


def summary(questions: list[VideoQuestion]) -> list[tuple]:
    return [(q.question_id, q.answer, q.task, q.duration) for q in questions]


def relative_videos(questions: list[VideoQuestion], name: str) -> list[str]:
    root = (FIXTURES / name).resolve()
    return [q.video.relative_to(root).as_posix() for q in questions]


def test_videomme_parquet():
    questions = read("videomme")
    assert summary(questions) == [("001-1", "C", "Counting Problem", None),
                                  ("001-2", "A", "Object Recognition", None),
                                  ("602-1", "B", "Temporal Reasoning", None)]
    assert relative_videos(questions, "videomme") == [
        "data/fFjv93ACGo8.mp4", "data/fFjv93ACGo8.mp4", "data/Bq7DMH3Mx-A.mp4"]
    # the options' own "A. " labels are not doubled
    assert questions[0].prompt == ("How many red boats appear in the video?\n"
                                   "A. One.\nB. Two.\nC. Three.\nD. Four.\n" + INSTRUCTION)


def test_videomme_json_export_reads_like_the_parquet(tmp_path):
    rows = pyarrow.parquet.read_table(
        FIXTURES / "videomme" / "videomme" / "test-00000-of-00001.parquet").to_pylist()
    (tmp_path / "videomme").mkdir()
    (tmp_path / "videomme" / "test.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    from_json = read_dataset("videomme", tmp_path)
    from_parquet = read("videomme")
    assert [(q.question_id, q.prompt, q.answer, q.task) for q in from_json] == \
        [(q.question_id, q.prompt, q.answer, q.task) for q in from_parquet]
    assert from_json[0].video == tmp_path.resolve() / "data" / "fFjv93ACGo8.mp4"


def test_videomme_without_pyarrow_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(HippoError, match=r"needs pyarrow: pip install pyarrow.*json"):
        read("videomme")


def test_mvbench_answer_text_becomes_the_candidate_letter():
    questions = read("mvbench")
    assert summary(questions) == [("action_sequence/0", "C", "action_sequence", None),
                                  ("action_sequence/1", "A", "action_sequence", None),
                                  ("fine_grained_action/0", "B", "fine_grained_action", None)]
    assert relative_videos(questions, "mvbench") == [
        "video/star/Charades_v1_480/3X5KN.mp4", "video/star/Charades_v1_480/ZS9XR.mp4",
        "video/Moments_in_Time_Raw/videos/yawning/getty-man-yawning.mp4"]
    assert questions[0].prompt == ("What did the person do first?\nA. Opened the door.\n"
                                   "B. Sat on the sofa.\nC. Took a book.\n" + INSTRUCTION)
    # action_sequence is a bounded task: its rows' seconds cut the (official, full) video.
    assert [(q.start, q.end, q.assumed_fps) for q in questions] == [
        (1.5, 9.0, None), (0.0, 6.2, None), (None, None, None)]
    # Frames as MVBench's own evaluation takes them: the middles of equal segments.
    assert {q.sampling for q in questions} == {"segment_midpoints"}
    assert {q.sampling for q in read("longvideobench")} == {"uniform"}


def test_longvideobench_correct_choice_index_becomes_a_letter():
    questions = read("longvideobench")
    assert summary(questions) == [("86CxyhFV9MI_0", "C", "TOS", 23.92),
                                  ("vD4sSq2eU0U_1", "A", "E2O", 512.5)]
    assert relative_videos(questions, "longvideobench") == ["videos/86CxyhFV9MI.mp4",
                                                            "videos/vD4sSq2eU0U.mp4"]
    assert "\nE. A book\n" in questions[0].prompt


def test_longvideobench_test_split_has_no_answers(tmp_path):
    rows = json.loads((FIXTURES / "longvideobench" / "lvb_val.json").read_text())
    for row in rows:
        del row["correct_choice"]
    (tmp_path / "lvb_test_wo_gt.json").write_text(json.dumps(rows))
    assert [q.answer for q in read_dataset("longvideobench", tmp_path)] == [None, None]


def test_mlvu_reads_choice_tasks_and_skips_open_ended_ones():
    questions = read("mlvu")
    assert summary(questions) == [("1_plotQA/0", "A", "plotQA", 246.0),
                                  ("1_plotQA/1", "B", "plotQA", 301.5)]
    assert relative_videos(questions, "mlvu") == ["video/1_plotQA/movie101_66.mp4",
                                                  "video/1_plotQA/movie101_7.mp4"]
    assert "In a forest\nB. On a ship\nC. In a city\n" in questions[1].prompt


def test_lvbench_splits_the_embedded_options():
    questions = read("lvbench")
    assert summary(questions) == [("1", "B", "entity recognition", None),
                                  ("2", "D", "reasoning, event understanding", None),
                                  ("3", "A", "key information retrieval", None)]
    assert relative_videos(questions, "lvbench") == ["Cm73ma6Ibcs.mp4", "Cm73ma6Ibcs.mp4",
                                                     "xZc1bS9vQ2k.mp4"]
    assert questions[0].prompt == ("What is the girl holding at the start?\nA. An umbrella\n"
                                   "B. A kite\nC. A lamp\nD. A fish\n" + INSTRUCTION)


def test_vdc_is_one_caption_request_per_video():
    questions = read("vdc")
    assert summary(questions) == [("ego4d_0001", None, "detailed", None),
                                  ("pexels_2042", None, "detailed", None)]
    assert relative_videos(questions, "vdc") == ["videos/ego4d_0001.mp4", "videos/pexels_2042.mp4"]
    assert all("detailed description" in q.prompt for q in questions)


@pytest.mark.parametrize("name", DATASETS)
def test_every_fixture_reads_with_absolute_paths_and_limit(name):
    questions = read(name)
    assert len(questions) >= 2
    assert all(q.dataset == name and q.video.is_absolute() for q in questions)
    assert len({q.question_id for q in questions}) == len(questions)
    assert read(name, limit=1) == questions[:1]
    assert read(name, limit=0) == []
    assert read(name, limit=100) == questions


def test_an_existing_video_is_found_under_its_own_extension(tmp_path):
    shutil.copytree(FIXTURES / "lvbench", tmp_path / "lvbench")
    (tmp_path / "lvbench" / "videos").mkdir()
    (tmp_path / "lvbench" / "videos" / "xZc1bS9vQ2k.mkv").touch()
    videos = [q.video for q in read_dataset("lvbench", tmp_path / "lvbench")]
    assert videos[2] == (tmp_path / "lvbench" / "videos" / "xZc1bS9vQ2k.mkv").resolve()
    assert videos[0] == (tmp_path / "lvbench" / "Cm73ma6Ibcs.mp4").resolve()  # absent: default


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(HippoError, match="unknown dataset 'egoschema'.*videomme, mvbench"):
        read_dataset("egoschema", FIXTURES)


def test_missing_root(tmp_path):
    with pytest.raises(HippoError, match="is not a directory"):
        read_dataset("mvbench", tmp_path / "nowhere")


@pytest.mark.parametrize("name, looked_for", [
    ("videomme", "videomme/*.parquet"), ("mvbench", "json/*.json"),
    ("longvideobench", "lvb_val.json, lvb_test_wo_gt.json"), ("mlvu", "json/*.json"),
    ("lvbench", "video_info.meta.jsonl"), ("vdc", "VDC*.jsonl"),
])
def test_missing_annotations_say_what_was_looked_for(tmp_path, name, looked_for):
    pattern = f"no .* annotations under .*looked for .*{re.escape(looked_for)}"
    with pytest.raises(HippoError, match=pattern):
        read_dataset(name, tmp_path, limit=0)


@pytest.mark.parametrize("name, path, content, why", [
    ("mvbench", "json/action_sequence.json", "[{\"video\": ", "Expecting value"),
    ("mvbench", "json/action_sequence.json", "{\"video\": \"a.mp4\"}", "expected a JSON list"),
    ("longvideobench", "lvb_val.json", json.dumps([{"id": "1", "question": "Q?"}]),
     "entry 0 has no field 'candidates'"),
    ("lvbench", "video_info.meta.jsonl", "{\"key\": \"k\", \"qa\": []}\nnot json\n", "line 2"),
    ("lvbench", "video_info.meta.jsonl",
     json.dumps({"key": "k", "qa": [{"uid": 1, "question": "Q? A or B", "answer": "A"}]}),
     "no '(A) ...' options"),
    ("vdc", "VDC_1k.jsonl", json.dumps(["not", "an", "object"]), "entry 0 is a list"),
    ("videomme", "videomme/test-00000-of-00001.parquet", "not a parquet file", "cannot parse"),
    # A window bound that is no number would silently widen the question to the whole video.
    ("mvbench", "json/action_sequence.json",
     json.dumps([{"video": "a.mp4", "question": "Q?", "candidates": ["x", "y"], "answer": "x",
                  "start": "abc", "end": 3}]),
     "entry 0: start must be a number of seconds, got 'abc'"),
    # Options written as the text of a list would read as one option per character.
    ("videomme", "videomme/test.jsonl",
     json.dumps({"videoID": "v", "question_id": "1", "question": "Q?",
                 "options": "['A. x', 'B. y']", "answer": "A"}),
     "entry 0: options must be a list of options, got a str"),
    ("mvbench", "json/action_sequence.json",
     json.dumps([{"video": "a.mp4", "question": "Q?", "candidates": "xy", "answer": "x"}]),
     "entry 0: candidates must be a list of options, got a str"),
    # Nesting deeper than the decoder's recursion limit.
    ("mvbench", "json/action_sequence.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("lvbench", "video_info.meta.jsonl", "[" * 100_000 + "]" * 100_000,
     "line 1: nested too deeply"),
])
def test_corrupt_annotations_name_the_file_and_why(tmp_path, name, path, content, why):
    file = tmp_path / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(content)
    with pytest.raises(HippoError) as error:
        read_dataset(name, tmp_path)
    message = str(error.value)
    assert message.startswith(f"cannot parse {file.resolve()}: ")
    assert "\n" not in message
    assert why in message, message


def _copy_fixture(name: str, destination: Path) -> Path:
    shutil.copytree(FIXTURES / name, destination)
    return destination


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path.resolve()


@pytest.mark.parametrize("name, path, row", [
    ("mvbench", "json/action_sequence.json",
     {"video": "a.mp4", "question": "Q?", "candidates": ["x", "y"], "answer": "z"}),
    ("longvideobench", "lvb_val.json",
     {"id": "1", "video_path": "v.mp4", "question": "Q?", "candidates": ["x", "y"],
      "correct_choice": 2}),
])
def test_an_answer_that_names_no_option_is_unknown(tmp_path, name, path, row):
    """An erratum of some copies (older MLVU files) must not stop the whole set."""
    file = tmp_path / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps([row]))
    [question] = read_dataset(name, tmp_path)
    assert question.answer is None and "\nB. y\n" in question.prompt


def test_mvbench_finds_the_data0613_and_lmms_eval_layouts(tmp_path):
    root = _copy_fixture("mvbench", tmp_path / "mvbench")
    renamed = _touch(root / "star" / "Charades_segment" / "3X5KN.mp4")  # lmms-eval's folder
    reissued = _touch(root / "video" / "data0613" / "star" / "Charades_v1_480" / "ZS9XR.mp4")
    lmms_reissued = _touch(root / "data0613" / "Moments_in_Time_Raw" / "videos" / "yawning" /
                           "getty-man-yawning.mp4")
    questions = read_dataset("mvbench", root)
    assert [q.video for q in questions] == [renamed, reissued, lmms_reissued]
    # lmms-eval's clips of the bounded tasks are already cut to the window; data0613 is official.
    assert [(q.start, q.end) for q in questions] == [(None, None), (0.0, 6.2), (None, None)]
    official = _touch(root / "video" / "star" / "Charades_v1_480" / "3X5KN.mp4")
    first = read_dataset("mvbench", root)[0]
    assert first.video == official and (first.start, first.end) == (1.5, 9.0)  # official first


def test_mvbench_episodic_reasoning_frames_are_three_per_second(tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "episodic_reasoning.json").write_text(json.dumps([{
        "video": "s01e02_seg02_clip_03", "question": "Who?", "candidates": ["x", "y"],
        "answer": "y", "start": 2.0, "end": 40.5}]))
    [question] = read_dataset("mvbench", tmp_path)
    assert question.video == tmp_path.resolve() / "video/tvqa/frames_fps3_hq/s01e02_seg02_clip_03.mp4"
    assert (question.start, question.end, question.assumed_fps) == (2.0, 40.5, 3.0)


def test_mvbench_window_bounds_may_be_numeric_strings(tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "action_sequence.json").write_text(json.dumps([{
        "video": "a.mp4", "question": "Q?", "candidates": ["x", "y"], "answer": "y",
        "start": "1.5", "end": 9}]))
    [question] = read_dataset("mvbench", tmp_path)
    assert (question.start, question.end) == (1.5, 9.0)


def test_lvbench_finds_the_official_download_script_output(tmp_path):
    """scripts/download.sh runs video2dataset: <shard>/<index>.mp4 beside a JSON sidecar whose
    url holds the YouTube id."""
    root = _copy_fixture("lvbench", tmp_path / "lvbench")
    shard = root / "scripts" / "videos" / "00000"
    for index, key in enumerate(["xZc1bS9vQ2k", "Cm73ma6Ibcs"]):
        _touch(shard / f"00000000{index}.mp4")
        (shard / f"00000000{index}.json").write_text(json.dumps(
            {"url": f"https://www.youtube.com/watch?v={key}", "key": f"00000000{index}",
             "status": "success"}))
    (shard / "00000000_stats.json").write_text("{}")  # video2dataset's shard statistics
    videos = [q.video for q in read_dataset("lvbench", root)]
    assert videos == [(shard / "000000001.mp4").resolve()] * 2 + [
        (shard / "000000000.mp4").resolve()]


def test_mlvu_under_the_repository_root(tmp_path):
    _copy_fixture("mlvu", tmp_path / "MLVU")
    video = _touch(tmp_path / "MLVU" / "video" / "1_plotQA" / "movie101_7.mp4")
    questions = read_dataset("mlvu", tmp_path)
    assert summary(questions) == summary(read("mlvu"))
    assert questions[1].video == video


def test_vdc_older_and_lmms_eval_layouts(tmp_path):
    older = _copy_fixture("vdc", tmp_path / "older")
    (older / "VDC_1k.jsonl").rename(_touch(older / "annotations" / "VDC_1k.jsonl"))
    assert summary(read_dataset("vdc", older)) == summary(read("vdc"))
    lmms_eval = tmp_path / "lmms_eval"
    (lmms_eval / "detailed_test").mkdir(parents=True)
    rows = [{"video_id": None, "video_name": "v_0001"}, {"video_id": "x", "video_name": "v_2"}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows),
                                lmms_eval / "detailed_test" / "test-00000-of-00001.parquet")
    video = _touch(lmms_eval / "Test_Videos" / "v_0001.mp4")
    questions = read_dataset("vdc", lmms_eval)
    assert [q.question_id for q in questions] == ["v_0001", "x"]
    assert questions[0].video == video


@pytest.mark.parametrize("output, letter", [
    ("B", "B"), ("B.", "B"), ("D)", "D"), ("(C) the door opens", "C"), ("[E]", "E"),
    ("  C\n", "C"), ("Answer: D.", "D"), ("The answer is B", "B"), ("the best answer is (A)", "A"),
    ("Option B", "B"), ("B is correct", "B"), ("A.", "A"), ("A", "A"),
    ("The correct answer is B", "B"), ("My answer is C.", "C"), ("My final answer: D", "D"),
    ("**B**", "B"), ("**B.** The door", "B"), ("A is correct", "A"), ("A because it moves", "A"),
    ("I.", "I"), ("I is the only one", "I"),
    # No choice: lower case, a word, a sentence opening with "A" or "I", nothing at all.
    ("b.", None), ("answer: b", None), ("Banana", None), ("A person walks in.", None),
    ("I think B", None), ("", None), (None, None),
])
def test_chosen_letter_reads_the_start_of_an_answer(output, letter):
    assert chosen_letter(output) == letter


"""hippo.bench.datasets: each published annotation layout (tiny synthetic copies under
fixtures/datasets/<name>/, videos referenced but absent) reads into the expected questions, and
every way a local copy can be wrong raises one clear HippoError."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet  # a declared dependency (requirements.txt): no skip
import pytest

from hippo.bench.datasets import DATASETS, VideoQuestion, chosen_letter, read_dataset
from hippo.errors import HippoError

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
    # A window bound that is a boolean or no finite number is no window either.
    ("mvbench", "json/action_sequence.json",
     json.dumps([{"video": "a.mp4", "question": "Q?", "candidates": ["x", "y"], "answer": "x",
                  "start": True, "end": 3}]),
     "entry 0: start must be a number of seconds, got True"),
    ("mvbench", "json/action_sequence.json",
     json.dumps([{"video": "a.mp4", "question": "Q?", "candidates": ["x", "y"], "answer": "x",
                  "start": 0, "end": "inf"}]),
     "entry 0: end must be a number of seconds, got 'inf'"),
    ("mvbench", "json/action_sequence.json",
     json.dumps([{"video": "a.mp4", "question": "Q?", "candidates": ["x", "y"], "answer": "x",
                  "start": float("nan"), "end": 3}]),
     "entry 0: start must be a number of seconds, got nan"),
    # No options, or more than there are letters: no multiple-choice prompt can be written.
    ("videomme", "videomme/test.jsonl",
     json.dumps({"videoID": "v", "question_id": "1", "question": "Q?", "options": [],
                 "answer": "A"}),
     "entry 0: no options"),
    ("mvbench", "json/action_sequence.json",
     json.dumps([{"video": "a.mp4", "question": "Q?", "candidates": [str(n) for n in range(27)],
                  "answer": "0"}]),
     "entry 0: 27 options, more than there are letters"),
    # A VDC row naming no video.
    ("vdc", "VDC_1k.jsonl", json.dumps({"captions": {"detailed_caption": "A dog."}}),
     "entry 0 has no field 'video_id'"),
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
    # a JSON boolean is no index (True would otherwise read as 1: "B")
    ("longvideobench", "lvb_val.json",
     {"id": "1", "video_path": "v.mp4", "question": "Q?", "candidates": ["x", "y"],
      "correct_choice": True}),
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
    ("I.", "I"), ("I is the only one", "I"), ("B the door opens", "B"),
    # No choice: lower case, a word, a sentence opening with "A" or "I", nothing at all.
    ("b.", None), ("answer: b", None), ("Banana", None), ("A person walks in.", None),
    ("I think B", None), ("", None), (None, None),
])
def test_chosen_letter_reads_the_start_of_an_answer(output, letter):
    assert chosen_letter(output) == letter



def test_a_negative_limit_is_a_clear_error():
    with pytest.raises(HippoError, match="limit must be >= 0, got -1"):
        read("mvbench", limit=-1)


def test_the_last_letter_takes_a_twenty_sixth_option(tmp_path):
    (tmp_path / "json").mkdir()
    candidates = [f"option {n}" for n in range(26)]
    (tmp_path / "json" / "action_count.json").write_text(json.dumps([{
        "video": "a.mp4", "question": "Q?", "candidates": candidates, "answer": "option 25"}]))
    [question] = read_dataset("mvbench", tmp_path)
    assert question.answer == "Z" and "\nZ. option 25\n" in question.prompt


def test_only_an_options_own_label_is_dropped(tmp_path):
    """Video-MME's "A. ..." labels are not doubled, but an option that opens with another
    letter and a dot (a name's initial) keeps it."""
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "action_count.json").write_text(json.dumps([{
        "video": "a.mp4", "question": "Who?", "candidates": ["J. K. Rowling", "B. Obama"],
        "answer": "B. Obama"}]))
    [question] = read_dataset("mvbench", tmp_path)
    assert question.prompt == "Who?\nA. J. K. Rowling\nB. Obama\n" + INSTRUCTION
    assert question.answer == "B"


def test_rows_without_a_task_field(tmp_path):
    """A missing task / category / question type is "" (not "None"), and MLVU's comes from the
    file name, <n>_<task>.json, where the task's own name holds underscores."""
    (tmp_path / "videomme").mkdir()
    (tmp_path / "videomme" / "test.jsonl").write_text(json.dumps({
        "videoID": "v", "question_id": "1", "question": "Q?", "options": ["A. x", "B. y"],
        "answer": "B", "task_type": None}))
    assert read_dataset("videomme", tmp_path)[0].task == ""
    (tmp_path / "lvb_val.json").write_text(json.dumps([{
        "id": "1", "video_path": "v.mp4", "question": "Q?", "candidates": ["x", "y"],
        "correct_choice": 0}]))
    assert read_dataset("longvideobench", tmp_path)[0].task == ""
    (tmp_path / "video_info.meta.jsonl").write_text(json.dumps({"key": "k", "qa": [{
        "uid": 1, "question": "Q?\n(A) x\n(B) y", "answer": "A"}]}))
    assert read_dataset("lvbench", tmp_path)[0].task == ""
    (tmp_path / "json").mkdir()
    row = {"video": "a.mp4", "question": "Q?", "candidates": ["x", "y"], "answer": "y"}
    (tmp_path / "json" / "6_anomaly_reco.json").write_text(json.dumps([row]))
    (tmp_path / "json" / "counting.json").write_text(json.dumps([row]))
    (tmp_path / "json" / "7_topic_reasoning.json").write_text(json.dumps([
        dict(row, question_type="topic")]))
    assert [(q.question_id, q.task) for q in read_dataset("mlvu", tmp_path)] == [
        ("6_anomaly_reco/0", "anomaly_reco"), ("7_topic_reasoning/0", "topic"),
        ("counting/0", "counting")]


def test_letter_answers_that_name_no_single_option_are_unknown(tmp_path):
    qa = [{"uid": str(n), "question": "Q?\n(A) x\n(B) y", "answer": answer}
          for n, answer in enumerate(["AB", "", "(b)", "C"])]
    (tmp_path / "video_info.meta.jsonl").write_text(json.dumps({"key": "k", "qa": qa}))
    assert [q.answer for q in read_dataset("lvbench", tmp_path)] == [None, None, "B", None]


def test_mvbench_rows_of_an_unbounded_task_ask_about_the_whole_clip(tmp_path):
    """Only the tasks the official code flags as bounded read the rows' start/end."""
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "action_antonym.json").write_text(json.dumps([{
        "video": "a.webm", "question": "Q?", "candidates": ["x", "y"], "answer": "y",
        "start": 1.0, "end": 2.0}]))
    [question] = read_dataset("mvbench", tmp_path)
    assert question.video == tmp_path.resolve() / "video" / "ssv2_video" / "a.webm"
    assert (question.start, question.end) == (None, None)


def test_jsonl_blank_lines_are_no_rows(tmp_path):
    root = _copy_fixture("lvbench", tmp_path / "lvbench")
    file = root / "video_info.meta.jsonl"
    file.write_text(file.read_text().replace("\n", "\n\n  \n") + "\n\n")
    assert summary(read_dataset("lvbench", root)) == summary(read("lvbench"))


def test_videos_in_the_other_listed_folders(tmp_path):
    """Video-MME's videos/, LVBench's all_videos/, VDC's videos/videos/ (the hub's archive
    unpacked in videos/)."""
    videomme = _copy_fixture("videomme", tmp_path / "videomme")
    video = _touch(videomme / "videos" / "Bq7DMH3Mx-A.mp4")
    assert read_dataset("videomme", videomme)[2].video == video
    lvbench = _copy_fixture("lvbench", tmp_path / "lvbench")
    video = _touch(lvbench / "all_videos" / "xZc1bS9vQ2k.mp4")
    assert read_dataset("lvbench", lvbench)[2].video == video
    vdc = _copy_fixture("vdc", tmp_path / "vdc")
    video = _touch(vdc / "videos" / "videos" / "pexels_2042.mp4")
    assert read_dataset("vdc", vdc)[1].video == video


def test_lvbench_prefers_its_listed_folders_and_skips_failed_downloads(tmp_path):
    """A video in the listed folders wins over a download's copy; a sidecar without its video
    (a failed download) or whose url is no YouTube one names no video."""
    root = _copy_fixture("lvbench", tmp_path / "lvbench")
    listed = _touch(root / "videos" / "Cm73ma6Ibcs.mp4")
    shard = root / "scripts" / "videos" / "00000"
    sidecars = {"000000000": "https://www.youtube.com/watch?v=Cm73ma6Ibcs",  # beside a video
                "000000001": "https://www.youtube.com/watch?v=xZc1bS9vQ2k",  # failed: no video
                "000000002": "https://example.com/clip"}  # beside a video, no YouTube id
    for index, url in sidecars.items():
        _touch(shard / f"{index}.json").write_text(json.dumps({"url": url}))
    _touch(shard / "000000000.mp4")
    _touch(shard / "000000002.mp4")
    videos = [q.video for q in read_dataset("lvbench", root)]
    assert videos == [listed, listed, root.resolve() / "xZc1bS9vQ2k.mp4"]


def test_vdc_video_name_and_id_and_the_first_file_only(tmp_path):
    """The question is the video_id (as text), the video its file name; only the first
    annotation file is read (a second VDC*.jsonl would repeat the videos)."""
    rows = [{"video_id": 17, "video_name": "v_0017.mkv"}, {"video_id": "x", "video_name": "v_2"}]
    (tmp_path / "VDC_1k.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (tmp_path / "VDC_2k.jsonl").write_text(json.dumps({"video_id": "other"}))
    questions = read_dataset("vdc", tmp_path)
    assert [q.question_id for q in questions] == ["17", "x"]
    root = tmp_path.resolve()
    assert [q.video for q in questions] == [root / "videos" / "v_0017.mkv",
                                            root / "videos" / "v_2.mp4"]


def test_a_parse_error_keeps_the_first_line_of_a_long_reason():
    from hippo.bench.datasets import _parse_error

    assert str(_parse_error(Path("a.parquet"), "\n  bad footer\nat offset 12\n")) == \
        "cannot parse a.parquet: bad footer"


class _FakePipeline:
    """What the runner calls of a HippoPipeline, returning one fixed generation."""

    def __init__(self, stats, tokens: list[int], text: str):
        self.result = SimpleNamespace(stats=stats, tokens=tokens, text=text)

    def encode_video(self, frames, *, reuse_prefix):
        assert reuse_prefix is False  # each question's rows time a whole prefill
        return ("encoded", frames)

    def prepare(self, video, prompt, *, max_new_tokens):
        assert video == ("encoded", "frames")
        return ("prepared",)

    def eos_ids(self):
        return [0]

    def generate_prepared(self, *args):
        return self.result


def test_a_question_row_holds_the_runs_rates_and_the_graded_answer(monkeypatch):
    from hippo.bench import dataset_runner
    from hippo.speculative.statistics import GenerationStats

    question = VideoQuestion(dataset="mlvu", question_id="1_plotQA/0", video=Path("v.mp4"),
                             prompt="Q?", answer="B", task="plotQA")
    monkeypatch.setattr(dataset_runner, "load_video", lambda *args, **kwargs: "frames")
    ar = _FakePipeline(GenerationStats("ar", tokens=9, target_steps=8, decode_s=0.8), [5] * 9, "B")
    hippo = _FakePipeline(GenerationStats(
        "parallel", tokens=9, target_steps=3, drafted=9, accepted=5, decode_s=0.3,
        prefill_s=0.0123456, selection_s=0.0015, draft_prefill_s=0.002), [5] * 9, "B. A kite")
    row = dataset_runner._run_question(question, ar, hippo, 8, 4, dataset_runner.LastVideo(hippo))
    assert row == {"question": "1_plotQA/0", "task": "plotQA", "tokens": 9, "MAT": 2.67,
                   "acceptance": 0.556, "ar_ms_per_token": 100.0, "hippo_ms_per_token": 37.5,
                   "speedup": 2.67, "matched_ar": True, "answer": "B. A kite", "expected": "B",
                   "prefill/selection/draft prefill ms": [12.35, 1.5, 2.0], "correct": True,
                   "_steps": 3, "_ar_s": 0.8, "_hippo_s": 0.3}

    def unreadable(*args, **kwargs):
        raise HippoError("cannot decode video v.mp4: the file is corrupt\n(decord: ...)")

    monkeypatch.setattr(dataset_runner, "load_video", unreadable)
    assert dataset_runner._run_question(question, ar, hippo, 8, 4,
                                        dataset_runner.LastVideo(hippo)) == {
        "question": "1_plotQA/0", "task": "plotQA",
        "skipped": "cannot decode video v.mp4: the file is corrupt"}


def test_the_sets_summary_pools_the_questions_that_ran():
    """MAT and speedup over all the decoding that ran (not means of the rows' ratios);
    accuracy over the questions run with a known answer; skipped ones count only as skipped."""
    from hippo.bench.dataset_runner import _summary

    def ran(tokens, steps, ar_s, hippo_s, correct, matched=True):
        return dict(tokens=tokens, correct=correct, matched_ar=matched, _steps=steps,
                    _ar_s=ar_s, _hippo_s=hippo_s)

    rows = [ran(9, 6, 2.0, 1.0, True), ran(5, 2, 1.0, 0.6, True), ran(3, 2, 0.5, 0.3, False),
            ran(2, 1, 0.25, 0.2, None), dict(question="q", skipped="no video")]
    assert _summary("mlvu", rows) == dict(
        dataset="mlvu", questions=5, run=4, skipped=1, graded=3, accuracy=0.667,
        MAT=1.36,  # (8 + 4 + 2 + 1) tokens after the prefills' / 11 steps
        speedup=1.79,  # 3.75 s / 2.1 s
        all_matched_ar=True)
    assert not any(key.startswith("_") for row in rows for key in row)  # not in the JSON
    rows = [ran(4, 3, 1.0, 1.0, None), ran(4, 3, 1.0, 1.0, None, matched=False)]
    assert _summary("vdc", rows) == dict(
        dataset="vdc", questions=2, run=2, skipped=0, graded=0, accuracy=None, MAT=1.0,
        speedup=1.0, all_matched_ar=False)
    assert _summary("vdc", [dict(question="q", skipped="no video")]) == dict(
        dataset="vdc", questions=1, run=0, skipped=1, graded=0, accuracy=None, MAT=None,
        speedup=None, all_matched_ar=None)

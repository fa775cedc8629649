"""The README is what users copy from: its Python examples must run, the options its command
synopsis shows must exist, and the files, tuning switches and ops it names must be there."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

import hippo_ext

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _fenced_blocks(language: str) -> list[str]:
    """The contents of the README's fenced blocks of `language` ("" for blocks without one)."""
    blocks, current, opened_as = [], None, None
    for line in README.splitlines():
        if line.startswith("```"):
            if current is None:
                current, opened_as = [], line[3:].strip()
            else:
                if opened_as == language:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _section(title: str) -> str:
    """The text of a README section, from its heading to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#)", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


@pytest.mark.parametrize("index", range(len(_fenced_blocks("python"))))
def test_python_examples_run(index: int, tmp_path, monkeypatch) -> None:
    """Each example runs as written, in a fresh namespace (presets only: nothing is
    downloaded; a GPU when present, as the examples' defaults pick)."""
    monkeypatch.chdir(tmp_path)
    source = _fenced_blocks("python")[index]
    exec(compile(source, f"README.md python example {index + 1}", "exec"), {"__name__": "__readme__"})


def _subcommand_options() -> dict[str, set[str]]:
    from hippo.cli import _parser

    subparsers = next(action for action in _parser()._actions
                      if isinstance(action, argparse._SubParsersAction))
    return {name: {option for action in sub._actions for option in action.option_strings}
            for name, sub in subparsers.choices.items()}


def _synopsis_options() -> list[tuple[str, str]]:
    """(subcommand, option) for every --option the `hippo` synopsis shows, continuation lines
    included (comments after # left out)."""
    synopsis = next(block for block in _fenced_blocks("bash") if "hippo generate" in block)
    found, command = [], None
    for line in synopsis.splitlines():
        code = line.split("#", 1)[0]
        starts = re.match(r"\s*hippo (\w+)", code)
        if starts:
            command = starts.group(1)
        elif not code.strip():
            continue
        found += [(command, option) for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", code)]
    return found


def test_synopsis_shows_only_options_the_command_has() -> None:
    options = _subcommand_options()
    shown = _synopsis_options()
    assert len(shown) > 30, "the synopsis parse found too few options to be the synopsis"
    unknown = [f"hippo {command} {option}" for command, option in shown
               if option not in options.get(command, set())]
    assert unknown == []


def test_every_subcommand_appears_in_the_synopsis() -> None:
    shown = {command for command, _ in _synopsis_options()} | set(
        re.findall(r"^hippo (\w+)", next(b for b in _fenced_blocks("bash") if "hippo generate" in b), re.M))
    assert sorted(set(_subcommand_options()) - shown) == []


def _architecture_entries() -> list[tuple[list[str], str]]:
    """(paths, description) per entry of the README's layout block: the first column holds
    paths joined by ", " (a folder ends in /; a bare name lies beside the path before it), the
    description runs on over the indented lines below."""
    tree = next(block for block in _fenced_blocks("") if "csrc/ops.cpp" in block)
    entries: list[tuple[list[str], str]] = []
    for line in tree.splitlines():
        if line and not line[0].isspace():
            paths: list[str] = []
            for path in re.split(r",\s*", line[:32].strip()):
                if "/" not in path.rstrip("/") and paths and "/" in paths[-1]:
                    path = f"{paths[-1].rsplit('/', 1)[0]}/{path}"
                paths.append(path)
            entries.append((paths, line[32:]))
        elif entries:
            entries[-1] = (entries[-1][0], f"{entries[-1][1]} {line.strip()}")
    return entries


def test_architecture_names_files_that_exist() -> None:
    entries = _architecture_entries()
    paths = [path for entry_paths, _ in entries for path in entry_paths
             if "<" not in path and "*" not in path]
    assert len(paths) > 15
    assert [path for path in paths if not (ROOT / path).exists()] == []
    # Files a folder's description names (static_cache.py, ...) lie somewhere in that folder.
    missing = []
    for entry_paths, description in entries:
        first = entry_paths[0].split("<")[0]
        folder = ROOT / first[:first.rfind("/") + 1]
        for name in re.findall(r"\b[\w-]+\.(?:py|cpp|cu|cuh|h|sh|txt|in|toml)\b", description):
            if "/" not in name and not any(folder.rglob(name)):
                missing.append(f"{entry_paths[0]}: {name}")
    assert missing == []


def test_tuning_switches_are_read_by_the_code() -> None:
    switches = set(re.findall(r"^\| `(HIPPO_[A-Z0-9_]+)`", README, re.M))
    assert len(switches) >= 8
    sources = "".join(path.read_text(errors="replace") for folder in ("csrc", "hippo_ext", "python")
                      for path in (ROOT / folder).rglob("*") if path.suffix in {".cu", ".cuh", ".h",
                                                                                ".cpp", ".py"})
    assert sorted(name for name in switches if name not in sources) == []


def test_op_table_names_every_op() -> None:
    """The op table lists each registered op, and only those."""
    named = set()
    for cell in re.findall(r"^\| ([^|]+) \|", _section("Ops"), re.M):
        named |= set(re.findall(r"`(\w+)`", cell))
    assert sorted(set(hippo_ext.OP_NAMES) - named) == []
    assert sorted(named - set(hippo_ext.OP_NAMES)) == []

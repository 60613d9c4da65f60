"""Every block and command in README.md and docs/*.md runs as written, so a doc that drifts from the code
fails here.

Each fenced ``bash`` / ``python`` block of a doc runs, in the doc's order, in a fresh folder of its own (one per
doc, so a later block sees what an earlier one wrote, as a reader's would): ``mmprm ...`` and ``python -m ...``
lines in this process (no interpreter start per command: the whole run stays within a couple of minutes on
2 cores), Python blocks in a subprocess of their own, as a reader pastes them.  Every model they use is a tiny
one the blocks build themselves (``mmprm_infer.testing``); nothing is downloaded.

A block that cannot run here says so on its first line, visibly to readers too::

    # not run by the doc test: needs a GPU

with one of ``MARKS``; ``test_every_block_runs_or_says_why`` refuses any other block that holds a command this
test cannot run (``pip``, ``bash scripts/...``, a server).  Inline ``mmprm ...`` commands in the prose are
checked against the parser: each flag must be one the command shows in ``--help`` (old spellings are hidden
aliases, so the docs must use the current names).
"""

from __future__ import annotations

import contextlib
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmprm_infer.cli import build_parser
from mmprm_infer.cli import main as mmprm

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = "# not run by the doc test: "
# what may keep a block from running here; the rest of the line says which and why
MARKS = ("needs a GPU", "needs several devices", "needs network", "needs vLLM", "needs a Ray cluster", "takes minutes",
         "installs packages", "starts a server")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    doc: Path
    line: int  # of the opening fence
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def mark(self) -> str | None:
        first = self.text.lstrip("\n").splitlines()[0] if self.text.strip() else ""
        return first[len(MARK):] if first.startswith(MARK) else None


def blocks(doc: Path) -> list[Block]:
    out, lines, i = [], doc.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if opening.group(1) in ("bash", "sh", "python"):
            out.append(Block(doc, i + 1, "python" if opening.group(1) == "python" else "bash",
                             "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return out


def commands(block: Block) -> list[list[str]]:
    """The shell commands of a bash block: continuation lines joined, comments dropped, split as the shell does."""
    joined = re.sub(r"\\\n\s*", " ", block.text)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def runnable(words: list[str]) -> bool:
    return words[0] == "mmprm" or words[:2] == ["python", "-m"]


ALL = [b for doc in DOCS for b in blocks(doc)]


def test_the_docs_have_blocks():
    assert len(DOCS) >= 6 and sum(b.mark is None for b in ALL) >= 10


@pytest.mark.parametrize("block", ALL, ids=lambda b: b.where)
def test_every_block_runs_or_says_why(block):
    if block.mark is not None:
        assert block.mark.startswith(MARKS), f"{block.where}: the mark must say one of {MARKS}, got {block.mark!r}"
        return
    if block.lang == "bash":
        bad = [" ".join(w) for w in commands(block) if not runnable(w)]
        assert not bad, (f"{block.where}: the doc test cannot run {bad}; mark the block's first line "
                         f"'{MARK}<one of {MARKS}>: why'")


@contextlib.contextmanager
def _argv(argv: list[str]):
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def _run_command(words: list[str], where: str) -> None:
    try:
        if words[0] == "mmprm":
            status = mmprm(words[1:])
        else:
            sys.path.insert(0, str(ROOT))  # `python -m bench.run` from the checkout, as the docs run it
            try:
                with _argv([words[2], *words[3:]]):
                    runpy.run_module(words[2], run_name="__main__", alter_sys=True)
            finally:
                sys.path.remove(str(ROOT))
            status = 0
    except SystemExit as exc:
        status = exc.code
    assert status in (0, None), f"{where}: `{shlex.join(words)}` exited with {status}"


def _run_python(block: Block, folder: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run([sys.executable, "-c", block.text], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{block.where}: the Python block failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_doc_blocks_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = 0
    for block in blocks(doc):
        if block.mark is not None:
            continue
        if block.lang == "python":
            _run_python(block, tmp_path)
        else:
            for words in commands(block):
                _run_command(words, block.where)
        ran += 1
    if ran == 0:
        pytest.skip(f"{doc.name}: no block to run (none, or every one marked)")


INLINE = re.compile(r"`(mmprm [^`]+)`")


def _visible_flags(parser) -> set[str]:
    import argparse

    return {s for a in parser._actions if a.help is not argparse.SUPPRESS for s in a.option_strings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_inline_commands_use_current_flags(doc):
    """`mmprm cmd --flag` in the prose: the command exists and shows every flag in its --help."""
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
    for match in INLINE.finditer(text):
        words = match.group(1).split()
        command = words[1]
        if not re.fullmatch(r"[a-z][a-z-]*", command):  # `mmprm --help`, `mmprm COMMAND ...`, `mmprm ...:`
            continue
        parser = build_parser(command, only=True)
        sub = parser._subparsers._group_actions[0].choices.get(command)
        assert sub is not None, f"{doc.name}: `{match.group(1)}`: no command {command!r}"
        if command == "eval" and len(words) > 2 and not words[2].startswith("-"):
            sub = sub._subparsers._group_actions[0].choices[words[2]]
        for word in words[2:]:
            flag = word.split("=")[0].strip("[],.;:()")
            if flag.startswith("--") and flag not in ("--help", "--version"):
                assert flag in _visible_flags(sub), f"{doc.name}: `{match.group(1)}`: {flag} is not an option of " \
                                                    f"mmprm {command} (or an old spelling: use the current name)"

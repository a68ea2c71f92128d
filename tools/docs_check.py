"""Checks of README.md and docs/ that need no site build: relative links and anchors, and the code blocks.

    python tools/docs_check.py          # list broken links and anchors; exit 1 if there are any
    python tools/docs_check.py --run    # also run the code blocks marked runnable

A link is checked when it is relative: the file (or folder) must exist, and an anchor into a Markdown file must
name one of its headings. Anchors are GitHub's: the heading's text, lower-cased, without punctuation other than
``-`` and ``_``, spaces turned into ``-``; mkdocs.yml makes the site use the same slugs. Two headings of one file
with the same anchor are an error too, since GitHub and the site number the second one differently.

A fenced code block is runnable when the line before its fence is ``<!-- runnable -->``. Runnable blocks must be
tiny, CPU-only and offline; tests/test_docs.py runs each in a fresh interpreter in an empty folder. Every other
``python`` block must parse, and every ``json`` block must be valid JSON (a block holding ``"key": value`` pairs
is read as the inside of an object).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE_MARK = "<!-- runnable -->"
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")  # indented: inside a list item
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"!?\[(?P<text>(?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?(?P<target>[^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(?P<target>\S+?)>?(?:\s+.*)?$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
CODE_SPAN = re.compile(r"(`+)(?:.+?)\1")
COMMENT = re.compile(r"<!--.*?-->", re.S)


def markdown_files() -> list[Path]:
    """README.md and every page of the site."""
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


@dataclass
class CodeBlock:
    path: Path
    line: int
    """1-based line of the opening fence."""
    language: str
    code: str
    runnable: bool

    @property
    def where(self) -> str:
        return f"{_shown(self.path)}:{self.line}"


def _shown(path: Path) -> str:
    """A path as messages show it: relative to the repository when it is inside."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def split_code(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str, str, bool]]]:
    """(prose lines with their 1-based numbers, fenced blocks as (line, language, code, runnable))."""
    prose, blocks = [], []
    lines = text.split("\n")
    i = 0
    previous = ""
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            prose.append((i + 1, lines[i]))
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        fence, info = match["fence"], match["info"].strip()
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(rf"^ *{fence[0]}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i][len(match["indent"]):] if lines[i].startswith(match["indent"]) else lines[i])
            i += 1
        i += 1  # the closing fence
        blocks.append((start + 1, info.split()[0] if info else "", "\n".join(body) + "\n", previous == RUNNABLE_MARK))
        previous = ""
    return prose, blocks


def code_blocks(paths: Optional[list[Path]] = None) -> list[CodeBlock]:
    found = []
    for path in paths or markdown_files():
        for line, language, code, runnable in split_code(path.read_text())[1]:
            found.append(CodeBlock(path, line, language, code, runnable))
    return found


# ------------------------------------------------------------------------------------------------------ links
def slug(heading: str) -> str:
    """GitHub's anchor of a heading (pymdownx.slugs.slugify(case="lower") gives the same on the site)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"</?[^>]*>", "", unicodedata.normalize("NFC", text)).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> tuple[set[str], list[str]]:
    """(the anchors of a Markdown file, problems: headings whose anchor repeats an earlier one)."""
    prose, _ = split_code(path.read_text())
    found: set[str] = set()
    problems = []
    for number, line in prose:
        heading = HEADING.match(line)
        if heading:
            name = slug(heading[2])
            if name in found:
                problems.append(f"{_shown(path)}:{number}: heading {heading[2]!r} repeats the anchor "
                                f"#{name} of an earlier heading: give it another title")
            found.add(name)
        found.update(HTML_ANCHOR.findall(line))
    return found, problems


def links(path: Path) -> Iterator[tuple[int, str]]:
    """(line, target) of every link and image outside code, including reference definitions."""
    prose, _ = split_code(path.read_text())
    text = "\n".join(line for _, line in prose)
    text = COMMENT.sub(lambda m: "\n" * m[0].count("\n"), text)
    for index, line in enumerate(text.split("\n")):
        number = prose[index][0]
        line = CODE_SPAN.sub("", line)
        for match in INLINE_LINK.finditer(line):
            yield number, match["target"]
        definition = REFERENCE_DEF.match(line)
        if definition:
            yield number, definition["target"]


def broken_links(paths: Optional[list[Path]] = None, root: Path = ROOT) -> list[str]:
    """Every relative link of the files whose target or anchor does not exist or lies outside ``root`` (the
    repository), and every repeated anchor."""
    problems: list[str] = []
    cache: dict[Path, set[str]] = {}

    def anchors_of(path: Path) -> set[str]:
        if path not in cache:
            cache[path], repeated = anchors(path)
            problems.extend(repeated)
        return cache[path]

    for path in paths or markdown_files():
        anchors_of(path)
        for number, target in links(path):
            if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                continue  # an external URL (mailto:, https:): not checked offline
            where = f"{_shown(path)}:{number}"
            file_part, _, anchor = target.partition("#")
            destination = (path.parent / unquote(file_part)).resolve() if file_part else path
            if not destination.exists():
                problems.append(f"{where}: link to {target!r}: {file_part} does not exist")
                continue
            if not destination.is_relative_to(root.resolve()):
                problems.append(f"{where}: link to {target!r} leaves the repository")
                continue
            if anchor and destination.suffix == ".md" and unquote(anchor) not in anchors_of(destination):
                problems.append(f"{where}: link to {target!r}: {_shown(destination)} has no heading "
                                f"with the anchor #{anchor}")
    return problems


# ------------------------------------------------------------------------------------------------ code blocks
def block_problem(block: CodeBlock) -> Optional[str]:
    """Why a block that is not run is wrong: Python that does not parse, JSON that does not load."""
    if block.language == "python":
        try:
            ast.parse(block.code)
        except SyntaxError as e:
            return f"{block.where}: the python block does not parse: {e}"
    if block.language == "json":
        try:
            json.loads(block.code)
        except json.JSONDecodeError:
            try:
                json.loads("{" + block.code + "}")
            except json.JSONDecodeError as e:
                return f"{block.where}: the json block is not JSON (nor the inside of an object): {e}"
    if block.runnable and block.language not in ("python", "bash"):
        return f"{block.where}: a runnable block must be python or bash, not {block.language or 'unlabelled'}"
    return None


def run_block(block: CodeBlock, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
    """Run a runnable block in a fresh interpreter of this environment, in an empty folder, offline, one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # each block is a single-process run of its own
    command = [sys.executable, "-c", block.code] if block.language == "python" else ["bash", "-euo", "pipefail",
                                                                                       "-c", block.code]
    with tempfile.TemporaryDirectory(prefix="zo2-docs-block-") as folder:
        return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout_s)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="also run the blocks marked runnable")
    args = parser.parse_args(argv)
    problems = broken_links() + [p for p in map(block_problem, code_blocks()) if p]
    if args.run:
        for block in code_blocks():
            if block.runnable:
                result = run_block(block)
                print(f"{block.where}: exit {result.returncode}")
                if result.returncode:
                    problems.append(f"{block.where}: exit {result.returncode}\n{result.stdout}{result.stderr}")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Writes one benchmark's section of benchmarks/RESULTS.md (other sections are kept)."""
from __future__ import annotations

import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEach section is written by the command shown in it; ratios are measured side by side in one run.\n"


def machine() -> str:
    cpus = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {cpus} CPU threads (torch uses {torch.get_num_threads()}), {gpu}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def command() -> str:
    script = os.path.relpath(sys.argv[0], Path(__file__).resolve().parents[1])
    return "python " + " ".join(shlex.quote(a) for a in [script, *sys.argv[1:]])


def write_section(name: str, body: str, path: Path | str = RESULTS, ran: str | None = None) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md (or of the markdown file ``path``).

    ``ran``: the "`command` — date, machine" line, when the numbers were measured elsewhere (default: here, now).
    """
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    block = (f"<!-- {name}:start -->\n## {name}\n\n{ran or provenance()}\n\n{body.strip()}\n"
             f"<!-- {name}:end -->\n")
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    path.write_text(text)


def provenance() -> str:
    """The command, the date and this machine, as a section's first line."""
    return f"`{command()}` — {time.strftime('%Y-%m-%d %H:%M')}, {machine()}"


def table(header: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)

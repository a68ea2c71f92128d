"""Injected faults: every file-system mutation of a checkpoint save, a zo2-export, engine.save_pretrained and an NVMe
run, each a SIGKILL point, and what the next run found. One command:

    python benchmarks/crash_points.py [--docs]

Runs tests/crash_harness.py (one process per group of scenarios, one fork per crash point) and writes the table
| operation | crash points | recovered | data lost | hangs | to its section of benchmarks/RESULTS.md, and with
``--docs`` into docs/crash-safety.md too. "recovered": the next run found the previous or the new
version, whole, and its next save or export succeeded with nothing left behind; "data lost": it found neither
(or an error instead); "hangs": the operation or the next run did not finish within 3 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from results import command, machine, table, write_section  # noqa: E402

GROUPS = [
    ["checkpoint-first", "checkpoint-next", "checkpoint-overwrite"],
    ["checkpoint-hybrid-overwrite"],
    ["export-first", "export-replace", "export-symlink", "save-pretrained"],
    ["nvme-run"],
    ["checkpoint-overwrite", "export-replace", "save-pretrained", "--no-exchange"],
]
DOCS_PAGE = ROOT / "docs" / "crash-safety.md"
TABLE_START, TABLE_END = "<!-- crash_points table:start -->", "<!-- crash_points table:end -->"


def run_group(args: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "results.json"
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                  "MASTER_PORT")}
        env["OMP_NUM_THREADS"] = "1"
        run = subprocess.run([sys.executable, str(ROOT / "tests" / "crash_harness.py"), *args, "--json", str(report)],
                             env=env, text=True, capture_output=True)
        if run.returncode != 0:
            raise SystemExit(f"crash_harness.py {' '.join(args)} failed:\n{run.stderr[-4000:]}")
        return json.loads(report.read_text())


def render(results: list[dict]) -> str:
    rows = [[r["operation"], r["points"], r["recovered"], r["data_lost"], r["hangs"]] for r in results]
    total = [sum(r[k] for r in results) for k in ("points", "recovered", "data_lost", "hangs")]
    rows.append(["**all**", *[f"**{n}**" for n in total]])
    return table(["operation", "crash points", "recovered", "data lost", "hangs"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", "--readme", dest="docs", action="store_true",
                        help="also replace the table in docs/crash-safety.md (--readme: its name before the docs moved)")
    args = parser.parse_args()
    started, load = time.perf_counter(), os.getloadavg()[0]
    results = []
    for group in GROUPS:
        for r in run_group(group):
            print(f"{r['scenario']}: {r['points']} points, {r['recovered']} recovered, {r['data_lost']} lost, "
                  f"{r['hangs']} hangs, {r['seconds']} s", flush=True)
            for failure in r["failures"][:5]:
                print(f"    {failure}", flush=True)
            results.append(r)
    elapsed = time.perf_counter() - started
    kinds: dict[str, int] = {}
    for r in results:
        for kind, n in r["kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    gaps = sum(len(r["durability_gaps"]) for r in results)
    body = render(results) + (
        f"\n\nEach crash point is one file-system mutation under the directory the operation writes (kinds: "
        f"{', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}); the process is SIGKILLed just before it. "
        f"Python's file operations are wrapped one by one; a writer in native code (safetensors' save_file, "
        f"DeepSpeed's asynchronous swap writes) counts as its file's creation and one write. "
        f"Rows \"without RENAME_EXCHANGE\" replace directories by two renames, as on file systems without the "
        f"atomic exchange (NFS): there a kill between the renames leaves the previous version set aside, "
        f"complete, and the next load or export takes it back. Renames into place without an fsync of the data "
        f"before and of the directory after (what a power loss could undo): {gaps}. "
        f"All {sum(r['points'] for r in results)} points, with the next run's checks, took {elapsed:.0f} s "
        f"(forks of one process per group: no import or model build per point; load average {load:.1f} at the "
        f"start, the machine shared with other work).")
    write_section("crash_points", body)
    print(render(results))
    if args.docs:
        text = DOCS_PAGE.read_text()
        block = (f"{TABLE_START}\n{render(results)}\n\n`{command()}`, {time.strftime('%Y-%m-%d')}, "
                 f"{machine()}\n{TABLE_END}")
        pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.S)
        if not pattern.search(text):
            raise SystemExit(f"{DOCS_PAGE} has no {TABLE_START} ... {TABLE_END} block to replace")
        DOCS_PAGE.write_text(pattern.sub(lambda _: block, text))


if __name__ == "__main__":
    main()

"""What the config switch costs an interpreter that never uses it: start-up with and without its .pth.

Both variants are the same interpreter with a private user site directory (``PYTHONUSERBASE``); one holds
``zo2_deepspeed_autopatch.pth``, as ``pip install`` puts it in site-packages, the other nothing. Runs are
interleaved; the CPU time (user + sys) of each child is measured, which a shared machine disturbs far less
than the wall clock. Also reported: the hook module's own import time (``-X importtime``) and the cost of
one import passing the hook's finder, times the modules ``import torch`` loads.

    python benchmarks/switch_startup.py [--repeats 200] [--torch-repeats 20]
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def user_base(root: Path, with_switch: bool) -> Path:
    base = root / ("with" if with_switch else "without")
    site_dir = subprocess.run([sys.executable, "-c", "import site; print(site.getusersitepackages())"],
                              env={**os.environ, "PYTHONUSERBASE": str(base)}, capture_output=True, text=True,
                              check=True).stdout.strip()
    Path(site_dir).mkdir(parents=True)
    if with_switch:
        shutil.copy(ROOT / "zo2_deepspeed_autopatch.pth", site_dir)
    return base


def child_env(base: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "ZO2_DEEPSPEED_AUTOPATCH")}
    return {**env, "PYTHONUSERBASE": str(base), "PYTHONPATH": str(ROOT)}  # the same sys.path in both variants


def cpu_ms(code: str, env: dict) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000


def interleaved(code: str, bases: dict, repeats: int) -> dict:
    times: dict = {name: [] for name in bases}
    for _ in range(repeats):
        for name, base in bases.items():
            times[name].append(cpu_ms(code, child_env(base)))
    return {name: statistics.median(values) for name, values in times.items()}


def hook_import_us(base: Path, repeats: int = 20) -> float:
    """Median self time of importing zo2_deepspeed_autopatch at start-up (bytecode cached, as pip leaves it)."""
    samples = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], env=child_env(base),
                             capture_output=True, text=True, check=True).stderr
        match = re.search(r"import time:\s+(\d+) \|\s+\d+ \|\s+zo2_deepspeed_autopatch$", out, re.M)
        samples.append(float(match.group(1)))
    return statistics.median(samples)


def finder_ns() -> tuple[float, int]:
    """One import of an unrelated module through the hook's finder, and how many modules torch imports."""
    code = ("import timeit, sys, zo2_deepspeed_autopatch as h; f = h._Finder(); "
            "t = min(timeit.repeat(lambda: f.find_spec('torch.nn.modules.linear'), number=100000, repeat=5)); "
            "import torch; print(t / 100000 * 1e9, len(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(Path(tempfile.gettempdir())), capture_output=True,
                         text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="interleaved runs of `python -c pass` per variant")
    parser.add_argument("--torch-repeats", type=int, default=20, help="interleaved runs of `import torch` per variant")
    parser.add_argument("--results", default=None, help="markdown file to write the section to (default RESULTS.md)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bases = {"without": user_base(Path(tmp), False), "with": user_base(Path(tmp), True)}
        subprocess.run([sys.executable, "-c", "import zo2_deepspeed_autopatch"], env=child_env(bases["with"]),
                       check=True)  # bytecode written once, as pip install does
        rows = [(code, interleaved(code, bases, n)) for code, n in
                (("pass", args.repeats), ("import torch", args.torch_repeats))]
        import_us = hook_import_us(bases["with"])
    per_import_ns, modules = finder_ns()
    body = ["| `python -c` | runs per variant | CPU ms without .pth | CPU ms with .pth | with / without |",
            "|---|---|---|---|---|"]
    for (code, medians), n in zip(rows, (args.repeats, args.torch_repeats)):
        body.append(f"| `{code}` | {n} | {medians['without']:.1f} | {medians['with']:.1f} | "
                    f"{medians['with'] / medians['without']:.3f} |")
    body += ["", f"Import of the hook module at start-up (`-X importtime`, self, median of 20): {import_us:.0f} µs. "
             f"One import through the hook's finder (a name it does not watch): {per_import_ns:.0f} ns; `import torch` "
             f"loads {modules} modules, so at most {per_import_ns * modules / 1e6:.2f} ms."]
    text = "\n".join(body)
    print(text)
    from results import write_section
    write_section("switch_startup", text, **({"path": args.results} if args.results else {}))


if __name__ == "__main__":
    main()

"""DeepSpeed's JIT-compiled C++ ops: build them once up front, and never wait forever on a dead build's lock.

DeepSpeed compiles an op the first time it loads (torch.utils.cpp_extension, ninja), minutes on a small machine,
and serialises builds with a lock file in the op's build folder. torch's ``FileBaton`` holds that file open for the
whole build and removes it at the end; a build killed part-way (Ctrl-C, a test timeout, OOM) leaves the file, and
every later load of the op then waits on it forever, silently. Because the owner keeps the file open, "owner gone"
is decidable on Linux: no process has it among its open descriptors (/proc/<pid>/fd). On a shared home folder
(NFS) another host's build is invisible here, so a lock younger than ``min_age_s`` is never removed.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

logger = logging.getLogger(__name__)

# The ops this project makes DeepSpeed build, with what each is for and its build time on 2 cores.
OPS: dict[str, tuple[str, str]] = {
    "PinMemoryBuilder": ("pinned host buffers (loaded with the AsyncIO op)", "under 1 min"),
    "AsyncIOBuilder": ("the NVMe tier (ZeRO-Infinity's asynchronous file I/O)", "3-9 min"),
    "CPUAdamBuilder": ("DeepSpeed's CPU Adam (first-order optimizer state on the host)", "1-3 min"),
    "ShareMemCommBuilder": ("DeepSpeed's shared-memory all-reduce between ranks on one CPU host", "1-2 min"),
}


class StaleBuildLockError(RuntimeError):
    """A build lock whose owner cannot be decided; the message names the file to remove."""


def _cpu_builder(name: str) -> Any:
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().create_op_builder(name)
    if builder is None:
        raise LookupError(f"the accelerator has no {name}")
    return builder if not isinstance(builder, type) else builder()


def build_folder(builder: Any) -> Path:
    """Where torch compiles (and locks) this op."""
    from torch.utils.cpp_extension import _get_build_directory
    return Path(_get_build_directory(builder.name, verbose=False))


def lock_holders(lock: Path, proc: Path = Path("/proc")) -> Optional[list[int]]:
    """Pids of the live processes that have ``lock`` open, or None where /proc cannot tell (not Linux)."""
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(lock)
    holders = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    holders.append(int(entry.name))
                    break
            except OSError:
                continue
    return holders


def clear_stale_lock(folder: Path, min_age_s: float = 5.0) -> bool:
    """Remove ``folder``/lock when its build is dead; True when one was removed.

    Raises StaleBuildLockError, naming the path, where the owner cannot be decided (no /proc).
    """
    lock = folder / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    holders = lock_holders(lock)
    if holders is None:
        raise StaleBuildLockError(
            f"{lock} exists and this system cannot tell whether its build is still running; if no build of this op "
            f"is running, remove it (rm {lock}) and run again")
    if holders or age < min_age_s:
        return False
    try:
        lock.unlink()
    except FileNotFoundError:
        return False
    logger.warning("zo2: removed %s, left by a build of DeepSpeed's %s op that was killed %.0f s ago "
                   "(no process holds it); building again", lock, folder.name, age)
    return True


def built_elsewhere(builder: Any) -> bool:
    """True when the op's cached build was compiled for another Python environment.

    torch keys its extension cache by op name only (``~/.cache/torch_extensions/py311_cpu/<op>``), but the
    build commands name the environment's own DeepSpeed sources and torch headers: loading from a second venv
    recompiles for minutes, and two venvs that alternate recompile every time. Giving each environment its own
    ``TORCH_EXTENSIONS_DIR`` keeps both builds.
    """
    import deepspeed
    ninja = build_folder(builder) / "build.ninja"
    try:
        text = ninja.read_text()
    except OSError:
        return False
    return os.path.dirname(os.path.abspath(deepspeed.__file__)) not in text


def is_built(builder: Any) -> bool:
    """True when loading the op will not compile it: installed with DeepSpeed, or built in torch's extension
    cache for this environment."""
    from deepspeed.git_version_info import installed_ops
    if installed_ops.get(builder.name, False):
        return True
    folder = build_folder(builder)
    names = os.listdir(folder) if folder.is_dir() else []
    return (any(name.startswith(builder.name) and name.endswith(".so") for name in names)
            and not built_elsewhere(builder))


def load_op(builder: Any) -> Any:
    """``builder.load()``, first clearing dead builds' locks so that the load cannot wait forever.

    Every op of ``OPS`` is checked, not only this one: loading one op can load another (the AsyncIO op loads
    the pinned-memory op).
    """
    from deepspeed.ops.op_builder.builder import OpBuilder
    if builder.name not in OpBuilder._loaded_ops:
        clear_stale_locks(extra=[build_folder(builder)])
    return builder.load(verbose=False)


def clear_stale_locks(extra: Iterable[Path] = ()) -> list[Path]:
    """``clear_stale_lock`` for every op of ``OPS`` (and ``extra`` folders); the folders cleared.

    Called before the project loads an op, and before ``deepspeed.init_distributed``, which loads the
    shared-memory comm op itself.
    """
    folders = set(extra)
    for name in OPS:
        try:
            folders.add(build_folder(_cpu_builder(name)))
        except Exception:  # an accelerator without this op, or DeepSpeed's probe failing: nothing to clear
            continue
    return [folder for folder in sorted(folders) if clear_stale_lock(folder)]


def prebuild(names: Iterable[str] = OPS, out=sys.stderr) -> int:
    """Build every op in ``names`` that is compatible here and not built yet; 0 unless a build failed."""
    failed = 0
    for name in names:
        purpose, duration = OPS[name]
        try:
            builder = _cpu_builder(name)
            compatible = builder.is_compatible(verbose=False)
        except Exception as e:  # DeepSpeed raises whatever its probes raise
            print(f"zo2 prebuild: {name} skipped ({e})", file=out)
            continue
        if not compatible:
            print(f"zo2 prebuild: {builder.name} is not compatible here, skipped (needed for {purpose})", file=out)
            continue
        if is_built(builder):
            print(f"zo2 prebuild: {builder.name} already built ({build_folder(builder)})", file=out)
            continue
        elsewhere = (" (the build there was made for another Python environment; set TORCH_EXTENSIONS_DIR per "
                     "environment to keep both)" if built_elsewhere(builder) else "")
        print(f"zo2 prebuild: compiling {builder.name} for {purpose}; about {duration} on 2 cores, once per "
              f"environment, into {build_folder(builder)}{elsewhere}", file=out, flush=True)
        start = time.monotonic()
        try:
            load_op(builder)
        except Exception as e:  # a compiler error: say it and go on with the other ops
            failed += 1
            print(f"zo2 prebuild: {builder.name} failed to build: {e}", file=out)
            continue
        print(f"zo2 prebuild: {builder.name} built in {time.monotonic() - start:.0f} s", file=out, flush=True)
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m zo2_deepspeed.prebuild",
                                     description="Compile DeepSpeed's C++ ops that zo2_deepspeed uses, once, up front.")
    parser.add_argument("ops", nargs="*", default=list(OPS),
                        help=f"which ops (default: all of {', '.join(OPS)})")
    args = parser.parse_args(argv)
    unknown = [name for name in args.ops if name not in OPS]
    if unknown:
        parser.error(f"unknown op {', '.join(unknown)}; choose from {', '.join(OPS)}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return prebuild(args.ops or list(OPS))

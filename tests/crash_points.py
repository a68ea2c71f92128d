"""Crash points: every file-system mutation a process makes under some directories, traced in order, and a
SIGKILL just before the N-th.

``CrashPoints(roots, kill_at=N).install()`` wraps, for the rest of the process, the Python entry points
through which zo2_deepspeed, transformers and the standard library change files: ``open`` for writing
(builtins, io, pathlib), the writes of the file it returns, ``os.open`` with a write flag, ``os.write``,
``os.fsync``/``fdatasync``, ``os.rename``/``replace``, ``os.unlink``/``remove``, ``os.rmdir``, ``os.mkdir``
(``makedirs`` and ``Path.mkdir`` call it), ``os.link``/``symlink``, ``os.truncate``/``ftruncate``,
``shutil.rmtree`` (a point of its own, then its unlinks one by one), the atomic directory exchange of
``zo2_deepspeed.checkpoint.durable``, and writers in native code: safetensors' ``save_file`` (as
open-for-write, then write) and DeepSpeed's asynchronous swap writes. Only paths under ``roots`` count.

Point N is reached just before mutation N: the process is killed there, so mutations 0..N-1 happened and
N did not. A run without ``kill_at`` records the trace (kind, path) that a test then enumerates; the
trace also shows whether every file was fsynced before it was renamed into place (``durability_gaps``).
"""
from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _joined(path: Any, dir_fd: Optional[int]) -> str:
    if isinstance(path, int):
        return _fd_path(path)
    path = os.fsdecode(os.fspath(path))
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(_fd_path(dir_fd), path)
    return os.path.abspath(path)


class _TrackedFile:
    """A file opened for writing whose writes are crash points; everything else is the file's own."""

    def __init__(self, file: Any, path: str, points: "CrashPoints") -> None:
        self._file, self._path, self._points = file, path, points

    def write(self, data: Any) -> int:
        self._points.point("write", self._path)
        return self._file.write(data)

    def writelines(self, lines: Iterable[Any]) -> None:
        for line in lines:
            self.write(line)

    def __enter__(self) -> "_TrackedFile":
        self._file.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._file.__exit__(*exc)

    def __iter__(self) -> Any:
        return iter(self._file)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


class CrashPoints:
    """Counts (and traces) the file-system mutations under ``roots``; SIGKILLs itself before number ``kill_at``."""

    def __init__(self, roots: Iterable[str | Path], kill_at: Optional[int] = None,
                 kill_note: Optional[Path] = None) -> None:
        self.roots = [os.path.realpath(r) for r in roots]
        self.kill_at = kill_at
        self.kill_note = kill_note
        """Where the point the process is killed at is written first (the parent checks it is the one it meant)."""
        self.trace: list[tuple[str, str]] = []
        self._original: dict[tuple[Any, str], Any] = {}

    # -- the points --------------------------------------------------------------------------------
    def watched(self, path: str) -> bool:
        real = os.path.realpath(path) if path else ""
        return any(real == r or real.startswith(r + os.sep) for r in self.roots)

    def point(self, kind: str, path: str) -> None:
        if not self.watched(path):
            return
        n = len(self.trace)
        self.trace.append((kind, path))
        if n == self.kill_at:
            if self.kill_note is not None:
                self.kill_note.write_text(json.dumps([kind, path]))
            os.kill(os.getpid(), signal.SIGKILL)

    # -- wrapping ----------------------------------------------------------------------------------
    def _wrap(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name)
        self._original[(owner, name)] = original
        setattr(owner, name, make(original))

    def install(self) -> "CrashPoints":
        point = self.point

        def opener(original: Any) -> Any:
            def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
                writing = any(c in mode for c in "wxa+")
                path = _joined(file, None) if writing and not isinstance(file, int) else ""
                if writing:
                    point("open-for-write", path)
                handle = original(file, mode, *args, **kwargs)
                return _TrackedFile(handle, path, self) if writing and self.watched(path) else handle
            return open_

        self._wrap(builtins, "open", opener)
        self._wrap(io, "open", opener)

        def os_open(original: Any) -> Any:
            def wrapped(path: Any, flags: int, mode: int = 0o777, *, dir_fd: Optional[int] = None) -> int:
                if flags & WRITE_FLAGS:
                    point("open-for-write", _joined(path, dir_fd))
                return original(path, flags, mode, dir_fd=dir_fd)
            return wrapped

        self._wrap(os, "open", os_open)

        def on_fd(kind: str) -> Callable[[Any], Any]:
            def make(original: Any) -> Any:
                def wrapped(fd: Any, *args: Any) -> Any:
                    number = fd if isinstance(fd, int) else fd.fileno()
                    point(kind, _fd_path(number))
                    return original(fd, *args)
                return wrapped
            return make

        self._wrap(os, "write", on_fd("write"))
        self._wrap(os, "fsync", on_fd("fsync"))
        self._wrap(os, "fdatasync", on_fd("fsync"))
        self._wrap(os, "ftruncate", on_fd("truncate"))

        def on_path(kind: str) -> Callable[[Any], Any]:
            def make(original: Any) -> Any:
                def wrapped(path: Any, *args: Any, dir_fd: Optional[int] = None, **kwargs: Any) -> Any:
                    point(kind, _joined(path, dir_fd))
                    if dir_fd is not None:
                        kwargs["dir_fd"] = dir_fd
                    return original(path, *args, **kwargs)
                return wrapped
            return make

        for name, kind in [("unlink", "unlink"), ("remove", "unlink"), ("rmdir", "rmdir"), ("mkdir", "mkdir"),
                           ("truncate", "truncate")]:
            self._wrap(os, name, on_path(kind))

        def two_paths(kind: str) -> Callable[[Any], Any]:
            def make(original: Any) -> Any:
                def wrapped(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
                    target = _joined(dst, kwargs.get("dst_dir_fd"))
                    source = _joined(src, kwargs.get("src_dir_fd"))
                    point(kind, f"{source} -> {target}" if self.watched(target) else source)
                    return original(src, dst, *args, **kwargs)
                return wrapped
            return make

        self._wrap(os, "rename", two_paths("rename"))
        self._wrap(os, "replace", two_paths("rename"))
        self._wrap(os, "link", two_paths("link"))
        self._wrap(os, "symlink", lambda original: lambda src, dst, *a, **k: (
            point("symlink", _joined(dst, k.get("dir_fd"))), original(src, dst, *a, **k))[1])

        def rmtree(original: Any) -> Any:
            def wrapped(path: Any, *args: Any, **kwargs: Any) -> Any:
                point("rmtree", _joined(path, None))
                return original(path, *args, **kwargs)
            return wrapped

        self._wrap(shutil, "rmtree", rmtree)
        self._wrap_native()
        return self

    def _wrap_native(self) -> None:
        """Writers whose file operations happen in native code: a point before they start, one for the write."""
        try:
            from zo2_deepspeed.checkpoint import durable
        except ImportError:
            durable = None

        def exchange(original: Any) -> Any:
            def wrapped(a: Path, b: Path) -> bool:
                if durable.exchange_enabled:
                    self.point("exchange", f"{a} <-> {b}")
                return original(a, b)
            return wrapped

        if durable is not None:
            self._wrap(durable, "exchange", exchange)
        try:
            import safetensors.torch
            import transformers.modeling_utils as modeling_utils
        except ImportError:
            return

        def save_file(original: Any) -> Any:
            def wrapped(tensors: Any, filename: Any, *args: Any, **kwargs: Any) -> Any:
                path = _joined(filename, None)
                self.point("open-for-write", path)
                if self.watched(path) and len(self.trace) == self.kill_at:  # the next point: the file exists, empty
                    self._original[(builtins, "open")](path, "wb").close()
                self.point("write", path)
                return original(tensors, filename, *args, **kwargs)
            return wrapped

        for owner in (safetensors.torch, modeling_utils):
            if hasattr(owner, "safe_save_file" if owner is modeling_utils else "save_file"):
                self._wrap(owner, "safe_save_file" if owner is modeling_utils else "save_file", save_file)

    def wrap_swap_writes(self) -> None:
        """DeepSpeed's swap-out (native asynchronous writes into the NVMe swap files): one point per file."""
        from deepspeed.runtime.swap_tensor import partitioned_param_swapper as swapper_module

        def swap_out(original: Any) -> Any:
            def wrapped(handle: Any, buffers: Any, paths: list, *args: Any, **kwargs: Any) -> Any:
                for path in paths:
                    self.point("write", _joined(path, None))
                return original(handle, buffers, paths, *args, **kwargs)
            return wrapped

        self._wrap(swapper_module, "swap_out_tensors", swap_out)

    def uninstall(self) -> None:
        for (owner, name), original in reversed(list(self._original.items())):
            setattr(owner, name, original)
        self._original.clear()


def durability_gaps(trace: list[tuple[str, str]]) -> list[str]:
    """What a power loss could take from the operation traced: every rename that publishes a file or a
    directory needs the data below it fsynced first, and its directory fsynced after.

    Checked per rename (or exchange) into a visible name: each file opened for writing under the
    source since the last fsync of it, and the source directory itself when files were created in it,
    must be fsynced before the rename; the parent of the target must be fsynced after it.
    """
    gaps = []
    for i, (kind, path) in enumerate(trace):
        if kind not in ("rename", "exchange"):
            continue
        source, target = path.split(" -> " if kind == "rename" else " <-> ")
        if os.path.basename(target).startswith("."):
            continue  # set aside or hidden: not where readers look
        unsynced: dict[str, int] = {}
        created_in_source = False
        for j, (k, p) in enumerate(trace[:i]):
            if k in ("open-for-write", "write", "truncate") and (p == source or p.startswith(source + os.sep)):
                unsynced[p] = j
                created_in_source = created_in_source or (k == "open-for-write" and p != source)
            elif k == "fsync":
                unsynced.pop(p, None)
                if p == source:
                    created_in_source = False
        for p in unsynced:
            gaps.append(f"{p} is renamed into place ({target}) without an fsync after its last write")
        if created_in_source:
            gaps.append(f"{source} is renamed to {target} without an fsync of the directory after its files were "
                        f"created")
        parent = os.path.dirname(target)
        if not any(k == "fsync" and p == parent for k, p in trace[i + 1:]):
            gaps.append(f"the rename to {target} is not made durable (no fsync of {parent} after it)")
    return gaps

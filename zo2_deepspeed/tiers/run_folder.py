"""One folder of its own under ``nvme_path`` for every NVMe swapper, so runs sharing a path never touch each
other's files.

DeepSpeed's swapper deletes ``<nvme_path>/zero_stage_3/<dtype>params/rank<r>`` when it starts: a second run
with the same path (the shipped configs use one fixed path) deleted a live run's swap files. Here each
swapper gets ``<nvme_path>/zo2-run-<host>-<pid>-<random>/``, locked (``flock``) by an open lock file
beside it for as long as the process holds it. The folder is removed when its swapper is freed and at
interpreter exit; a folder whose lock is free belongs to a run that died without cleaning up, and the
next run removes it. A live run's folder is never removed.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import uuid
import weakref
from pathlib import Path
from typing import Any

from ..errors import ConfigError

NVME_PATH = "zero_optimization.offload_param.nvme_path"
PREFIX = "zo2-run-"
LOCK = ".lock"


def _log_rank0(message: str, warning: bool = False) -> None:
    import logging

    from deepspeed.utils import log_dist
    log_dist(message, ranks=[0], level=logging.WARNING if warning else logging.INFO)


def check_nvme_path(nvme_path: Any) -> Path:
    """``nvme_path`` as a usable directory: created when missing if its parent exists; else a ConfigError.

    A missing parent is not created: a typo there (``/mnt/nmve/zo2``) would otherwise put the swap files
    on whatever disk holds the root.
    """
    if not nvme_path:
        raise ConfigError(f"{NVME_PATH} is required with offload_param.device nvme: give a folder on a fast local "
                          f"disk")
    path = Path(str(nvme_path)).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{NVME_PATH} {str(nvme_path)!r} is a file, not a directory")
    if not path.exists():
        if not path.parent.is_dir():
            raise ConfigError(f"{NVME_PATH} {str(nvme_path)!r} does not exist, nor does its parent {path.parent}: "
                              f"create it, or give a folder on a fast local disk")
        try:
            path.mkdir(exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{NVME_PATH} {str(nvme_path)!r} does not exist and cannot be created: "
                              f"{e.strerror or e}") from None
        _log_rank0(f"{NVME_PATH}: created {path}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{NVME_PATH} {str(nvme_path)!r} is not writable by this process: give a folder it can "
                          f"write to")
    return path


class RunFolder:
    """A locked folder of one swapper under ``nvme_path``; ``remove()`` deletes it and frees the lock."""

    def __init__(self, root: Path) -> None:
        name = f"{PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = root / name
        self.lock_path = root / f"{name}{LOCK}"
        try:
            self._fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # before the folder exists: never seen unlocked
            self.path.mkdir()
        except OSError as e:
            raise ConfigError(f"{NVME_PATH} {str(root)!r}: cannot create the run folder {self.path}: "
                              f"{e.strerror or e}") from None

    def remove(self) -> None:
        """Delete the folder (swap and state files), then the lock file, then release the lock."""
        if self._fd < 0:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lock_path)
        os.close(self._fd)
        self._fd = -1


def remove_stale(root: Path) -> list[Path]:
    """Remove the run folders under ``root`` whose lock is free (their process is gone); the folders removed."""
    removed = []
    for lock in sorted(root.glob(f"{PREFIX}*{LOCK}")):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live run
            os.close(fd)
            continue
        folder = lock.with_name(lock.name[:-len(LOCK)])
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)
        removed.append(folder)
    if removed:
        _log_rank0(f"{NVME_PATH}: removed {len(removed)} folder(s) of runs that ended without cleaning up: "
                   f"{', '.join(p.name for p in removed)}")
    return removed


def claim(nvme_path: Any, owner: Any) -> RunFolder:
    """A new run folder under ``nvme_path`` for ``owner`` (a swapper), removed when ``owner`` is freed or at exit."""
    root = check_nvme_path(nvme_path)
    remove_stale(root)
    folder = RunFolder(root)
    weakref.finalize(owner, folder.remove)  # also runs at interpreter exit
    return folder

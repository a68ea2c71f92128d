"""One folder of its own under ``nvme_path`` for every NVMe swapper, so runs sharing a path never touch each
other's files.

DeepSpeed's swapper deletes ``<nvme_path>/zero_stage_3/<dtype>params/rank<r>`` when it starts: a second run
with the same path (the shipped configs use one fixed path) deleted a live run's swap files. Here each
swapper gets ``<nvme_path>/zo2-run-<host>-<pid>-<random>/`` and a lock file beside it,
``zo2-run-<host>-<pid>-<random>.lock``, that records its owner (host name, pid, the kernel's boot id and
the process's start time) and is held with ``flock`` for as long as the process runs. The folder is
removed when its swapper is freed and at interpreter exit.

A run that died without cleaning up (killed, out of memory, a node lost) leaves its folder; the next run
on the path removes it when all of these hold:

- the lock records this host (a folder of another host is never removed: from here it cannot be told
  whether that run is alive);
- the recorded process is gone: no such pid, or a pid reused by a newer process (another start time), or
  a pid of an earlier boot (another boot id);
- its lock is free (``flock`` of this host: a run still holding it is alive, whatever else says).

The lock is created under a temporary hidden name, locked and given its record, and only then renamed to
its final name: a lock file is never seen unlocked or empty, so two runs starting at once cannot take
each other's fresh folder for a dead one. A temporary lock left by a run killed in between is removed by
the same rules (its name carries host and pid).

Network file systems: on NFS, ``flock`` is a lock the server sees from every client unless the client
mounts with ``local_lock=flock`` or ``local_lock=all``, and on Lustre only with the ``flock`` mount
option (``localflock`` makes it local to each node; ``noflock`` refuses it). A lock local to each node
says nothing about runs on other nodes: that is why the host check comes first, and why a folder of
another host stays until its own host's next run removes it (or someone does by hand). Where ``flock``
is refused altogether, runs go on without a lock, and only the pid check guards this host's folders. A
node-local disk (the usual place for ``nvme_path``) has none of these questions.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import uuid
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from ..checkpoint.durable import fsync_dir
from ..errors import ConfigError

NVME_PATH = "zero_optimization.offload_param.nvme_path"
PREFIX = "zo2-run-"
LOCK = ".lock"
PENDING = ".pending-"
"""Prefix of a lock file being set up (locked and recorded, not yet renamed to its final name)."""
_NAME = re.compile(rf"^(?:{re.escape(PENDING)})?{re.escape(PREFIX)}(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}")
_NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
"""What ``flock`` answers on a file system that does not support it (Lustre ``noflock``, some FUSE mounts)."""


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


# -- who owns a folder --------------------------------------------------------------------------------------


def _boot_id() -> str:
    """This kernel's boot id (a pid is meaningful only within one boot); empty where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> Optional[int]:
    """The start time of process ``pid`` in clock ticks since boot (tells a reused pid apart); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name, in parentheses, may hold spaces
    return int(fields[19])


@dataclass(frozen=True)
class Owner:
    """The process a run folder belongs to, as recorded in its lock file."""

    host: str
    pid: int
    boot_id: str = ""
    start_time: Optional[int] = None

    @classmethod
    def me(cls) -> "Owner":
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _boot_id(), _start_time(pid))

    @classmethod
    def of(cls, lock: Path) -> Optional["Owner"]:
        """The lock's record, else what its name says (host and pid); None if neither can be read."""
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            record = json.loads(lock.read_text())
            return cls(str(record["host"]), int(record["pid"]), str(record.get("boot_id", "")),
                       record.get("start_time"))
        found = _NAME.match(lock.name)
        return cls(found["host"], int(found["pid"])) if found else None

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether the recorded process (on this host) still runs: same boot, pid present, same start time."""
        if self.boot_id and self.boot_id != _boot_id():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: alive
            pass
        now = _start_time(self.pid)
        return self.start_time is None or now is None or now == self.start_time


def _try_lock(fd: int) -> Optional[bool]:
    """Take the exclusive lock without waiting: True taken, False held by a live process, None not supported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in _NO_FLOCK:
            return None
        raise


# -- a run's own folder -------------------------------------------------------------------------------------


class RunFolder:
    """A locked folder of one swapper under ``nvme_path``; ``remove()`` deletes it and frees the lock."""

    def __init__(self, root: Path) -> None:
        owner = Owner.me()
        name = f"{PREFIX}{owner.host}-{owner.pid}-{uuid.uuid4().hex[:8]}"
        self.path = root / name
        self.lock_path = root / f"{name}{LOCK}"
        pending = root / f"{PENDING}{name}{LOCK}"
        self._fd = -1
        try:
            self._fd = os.open(pending, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o644)
            if _try_lock(self._fd) is None:
                _log_rank0(f"{NVME_PATH} {root}: the file system refuses flock; run folders are told apart by host "
                           f"and pid only", warning=True)
            os.write(self._fd, json.dumps(asdict(owner)).encode())
            os.fsync(self._fd)  # the record outlives a power loss: it tells the next boot's runs this one is dead
            os.rename(pending, self.lock_path)  # appears locked and recorded, never otherwise
            fsync_dir(root)
            self.path.mkdir()
        except OSError as e:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            with contextlib.suppress(OSError):
                os.unlink(pending)
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


def _stale(lock: Path) -> Optional[int]:
    """An open, locked descriptor of ``lock`` if its run is dead and of this host; else None (keep it)."""
    owner = Owner.of(lock)
    if owner is None or not owner.on_this_host() or owner.alive():
        return None
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if _try_lock(fd) is False:  # held: alive after all (a pid namespace of its own, say)
            os.close(fd)
            return None
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale(root: Path) -> list[Path]:
    """Remove the run folders under ``root`` of this host's dead runs (see the module's docstring); those removed."""
    removed, others = [], []
    locks = sorted(root.glob(f"{PREFIX}*{LOCK}")) + sorted(root.glob(f"{PENDING}{PREFIX}*{LOCK}"))
    for lock in locks:
        owner = Owner.of(lock)
        if owner is not None and not owner.on_this_host():
            others.append(lock)
            continue
        fd = _stale(lock)
        if fd is None:
            continue
        name = lock.name[len(PENDING):] if lock.name.startswith(PENDING) else lock.name
        folder = root / name[:-len(LOCK)]
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)
        removed.append(folder)
    if removed:
        _log_rank0(f"{NVME_PATH}: removed {len(removed)} folder(s) of runs on this host that ended without "
                   f"cleaning up: {', '.join(p.name for p in removed)}")
    if others:
        _log_rank0(f"{NVME_PATH} {root}: kept {len(others)} run folder(s) of other hosts (their runs may be alive; "
                   f"remove them by hand once they are not): {', '.join(p.name[:-len(LOCK)] for p in others)}")
    return removed


def claim(nvme_path: Any, owner: Any) -> RunFolder:
    """A new run folder under ``nvme_path`` for ``owner`` (a swapper), removed when ``owner`` is freed or at exit."""
    root = check_nvme_path(nvme_path)
    remove_stale(root)
    folder = RunFolder(root)
    weakref.finalize(owner, folder.remove)  # also runs at interpreter exit
    return folder

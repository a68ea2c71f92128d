"""Durable file-system steps: fsync of files and directories, directories created durably, and a directory
replaced so that a crash never leaves its name empty.

Why: a rename is atomic against a killed process, but data and names reach the disk only when fsynced
(a file renamed into place before its data was flushed can be empty after a power loss). And replacing
a directory that exists takes two renames (set the old one aside, move the new one in) unless the kernel
exchanges two names in one step: ``renameat2(RENAME_EXCHANGE)``, Linux 3.15 and later, on ext4, XFS,
Btrfs, tmpfs and most local file systems (not on NFS). With the exchange the name holds the old or the
new version at every moment. Without it, a crash between the two renames leaves the old version set
aside as ``.trash-<name>``, complete: ``paths.resolve`` loads a checkpoint from there, and the next save
or export puts it back.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from .format import TRASH

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}
"""What renameat2 answers where the kernel or the file system has no exchange (EXDEV: never across mounts)."""


def _renameat2() -> Optional[Callable[..., int]]:
    """glibc's renameat2 (2.28 and later), or None (another C library, another OS)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_EXCHANGE: Optional[Callable[..., int]] = _renameat2()
exchange_enabled = _EXCHANGE is not None
"""False where no exchange exists; also set False to test the two-rename path."""


def exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` (both exist) in one atomic step; False where that is not supported."""
    if not exchange_enabled or _EXCHANGE is None:
        return False
    if _EXCHANGE(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (names created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make the data of the file at ``path`` durable (a file written by code that does not fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file and directory under ``root``, and ``root`` itself, made durable (deepest first).

    Used before a directory written by other code (``save_pretrained``, tokenizers) is renamed into place.
    """
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                fsync_file(path)
        fsync_dir(Path(dirpath))


def make_dirs(path: Path) -> None:
    """``mkdir -p path``, each new directory's entry made durable in its parent."""
    missing = []
    current = path.absolute()
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another rank or process made it meanwhile
            os.mkdir(directory)
        fsync_dir(directory.parent)


def set_aside_name(target: Path) -> Path:
    """Where ``replace_dir`` keeps the previous version of ``target`` while it moves the new one in."""
    return target.with_name(f"{TRASH}{target.name}")


def replace_dir(source: Path, target: Path) -> None:
    """Move the finished directory ``source`` to ``target``, replacing an existing ``target`` whole.

    ``source``'s files must be durable already (fsynced). With the atomic exchange ``target`` names
    the old or the new version at every moment, and the old one, then at ``source``, is removed;
    without it the old version is set aside (``set_aside_name``) for the instant between two renames.
    The parent's entries are fsynced before this returns.
    """
    parent = target.parent
    if not os.path.lexists(target):
        os.rename(source, target)
        fsync_dir(parent)
        return
    if exchange(source, target):
        fsync_dir(parent)
        shutil.rmtree(source, ignore_errors=True)  # now the previous version (a leftover if this is cut short)
        return
    trash = set_aside_name(target)
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(target, trash)
    os.rename(source, target)
    fsync_dir(parent)
    shutil.rmtree(trash, ignore_errors=True)

"""Free space: what a save or an export will take on its filesystem, and what it may use there.

Leftovers of interrupted saves (partial copies, old versions of a replaced tag) count as free: the
next save removes them before it writes.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .format import META, PARTIAL, TRASH


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _block_size(root: Path) -> int:
    return os.statvfs(_existing_ancestor(root)).f_frsize or 4096


def _allocated_bytes(path: Path) -> int:
    """Bytes a directory tree holds on disk (what removing it gives back)."""
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in [*names, "."]:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _set_aside_tag(path: Path) -> Optional[str]:
    """The tag whose old version ``path`` holds, if it is a directory set aside by ``replace_dir``."""
    return path.name[len(TRASH):] if path.is_dir() and path.name.startswith(TRASH) else None


def _leftovers(root: Path) -> list[Path]:
    """Directories of interrupted saves that hold nothing needed: partial copies, and old versions of a
    tag whose new version is in place (or that are incomplete themselves)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PARTIAL)
                  or _set_aside_tag(p) and ((root / _set_aside_tag(p)).exists() or not (p / META).is_file()))


def free_space(path: Path) -> int:
    """Bytes free on the filesystem that holds ``path`` (or will: its nearest existing ancestor's)."""
    return shutil.disk_usage(_existing_ancestor(path)).free


def bytes_on_disk(path: Path, sizes: Iterable[int]) -> int:
    """What files of ``sizes`` bytes take on the filesystem of ``path``: whole blocks, plus one each for metadata."""
    block = _block_size(path)
    return sum(_on_disk(n, block) for n in sizes)


def _free_bytes(root: Path) -> int:
    """Bytes a save into ``root`` may use: free space plus what removing leftovers of interrupted saves frees."""
    return free_space(root) + sum(_allocated_bytes(p) for p in _leftovers(root))


@dataclass
class _Space:
    """What a save needs and had, for the messages of a refused or failed save."""

    root: Path
    needed: int
    free: int
    latest: Optional[str]

    def kept(self) -> str:
        return f"'latest' still names {self.latest}" if self.latest else "there is no 'latest' yet"

    def explain(self) -> str:
        return (f"the checkpoint needs {self.needed:,} bytes in {self.root} and {self.free:,} bytes were free "
                f"there; {self.kept()}")


def _on_disk(size: int, block: int) -> int:
    return -(-size // block) * block + block  # rounded up to whole blocks, plus one for metadata



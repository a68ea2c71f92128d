"""Hugging Face export directories written as checkpoints are: space checked first, built in a hidden sibling,
fsynced, then moved into place, so a full disk, an I/O error, a killed process or a power loss leaves no
half-written export and the previous one intact.

The finished sibling replaces the directory in one atomic exchange where the file system has one
(``checkpoint.durable.replace_dir``), so at every moment the directory holds the previous export or the
new one, whole. A symlinked output directory stays a symlink: the directory it points to is replaced.

``zo2-export`` (``replace=True``) replaces the whole directory: an earlier export's files (shards of
another layout, a tokenizer) do not survive a re-export. It refuses a non-empty directory that is not
a Hugging Face model directory (no ``config.json``), so a mistyped ``out_dir`` cannot wipe unrelated
files. ``engine.save_pretrained`` (``replace=False``) follows ``PreTrainedModel.save_pretrained``: the
files it writes replace theirs, earlier weight files it does not write are removed, and other files
(a tokenizer saved there first) are kept: hard-linked into the sibling before the exchange, so they
cost no space and the switch stays one step. Where hard links are refused, the new files are moved in
one by one, weights first and ``config.json`` last.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from .checkpoint import bytes_on_disk, free_space
from .checkpoint.durable import fsync_dir, fsync_tree, make_dirs, replace_dir, set_aside_name
from .checkpoint.ranks import _log_info
from .errors import ExportError

STAGING = ".zo2-export-"
"""Prefix of the hidden sibling an export is written into (``.zo2-export-<name>``)."""
SMALL_FILES = 64 << 10
"""Bytes allowed for config.json, generation_config.json and an index (a few KiB each)."""
WEIGHT_FILE = re.compile(r"^(model|pytorch_model|adapter_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$"
                         r"|^(model\.safetensors|pytorch_model\.bin)\.index\.json$")


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def check_target(out: Path, replace: bool) -> None:
    """Refuse, before anything is written, an ``out`` the export must not touch."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"cannot export to {out}: it is a file")
    if replace and out.is_dir() and any(out.iterdir()) and not _is_model_dir(out):
        raise ExportError(f"{out} is not empty and not a Hugging Face model directory (no config.json): an export "
                          f"replaces its directory whole, so it is not written there; give a new or empty directory")


def _restore_interrupted(out: Path) -> None:
    """A previous export killed while being replaced leaves it set aside: put it back (or drop the stale copy)."""
    aside = set_aside_name(out)
    if aside.is_dir():
        if out.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            _log_info(f"restoring {out} from {aside}, set aside by an interrupted export")
            os.rename(aside, out)
            fsync_dir(out.parent)


def _failure(out: Path, needed: int, error: BaseException) -> ExportError:
    reason = getattr(error, "strerror", None) or str(error)
    kept = "the previous export in it is unchanged" if _is_model_dir(out) else "nothing was written there"
    return ExportError(f"cannot export to {out}: {type(error).__name__}: {reason}; the export needs about "
                       f"{needed:,} bytes and {free_space(out.parent):,} are free there now; {kept}")


@contextlib.contextmanager
def staged_export(out_dir: str, tensor_bytes: list[int], replace: bool) -> Iterator[Path]:
    """A hidden sibling of ``out_dir`` to write the export into; moved into place when the block succeeds.

    ``tensor_bytes``: the sizes of the weight files to be written. A failure inside the block (an
    OSError such as a full disk, or safetensors' own error) removes the sibling and raises an
    ExportError naming the directory and the bytes needed; ``out_dir`` is untouched.
    """
    out = _real_target(Path(out_dir).absolute())
    check_target(out, replace)
    needed = bytes_on_disk(out.parent, [*tensor_bytes, SMALL_FILES])
    free = free_space(out.parent)
    if needed > free:
        raise ExportError(f"not enough space to export to {out}: it needs about {needed:,} bytes and {free:,} are "
                          f"free there; nothing was written: free space or export to another directory")
    staging = out.with_name(f"{STAGING}{out.name}")
    try:
        make_dirs(out.parent)
        _restore_interrupted(out)
        shutil.rmtree(staging, ignore_errors=True)  # left by an export that was killed
        staging.mkdir()
    except OSError as e:
        raise _failure(out, needed, e) from None
    try:
        yield staging
        fsync_tree(staging)  # save_pretrained and tokenizers write without fsync
        _publish(staging, out, replace)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            raise _failure(out, needed, e) from e
        raise


def _real_target(out: Path) -> Path:
    """The directory an export replaces: for a symlink, the directory it points to (the link is kept)."""
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def _publish(staging: Path, out: Path, replace: bool) -> None:
    """Move the finished export into place (renames and hard links only: they need no space)."""
    if not out.exists() or replace:
        replace_dir(staging, out)
        return
    written = {p.name for p in staging.iterdir()}
    try:
        for old in out.iterdir():  # kept files join the new version; earlier weight files of another layout do not
            if old.name not in written and not (old.is_file() and WEIGHT_FILE.match(old.name)):
                _link_into(old, staging / old.name)
        fsync_dir(staging)
    except OSError as e:  # a file system without hard links
        _log_info(f"{out}: cannot hard-link the files to keep ({e.strerror or e}); moving the new files in one by one")
        _move_files_in(staging, out, written)
        return
    shutil.copymode(out, staging)
    replace_dir(staging, out)


def _link_into(source: Path, target: Path) -> None:
    """``source`` (a file, a symlink or a directory tree) at ``target`` without copying data."""
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        shutil.copytree(source, target, symlinks=True, copy_function=os.link)
    else:
        os.link(source, target)


def _move_files_in(staging: Path, out: Path, written: set[str]) -> None:
    """The new files moved into ``out`` one by one (not one atomic step), weights first, config.json last."""
    for name in [p.name for p in staging.iterdir() if p.name not in written]:  # links made before a failure
        _remove(staging / name)
    for old in out.iterdir():
        if old.is_file() and WEIGHT_FILE.match(old.name) and old.name not in written:
            old.unlink()
    # until config.json moves, the directory's config still describes its old weights
    for name in sorted(written, key=lambda n: n == "config.json"):
        if (out / name).is_dir() and not (out / name).is_symlink():
            shutil.rmtree(out / name)
        os.replace(staging / name, out / name)
    staging.rmdir()
    fsync_dir(out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()

"""Saving: plan, check the space, write into a hidden directory, publish by rename.

``save_checkpoint`` runs these steps on every rank, each through ``ranks.together`` so a failure on
one rank raises on all:

1. ``plan._plan``: what each rank writes and its size; the sum is compared with the free space
   before anything is written (a refused save writes nothing);
2. ``_prepare_dir`` (rank 0): tidy what interrupted saves left, create ``.partial-<tag>``;
3. ``_write_rank``: each rank writes its tensor file, hashing it as it goes (``hashing``);
4. ``_publish`` (rank 0): the small files and the manifest with every checksum, fsync, rename the
   directory into place, then replace ``latest`` by rename.

A crash at any moment leaves ``latest`` naming a complete checkpoint; a failed write on any rank
removes the partial directory on every rank (``_discard``).
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..errors import CheckpointError
from .format import FIRST_ORDER, HASH, LATEST, MANIFEST_CHECKSUM, META, PARTIAL, _raw_bytes, rank_file
from .durable import fsync_dir, make_dirs, replace_dir
from .hashing import _manifest_digest, _write_hashed
from .plan import _Plan, _plan
from .ranks import _log_info, together
from .space import _leftovers, _set_aside_tag, _Space
from .subject import CheckpointSubject


@contextlib.contextmanager
def _writing(file: Path, space: _Space) -> Iterator[None]:
    """Turn an OS error while writing ``file`` into a CheckpointError that says what the save needed."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"cannot write {file}: {reason}; {space.explain()}; the partial checkpoint is "
                                  f"removed: free space or save to another directory") from e
        raise CheckpointError(f"cannot write {file}: {reason}; the partial checkpoint is removed and "
                              f"{space.kept()}") from e


def _write_rank(plan: _Plan, partial: Path, rank: int, space: _Space) -> list[tuple[str, dict]]:
    """This rank's tensor files (name and manifest entry each): its partitions, and on rank 0 the first-order
    tail's state."""
    written = []
    if plan.header:
        path = partial / rank_file(rank)
        tensors = (_raw_bytes(_read_planned(key, expected, plan.readers[key]))
                   for key, expected in plan.tensors.items())
        with _writing(path, space):
            written.append((path.name, _write_hashed(path, itertools.chain([plan.header], tensors))))
    if plan.first_order_header:
        path = partial / FIRST_ORDER
        tensors = (_raw_bytes(t) for t in plan.first_order.values())
        with _writing(path, space):
            written.append((path.name, _write_hashed(path, itertools.chain([plan.first_order_header], tensors))))
    return written


def _read_planned(key: str, expected: torch.Tensor, read: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A tensor of the plan, checked against the size and dtype its header entry was written with."""
    tensor = read().contiguous()
    if tensor.numel() != expected.numel() or tensor.dtype != expected.dtype:
        raise CheckpointError(f"{key} read back as {tensor.numel()} x {tensor.dtype}, but the checkpoint plans "
                              f"{expected.numel()} x {expected.dtype}")
    return tensor


def _publish(plan: _Plan, root: Path, partial: Path, final: Path, tag: str, save_latest: bool,
             rank_entries: list[list[tuple[str, dict]]], space: _Space) -> None:
    """Rank 0: write the small files and the manifest, then move the checkpoint into place."""
    checksums = dict(entry for entries in rank_entries for entry in entries)
    for name, data in plan.extras.items():
        with _writing(partial / name, space):
            checksums[name] = _write_hashed(partial / name, [data])
    meta = dict(plan.meta, checksums=checksums)
    meta[MANIFEST_CHECKSUM] = {"algorithm": HASH, "digest": _manifest_digest(meta, HASH)}
    with _writing(partial / META, space):
        _write_durably(partial / META, json.dumps(meta, indent=1, sort_keys=True), "x")
        fsync_dir(partial)
    latest_tmp = root / f".{LATEST}.tmp"
    if save_latest:  # written before the rename: after it, nothing is left that needs space
        with _writing(latest_tmp, space):
            _write_durably(latest_tmp, tag, "w")
    replace_dir(partial, final)  # fsyncs root: the new tag is there before 'latest' names it
    if save_latest:
        os.replace(latest_tmp, root / LATEST)
        fsync_dir(root)


def _write_durably(path: Path, text: str, mode: str) -> None:
    """A small file written in one write and fsynced."""
    with open(path, mode) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _prepare_dir(root: Path, partial: Path, space: _Space) -> None:
    """Rank 0: an empty ``partial`` directory, after tidying what interrupted saves left.

    A save killed while replacing an existing tag without an atomic exchange can leave its old version
    set aside and the tag missing: that complete checkpoint is put back. Partial copies are removed.
    """
    with _writing(partial, space):
        make_dirs(root)
        for path in root.iterdir():
            tag = _set_aside_tag(path)
            if tag and not (root / tag).exists() and (path / META).is_file():
                _log_info(f"restoring {root / tag} from {path}, set aside by an interrupted save")
                os.rename(path, root / tag)
                fsync_dir(root)
        for leftover in _leftovers(root):
            _log_info(f"removing {leftover}, left by an interrupted save")
            shutil.rmtree(leftover, ignore_errors=True)
        partial.mkdir()


def _discard(rank: int, root: Path, partial: Path) -> None:
    """After a failed save: each rank removes its own file, rank 0 the partial directory."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial / rank_file(rank))
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(root / f".{LATEST}.tmp")


def save_checkpoint(subject: CheckpointSubject, save_dir: str, tag: Optional[str] = None,
                    client_state: Optional[dict] = None, save_latest: bool = True,
                    exclude_frozen_parameters: bool = False) -> bool:
    """Write a checkpoint of ``subject`` (every rank calls this). Returns True, as DeepSpeed does.

    The engine applies its pending ZO update before it builds ``subject``. Raises CheckpointError
    before writing anything when the filesystem lacks the space, and after removing every partial
    file when a write fails on any rank.
    """
    tag = str(tag) if tag is not None else f"global_step{subject.counters.global_steps}"
    if "/" in tag or tag.startswith(".") or not tag:
        raise CheckpointError(f"checkpoint tag {tag!r} must be a plain directory name")
    root = Path(save_dir)
    partial, final = root / f"{PARTIAL}{tag}", root / tag
    world_size, rank = subject.world_size, subject.rank
    plan, shared = together(world_size, "preparing the checkpoint",
                            lambda: _plan(subject, root, tag, client_state, exclude_frozen_parameters),
                            share=lambda p: (p.disk_bytes, p.free, p.latest))
    space = _Space(root.absolute(), sum(n for n, _, _ in shared), shared[0][1], shared[0][2])
    if space.needed > space.free:
        raise CheckpointError(f"not enough space to save checkpoint {tag}: {space.explain()}; nothing was written: "
                              f"free space or save to another directory")
    rank0 = rank == 0
    try:
        together(world_size, "creating the checkpoint directory",
                 lambda: _prepare_dir(root, partial, space) if rank0 else None)
        _, entries = together(world_size, "writing the checkpoint files",
                              lambda: _write_rank(plan, partial, rank, space), share=lambda e: e)
        together(world_size, "publishing the checkpoint", lambda: _publish(
            plan, root, partial, final, tag, save_latest, entries, space) if rank0 else None, last=True)
    except BaseException:
        _discard(rank, root, partial)
        raise
    return True



"""Finding a checkpoint: where ``load_dir`` and ``tag`` point, its manifest, and what to offer instead of a
damaged one; and moving a finished directory into place."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError
from .format import FORMAT, LATEST, META, REQUIRED_KEYS, TRASH


def replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; an existing ``target`` is set aside first and removed after."""
    if not target.exists():
        os.rename(source, target)
        return
    trash = target.with_name(f"{TRASH}{target.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(target, trash)
    os.rename(source, target)
    shutil.rmtree(trash, ignore_errors=True)


def _other_tags(path: Path) -> str:
    """What to do about a damaged checkpoint: the other checkpoints beside it, newest first."""
    root = path.parent
    others = [p for p in root.iterdir() if p.is_dir() and p != path and not p.name.startswith(".")
              and (p / META).is_file()] if root.is_dir() else []
    others.sort(key=lambda p: (p / META).stat().st_mtime, reverse=True)
    if not others:
        return f"no other checkpoint is in {root}"
    return f"use an earlier tag instead; other checkpoints in {root}, newest first: " + ", ".join(
        p.name for p in others[:5])


def _visible_entries(root: Path) -> list[Path]:
    """What a directory holds, without hidden entries (leftovers of interrupted saves, ``.latest.tmp``)."""
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


def _checkpoint_tags(root: Path) -> list[str]:
    """The complete checkpoints directly in ``root``, newest first."""
    found = [p for p in _visible_entries(root) if p.is_dir() and (p / META).is_file()]
    found.sort(key=lambda p: (p / META).stat().st_mtime, reverse=True)
    return [p.name for p in found]


def resolve(load_dir: str, tag: Optional[str]) -> Optional[Path]:
    """The checkpoint directory ``load_dir`` and ``tag`` name; None when there is nothing to resume.

    Following DeepSpeed, a ``load_dir`` that does not exist or is empty (no ``latest``, nothing but
    leftovers of interrupted saves) is a fresh start: None. A ``global_step{N}`` directory given as
    ``load_dir`` is that checkpoint. Anything else that holds no checkpoint is refused with a
    CheckpointError naming the path: a file, a directory of other files, a save_dir whose ``latest``
    was deleted (its tags are listed), a tag that is not there. ``zo2-export`` resolves its input here too.
    """
    root = Path(load_dir)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} is a file, not a checkpoint directory: give the save_dir holding 'latest' "
                              f"or a {META}-holding tag directory such as global_step<N>")
    if tag is not None:
        path = root / str(tag)
        if not (path / META).is_file():
            where = "does not exist" if not path.exists() else f"is not a complete zo2 checkpoint (no {META})"
            tags = _checkpoint_tags(root) if root.is_dir() else []
            hint = f"; checkpoints in {root}, newest first: {', '.join(tags[:5])}" if tags else ""
            raise CheckpointError(f"checkpoint {path} {where}{hint}")
        return path
    if (root / META).is_file():  # a tag directory given directly
        return root
    if not root.exists() or not _visible_entries(root):
        return None
    latest = root / LATEST
    if not latest.is_file():
        tags = _checkpoint_tags(root)
        if tags:
            raise CheckpointError(f"{root} has no '{LATEST}' file, but holds checkpoints (newest first: "
                                  f"{', '.join(tags[:5])}): pass tag= (or the tag directory itself) to load one")
        raise CheckpointError(f"{root} holds no zo2 checkpoint (neither a '{LATEST}' file nor a {META}): give the "
                              f"directory save_checkpoint wrote, or a tag directory such as global_step<N>")
    tag = latest.read_text(errors="replace").strip()
    if not tag or any(c in tag for c in "/\0\ufffd") or tag.startswith("."):
        raise CheckpointError(f"{latest} is damaged: it holds {tag[:40]!r}, not a tag; pass tag= to load one; "
                              f"{_other_tags(latest)}")
    path = root / tag
    if not (path / META).exists():
        raise CheckpointError(f"{path} (named by {latest}) is not a complete zo2 checkpoint (no {META})")
    return path


def nothing_to_resume(load_dir: str) -> str:
    """The message for a ``load_dir`` that ``resolve`` found empty or missing."""
    state = "does not exist" if not Path(load_dir).exists() else "holds no checkpoint yet"
    return (f"load_checkpoint: {load_dir} {state}: nothing to resume, training starts from the model as given "
            f"(step 0)")


def read_meta(path: Path) -> dict:
    """The manifest of the checkpoint at ``path``; a damaged one is refused with its file named."""
    file = path / META
    try:
        meta = json.loads(file.read_bytes())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{file} (checkpoint {path.name}) cannot be read: {type(e).__name__}: {e}; "
                              f"{_other_tags(path)}") from None
    missing = [k for k in REQUIRED_KEYS if k not in meta] if isinstance(meta, dict) else list(REQUIRED_KEYS)
    if missing:
        raise CheckpointError(f"{file} (checkpoint {path.name}) is damaged: it lacks {missing}; {_other_tags(path)}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not supported (expected {FORMAT})")
    return meta



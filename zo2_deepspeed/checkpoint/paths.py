"""Finding a checkpoint: where ``load_dir`` and ``tag`` point, its manifest, and what to offer instead of a
damaged one. A save interrupted while it published (killed, or the machine lost power) is resolved to the
checkpoint it left complete, never to an error (``_published``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError
from .durable import set_aside_name
from .format import FORMAT, LATEST, META, REQUIRED_KEYS
from .ranks import _warn_rank0


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
        path = _published(root / str(tag))
        if not (path / META).is_file():
            where = "does not exist" if not path.exists() else f"is not a complete zo2 checkpoint (no {META})"
            tags = _checkpoint_tags(root) if root.is_dir() else []
            hint = f"; checkpoints in {root}, newest first: {', '.join(tags[:5])}" if tags else ""
            raise CheckpointError(f"checkpoint {path} {where}{hint}")
        return path
    if (root / META).is_file():  # a tag directory given directly
        return root
    if not root.exists() and (set_aside_name(root) / META).is_file():  # ... whose replacing save was interrupted
        return _published(root)
    if not root.exists() or not _visible_entries(root):
        return None
    latest = root / LATEST
    if not latest.is_file():
        unnamed = _unnamed_latest(root)
        if unnamed is not None:
            return unnamed
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
    path = _published(root / tag)
    if not (path / META).exists():
        raise CheckpointError(f"{root / tag} (named by {latest}) is not a complete zo2 checkpoint (no {META})")
    return path


def _published(path: Path) -> Path:
    """``path``, or the complete previous version of it that a save replacing it had set aside.

    A save that overwrites a tag where no atomic exchange exists (``durable.replace_dir``) renames the old
    version to ``.trash-<tag>`` and then the new one into place; killed between the two renames it leaves
    the tag missing. The set-aside copy is complete (it was the tag): load it; the next save puts it back.
    """
    if (path / META).is_file():
        return path
    aside = set_aside_name(path)
    if (aside / META).is_file():
        _warn_rank0(f"{path} is missing: a save that was replacing it was interrupted; loading its previous "
                    f"version, set aside at {aside} (the next save puts it back)")
        return aside
    return path


def _unnamed_latest(root: Path) -> Optional[Path]:
    """The checkpoint a save published just before it was interrupted, when no ``latest`` names it yet.

    A save writes the new ``latest`` as ``.latest.tmp`` before it renames the checkpoint into place, and
    renames it over ``latest`` after: interrupted in between, the first save into ``root`` leaves a
    complete checkpoint and no ``latest``. That checkpoint is what the save meant ``latest`` to name.
    """
    pending = root / f".{LATEST}.tmp"
    try:
        tag = pending.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not tag or "/" in tag or tag.startswith(".") or not (root / tag / META).is_file():
        return None
    _warn_rank0(f"{root} has no '{LATEST}' file: the save of {tag} was interrupted just before it wrote one; "
                f"loading {root / tag}, the checkpoint it had completed")
    return root / tag


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



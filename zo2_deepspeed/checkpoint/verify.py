"""Verifying a checkpoint before it is used: the manifest's own checksum, then the size and checksum of
every file about to be read, all recorded at save."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .format import CHUNK, MANIFEST_CHECKSUM, META
from .hashing import _hasher, _manifest_digest
from .paths import _other_tags
from .ranks import _log_info


def _verify_file(path: Path, name: str, entry: Any) -> None:
    """Refuse a file whose size or checksum differs from what the manifest recorded when it was saved."""
    file = path / name
    if not isinstance(entry, dict) or not {"algorithm", "digest", "bytes"} <= entry.keys():
        raise CheckpointError(f"{path / META} (checkpoint {path.name}) has no valid checksum for {name}: the "
                              f"manifest is damaged; {_other_tags(path)}")
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path.name} is incomplete: {file} is missing; {_other_tags(path)}")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(f"{file} (checkpoint {path.name}) is {size:,} bytes but was saved with "
                              f"{entry['bytes']:,} (truncated or overwritten); {_other_tags(path)}")
    hasher = _hasher(entry["algorithm"])
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            hasher.update(view[:n])
    if hasher.hexdigest() != entry["digest"]:
        raise CheckpointError(f"{file} (checkpoint {path.name}) is damaged: its {entry['algorithm']} checksum "
                              f"{hasher.hexdigest()} differs from the {entry['digest']} recorded at save; "
                              f"{_other_tags(path)}")


def _verify_manifest(path: Path, meta: dict) -> None:
    """Refuse a manifest whose content changed after it was saved (it parsed, so the change is in a value)."""
    entry = meta.get(MANIFEST_CHECKSUM)
    if entry is None:
        _log_info(f"checkpoint {path}: its manifest has no checksum of its own (saved before one was recorded)")
        return
    if not isinstance(entry, dict) or not {"algorithm", "digest"} <= entry.keys():
        raise CheckpointError(f"{path / META} (checkpoint {path.name}) is damaged: '{MANIFEST_CHECKSUM}' is not an "
                              f"algorithm and a digest; {_other_tags(path)}")
    digest = _manifest_digest(meta, entry["algorithm"])
    if digest != entry["digest"]:
        raise CheckpointError(f"{path / META} (checkpoint {path.name}) is damaged: the {entry['algorithm']} checksum "
                              f"of its content, {digest}, differs from the {entry['digest']} recorded at save (a "
                              f"value was changed after the save); {_other_tags(path)}")


def _verify(path: Path, meta: dict, names: list[str], verify: bool) -> None:
    """Check the manifest and the files about to be read (all of them before any is used)."""
    if not verify:
        _log_info(f"checkpoint {path}: checksums not verified (verify=False)")
        return
    _verify_manifest(path, meta)
    checksums = meta.get("checksums")
    if checksums is None:
        _log_info(f"checkpoint {path} has no checksums (saved before they were recorded): its files cannot be "
                  f"verified")
        return
    if not isinstance(checksums, dict):
        raise CheckpointError(f"{path / META} (checkpoint {path.name}) is damaged: 'checksums' is not a mapping; "
                              f"{_other_tags(path)}")
    for name in names:
        _verify_file(path, name, checksums.get(name))



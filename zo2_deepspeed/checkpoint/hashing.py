"""Checksums: files hashed while they are written, and the manifest's checksum of its own content."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import CheckpointError
from ..version import __version__
from .format import CHUNK, HASH, MANIFEST_CHECKSUM


def _hasher(algorithm: str) -> Any:
    """A streaming hash object for ``algorithm`` as named in a manifest."""
    if algorithm in ("xxh3_128", "xxh3_64", "xxh64", "xxh32"):
        import xxhash
        return getattr(xxhash, algorithm)()
    if algorithm in hashlib.algorithms_guaranteed:
        return hashlib.new(algorithm)
    raise CheckpointError(f"checksum algorithm {algorithm!r} is unknown to zo2_deepspeed {__version__}: "
                          f"load the checkpoint with the version that wrote it, or pass verify=False")


class _HashingFile:
    """A new file whose bytes are hashed as they are written: one pass over the data, no re-read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._hash = _hasher(HASH)
        self.size = 0
        self._file = open(path, "xb")

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK):
            chunk = view[start:start + CHUNK]
            self._hash.update(chunk)
            self._file.write(chunk)
        self.size += len(view)

    def finish(self) -> dict:
        """Flush and fsync; the manifest entry (algorithm, hex digest, size) of the file."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"algorithm": HASH, "digest": self._hash.hexdigest(), "bytes": self.size}

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()


def _write_hashed(path: Path, chunks: Iterable[Any]) -> dict:
    """Write ``chunks`` (bytes-like) to a new file at ``path``; its manifest entry."""
    out = _HashingFile(path)
    try:
        for chunk in chunks:
            out.write(chunk)
        return out.finish()
    except BaseException:
        out.abandon()
        raise


def _manifest_digest(meta: dict, algorithm: str) -> str:
    """Checksum of the manifest's content: its canonical JSON (sorted keys, no spaces) without its own checksum."""
    content = {k: v for k, v in meta.items() if k != MANIFEST_CHECKSUM}
    hasher = _hasher(algorithm)
    hasher.update(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())
    return hasher.hexdigest()



"""The on-disk format: names and constants of the layout, and the safetensors files' bytes.

The layout itself is drawn once, in the package's docstring (``zo2_deepspeed/checkpoint/__init__.py``).
"""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

FORMAT = 1
META = "zo2_checkpoint.json"
LATEST = "latest"
CLIENT_STATE = "client_state.pt"
LR_SCHEDULER = "lr_scheduler.pt"
FIRST_ORDER = "first_order.safetensors"
"""The first-order tail's masters, optimizer state and accumulated gradient (rank 0 writes it, every rank reads it)."""
PARTIAL = ".partial-"
TRASH = ".trash-"
HASH = "xxh3_128"
"""Checksum of every file; stored with each digest, so it can change later."""
MANIFEST_CHECKSUM = "manifest_checksum"
"""The manifest's own checksum, over its canonical JSON without this key (a flipped digit still parses)."""
CHUNK = 4 << 20
"""Bytes hashed and written (or read and hashed) at a time: small enough to stay in the CPU cache."""
OPERATIONAL_KEYS = {"prefetch_blocks", "comm_timeout_s", "check_sync_every", "max_skipped_steps", "parallel"}
"""zo2 fields that may change between save and resume without changing the trajectory."""
REQUIRED_KEYS = ("format", "tag", "global_steps", "world_size", "sharded", "method", "zo2", "batch", "parameters",
                 "files")
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
SAFETENSORS_NAMES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def rank_file(rank: int) -> str:
    """The tensor file of ``rank`` in a checkpoint directory."""
    return f"rank{rank:05d}.safetensors"


def _raw_bytes(t: torch.Tensor) -> Any:
    """A tensor's bytes as a numpy view (no copy for a contiguous CPU tensor)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, int]:
    """The leading bytes (length + JSON header) of a safetensors file holding ``tensors`` in order, and the
    file's total size.

    Why our own writer: the bytes are hashed while written, the size is known before anything is
    written (for the free-space check), and tensors are written from their own memory, not copied.
    The files are standard safetensors (``safetensors.safe_open`` reads them).
    """
    entries: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, which a safetensors checkpoint cannot hold")
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    entries["__metadata__"] = metadata
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # tensor data starts 8-byte aligned
    prefix = struct.pack("<Q", len(header)) + header
    return prefix, len(prefix) + offset


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _safe_bytes(value: Any, what: str) -> bytes:
    """``value`` serialised so that ``torch.load(weights_only=True)`` can read it back (checked now)."""
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{what} holds objects a safe loader cannot read back ({type(e).__name__}: {e}); "
                              f"keep it to tensors, numbers, strings, lists and dicts") from None
    return buffer.getvalue()


def _tensor_index(file: Path) -> tuple[dict, int]:
    """A safetensors file's tensor entries (dtype, shape, data_offsets) and where its data starts."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(length))
    entries.pop("__metadata__", None)
    return entries, 8 + length



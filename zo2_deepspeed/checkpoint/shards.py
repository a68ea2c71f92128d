"""Reading the tensor files: lazily, one tensor at a time, as whole parameters or as this rank's partition."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import CheckpointError
from .format import SAFETENSORS_NAMES, _tensor_index
from .paths import _other_tags


def _open_safetensors(file: Path, tag: str) -> Any:
    from safetensors import safe_open
    if not file.is_file():
        raise CheckpointError(f"checkpoint {tag} is incomplete: {file} is missing; {_other_tags(file.parent)}")
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # SafetensorError: truncated file, damaged header
        raise CheckpointError(f"{file} (checkpoint {tag}) cannot be read: {type(e).__name__}: {e}; "
                              f"{_other_tags(file.parent)}") from None


class _Shards:
    """Lazy access to per-rank tensor files: all of them (reassembly) or this rank's own.

    Each file is checked by safetensors when opened, then its tensors are read one at a time with plain
    reads at their offsets: safetensors memory-maps the file, and every page read through the map stays
    in the process's resident set while it is open, so loading a checkpoint larger than memory would
    hold all of it.
    """

    def __init__(self, path: Path, files: list[str]) -> None:
        self.path = path
        self.files = files
        self.index: list[tuple[dict, int]] = []
        for name in files:
            handle = _open_safetensors(path / name, path.name)  # refuses a damaged header or a short file now
            del handle  # unmaps the file
            self.index.append(_tensor_index(path / name))

    def _read(self, i: int, key: str) -> torch.Tensor:
        file = self.path / self.files[i]
        entries, data_start = self.index[i]
        try:
            entry = entries[key]
            start, end = entry["data_offsets"]
            dtype = SAFETENSORS_NAMES[entry["dtype"]]
            out = torch.empty(end - start, dtype=torch.uint8)
            view = memoryview(out.numpy())
            with open(file, "rb", buffering=0) as f:
                f.seek(data_start + start)
                done = 0
                while done < len(view):
                    n = f.readinto(view[done:])
                    if not n:
                        raise EOFError(f"the file ends {len(view) - done:,} bytes early")
                    done += n
            return out.view(dtype).view(entry["shape"])
        except Exception as e:
            raise CheckpointError(f"{file} (checkpoint {self.path.name}): cannot read {key}: "
                                  f"{type(e).__name__}: {e}; {_other_tags(self.path)}") from None

    def full(self, key: str, numel: int) -> torch.Tensor:
        """The flat tensor over the files: the concatenation of their partitions, cut to ``numel``."""
        parts = [self._read(i, key) for i in range(len(self.files))]
        return torch.cat(parts)[:numel] if len(parts) > 1 else parts[0][:numel]

    def tensor(self, key: str) -> torch.Tensor:
        """A tensor of a single file, with its saved shape (the first-order tail's state)."""
        return self._read(0, key)

    def has(self, key: str) -> bool:
        return key in self.index[0][0]


def _local_slice(full: torch.Tensor, rank: int, size: Optional[int]) -> torch.Tensor:
    """This rank's partition of a flat tensor (zero-padded at the end, as ZeRO-3 pads)."""
    if size is None:
        return full
    out = torch.zeros(size, dtype=full.dtype)
    start = rank * size
    n = max(0, min(size, full.numel() - start))
    if n:
        out[:n] = full[start:start + n]
    return out



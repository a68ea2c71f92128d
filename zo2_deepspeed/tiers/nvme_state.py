"""Method state (HiZOO's Hessian) of NVMe-resident parameters: fp32 files moved with DeepSpeed's async I/O.

Kept apart from the swapper: an own aio handle and own page-locked staging buffers, files under
``<run folder>/zo2_state/rank<r>/`` (the NVMe tier chooses the folder).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .nvme_aio import aio_op, aio_options


@dataclass(eq=False)
class StateFile:
    """An fp32 state shard at rest in a file (padded on disk to the O_DIRECT alignment)."""

    path: str
    numel: int


class StateFiles:
    """fp32 shards <-> files with DeepSpeed's async I/O, through reused page-locked staging buffers.

    An own aio handle: the swapper's handles count their pending operations and must not see ours.
    Files are opened with O_DIRECT, which silently drops an unaligned tail, so every transfer is padded.
    """

    def __init__(self, folder: str, aio_config: dict) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self._handle = aio_op().aio_handle(**aio_options(aio_config))
        # O_DIRECT needs whole logical blocks: pad to a page, which covers 512 B and 4 KiB sector devices.
        self._alignment = max(self._handle.get_alignment(), 4096) // 4
        self._free: dict[int, list[torch.Tensor]] = {}
        self._files: list[StateFile] = []

    def padded(self, numel: int) -> int:
        return -(-numel // self._alignment) * self._alignment

    def create(self, key: str, numel: int, value: float) -> tuple[StateFile, int]:
        """A new file of ``numel`` elements set to ``value``; returns it and the bytes written."""
        ref = StateFile(os.path.join(self.folder, f"{key}.swp"), numel)
        buffer = self.staging(numel)
        buffer.fill_(value)
        written = self.write([ref], [buffer])
        self.release([buffer])
        self._files.append(ref)
        return ref, written

    def staging(self, numel: int) -> torch.Tensor:
        """A page-locked buffer of ``padded(numel)`` fp32 elements (contents undefined)."""
        size = self.padded(numel)
        free = self._free.get(size)
        if free:
            return free.pop()
        return self._handle.new_cpu_locked_tensor(size, torch.empty(0, dtype=torch.float32))

    def release(self, buffers: list[torch.Tensor]) -> None:
        for buffer in buffers:
            self._free.setdefault(buffer.numel(), []).append(buffer)

    def read(self, refs: list[StateFile]) -> tuple[list[torch.Tensor], int]:
        """Staging buffers holding the files' contents (all reads in flight together); and the bytes read."""
        for ref in refs:
            self._check_size(ref)
        buffers = [self.staging(r.numel) for r in refs]
        for ref, buffer in zip(refs, buffers):
            self._submit(self._handle.async_pread(buffer, ref.path), "read", ref)
        self._wait(len(refs), "read")
        return buffers, sum(b.numel() * 4 for b in buffers)

    def write(self, refs: list[StateFile], buffers: list[torch.Tensor]) -> int:
        """Write staging buffers to their files and wait; returns the bytes written."""
        for ref, buffer in zip(refs, buffers):
            self._submit(self._handle.async_pwrite(buffer, ref.path), "write", ref)
        self._wait(len(refs), "write")
        return sum(b.numel() * 4 for b in buffers)

    def _check_size(self, ref: StateFile) -> None:
        """Refuse a file that is not the size it was written with: the async read reports completed
        operations, not bytes, so a short read would leave the rest of the buffer stale without an error."""
        expected = self.padded(ref.numel) * 4
        try:
            size = os.path.getsize(ref.path)
        except OSError as e:
            raise OSError(f"NVMe state file {ref.path} cannot be read: {e.strerror or e}") from None
        if size != expected:
            raise OSError(f"NVMe state file {ref.path} is {size:,} bytes, not the {expected:,} it was written with "
                          f"(truncated or replaced while training): the method's state in it is lost")

    @staticmethod
    def _submit(rc: int, what: str, ref: StateFile) -> None:
        if rc != 0:
            raise OSError(f"async {what} of {ref.path} could not be submitted (rc={rc})")

    def _wait(self, count: int, what: str) -> None:
        if count and self._handle.wait() != count:
            raise OSError(f"NVMe state {what}: fewer than {count} operations completed in {self.folder}")

    def close(self) -> None:
        """Free the page-locked buffers, drop the handle and delete the files (state is not kept past the run)."""
        for buffers in self._free.values():
            for buffer in buffers:
                self._handle.free_cpu_locked_tensor(buffer)
        self._free.clear()
        del self._handle
        for ref in self._files:
            try:
                os.remove(ref.path)
            except FileNotFoundError:
                pass
        self._files.clear()

"""ZeRO-Infinity partitions on NVMe as the resting place (``zero_optimization.offload_param.device: nvme``).

Parameter shards move through DeepSpeed's own partitioned-parameter swapper (``p.nvme_swapper``, made
by ``deepspeed.zero.Init``), so a model built under ``zero_init`` or ``HfDeepSpeedConfig`` streams
without a second copy or file layout of our own. A swapped-out shard's ``ds_tensor`` is a 0-dim fp16
placeholder, never the data: it is swapped in before anything reads it. Shards below DeepSpeed's
swap threshold stay in CPU memory and need no I/O. For zo2 configs ``zero_init`` gives ``zero.Init`` a
subclass of that swapper which pins its buffers per shard size as they are needed, instead of
buffer_count buffers of the largest shard's size up front (``nvme_swapper.sized_swapper_class``).

Method state (HiZOO's Hessian) lives where its parameter lives: an fp32 file under
``<run folder>/zo2_state/rank<r>/`` (the swapper's own folder under ``nvme_path``, see ``run_folder``)
for a parameter whose shard is on NVMe, moved with DeepSpeed's async I/O through page-locked, aligned
buffers; a CPU tensor for the small ones.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from ..blocks import ParamSlot
from ..buffers import BufferPool
from ..errors import ConfigError
from .base import MovementStats
from .nvme_aio import aio_options, nvme_unavailable_reason
from .nvme_state import StateFile, StateFiles
from .nvme_swapper import BUFFER_COUNT, _is_swapped_out, on_nvme, release_swapper, reopen_swapper
from .partitioned import PartitionedTier

__all__ = ["DiskStats", "NVMeTier", "StateFile", "StateFiles", "aio_options", "nvme_unavailable_reason", "on_nvme"]


@dataclass
class DiskStats(MovementStats):
    """Bytes that crossed the NVMe interface, and the seconds spent waiting for them."""

    read_s: float = 0.0
    """Wall time inside swap-ins and state reads (submission to completion)."""
    write_s: float = 0.0
    """Wall time inside swap-outs and state writes."""


class NVMeTier(PartitionedTier):
    """ZeRO-3 partitions on NVMe, swapped in for a block's residency and written back only when updated."""

    host_io = True

    def __init__(self, device: torch.device, pool: BufferPool, compute_dtype: torch.dtype,
                 stochastic_rounding: bool, process_group: Any = None, round_fn: Any = None) -> None:
        super().__init__(device, pool, compute_dtype, "nvme", stochastic_rounding, process_group, round_fn)
        self.disk_stats = DiskStats()
        """Bytes that really crossed the NVMe interface (O_DIRECT-padded), parameters and state, and the time
        spent on them. ``stats`` counts, like every tier, the shard bytes moved between the tier and the device."""
        self._swapper: Any = None
        self._states: Optional[StateFiles] = None
        self._closed = False

    def _swapper_of(self, p: torch.Tensor) -> Any:
        """The swapper of ``p`` (one per zero.Init, shared by all its parameters), with open aio handles."""
        swapper = p.nvme_swapper
        if self._closed:
            raise RuntimeError("the NVMe tier is closed (engine.close() was called)")
        reopen_swapper(swapper)  # released by an earlier engine's close() over the same model
        self._swapper = swapper
        return swapper

    # -- parameter shards: DeepSpeed's swapper --
    def _make_available(self, slots: list[ParamSlot]) -> None:
        """Swap in the block's NVMe shards (one batch of reads, then wait)."""
        wanted = [s.param for s in slots if on_nvme(s.param) and _is_swapped_out(s.param)]
        if wanted:
            swapper = self._swapper_of(wanted[0])
            free = swapper.available_swap_in_buffers()
            if len(wanted) > free:
                held = swapper.param_buffer_count - free
                raise ConfigError(f"{BUFFER_COUNT} is {swapper.param_buffer_count}: {held} NVMe partitions are in "
                                  f"memory and the next block needs {len(wanted)} more; set it to at least "
                                  f"{held + len(wanted)}")
            with self._timed("read_s"):
                swapper.swap_in(wanted, async_op=False)
            self.disk_stats.bytes_read += sum(self._disk_bytes(swapper, p) for p in wanted)
        for slot in slots:
            if on_nvme(slot.param) and _is_swapped_out(slot.param):
                raise RuntimeError(f"{slot.name}: NVMe partition is {slot.param.ds_tensor.status.name} after swap-in")

    def _after_store(self, slots: list[ParamSlot], dirty: list[bool]) -> None:
        """Write updated shards back (synchronously: the buffer is reused next) and drop clean ones unwritten."""
        written = [s.param for s, d in zip(slots, dirty) if d and on_nvme(s.param)]
        clean = [s.param for s, d in zip(slots, dirty) if not d and on_nvme(s.param)]
        if not written and not clean:
            return
        swapper = self._swapper_of((written or clean)[0])
        if written:
            self.disk_stats.bytes_written += sum(self._disk_bytes(swapper, p) for p in written)
            with self._timed("write_s"):
                swapper.swap_out_and_release(written)
        if clean:
            swapper.remove_partition_and_release_buffers(clean)

    @contextlib.contextmanager
    def _timed(self, field: str) -> Iterator[None]:
        """Add the wall time of the enclosed disk I/O to ``disk_stats.<field>``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self.disk_stats, field, getattr(self.disk_stats, field) + time.perf_counter() - start)

    @staticmethod
    def _disk_bytes(swapper: Any, p: torch.Tensor) -> int:
        return swapper._io_aligned_numel(int(p.ds_tensor.ds_numel)) * swapper.swap_element_size

    # -- method state: files beside the parameter's --
    def _state_files(self, swapper: Any) -> StateFiles:
        if self._states is None:
            run = getattr(swapper, "run_folder", None)  # DeepSpeed's own swapper (a model built without zo2) has none
            root = run.path if run is not None else swapper.swap_config.nvme_path
            folder = os.path.join(str(root), "zo2_state", f"rank{self._dist.get_rank()}")
            self._states = StateFiles(folder, swapper.aio_config)
        return self._states

    def create_state(self, slot: ParamSlot, name: str, value: float) -> None:
        p = slot.param
        if not on_nvme(p):
            super().create_state(slot, name, value)
            return
        files = self._state_files(self._swapper_of(p))
        ref, written = files.create(f"{p.ds_id}_{name}", int(p.ds_tensor.ds_numel), value)
        self.disk_stats.bytes_written += written
        slot.stored_state[name] = ref

    def fetch_state(self, slots: list[ParamSlot], name: str) -> list[torch.Tensor]:
        stored = [s.stored_state[name] for s in slots]
        refs = [r for r in stored if isinstance(r, StateFile)]
        buffers: list[torch.Tensor] = []
        if refs:
            with self._timed("read_s"):
                buffers, read = self._states.read(refs)
            self.disk_stats.bytes_read += read
        staged = iter(buffers)
        shards = [next(staged)[:r.numel] if isinstance(r, StateFile) else r for r in stored]
        fulls = self._materialize(shards, [s.numel for s in slots], [torch.float32] * len(slots))
        if buffers:
            self._states.release(buffers)
        return [f.view(s.shape) for s, f in zip(slots, fulls)]

    def store_state(self, slots: list[ParamSlot], name: str, tensors: list[torch.Tensor],
                    dirty: list[bool]) -> list[torch.Tensor]:
        refs, buffers = [], []
        for slot, full, changed in zip(slots, tensors, dirty):
            stored = slot.stored_state[name]
            if changed and isinstance(stored, StateFile):
                buffer = self._states.staging(stored.numel)
                self.stats.bytes_written += self._write_shard(buffer[:stored.numel], full, slot.numel, False, 0)
                refs.append(stored)
                buffers.append(buffer)
            elif changed:
                self.stats.bytes_written += self._write_shard(stored, full, slot.numel, False, 0)
        if refs:
            with self._timed("write_s"):
                self.disk_stats.bytes_written += self._states.write(refs, buffers)
            self._states.release(buffers)
        return list(tensors)

    def read_state_partition(self, slot: ParamSlot, name: str) -> torch.Tensor:
        stored = slot.stored_state[name]
        if not isinstance(stored, StateFile):
            return super().read_state_partition(slot, name)
        with self._timed("read_s"):
            (buffer,), read = self._states.read([stored])
        self.disk_stats.bytes_read += read
        out = buffer[:stored.numel].clone()
        self._states.release([buffer])
        return out

    def write_state_partition(self, slot: ParamSlot, name: str, values: torch.Tensor) -> None:
        stored = slot.stored_state[name]
        if not isinstance(stored, StateFile):
            super().write_state_partition(slot, name, values)
            return
        buffer = self._states.staging(stored.numel)
        buffer[:stored.numel].copy_(values)
        with self._timed("write_s"):
            self.disk_stats.bytes_written += self._states.write([stored], [buffer])
        self._states.release([buffer])

    def close(self) -> None:
        """Finish pending I/O, drop the aio handles and the state files; a later engine over the model reopens them."""
        if self._closed:
            return
        self._closed = True
        if self._states is not None:
            self._states.close()
            self._states = None
        if self._swapper is not None:
            release_swapper(self._swapper)

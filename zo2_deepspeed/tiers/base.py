"""Where parameters live between residencies, and the bytes that cross to the compute device."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Self

import torch

from ..blocks import ParamSlot
from ..buffers import BufferPool


class Counters:
    """Cumulative numeric fields of a dataclass; the engine reports per-step differences."""

    def snapshot(self) -> Self:
        return type(self)(**asdict(self))

    def since(self, earlier: Self) -> Self:
        return type(self)(**{k: v - getattr(earlier, k) for k, v in asdict(self).items()})


@dataclass
class MovementStats(Counters):
    """Bytes and fetches between the tier and the device."""

    bytes_read: int = 0
    """Bytes read from the tier into device buffers (this rank's partitions, plus what gathers bring)."""
    bytes_gathered: int = 0
    """Bytes of other ranks' partitions received by all-gathers (data parallel with ZeRO-3)."""
    bytes_written: int = 0
    """Bytes written back from the device into the tier (this rank's partitions)."""
    bytes_merged: int = 0
    """Of ``bytes_written``: LOZO's window merges (``zo2.write_back`` "window"), once per lazy window."""
    block_fetches: int = 0
    """Calls that made a block's parameters resident (one per block per step when streaming works)."""
    param_fetches: int = 0


class Tier(ABC):
    """Adapter between a parameter's resting place and full working tensors on the compute device."""

    name: str = "tier"
    host_io: bool = False
    """Fetch and write-back block the host (NVMe I/O): they run on a worker thread, copies synchronous."""
    async_copies: bool = False
    """Set by the pipeline: device copies are queued on streams and return at once (pinned host memory
    makes them truly asynchronous); the pipeline's events order every reader after them."""

    def __init__(self, device: torch.device, pool: BufferPool, compute_dtype: torch.dtype) -> None:
        self.device = torch.device(device)
        self.pool = pool
        self.compute_dtype = compute_dtype
        self.stats = MovementStats()
        self.synchronize: Callable[[], None] = lambda: None
        """Set by the pipeline: waits until queued copies into and out of the tier have landed (called
        before the host itself reads or writes partitions)."""

    @abstractmethod
    def work_dtype(self, slot: ParamSlot) -> torch.dtype:
        """dtype of the working copy that updates are applied to (the more precise of storage and compute)."""

    @abstractmethod
    def fetch(self, slots: list[ParamSlot]) -> list[torch.Tensor]:
        """Full working tensors (``work_dtype``, the parameter's shape, on the device), one per slot."""

    @abstractmethod
    def store(self, slots: list[ParamSlot], works: list[torch.Tensor], dirty: list[bool],
              rounding_seeds: Optional[list[int]] = None) -> list[torch.Tensor]:
        """Write back the dirty working tensors and put each parameter at rest.

        Returns the pool buffers it is done with once the copies it queued have run (the caller
        recycles them, ordered after those copies).
        """

    def storage_dtype(self, slot: ParamSlot) -> torch.dtype:
        return slot.param.dtype

    # -- pinned parameters (the first-order tail): fetched once, kept on the device, written through on demand --
    def settle_pinned(self, slots: list[ParamSlot]) -> None:
        """After the fetch of parameters that stay resident: drop what the fetch holds beyond their working
        tensors (NVMe swap buffers); the at-rest copy stays where it is."""

    def write_through(self, slots: list[ParamSlot], works: list[torch.Tensor], rounding_seeds: list[int]) -> None:
        """Write resident working tensors into the at-rest copy and keep them resident (whole parameters:
        the working tensor is the parameter itself, nothing to do)."""
        for slot, work in zip(slots, works):
            if work.data_ptr() != slot.param.data.data_ptr():
                slot.param.data.copy_(work)

    # -- per-parameter method state (HiZOO's Hessian): fp32, stored like the parameter, streams with it --
    @abstractmethod
    def create_state(self, slot: ParamSlot, name: str, value: float) -> None:
        """Allocate the state ``name`` of ``slot`` in this tier, every element set to ``value``."""

    @abstractmethod
    def fetch_state(self, slots: list[ParamSlot], name: str) -> list[torch.Tensor]:
        """Full fp32 state tensors on the device (the parameter's shape), one per slot."""

    @abstractmethod
    def store_state(self, slots: list[ParamSlot], name: str, tensors: list[torch.Tensor],
                    dirty: list[bool]) -> list[torch.Tensor]:
        """Write back dirty state tensors; returns the pool buffers to recycle, as ``store`` does."""

    # -- checkpoints: this rank's at-rest partitions, as CPU tensors --
    def partition_size(self, slot: ParamSlot) -> Optional[int]:
        """Elements per rank of a sharded parameter; None when every rank holds the whole tensor."""
        return None

    @abstractmethod
    def read_partition(self, slot: ParamSlot) -> torch.Tensor:
        """A flat CPU copy of what this rank stores for ``slot`` (its shard, or the whole tensor)."""

    @abstractmethod
    def write_partition(self, slot: ParamSlot, values: torch.Tensor) -> None:
        """Overwrite what this rank stores for ``slot`` with the flat ``values``."""

    @abstractmethod
    def read_state_partition(self, slot: ParamSlot, name: str) -> torch.Tensor:
        """Like ``read_partition`` for the method state ``name`` (fp32)."""

    @abstractmethod
    def write_state_partition(self, slot: ParamSlot, name: str, values: torch.Tensor) -> None:
        """Like ``write_partition`` for the method state ``name``."""

    def close(self) -> None:
        """Release files or handles the tier holds."""

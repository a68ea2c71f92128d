"""ZeRO-3 partitions as the resting place: each rank holds 1/world of every parameter (``p.ds_tensor``).

A block's partitions are gathered in one collective (one per block, not per parameter); write-back
copies only this rank's slice of the updated tensor into its partition, so it needs no
communication: every rank applies the same update to the whole tensor.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..blocks import ParamSlot
from ..buffers import BufferPool
from ..rounding import to_storage
from .base import Tier


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 has turned into a partition."""
    return hasattr(p, "ds_id") and hasattr(p, "ds_tensor")


class PartitionedTier(Tier):
    """ZeRO-3 partitions on the device (offload_param none) or in CPU memory (offload_param cpu)."""

    def __init__(self, device: torch.device, pool: BufferPool, compute_dtype: torch.dtype, name: str,
                 stochastic_rounding: bool, process_group=None) -> None:
        super().__init__(device, pool, compute_dtype)
        from deepspeed import comm as dist
        self.name = name
        self.stochastic_rounding = stochastic_rounding
        self._dist = dist
        self._group = process_group
        self.world = dist.get_world_size(group=process_group)
        self.rank = dist.get_rank(group=process_group)

    # -- hooks for tiers whose partitions are not always in memory (NVMe) --
    def _make_available(self, slots: list[ParamSlot]) -> None:
        """Ensure every slot's partition is in memory."""

    def _after_store(self, slots: list[ParamSlot], dirty: list[bool]) -> None:
        """Persist written partitions and drop what need not stay in memory."""

    def storage_dtype(self, slot: ParamSlot) -> torch.dtype:
        return slot.param.ds_tensor.dtype

    def work_dtype(self, slot: ParamSlot) -> torch.dtype:
        return torch.promote_types(self.storage_dtype(slot), self.compute_dtype)

    def _partition_size(self, slot: ParamSlot) -> int:
        return int(slot.param.ds_tensor.ds_numel)

    def fetch(self, slots: list[ParamSlot]) -> list[torch.Tensor]:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        if not slots:
            return []
        self._make_available(slots)
        works = [self.pool.get((s.numel,), self.work_dtype(s)) for s in slots]
        sizes = [self._partition_size(s) for s in slots]
        if self.world == 1:
            for slot, work in zip(slots, works):
                shard = slot.param.ds_tensor.view(-1)
                work.copy_(shard[:slot.numel])
                self.stats.bytes_read += shard.numel() * shard.element_size()
        else:
            self._gather(slots, works, sizes)
        self.stats.block_fetches += 1
        self.stats.param_fetches += len(slots)
        for slot in slots:
            slot.param.ds_status = ZeroParamStatus.AVAILABLE
        return [w.view(s.shape) for s, w in zip(slots, works)]

    def _gather(self, slots: list[ParamSlot], works: list[torch.Tensor], sizes: list[int]) -> None:
        """One all-gather for the whole block, grouped by storage dtype."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, slot in enumerate(slots):
            by_dtype.setdefault(self.storage_dtype(slot), []).append(i)
        for dtype, idx in by_dtype.items():
            total = sum(sizes[i] for i in idx)
            local = self.pool.get((total,), dtype)
            offset = 0
            for i in idx:
                local[offset:offset + sizes[i]].copy_(slots[i].param.ds_tensor.view(-1))
                offset += sizes[i]
            gathered = self.pool.get((self.world * total,), dtype)
            self._dist.all_gather_into_tensor(gathered, local, group=self._group)
            rows = gathered.view(self.world, total)
            offset = 0
            for i in idx:
                numel, size, flat = slots[i].numel, sizes[i], works[i]
                for r in range(self.world):
                    n = min(size, numel - r * size)
                    if n > 0:
                        flat[r * size:r * size + n].copy_(rows[r, offset:offset + n])
                offset += size
            self.stats.bytes_read += total * local.element_size()
            self.stats.bytes_gathered += (self.world - 1) * total * local.element_size()
            self.pool.put(local)
            self.pool.put(gathered)

    def store(self, slots: list[ParamSlot], works: list[torch.Tensor], dirty: list[bool],
              rounding_seeds: Optional[list[int]] = None) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        for i, (slot, work) in enumerate(zip(slots, works)):
            p = slot.param
            if dirty[i]:
                size = self._partition_size(slot)
                start = self.rank * size
                n = max(0, min(size, slot.numel - start))
                if n:
                    seed = rounding_seeds[i] if rounding_seeds else 0
                    src = work.reshape(-1)[start:start + n]
                    p.ds_tensor.view(-1)[:n].copy_(
                        to_storage(src, p.ds_tensor.dtype, self.stochastic_rounding, seed))
                self.stats.bytes_written += size * p.ds_tensor.element_size()
            p.data = torch.empty(0, dtype=p.ds_tensor.dtype, device=self.device)
            p.ds_status = ZeroParamStatus.NOT_AVAILABLE
            self.pool.put(work)
        self._after_store(slots, dirty)

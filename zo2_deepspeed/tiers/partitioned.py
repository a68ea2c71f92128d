"""ZeRO-3 partitions as the resting place: each rank holds 1/world of every parameter (``p.ds_tensor``).

A block's partitions are gathered in one collective (one per block, not per parameter); write-back
copies only this rank's slice of the updated tensor into its partition, so it needs no
communication: every rank applies the same update to the whole tensor.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..blocks import ParamSlot
from ..buffers import BufferPool
from ..comm import guarded
from ..rounding import to_storage
from .base import Tier

RoundFn = Callable[[torch.Tensor, torch.dtype, int, int], torch.Tensor]
"""(fp32 values, 16-bit dtype, seed, index of the first value in the whole tensor) -> rounded values."""
RoundManyFn = Callable[[list[tuple[torch.Tensor, torch.dtype, int, int]]], list[torch.Tensor]]
"""``RoundFn`` over a block's list of jobs at once (one kernel launch on a GPU)."""


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 has turned into a partition."""
    return hasattr(p, "ds_id") and hasattr(p, "ds_tensor")


def shard_dtype(p: torch.Tensor) -> torch.dtype:
    """dtype of a parameter's partition; a shard swapped out to NVMe is a placeholder of another dtype."""
    swapper = getattr(p, "nvme_swapper", None)
    if swapper is not None and getattr(p.ds_tensor, "final_location", None) is not None:
        return swapper.dtype
    return p.ds_tensor.dtype


def _all_gather_single(output: torch.Tensor, local: torch.Tensor, group: object) -> None:
    """``output`` = every rank's ``local``, concatenated in rank order.

    torch >= 2.13 names this collective ``all_gather_single`` and deprecates ``all_gather_into_tensor``
    (which ``deepspeed.comm`` still calls, with a FutureWarning in every run); older torch has only the latter.
    """
    import torch.distributed as torch_dist
    gather = getattr(torch_dist, "all_gather_single", None)
    if gather is not None:
        gather(output, local, group=group)
    else:
        from deepspeed import comm as dist
        dist.all_gather_into_tensor(output, local, group=group)


class PartitionedTier(Tier):
    """ZeRO-3 partitions on the device (offload_param none) or in CPU memory (offload_param cpu)."""

    def __init__(self, device: torch.device, pool: BufferPool, compute_dtype: torch.dtype, name: str,
                 stochastic_rounding: bool, process_group=None, round_fn: Optional[RoundFn] = None,
                 round_many: Optional[RoundManyFn] = None) -> None:
        super().__init__(device, pool, compute_dtype)
        self.round_many = round_many
        """The block's rounding in one call, before the copies back (None: one ``round_fn`` call per parameter)."""
        from deepspeed import comm as dist
        self.name = name
        self.stochastic_rounding = stochastic_rounding
        self.round_fn = round_fn
        """Stochastic rounding to a 16-bit partition, on the compute device before the copy back (None: torch's)."""
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
        return shard_dtype(slot.param)

    def work_dtype(self, slot: ParamSlot) -> torch.dtype:
        return torch.promote_types(self.storage_dtype(slot), self.compute_dtype)

    def fetch(self, slots: list[ParamSlot]) -> list[torch.Tensor]:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        if not slots:
            return []
        self._make_available(slots)
        works = self._materialize([s.param.ds_tensor for s in slots], [s.numel for s in slots],
                                  [self.work_dtype(s) for s in slots])
        self.stats.block_fetches += 1
        self.stats.param_fetches += len(slots)
        for slot in slots:
            slot.param.ds_status = ZeroParamStatus.AVAILABLE
        return [w.view(s.shape) for s, w in zip(slots, works)]

    def _materialize(self, shards: list[torch.Tensor], numels: list[int], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
        """Full flat tensors from every rank's shard: a copy with one rank, one all-gather per dtype with more."""
        works = [self.pool.get((n,), d) for n, d in zip(numels, dtypes)]
        if self.world == 1:
            for shard, numel, work in zip(shards, numels, works):
                self._upload(work, shard.view(-1)[:numel])
                self.stats.bytes_read += shard.numel() * shard.element_size()
            return works
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, shard in enumerate(shards):
            by_dtype.setdefault(shard.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            sizes = [shards[i].numel() for i in idx]
            total = sum(sizes)
            local = self.pool.get((total,), dtype)
            offset = 0
            for i, size in zip(idx, sizes):
                local[offset:offset + size].copy_(shards[i].view(-1), non_blocking=self.async_copies)
                offset += size
            gathered = self.pool.get((self.world * total,), dtype)
            with guarded("all-gather of a block's ZeRO-3 partitions"):
                _all_gather_single(gathered, local, self._group)
            rows = gathered.view(self.world, total)
            offset = 0
            for i, size in zip(idx, sizes):
                for r in range(self.world):
                    n = min(size, numels[i] - r * size)
                    if n > 0:
                        works[i][r * size:r * size + n].copy_(rows[r, offset:offset + n])
                offset += size
            self.stats.bytes_read += total * local.element_size()
            self.stats.bytes_gathered += (self.world - 1) * total * local.element_size()
            self.pool.put_many([local, gathered])
        return works

    def _upload(self, work: torch.Tensor, source: torch.Tensor) -> None:
        """``work`` (on the device) = ``source`` (a partition), moving the partition's own bytes across.

        A dtype change is made on the device after the copy (a cross-device ``copy_`` would convert on
        the host and send the wider type).
        """
        if source.dtype == work.dtype or source.device == work.device:
            work.copy_(source, non_blocking=self.async_copies)
            return
        staged = self.pool.get(source.shape, source.dtype)
        staged.copy_(source, non_blocking=self.async_copies)
        work.copy_(staged)
        self.pool.put(staged)

    def _shard_slice(self, shard: torch.Tensor, numel: int) -> tuple[int, int]:
        """(first index, length) of this rank's slice of a tensor of ``numel`` elements."""
        size = shard.numel()
        start = self.rank * size
        return start, max(0, min(size, numel - start))

    def _write_shard(self, shard: torch.Tensor, full: torch.Tensor, numel: int, stochastic: bool, seed: int,
                     rounded: Optional[torch.Tensor] = None) -> int:
        """Copy this rank's slice of ``full`` into ``shard``, rounding on the device first (or taking ``rounded``,
        the slice already rounded); returns the bytes written."""
        start, n = self._shard_slice(shard, numel)
        if n:
            src = rounded if rounded is not None else \
                to_storage(full.reshape(-1)[start:start + n], shard.dtype, stochastic, seed, self.round_fn, start)
            shard.view(-1)[:n].copy_(src, non_blocking=self.async_copies)
        return shard.numel() * shard.element_size()

    def _round_block(self, slots: list[ParamSlot], works: list[torch.Tensor], dirty: list[bool],
                     seeds: list[int]) -> dict[int, torch.Tensor]:
        """Slot index -> its rounded slice, for every dirty slot stored in 16 bits from fp32, in one call."""
        if self.round_many is None or not self.stochastic_rounding:
            return {}
        jobs, owners = [], []
        for i, (slot, work) in enumerate(zip(slots, works)):
            shard = slot.param.ds_tensor
            if not dirty[i] or work.dtype != torch.float32 or shard.dtype not in (torch.bfloat16, torch.float16):
                continue
            start, n = self._shard_slice(shard, slot.numel)
            if n:
                jobs.append((work.reshape(-1)[start:start + n], shard.dtype, seeds[i], start))
                owners.append(i)
        return dict(zip(owners, self.round_many(jobs))) if jobs else {}

    def store(self, slots: list[ParamSlot], works: list[torch.Tensor], dirty: list[bool],
              rounding_seeds: Optional[list[int]] = None) -> list[torch.Tensor]:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        seeds = list(rounding_seeds) if rounding_seeds else [0] * len(slots)
        rounded = self._round_block(slots, works, dirty, seeds)
        for i, (slot, work) in enumerate(zip(slots, works)):
            p = slot.param
            if dirty[i]:
                self.stats.bytes_written += self._write_shard(p.ds_tensor, work, slot.numel,
                                                              self.stochastic_rounding, seeds[i], rounded.get(i))
            p.data = torch.empty(0, dtype=p.ds_tensor.dtype, device=self.device)
            p.ds_status = ZeroParamStatus.NOT_AVAILABLE
        self._after_store(slots, dirty)
        return list(works)

    def settle_pinned(self, slots: list[ParamSlot]) -> None:
        self._after_store(slots, [False] * len(slots))

    def write_through(self, slots: list[ParamSlot], works: list[torch.Tensor], rounding_seeds: list[int]) -> None:
        """This rank's slice of each working tensor into its partition (rounded as ``store`` rounds), kept resident."""
        self._make_available(slots)
        for slot, work, seed in zip(slots, works, rounding_seeds):
            self.stats.bytes_written += self._write_shard(slot.param.ds_tensor, work, slot.numel,
                                                          self.stochastic_rounding, seed)
        self._after_store(slots, [True] * len(slots))

    def create_state(self, slot: ParamSlot, name: str, value: float) -> None:
        size = self.partition_size(slot)
        device = self.device if self.name == "device" else torch.device("cpu")
        state = torch.full((size,), value, dtype=torch.float32, device=device)
        if device.type == "cpu" and slot.param.ds_tensor.is_pinned():
            state = state.pin_memory()  # as the parameters' partitions: its copies then overlap compute
        slot.stored_state[name] = state

    def fetch_state(self, slots: list[ParamSlot], name: str) -> list[torch.Tensor]:
        fulls = self._materialize([s.stored_state[name] for s in slots], [s.numel for s in slots],
                                  [torch.float32] * len(slots))
        return [f.view(s.shape) for s, f in zip(slots, fulls)]

    def store_state(self, slots: list[ParamSlot], name: str, tensors: list[torch.Tensor],
                    dirty: list[bool]) -> list[torch.Tensor]:
        for slot, full, changed in zip(slots, tensors, dirty):
            if changed:
                self.stats.bytes_written += self._write_shard(slot.stored_state[name], full, slot.numel, False, 0)
        return list(tensors)

    def partition_size(self, slot: ParamSlot) -> Optional[int]:
        return int(slot.param.ds_tensor.ds_numel)

    def read_partition(self, slot: ParamSlot) -> torch.Tensor:
        self.synchronize()
        self._make_available([slot])
        try:
            return slot.param.ds_tensor.view(-1)[:self.partition_size(slot)].to("cpu", copy=True)
        finally:
            self._after_store([slot], [False])

    def write_partition(self, slot: ParamSlot, values: torch.Tensor) -> None:
        self.synchronize()
        self._make_available([slot])
        slot.param.ds_tensor.view(-1)[:self.partition_size(slot)].copy_(values)
        self._after_store([slot], [True])

    def read_state_partition(self, slot: ParamSlot, name: str) -> torch.Tensor:
        self.synchronize()
        return slot.stored_state[name].detach().to("cpu", copy=True)

    def write_state_partition(self, slot: ParamSlot, name: str, values: torch.Tensor) -> None:
        self.synchronize()
        slot.stored_state[name].copy_(values)


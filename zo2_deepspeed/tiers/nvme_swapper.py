"""DeepSpeed's partitioned-parameter swapper for the NVMe tier: sizing, capacity checks, on-demand pinning, release.

DeepSpeed's swapper has ``buffer_count`` buffers of ``buffer_size`` elements, pinned up front, and asserts
without a hint when a swap-in finds none free. Here the buffers are sized from the model before
``zero.Init`` (``sized_swap_config``), checked against the pipeline's residency after it
(``check_swap_capacity``), pinned per shard size as needed (``sized_swapper_class``), and every
swapper's aio handles are released before the interpreter exits (``track_swapper``/``release_swapper``).
"""
from __future__ import annotations

import atexit
import copy
import functools
import math
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..blocks import Block, find_blocks
from ..errors import ConfigError
from . import run_folder
from .nvme_aio import aio_op, aio_options

BUFFER_COUNT = "zero_optimization.offload_param.buffer_count"
BUFFER_SIZE = "zero_optimization.offload_param.buffer_size"


def _logger():
    from deepspeed.utils import logger
    return logger


def on_nvme(p: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter whose shard rests on NVMe (not one DeepSpeed kept in CPU memory)."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    shard = getattr(p, "ds_tensor", None)
    return shard is not None and getattr(shard, "final_location", None) == OffloadDeviceEnum.nvme


def _is_swapped_out(p: torch.Tensor) -> bool:
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus
    return p.ds_tensor.status != PartitionedParamStatus.AVAILABLE


# ---------------------------------------------------------------------------------------------
# Swap buffer capacity: DeepSpeed's swapper has buffer_count buffers of buffer_size elements, and
# asserts without a hint when a swap-in finds none free or a shard does not fit.


@dataclass(frozen=True)
class SwapNeed:
    """What the pipeline keeps in the swapper's buffers at once, and the largest shard."""

    buffer_count: int
    buffer_size: int
    blocks: int
    per_block: int
    shared: int

    def explain(self) -> str:
        return (f"{self.blocks} resident block(s) (1 + zo2.prefetch_blocks) of up to {self.per_block} NVMe "
                f"partition(s) each, plus {self.shared} shared (tied) one(s)")


def swap_need(blocks: list[Block], prefetch_blocks: int, nvme_numel: Callable[[torch.Tensor], int]) -> SwapNeed:
    """Upper bound over any block order: the 1 + prefetch_blocks fullest blocks plus every shared parameter.

    ``nvme_numel(p)`` is the element count of ``p``'s NVMe shard, 0 for a shard kept in CPU memory.
    Shared parameters stay resident for the whole forward, so they hold a buffer throughout.
    """
    slots = {id(s): s for b in blocks for s in b.slots}.values()
    shared = sum(1 for s in slots if s.shared and nvme_numel(s.param))
    per_block = sorted((sum(1 for s in b.slots if not s.shared and nvme_numel(s.param)) for b in blocks),
                       reverse=True)
    resident = min(1 + prefetch_blocks, len(per_block))
    return SwapNeed(buffer_count=shared + sum(per_block[:resident]),
                    buffer_size=max((nvme_numel(s.param) for s in slots), default=0),
                    blocks=resident, per_block=per_block[0] if per_block else 0, shared=shared)


def _planned_nvme_numel(world_size: int, element_size: int, min_aio_bytes: int) -> Callable[[torch.Tensor], int]:
    """DeepSpeed's placement rule before partitioning: a shard of ceil(numel/world) goes to NVMe when large."""
    def numel(p: torch.Tensor) -> int:
        shard = math.ceil(p.numel() / world_size)
        return shard if shard * element_size >= min_aio_bytes else 0
    return numel


def _partitioned_nvme_numel(p: torch.Tensor) -> int:
    return int(p.ds_tensor.ds_numel) if on_nvme(p) else 0


def sized_swap_config(model: nn.Module, raw_config: dict, storage_dtype: torch.dtype, prefetch_blocks: int,
                      world_size: int) -> dict:
    """A copy of ``raw_config`` whose swap buffers hold what the pipeline keeps resident (for in-place partitioning).

    Missing buffer_count / buffer_size get exactly what is needed (DeepSpeed's defaults would pin
    buffer_count × 1e8 elements); values that are too small are raised, with a warning.
    """
    from deepspeed.runtime.swap_tensor import partitioned_param_swapper
    from deepspeed.runtime.swap_tensor.constants import AIO_BLOCK_SIZE_DEFAULT
    block_size = int((raw_config.get("aio") or {}).get("block_size", AIO_BLOCK_SIZE_DEFAULT))
    min_aio_bytes = max(partitioned_param_swapper.MIN_AIO_BYTES, block_size)
    element_size = torch.empty((), dtype=storage_dtype).element_size()
    need = swap_need(find_blocks(model), prefetch_blocks,
                     _planned_nvme_numel(world_size, element_size, min_aio_bytes))
    config = copy.deepcopy(raw_config)
    offload = config["zero_optimization"]["offload_param"]
    for key, path, value in (("buffer_count", BUFFER_COUNT, need.buffer_count),
                             ("buffer_size", BUFFER_SIZE, need.buffer_size)):
        value = max(1, value)
        current = offload.get(key)
        if current is None:
            offload[key] = value
            _logger().info(f"zo2 nvme: {path} set to {value} ({need.explain()})")
        elif current < value:
            offload[key] = value
            _logger().warning(f"zo2 nvme: {path}={current} is too small, using {value} ({need.explain()})")
    return config


def check_swap_capacity(blocks: list[Block], prefetch_blocks: int) -> None:
    """Fail with the config field and the value needed when the swapper cannot hold the resident blocks."""
    params = [s.param for b in blocks for s in b.slots if on_nvme(s.param)]
    if not params:
        return
    swapper = params[0].nvme_swapper
    track_swapper(swapper)
    need = swap_need(blocks, prefetch_blocks, _partitioned_nvme_numel)
    if swapper.param_buffer_count < need.buffer_count:
        raise ConfigError(f"{BUFFER_COUNT} is {swapper.param_buffer_count}, but the pipeline keeps up to "
                          f"{need.buffer_count} NVMe partitions in memory at once ({need.explain()}): set it to at "
                          f"least {need.buffer_count}, or lower zo2.prefetch_blocks")
    if swapper.elements_per_buffer < need.buffer_size:
        raise ConfigError(f"{BUFFER_SIZE} is {swapper.elements_per_buffer} elements, but the largest NVMe "
                          f"partition has {need.buffer_size}: set it to at least {need.buffer_size}")


# ---------------------------------------------------------------------------------------------
# Swap buffers pinned on demand. DeepSpeed's swapper pins buffer_count buffers of buffer_size elements
# when it is made, every one as large as the largest shard: for a LLaMA layer (7 NVMe matrices) beside a
# 32k-word embedding that is 7-14 embedding-sized buffers, gigabytes of locked memory for layers whose
# matrices are a fraction of it. The subclass keeps both fields as limits and pins only what is in use.


@functools.lru_cache(maxsize=None)
def sized_swapper_class() -> type:
    """DeepSpeed's ``AsyncPartitionedParameterSwapper`` with buffers pinned per shard size when first needed.

    Made on first use: defining it imports DeepSpeed, which ``import zo2_deepspeed`` does not.
    """
    from deepspeed import comm as dist
    from deepspeed.runtime.swap_tensor import constants as c
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import (AsyncPartitionedParameterSwapper,
                                                                         PartitionedParamStatus)
    from deepspeed.runtime.swap_tensor.utils import AIO_ALIGNED_BYTES, MIN_AIO_BYTES

    class SizedSwapper(AsyncPartitionedParameterSwapper):
        """Swap buffers are pinned when a shard of that (aligned) size first needs one, then reused.

        ``buffer_count`` still bounds the shards in memory at once and ``buffer_size`` the elements of
        one shard, so the pinned total never exceeds what DeepSpeed would pin up front; in practice it
        is the bytes of the shards resident together. Idle buffers of other sizes are unpinned first
        when a new one would pass that bound. Paths, files and aio handles are DeepSpeed's own.
        """

        def _configure_aio(self, ds_config: Any) -> None:
            """DeepSpeed's set-up (swap folder, alignment, aio handles) without the up-front buffers."""
            self.swap_config = ds_config.zero_config.offload_param
            self.aio_config = ds_config.aio_config
            if self.aio_config[c.AIO_USE_GDS]:
                raise ConfigError("aio.use_gds is not supported with zo2's NVMe tier (it stages through host "
                                  "memory): set it to false")
            self.use_gds = False
            # a folder of this swapper's own, never DeepSpeed's shared rank folder (which it deletes at start)
            self.run_folder = run_folder.claim(self.swap_config.nvme_path, self)
            self.swap_folder = os.path.join(self.run_folder.path, "zero_stage_3",
                                            f"{str(self.dtype).split('.')[1]}params", f"rank{dist.get_rank()}")
            os.makedirs(self.swap_folder, exist_ok=True)
            self.swap_element_size = torch.tensor([], dtype=self.dtype).element_size()
            self.aio_handle = aio_op().aio_handle
            self.min_aio_bytes = max(MIN_AIO_BYTES, self.aio_config[c.AIO_BLOCK_SIZE])
            self.aligned_bytes = AIO_ALIGNED_BYTES * self.aio_config[c.AIO_INTRA_OP_PARALLELISM]
            self.numel_alignment = self.aligned_bytes // self.swap_element_size
            self.elements_per_buffer = self.swap_config.buffer_size
            self.aligned_elements_per_buffer = self._io_aligned_numel(self.elements_per_buffer)
            self.param_buffer_count = self.swap_config.buffer_count
            self.available_buffer_ids = list(range(self.param_buffer_count))
            self.reserved_buffer_ids = []
            options = aio_options(self.aio_config)
            self.aio_read_handle = self.aio_handle(**options)
            self.aio_write_handle = self.aio_handle(**options)
            self.buffers = None  # never one block of count x size: see _take_buffer
            self.swap_out_params = []
            self._idle: dict[int, list[torch.Tensor]] = {}
            self.pinned_numel = 0
            self.peak_pinned_numel = 0

        @property
        def pinned_bytes(self) -> int:
            """Page-locked bytes held now (buffers in use and idle ones kept for reuse)."""
            return self.pinned_numel * self.swap_element_size

        @property
        def peak_pinned_bytes(self) -> int:
            return self.peak_pinned_numel * self.swap_element_size

        def _take_buffer(self, param: Any, numel: int) -> torch.Tensor:
            """An aligned pinned buffer for ``param``'s shard of ``numel`` elements, booked to it."""
            if numel > self.elements_per_buffer:
                raise ConfigError(f"{BUFFER_SIZE} is {self.elements_per_buffer} elements, but a parameter's NVMe "
                                  f"partition has {numel}: set it to at least the largest partition ({numel} or "
                                  f"more)")
            if not self.available_buffer_ids:
                raise ConfigError(f"{BUFFER_COUNT} is {self.param_buffer_count}, and that many NVMe partitions are "
                                  f"already in memory: raise it")
            aligned = self._io_aligned_numel(numel)
            idle = self._idle.get(aligned)
            buffer = idle.pop() if idle else self._pin(aligned)
            self.param_id_to_numel[param.ds_id] = numel
            self.param_id_to_buffer_id[param.ds_id] = self.available_buffer_ids.pop()
            self.param_id_to_swap_buffer[param.ds_id] = buffer
            return buffer

        def _pin(self, numel: int) -> torch.Tensor:
            limit = self.aligned_elements_per_buffer * self.param_buffer_count
            if self.pinned_numel + numel > limit:
                self.unpin_idle()
            buffer = self.aio_read_handle.new_cpu_locked_tensor(numel, torch.empty(0, dtype=self.dtype))
            self.pinned_numel += numel
            self.peak_pinned_numel = max(self.peak_pinned_numel, self.pinned_numel)
            return buffer

        def unpin_idle(self) -> None:
            """Give the page-locked memory of every buffer not in use back to the system."""
            for buffers in self._idle.values():
                for buffer in buffers:
                    self.pinned_numel -= buffer.numel()
                    self.aio_read_handle.free_cpu_locked_tensor(buffer)
            self._idle.clear()

        def _allocate_and_return_buffers_for_swap_in(self, params: list) -> tuple[list, list]:
            compute_buffers, swap_buffers = [], []
            for param in params:
                if param.ds_id in self.param_id_to_buffer_id:
                    raise RuntimeError(f"NVMe partition {param.ds_id} already holds a swap buffer")
                numel = self.param_id_to_numel[param.ds_id]
                buffer = self._take_buffer(param, numel)
                swap_buffers.append(buffer)
                compute_buffers.append(buffer.narrow(0, 0, numel))
            return compute_buffers, swap_buffers

        def get_buffer(self, param: Any, numel: int) -> torch.Tensor:
            """A buffer for a partition being created (``zero.Init``), before its first swap-out."""
            return self._take_buffer(param, numel).narrow(0, 0, numel)

        def remove_partition_and_release_buffers(self, params: list) -> None:
            for param in params:
                token = self.param_id_to_buffer_id.pop(param.ds_id, None)
                if token is not None:
                    buffer = self.param_id_to_swap_buffer.pop(param.ds_id)
                    self._idle.setdefault(buffer.numel(), []).append(buffer)
                    self.available_buffer_ids.append(token)
                    if param.ds_id in self.available_params:
                        self.available_params.remove(param.ds_id)
                        self.available_numel -= self.param_id_to_numel[param.ds_id]
                param.ds_tensor.data = self.invalid_buffer.data
                param.ds_tensor.status = PartitionedParamStatus.NOT_AVAILABLE

        def reserve_available_buffers(self) -> list:
            raise NotImplementedError("DeepSpeed's first-order ZeRO-3 optimizer reserves whole swap buffers; "
                                      "build models for it without a zo2 section in the config")

    return SizedSwapper


# ---------------------------------------------------------------------------------------------
# Exit: aio handles still alive while the interpreter shuts down abort the process ("terminate called
# without an active exception"); they are synchronized and dropped while Python still runs.

_swappers: "weakref.WeakSet[Any]" = weakref.WeakSet()
_registry_lock = threading.Lock()
_exit_hook_registered = False


def track_swapper(swapper: Any) -> None:
    """Release ``swapper``'s aio handles at interpreter exit if nothing closed it before."""
    global _exit_hook_registered
    with _registry_lock:
        _swappers.add(swapper)
        if not _exit_hook_registered:
            atexit.register(_release_all_swappers)
            _exit_hook_registered = True


def reopen_swapper(swapper: Any) -> None:
    """Give a swapper released by an earlier ``close()`` new aio handles (its pinned buffers are shared, kept)."""
    if hasattr(swapper, "aio_read_handle"):
        return
    options = aio_options(swapper.aio_config)
    swapper.aio_read_handle = swapper.aio_handle(**options)
    swapper.aio_write_handle = swapper.aio_handle(**options)
    track_swapper(swapper)


def release_swapper(swapper: Any) -> None:
    """Finish pending swapper I/O and drop its aio handles; its NVMe shards cannot be read afterwards.

    A swapper that pins on demand also unpins its idle buffers: a later engine pins them again as needed.
    """
    if not hasattr(swapper, "aio_read_handle"):
        return
    swapper.synchronize_reads()
    swapper.synchronize_writes()
    if isinstance(swapper, sized_swapper_class()):
        swapper.unpin_idle()
    del swapper.aio_read_handle, swapper.aio_write_handle  # the last references: their threads are joined here
    _swappers.discard(swapper)


def _release_all_swappers() -> None:
    for swapper in list(_swappers):
        try:
            release_swapper(swapper)
        except Exception:  # best effort at exit: the data is already on disk
            pass

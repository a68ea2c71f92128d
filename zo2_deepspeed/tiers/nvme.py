"""ZeRO-Infinity partitions on NVMe as the resting place (``zero_optimization.offload_param.device: nvme``).

Parameter shards move through DeepSpeed's own partitioned-parameter swapper (``p.nvme_swapper``, made
by ``deepspeed.zero.Init``), so a model built under ``zero_init`` or ``HfDeepSpeedConfig`` streams
without a second copy or file layout of our own. A swapped-out shard's ``ds_tensor`` is a 0-dim fp16
placeholder, never the data: it is swapped in before anything reads it. Shards below DeepSpeed's
swap threshold stay in CPU memory and need no I/O. For zo2 configs ``zero_init`` gives ``zero.Init`` a
subclass of that swapper which pins its buffers per shard size as they are needed, instead of
buffer_count buffers of the largest shard's size up front (``sized_swapper_class``).

Method state (HiZOO's Hessian) lives where its parameter lives: an fp32 file under
``<run folder>/zo2_state/rank<r>/`` (the swapper's own folder under ``nvme_path``, see ``run_folder``)
for a parameter whose shard is on NVMe, moved with DeepSpeed's async I/O through page-locked, aligned
buffers; a CPU tensor for the small ones.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from ..blocks import Block, ParamSlot, find_blocks
from ..buffers import BufferPool
from ..errors import ConfigError
from .base import MovementStats
from . import run_folder
from .partitioned import PartitionedTier

BUFFER_COUNT = "zero_optimization.offload_param.buffer_count"
BUFFER_SIZE = "zero_optimization.offload_param.buffer_size"


def _logger():
    from deepspeed.utils import logger
    return logger


def _aio_built(builder: Any) -> bool:
    """True when loading the op will not compile it: installed with DeepSpeed, or in torch's extension cache."""
    from deepspeed.git_version_info import installed_ops
    if installed_ops.get(builder.name, False):
        return True
    from torch.utils.cpp_extension import _get_build_directory
    folder = _get_build_directory(builder.name, verbose=False)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return any(name.startswith(builder.name) and name.endswith(".so") for name in names)


def aio_op() -> Any:
    """DeepSpeed's AsyncIO op module; the first load on a machine compiles it (minutes, silently), so say so."""
    from deepspeed.ops.op_builder import AsyncIOBuilder
    from deepspeed.ops.op_builder.builder import OpBuilder
    builder = AsyncIOBuilder()
    if builder.name not in OpBuilder._loaded_ops and not _aio_built(builder):
        import logging

        from deepspeed.utils import log_dist
        from torch.utils.cpp_extension import _get_build_directory
        log_dist(f"zo2 nvme: compiling DeepSpeed's AsyncIO op ({builder.name}) for the NVMe tier; the first build on a "
                 f"machine takes several minutes without output, later runs load it from "
                 f"{_get_build_directory(builder.name, verbose=False)}", ranks=[0], level=logging.WARNING)
    return builder.load(verbose=False)


@functools.lru_cache(maxsize=None)
def nvme_unavailable_reason() -> Optional[str]:
    """None when DeepSpeed's AsyncIO op loads here (building it once if needed), else why not."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
        builder = AsyncIOBuilder()
        if not builder.is_compatible(verbose=False):
            return "DeepSpeed's AsyncIO op is not compatible here (install libaio-dev: launch/install.sh does)"
        aio_op()
    except Exception as e:  # a missing library or a failed build, whatever DeepSpeed raises
        return f"DeepSpeed's AsyncIO op is unavailable: {e}"
    return None


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


def aio_options(aio_config: dict) -> dict[str, Any]:
    """Keyword arguments of DeepSpeed's ``aio_handle`` from its ``aio`` config section."""
    from deepspeed.runtime.swap_tensor import constants as c
    return dict(block_size=aio_config[c.AIO_BLOCK_SIZE], queue_depth=aio_config[c.AIO_QUEUE_DEPTH],
                single_submit=aio_config[c.AIO_SINGLE_SUBMIT], overlap_events=aio_config[c.AIO_OVERLAP_EVENTS],
                intra_op_parallelism=aio_config[c.AIO_INTRA_OP_PARALLELISM])


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


# ---------------------------------------------------------------------------------------------
# Method state in files


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


# ---------------------------------------------------------------------------------------------


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

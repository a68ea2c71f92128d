"""The movement part of the block pipeline: residency, prefetch, streams or worker, buffer recycling.

``BlockMovement`` brings a block's partitions (and the method's state) from their tier to the
device and writes them back, and nothing else; what happens to them while resident belongs to the
perturbation part, which it calls through two hooks right after a fetch (``bring_up_to_date``,
``prepare_resident``).

Where the work runs depends on the device, not on a second pipeline:

* On an accelerator with streams (and a tier that needs no host I/O), every fetch, update and
  write-back is issued from the calling thread onto a fetch or a store stream and ordered by
  events: copies overlap the forwards, and no thread competes with compute for launches.
* On the CPU, and for the NVMe tier's blocking I/O, a background worker thread runs the fetches
  and write-backs in order while the calling thread computes.

A new device implements the ``DeviceStreams`` calls (None streams on the CPU); a new tier the
``Tier`` interface. Blocks are prefetched ``prefetch_blocks`` ahead along the trace of the first
completed pass (the order the model calls its blocks in).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from .blocks import Block, ParamSlot
from .buffers import BufferPool
from .comm import bit_checksum
from .methods import ZOMethod
from .noise import derive_seed
from .perturbation import Perturber
from .streams import DeviceStreams, PhaseClock
from .tiers.base import Tier

if TYPE_CHECKING:
    from .pipeline import ForwardPass


class BlockMovement:
    """Fetches blocks onto the device (ahead of use along the trace) and writes them back, in program order."""

    def __init__(self, blocks: list[Block], tier: Tier, method: ZOMethod, perturber: Perturber, prefetch_blocks: int,
                 compute_dtype: torch.dtype, pool: BufferPool, streams: DeviceStreams, clock: PhaseClock) -> None:
        self.blocks = blocks
        self.tier = tier
        self.method = method
        self.perturber = perturber
        self.prefetch_blocks = prefetch_blocks
        self.compute_dtype = compute_dtype
        self.pool = pool
        self.streams = streams
        self.clock = clock
        self.asynchronous = streams.enabled and not tier.host_io
        """Fetches and write-backs are queued on streams from this thread (else: a worker, or inline)."""
        tier.async_copies = self.asynchronous
        use_worker = prefetch_blocks > 0 and not self.asynchronous
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="zo2-prefetch") if use_worker else None
        self.trace: Optional[list[int]] = None
        """Block indices in the order of the first completed pass: what prefetch follows."""
        self._inflight: dict[int, Future] = {}
        self._written_back: tuple[list[torch.Tensor], Any] = ([], None)
        """Working tensors of the last release and the event after their write-back (streams only)."""
        self.collect_checksums = False
        self.checksums: dict[str, int] = {}
        """Bit checksums of the trainable partitions as fetched, while ``collect_checksums`` (replica checks)."""
        tier.synchronize = lambda: self.drain(host_reads=True)

    # ------------------------------------------------------------------ residency
    def bring_in(self, block: Block, forward: ForwardPass) -> None:
        """Make ``block`` resident for ``forward`` (waiting on its prefetch, if any), then prefetch further."""
        forward.visited.append(block.index)
        self._advance_trace(block, forward)
        future = self._inflight.pop(block.index, None)
        if future is None and not all(s.resident for s in block.slots):
            future = self.submit(self.acquire, block, forward)
        if future is not None:
            self.streams.wait(future.result())
        self.prefetch_from(forward.trace_position + 1, forward)

    def acquire(self, block: Block, forward: Optional[ForwardPass]) -> Any:
        """Fetch what is not resident, bring it up to date, make compute tensors; returns a stream event.

        Runs on the fetch stream: the pending update is applied on the device right after the upload.
        """
        with self.streams.on(self.streams.fetch):
            need = [s for s in block.slots if not s.resident]
            # the previous write-back of these partitions must land before they are read: one event per release
            for event in {id(s.written): s.written for s in need if s.written is not None}.values():
                self.streams.wait(event)
            for slot in need:
                slot.written = None
            with self.clock("fetch"):
                works = self.tier.fetch(need)
                with_state = [s for s in need if s.trainable]
                for name in self.method.state_init:
                    for slot, tensor in zip(with_state, self.tier.fetch_state(with_state, name)):
                        slot.state[name] = tensor
            for slot, work in zip(need, works):
                slot.work = work
                slot.dirty = False
                slot.fetches += 1
            self.perturber.bring_up_to_date(need, forward)
            for slot in need:
                work = slot.work  # the perturbation part may have put the up-to-date values in another buffer
                if self.collect_checksums and slot.trainable:
                    self.checksums[slot.name] = bit_checksum(work)
                if work.dtype == self.compute_dtype:
                    slot.compute = work
                else:
                    slot.compute = self.pool.get(slot.shape, self.compute_dtype)
                    slot.compute.copy_(work)
                slot.param.data = slot.compute
            self.perturber.prepare_resident(block, forward)
            return self.streams.record()

    def release(self, slots: list[ParamSlot], recycle: Optional[list[torch.Tensor]], step: int) -> None:
        """Write back and put at rest (``step``: the pending update's, which seeds stochastic rounding).

        Compute-only buffers (perturbed and compute copies, noise) are recycled after compute's last use
        of them; working tensors after their write-back — with streams, one release later, so that the
        next upload reuses buffers whose copy back finished a block ago and runs beside the current one.
        """
        recycle = list(recycle or [])
        slots = [s for s in slots if not s.pinned]  # the first-order tail stays resident for the whole run
        if not slots and not recycle:
            return
        works, dirty, seeds = [], [], []
        merged_bytes = 0
        for slot in slots:
            if slot.offset is not None:
                raise RuntimeError(f"{slot.name} released while perturbed")
            works.append(slot.work)
            held = self.perturber.stores_back(slot)  # LOZO's window write-back: stored only when merged
            changed = slot.dirty if held is None else held
            dirty.append(changed)
            if held:
                merged_bytes += self._stored_bytes(slot)
            rounds = changed and slot.work.dtype != self.tier.storage_dtype(slot)  # a seed only where it is used
            seeds.append(derive_seed("zo2-round", step, slot.name) if rounds else 0)
            if slot.compute is not None and slot.compute is not slot.work:
                recycle.append(slot.compute)
            if slot.perturbed is not None:
                recycle.append(slot.perturbed)
            recycle.extend(drop_noise(slot))
            slot.work = slot.compute = slot.perturbed = None
            slot.dirty = False
        states = {name: [(s, s.state.pop(name), d) for s, d in zip(slots, dirty) if name in s.state]
                  for name in self.method.state_init}
        done = self.streams.record()  # compute has queued its last use of these tensors
        self.pool.put_many(recycle, done)

        def store() -> None:
            freed: list[torch.Tensor] = []
            with self.streams.on(self.streams.store):
                self.streams.wait(done)
                with self.clock("store"):
                    if slots:
                        freed += self.tier.store(slots, works, dirty, seeds)
                        self.tier.stats.bytes_merged += merged_bytes
                    for name, entries in states.items():
                        if entries:
                            freed += self.tier.store_state([e[0] for e in entries], name, [e[1] for e in entries],
                                                           [e[2] for e in entries])
                written = self.streams.record()
            if self.asynchronous:
                for slot in slots:
                    slot.written = written
                (freed, written), self._written_back = self._written_back, (freed, written)
            self.pool.put_many(freed, written)

        self.submit(store)

    def _stored_bytes(self, slot: ParamSlot) -> int:
        """Bytes a write-back of ``slot`` puts into its tier: this rank's partition (0 where the tier holds the
        working tensor itself)."""
        size = self.tier.partition_size(slot)
        return 0 if size is None else size * self.tier.storage_dtype(slot).itemsize

    def recycle_written_back(self) -> None:
        """Recycle the working tensors held back by the last release (their copies are ordered by its event)."""
        freed, written = self._written_back
        self._written_back = ([], None)
        self.pool.put_many(freed, written)

    # ------------------------------------------------------------------ ordering
    def submit(self, fn: Callable, *args: Any) -> Future:
        """Run ``fn`` on the worker (in submission order) or, without one, right here.

        Every tier operation goes through here: tiers (DeepSpeed's NVMe swapper among them) are not
        thread-safe, so they are only ever used from one thread at a time, in program order. With
        asynchronous streams there is no worker: ``fn`` queues its device work and returns at once.
        """
        if self.worker is not None:
            return self.worker.submit(fn, *args)
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # surfaced by future.result(), as from the worker
            future.set_exception(e)
        return future

    def drain(self, host_reads: bool = False) -> None:
        """Wait for the worker's queued fetches and write-backs; with ``host_reads``, also for every stream's
        (the host is about to read or hand out what was written back)."""
        if self.worker is not None:
            self.worker.submit(lambda: None).result()
        if host_reads:
            self.streams.synchronize()
            self.recycle_written_back()

    def settle_inflight(self) -> list[BaseException]:
        """Wait for every prefetch of the pass; returns their errors (raised by the caller after clean-up)."""
        errors = []
        for future in self._inflight.values():
            try:
                self.streams.wait(future.result())
            except BaseException as e:
                errors.append(e)
        self._inflight.clear()
        return errors

    def close(self) -> None:
        """Stop the worker (after the caller's last drain)."""
        if self.worker is not None:
            self.worker.shutdown(wait=True)
            self.worker = None

    # ------------------------------------------------------------------ prefetch
    def _advance_trace(self, block: Block, forward: ForwardPass) -> None:
        if self.trace is None:
            return
        nxt = forward.trace_position + 1
        if nxt < len(self.trace) and self.trace[nxt] == block.index:
            forward.trace_position = nxt
            return
        for pos in range(nxt, len(self.trace)):
            if self.trace[pos] == block.index:
                forward.trace_position = pos
                return
        forward.trace_position = len(self.trace)  # off the trace: no further prefetch this pass

    def prefetch_from(self, position: int, forward: Optional[ForwardPass]) -> None:
        """Queue the fetches of the next ``prefetch_blocks`` blocks on the trace from ``position``."""
        if self.prefetch_blocks == 0 or self.trace is None or forward is None:
            return
        for pos in range(position, min(position + self.prefetch_blocks, len(self.trace))):
            index = self.trace[pos]
            block = self.blocks[index]
            if index in self._inflight or all(s.resident for s in block.slots):
                continue
            self._inflight[index] = self.submit(self.acquire, block, forward)


def drop_noise(slot: ParamSlot) -> list[torch.Tensor]:
    """Take a slot's noise buffers (to recycle them)."""
    buffers = list(slot.noise.values())
    slot.noise.clear()
    return buffers

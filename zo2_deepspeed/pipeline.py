"""The block pipeline: residency, prefetch, per-group forwards and fused deferred updates.

One training forward streams every block through the device once. On entry a block's parameters
are fetched from their tier (ahead of time when ``prefetch_blocks`` > 0), the pending update of
the previous step is applied to them, then the block runs every perturbation group on that
group's rows of the batch, and on exit the parameters are written back and released. Parameters
shared by several blocks (tied embeddings) stay resident for the whole forward, so they too are
fetched, perturbed and updated exactly once.

Where the work runs depends on the device, not on a second pipeline:

* On an accelerator with streams (and a tier that needs no host I/O), every fetch, update and
  write-back is issued from the calling thread onto a fetch or a store stream and ordered by
  events: copies overlap the forwards, and no thread competes with compute for launches.
* On the CPU, and for the NVMe tier's blocking I/O, a background worker thread runs the fetches
  and write-backs in order while the calling thread computes.

A noise source with fused kernels (``NoiseSource.fused``) computes perturbed copies and updates
straight from the seeds, one launch per block; otherwise z is drawn into buffers and reused while
the block is resident.
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .blocks import Block, ParamSlot, concat_groups, install_wrappers, iter_slots, remove_wrappers, split_groups
from .buffers import BufferPool
from .comm import bit_checksum
from .config import ZO2Config
from .methods import PendingUpdate, Perturbation, ZOMethod
from .noise import NoiseSource, derive_seed, parameter_seed
from .streams import DeviceStreams, PhaseClock
from .tiers.base import Counters, Tier


@dataclass
class PhaseTimes(Counters):
    """Seconds spent per phase, cumulative.

    On the CPU: wall time (the background worker's phases overlap compute). On an accelerator with
    streams: device time between events on each phase's own stream (fetch and store overlap
    compute), recorded only with DeepSpeed's ``wall_clock_breakdown`` (else every phase stays 0).
    Fused noise kernels compute z inside the perturb and update phases (noise stays 0).
    """

    compute: float = 0.0
    """Inside the blocks' own forwards."""
    noise: float = 0.0
    """Drawing z (perturbations and the regeneration for deferred updates)."""
    update: float = 0.0
    """Applying deferred updates, noise excluded."""
    perturb: float = 0.0
    """Forming perturbed copies (or in-place shifts), noise excluded."""
    fetch: float = 0.0
    """Bringing partitions (and method state) from the tier to the device."""
    store: float = 0.0
    """Writing back and releasing."""


@dataclass
class ForwardPass:
    """What the blocks of one model call need to know."""

    training: bool
    groups: list[Optional[Perturbation]]
    rows_per_group: int
    step: int
    step_seed: int
    visited: list[int] = field(default_factory=list)
    trace_position: int = -1


class BlockPipeline:
    """Streams a model's blocks through the device for ZO forwards, eval forwards and flushes."""

    def __init__(self, model: nn.Module, blocks: list[Block], tier: Tier, method: ZOMethod, noise: NoiseSource,
                 config: ZO2Config, compute_dtype: torch.dtype, pool: BufferPool, device_timing: bool = False) -> None:
        self.model = model
        self.blocks = blocks
        self.slots: list[ParamSlot] = list(iter_slots(blocks))
        self.tier = tier
        self.method = method
        self.noise = noise
        self.config = config
        self.compute_dtype = compute_dtype
        self.pool = pool
        self.pending: Optional[PendingUpdate] = None
        self.trace: Optional[list[int]] = None
        self._pass: Optional[ForwardPass] = None
        self.streams = DeviceStreams(pool.device)
        self.asynchronous = self.streams.enabled and not tier.host_io
        """Fetches and write-backs are queued on streams from this thread (else: a worker, or inline)."""
        tier.async_copies = self.asynchronous
        self.fused = noise.fused
        """Perturbed copies and linear updates come from one noise kernel per block (z never materialised)."""
        use_worker = config.prefetch_blocks > 0 and not self.asynchronous
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="zo2-prefetch") if use_worker else None
        self._inflight: dict[int, Future] = {}
        self._written_back: tuple[list[torch.Tensor], Any] = ([], None)
        """Working tensors of the last release and the event after their write-back (streams only)."""
        self._cache_shared_noise = len(method.directions()) <= 1
        self.times = PhaseTimes()
        # with streams, phases are timed by event pairs (two events per phase per block and group): only on request
        self._clock = PhaseClock(self.times, self.streams, device_timing=self.asynchronous,
                                 enabled=device_timing or not self.asynchronous)
        tier.synchronize = lambda: self._drain(host_reads=True)
        self.collect_checksums = False
        self.checksums: dict[str, int] = {}
        for slot in self.slots:
            for name, value in method.state_init.items():
                if slot.trainable and name not in slot.stored_state:
                    tier.create_state(slot, name, value)
        install_wrappers(blocks, self._run_block)

    # ------------------------------------------------------------------ public
    @contextlib.contextmanager
    def forward_pass(self, forward: ForwardPass) -> Iterator[ForwardPass]:
        """Scope of one model call: every block entered inside it streams; all is released at exit."""
        if self._pass is not None:
            raise RuntimeError("a forward pass is already running (nested engine calls are not supported)")
        self._pass = forward
        completed = False
        try:
            self._prefetch_from(0)
            yield forward
            completed = True
        finally:
            try:
                self._finish_pass()
            finally:
                self._pass = None
            if completed and self.trace is None and forward.visited:
                self.trace = list(forward.visited)

    def commit(self, update: Optional[PendingUpdate]) -> None:
        """Make ``update`` the pending one; whatever the previous one has not reached yet gets it now."""
        self._apply_pending_everywhere()
        if update is not None:
            self.pending = update

    def stale_slots(self) -> list[ParamSlot]:
        p = self.pending
        if p is None:
            return []
        return [s for s in self.slots if s.trainable and s.updated_through < p.step]

    def flush(self) -> int:
        """Apply the pending update to every parameter that has not had it, and let every write-back land.

        Returns the blocks touched. Afterwards the host may read the tier (checkpoints, export).
        """
        touched = self._apply_pending_everywhere()
        self._drain(host_reads=True)
        return touched

    def _apply_pending_everywhere(self) -> int:
        if self._pass is not None:
            raise RuntimeError("flush() during a forward pass")
        stale = {id(s) for s in self.stale_slots()}
        if not stale:
            return 0
        touched = 0
        self._drain()
        for block in self.blocks:
            if not any(id(s) in stale for s in block.slots):
                continue
            self.streams.wait(self._submit(self._acquire, block, None).result())
            self._release([s for s in block.slots if s.resident], None)
            stale.difference_update(id(s) for s in block.slots)
            touched += 1
        self._drain(host_reads=True)
        return touched

    def read_parameters(self, visit: Callable[[ParamSlot, torch.Tensor], None]) -> None:
        """Stream every parameter through the device once, up to date, calling ``visit(slot, full_tensor)``."""
        if self._pass is not None:
            raise RuntimeError("read_parameters() during a forward pass")
        self.flush()
        self._drain()
        seen: set[int] = set()
        for block in self.blocks:
            todo = [s for s in block.slots if id(s) not in seen]
            if not todo:
                continue
            self.streams.wait(self._submit(self._acquire, block, None).result())
            for slot in todo:
                visit(slot, slot.work)
                seen.add(id(slot))
            self._release([s for s in block.slots if s.resident], None)
            self._drain(host_reads=True)

    def close(self) -> None:
        """Flush, restore the blocks' own forwards and stop the worker."""
        if self._pass is None:
            self.flush()
        remove_wrappers(self.blocks)
        self._drain(host_reads=True)
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def time_phases(self, on: bool) -> None:
        """Turn phase timing on or off (it is always on without streams, where it costs no events)."""
        self._clock.enabled = on or not self.asynchronous
        self._clock.device_timing = self.asynchronous and self._clock.enabled

    def settle_times(self, wait: bool = False) -> PhaseTimes:
        """The phase times with the device phases that have finished folded in (``wait``: all of them).

        Without waiting, a phase still running on a stream counts toward a later reading.
        """
        self._clock.settle(wait)
        return self.times

    # ------------------------------------------------------------------ blocks
    def _run_block(self, block: Block, original: Callable, args: tuple, kwargs: dict) -> Any:
        forward = self._pass
        if forward is None:
            # The model was called outside the engine (generate(), a user's eval loop): stream it plainly.
            with self.forward_pass(ForwardPass(training=False, groups=[None], rows_per_group=0, step=-1,
                                               step_seed=0)):
                return self._run_block(block, original, args, kwargs)
        self._enter(block, forward)
        try:
            if not forward.training:
                with self._clock("compute"):
                    return original(*args, **kwargs)
            return self._run_groups(block, original, args, kwargs, forward)
        finally:
            self._leave(block, forward)

    def _run_groups(self, block: Block, original: Callable, args: tuple, kwargs: dict, forward: ForwardPass) -> Any:
        groups = forward.groups
        rows = len(groups) * forward.rows_per_group
        if self._plain_linear(block, args, kwargs, rows):
            return self._run_linear_groups(block, args[0], forward)
        arg_parts, args_batched = split_groups(args, len(groups), rows)
        kwarg_parts, kwargs_batched = split_groups(kwargs, len(groups), rows)
        outputs = []
        self._for_each_group(block, forward, lambda g: outputs.append(original(*arg_parts[g], **kwarg_parts[g])))
        return concat_groups(outputs, forward.rows_per_group, args_batched or kwargs_batched, block.name)

    def _for_each_group(self, block: Block, forward: ForwardPass, run_group: Callable[[int], None]) -> None:
        """``run_group(g)`` with the block's parameters perturbed for group g, then restored.

        A direction's z is recycled after the last group that uses it.
        """
        trainable = [s for s in block.slots if s.trainable]
        last_use = {g.direction: i for i, g in enumerate(forward.groups) if g is not None}
        scalings = [self.method.scaling(s.state) for s in trainable] if self.fused and self.method.uses_scaling \
            else None
        try:
            for g, perturbation in enumerate(forward.groups):
                self._perturb(trainable, perturbation, forward, scalings)
                with self._clock("compute"):
                    run_group(g)
                if perturbation is not None and last_use[perturbation.direction] == g and self.config.exact_restore:
                    self._drop_direction(trainable, perturbation.direction)
        finally:
            self._perturb(trainable, None, forward, scalings)

    @staticmethod
    def _plain_linear(block: Block, args: tuple, kwargs: dict, rows: int) -> bool:
        """A bare nn.Linear block (e.g. the LM head) called on one batched input."""
        return (type(block.module) is nn.Linear and not block.had_instance_forward and not kwargs and len(args) == 1
                and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2 and args[0].shape[0] == rows)

    def _run_linear_groups(self, block: Block, x: torch.Tensor, forward: ForwardPass) -> torch.Tensor:
        """Each group's product written straight into its rows of one output tensor.

        Same kernels as ``F.linear`` (matmul, or addmm with a bias), so the numbers are identical; what
        it saves is concatenating the per-group outputs — for an LM head, G copies of the logits.
        """
        module: nn.Linear = block.module
        out = torch.empty(*x.shape[:-1], module.out_features, dtype=x.dtype, device=x.device)
        x_parts, out_parts = x.chunk(len(forward.groups)), out.chunk(len(forward.groups))

        def run_group(g: int) -> None:
            weight = module.weight.t()
            if module.bias is None:
                torch.matmul(x_parts[g], weight, out=out_parts[g])
            else:
                xs = x_parts[g].reshape(-1, module.in_features)
                torch.addmm(module.bias, xs, weight, out=out_parts[g].view(-1, module.out_features))

        self._for_each_group(block, forward, run_group)
        return out

    def _perturb(self, slots: list[ParamSlot], perturbation: Optional[Perturbation], forward: ForwardPass,
                 scalings: Optional[list[torch.Tensor]] = None) -> None:
        """Point each parameter at its perturbed (or, for None, unperturbed) compute tensor."""
        if self.fused:
            self._perturb_fused(slots, perturbation, forward, scalings)
            return
        if perturbation is not None:
            self._ensure_noise(slots, perturbation.direction, forward)
        for slot in slots:
            if perturbation is None:
                if not self.config.exact_restore and slot.offset is not None:
                    self._shift(slot, slot.offset, -1.0, forward)
                    slot.offset = None
                slot.param.data = slot.compute
                continue
            if self.config.exact_restore or slot.compute is not slot.work:
                if slot.perturbed is None:
                    slot.perturbed = self.pool.get(slot.shape, self.compute_dtype)
                direction = self._direction_noise(slot, perturbation.direction, forward)
                with self._clock("perturb"):
                    torch.add(slot.work, direction, alpha=perturbation.scale, out=slot.perturbed)
                slot.param.data = slot.perturbed
            else:
                current = slot.offset
                if current is not None and current.direction == perturbation.direction:
                    if current.scale != perturbation.scale:
                        self._shift(slot, Perturbation(current.direction, perturbation.scale - current.scale), 1.0,
                                    forward)
                else:
                    if current is not None:
                        self._shift(slot, current, -1.0, forward)
                    self._shift(slot, perturbation, 1.0, forward)
                slot.offset = perturbation
                slot.param.data = slot.work

    def _perturb_fused(self, slots: list[ParamSlot], perturbation: Optional[Perturbation], forward: ForwardPass,
                       scalings: Optional[list[torch.Tensor]]) -> None:
        """``_perturb`` computing z inside the kernel: one launch for the block's copies, one for its shifts.

        ``scalings``: each slot's D (HiZOO's 1/√H), or None for D = 1.
        """
        scaling_of = {id(s): d for s, d in zip(slots, scalings)} if scalings is not None else None
        copies: list[ParamSlot] = []
        shifts: list[tuple[ParamSlot, list[tuple[int, float]]]] = []
        for slot in slots:
            current = slot.offset
            if perturbation is None:
                if current is not None:  # exact_restore=false: subtract the shift in place
                    shifts.append((slot, [(self._seed(forward, current.direction, slot), -current.scale)]))
                    slot.offset = None
                slot.param.data = slot.compute
                continue
            if self.config.exact_restore or slot.compute is not slot.work:
                if slot.perturbed is None:
                    slot.perturbed = self.pool.get(slot.shape, self.compute_dtype)
                copies.append(slot)
                slot.param.data = slot.perturbed
                continue
            terms: list[tuple[int, float]] = []
            if current is not None and current.direction == perturbation.direction:
                if current.scale != perturbation.scale:
                    terms.append((self._seed(forward, current.direction, slot), perturbation.scale - current.scale))
            else:
                if current is not None:
                    terms.append((self._seed(forward, current.direction, slot), -current.scale))
                terms.append((self._seed(forward, perturbation.direction, slot), perturbation.scale))
            if terms:
                shifts.append((slot, terms))
                slot.dirty = True  # as in _shift: the drift of the round trip is kept by every tier
            slot.offset = perturbation
            slot.param.data = slot.work
        kind = self.method.noise_kind

        def scaling(group: list[ParamSlot]) -> Optional[list[torch.Tensor]]:
            return [scaling_of[id(s)] for s in group] if scaling_of is not None else None

        with self._clock("perturb"):
            if copies:
                self.noise.combine([s.perturbed for s in copies], [s.work for s in copies], [1.0] * len(copies),
                                   [[(self._seed(forward, perturbation.direction, s), perturbation.scale)]
                                    for s in copies], kind, scaling(copies))
            if shifts:
                moved = [s for s, _ in shifts]
                self.noise.combine([s.work for s in moved], [s.work for s in moved], [1.0] * len(moved),
                                   [t for _, t in shifts], kind, scaling(moved))

    @staticmethod
    def _seed(forward: ForwardPass, direction: int, slot: ParamSlot) -> int:
        return parameter_seed(forward.step_seed, direction, slot.name)

    def _shift(self, slot: ParamSlot, perturbation: Perturbation, sign: float, forward: ForwardPass) -> None:
        """In-place ±scale·D·z on the working tensor (the exact_restore=false path)."""
        direction = self._direction_noise(slot, perturbation.direction, forward)
        with self._clock("perturb"):
            slot.work.add_(direction, alpha=sign * perturbation.scale)
        slot.dirty = True  # the round trip leaves rounding drift in the working copy: every tier keeps it

    def _direction_noise(self, slot: ParamSlot, direction: int, forward: ForwardPass) -> torch.Tensor:
        """D·z of one direction for this slot (D: the method's scaling, e.g. 1/√H), kept while it is needed."""
        z = slot.noise.get(direction)
        if z is None:
            self._ensure_noise([slot], direction, forward)
            z = slot.noise[direction]
        return z

    def _ensure_noise(self, slots: list[ParamSlot], direction: int, forward: ForwardPass) -> None:
        """Draw one direction's noise for every slot that lacks it, all chunks of all slots in parallel."""
        missing = [s for s in slots if direction not in s.noise]
        if not missing:
            return
        buffers = [self.pool.get(s.shape, torch.float32) for s in missing]
        with self._clock("noise"):
            self.noise.fill_many([(z, self.method.noise_seed(forward.step_seed, forward.step, direction, s.name))
                                  for s, z in zip(missing, buffers)], self.method.noise_kind)
        for slot, z in zip(missing, buffers):
            if self.method.uses_scaling:
                z.mul_(self.method.scaling(slot.state))
            slot.noise[direction] = z

    def _drop_direction(self, slots: list[ParamSlot], direction: int) -> None:
        """Recycle one direction's noise once this block has run its last group using it.

        Many-direction methods (FZOO) then hold one block's z at a time, not N of them; a shared
        parameter keeps it when the pass caches shared noise (one direction, needed by the other owner).
        """
        done = []
        for slot in slots:
            if slot.shared and self._cache_shared_noise:
                continue
            z = slot.noise.pop(direction, None)
            if z is not None:
                done.append(z)
        self.pool.put_many(done)  # one event for the block

    def _drop_noise(self, slot: ParamSlot) -> list[torch.Tensor]:
        buffers = list(slot.noise.values())
        slot.noise.clear()
        return buffers

    # ------------------------------------------------------------------ residency
    def _enter(self, block: Block, forward: ForwardPass) -> None:
        forward.visited.append(block.index)
        self._advance_trace(block, forward)
        future = self._inflight.pop(block.index, None)
        if future is None and not all(s.resident for s in block.slots):
            future = self._submit(self._acquire, block, forward)
        if future is not None:
            self.streams.wait(future.result())
        self._prefetch_from(forward.trace_position + 1)

    def _leave(self, block: Block, forward: ForwardPass) -> None:
        """Release the block's own parameters; shared ones stay (with their noise, if cached) for the pass."""
        recycle: list[torch.Tensor] = []
        if not self._cache_shared_noise:
            for slot in block.slots:
                if slot.shared:
                    recycle.extend(self._drop_noise(slot))
        self._release([s for s in block.slots if s.resident and not s.shared], recycle)

    def _acquire(self, block: Block, forward: Optional[ForwardPass]) -> Any:
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
            with self._clock("fetch"):
                works = self.tier.fetch(need)
                with_state = [s for s in need if s.trainable]
                for name in self.method.state_init:
                    for slot, tensor in zip(with_state, self.tier.fetch_state(with_state, name)):
                        slot.state[name] = tensor
            for slot, work in zip(need, works):
                slot.work = work
                slot.dirty = False
                slot.fetches += 1
            self._bring_up_to_date(need)
            for slot, work in zip(need, works):
                if self.collect_checksums and slot.trainable:
                    self.checksums[slot.name] = bit_checksum(work)
                if work.dtype == self.compute_dtype:
                    slot.compute = work
                else:
                    slot.compute = self.pool.get(slot.shape, self.compute_dtype)
                    slot.compute.copy_(work)
                slot.param.data = slot.compute
            if forward is not None and forward.training and len(self.method.directions()) == 1 and not self.fused:
                self._ensure_noise([s for s in block.slots if s.trainable], self.method.directions()[0], forward)
            return self.streams.record()

    def _bring_up_to_date(self, slots: list[ParamSlot]) -> None:
        """Apply the pending update to the slots that have not had it.

        With one noise direction (MeZO, HiZOO) the z of all the slots is drawn at once, in parallel;
        with several (FZOO) each slot draws its directions one after another (one z buffer at a time).
        """
        update = self.pending
        if update is None:
            return
        stale = [s for s in slots if s.trainable and s.updated_through < update.step]
        if not stale:
            return
        if self.fused and self.method.update_is_linear:
            self._update_fused(stale, update)
            return
        directions = sorted({d for d, _ in update.terms})
        drawn: dict[int, torch.Tensor] = {}
        if len(directions) == 1:
            drawn = {id(s): self.pool.get(s.shape, torch.float32) for s in stale}
            with self._clock("noise"):
                seed = self.method.noise_seed
                self.noise.fill_many([(drawn[id(s)], seed(update.step_seed, update.step, directions[0], s.name))
                                      for s in stale], self.method.noise_kind)
        for slot in stale:
            self._update_slot(slot, update, drawn.get(id(slot)))
        self.pool.put_many(drawn.values())

    def _update_fused(self, stale: list[ParamSlot], update: PendingUpdate) -> None:
        """θ ← decay·θ + Σ coefficient·D·z for every stale slot in one launch, z computed from the seeds."""
        targets, decays, terms, scalings = [], [], [], []
        for slot in stale:
            linear = self.method.linear_update(update, slot.group_index)
            slot.updated_through = update.step
            slot.dirty = True
            if linear is None:
                continue
            decay, coefficients = linear
            targets.append(slot.work)
            decays.append(decay)
            terms.append([(parameter_seed(update.step_seed, d, slot.name), c) for d, c in coefficients])
            if self.method.uses_scaling:
                scalings.append(self.method.scaling(slot.state))
        with self._clock("update"):
            self.noise.combine(targets, targets, decays, terms, self.method.noise_kind,
                               scalings if self.method.uses_scaling else None)

    def _update_slot(self, slot: ParamSlot, update: PendingUpdate, drawn: Optional[torch.Tensor]) -> None:
        buffer = drawn if drawn is not None else self.pool.get(slot.shape, torch.float32)
        scratch = self.pool.get(slot.shape, torch.float32) if self.method.uses_scaling else None
        noise_time = 0.0

        def noise(direction: int) -> torch.Tensor:
            nonlocal noise_time
            if drawn is not None:
                return drawn
            start = time.perf_counter()
            with self._clock("noise"):
                seed = self.method.noise_seed(update.step_seed, update.step, direction, slot.name)
                out = self.noise.fill(buffer, seed, self.method.noise_kind)
            noise_time += time.perf_counter() - start
            return out

        if self._clock.device_timing:  # device time of the whole update; the noise it draws is also in "noise"
            with self._clock("update"):
                self.method.apply_update(slot.work, slot.state, update, slot.group_index, noise, scratch)
        else:
            start = time.perf_counter()
            self.method.apply_update(slot.work, slot.state, update, slot.group_index, noise, scratch)
            self._clock.add("update", time.perf_counter() - start - noise_time)
        slot.updated_through = update.step
        slot.dirty = True
        if drawn is None:
            self.pool.put(buffer)
        if scratch is not None:
            self.pool.put(scratch)

    def _release(self, slots: list[ParamSlot], recycle: Optional[list[torch.Tensor]]) -> None:
        """Write back and put at rest.

        Compute-only buffers (perturbed and compute copies, noise) are recycled after compute's last use
        of them; working tensors after their write-back — with streams, one release later, so that the
        next upload reuses buffers whose copy back finished a block ago and runs beside the current one.
        """
        recycle = list(recycle or [])
        if not slots and not recycle:
            return
        works, dirty, seeds = [], [], []
        step = self.pending.step if self.pending is not None else -1
        for slot in slots:
            if slot.offset is not None:
                raise RuntimeError(f"{slot.name} released while perturbed")
            works.append(slot.work)
            dirty.append(slot.dirty)
            rounds = slot.dirty and slot.work.dtype != self.tier.storage_dtype(slot)  # a seed only where it is used
            seeds.append(derive_seed("zo2-round", step, slot.name) if rounds else 0)
            if slot.compute is not None and slot.compute is not slot.work:
                recycle.append(slot.compute)
            if slot.perturbed is not None:
                recycle.append(slot.perturbed)
            recycle.extend(self._drop_noise(slot))
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
                with self._clock("store"):
                    if slots:
                        freed += self.tier.store(slots, works, dirty, seeds)
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

        self._submit(store)

    def _recycle_written_back(self) -> None:
        """Recycle the working tensors held back by the last release (their copies are ordered by its event)."""
        freed, written = self._written_back
        self._written_back = ([], None)
        self.pool.put_many(freed, written)

    def _submit(self, fn: Callable, *args: Any) -> Future:
        """Run ``fn`` on the worker (in submission order) or, without one, right here.

        Every tier operation goes through here: tiers (DeepSpeed's NVMe swapper among them) are not
        thread-safe, so they are only ever used from one thread at a time, in program order. With
        asynchronous streams there is no worker: ``fn`` queues its device work and returns at once.
        """
        if self._worker is not None:
            return self._worker.submit(fn, *args)
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # surfaced by future.result(), as from the worker
            future.set_exception(e)
        return future

    def _drain(self, host_reads: bool = False) -> None:
        """Wait for the worker's queued fetches and write-backs; with ``host_reads``, also for every stream's
        (the host is about to read or hand out what was written back)."""
        if self._worker is not None:
            self._worker.submit(lambda: None).result()
        if host_reads:
            self.streams.synchronize()
            self._recycle_written_back()

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

    def _prefetch_from(self, position: int) -> None:
        if self.config.prefetch_blocks == 0 or self.trace is None or self._pass is None:
            return
        for pos in range(position, min(position + self.config.prefetch_blocks, len(self.trace))):
            index = self.trace[pos]
            block = self.blocks[index]
            if index in self._inflight or all(s.resident for s in block.slots):
                continue
            self._inflight[index] = self._submit(self._acquire, block, self._pass)

    def _finish_pass(self) -> None:
        errors = []
        for future in self._inflight.values():
            try:
                self.streams.wait(future.result())
            except BaseException as e:
                errors.append(e)
        self._inflight.clear()
        recycle: list[torch.Tensor] = []
        for slot in self.slots:
            if not slot.resident:
                recycle.extend(self._drop_noise(slot))
        self._release([s for s in self.slots if s.resident], recycle)
        self._recycle_written_back()
        self._drain()
        if errors:
            raise errors[0]

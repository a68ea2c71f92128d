"""The block pipeline: the order of a block's life in one forward (enter, run the groups, leave).

One training forward streams every block through the device once:

1. enter — the movement part (``movement.BlockMovement``) fetches the block's parameters from their
   tier (ahead of time when ``prefetch_blocks`` > 0, on streams or a worker thread) and, through the
   perturbation part's hooks, applies the pending update of the previous step to them;
2. run the groups — for each perturbation group the perturbation part
   (``perturbation.BlockPerturbation``) points the parameters at θ + scale·D·z (perturbed copies or
   in-place shifts, drawn z or fused kernels), the block's own forward runs on that group's rows of
   the batch, and the parameters are restored;
3. leave — the movement part writes the parameters back and releases them.

Parameters shared by several blocks (tied embeddings) stay resident for the whole forward, so they
too are fetched, perturbed and updated exactly once. ``BlockPipeline`` only keeps this order and the
pass's bookkeeping; a new device or tier changes the movement part, a new method the perturbation
part (or just the ``ZOMethod`` it calls).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .blocks import Block, ParamSlot, concat_groups, install_wrappers, iter_slots, remove_wrappers, split_groups
from .buffers import BufferPool
from .config import ZO2Config
from .methods import PendingUpdate, Perturbation, ZOMethod
from .movement import BlockMovement, drop_noise
from .noise import NoiseSource
from .perturbation import BlockPerturbation, Perturber
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
    tail_entered: Optional[str] = None
    """The first block of the first-order tail this pass ran (after it, no body block may run)."""


class BlockPipeline:
    """Streams a model's blocks through the device for ZO forwards, eval forwards and flushes."""

    def __init__(self, model: nn.Module, blocks: list[Block], tier: Tier, method: ZOMethod, noise: NoiseSource,
                 config: ZO2Config, compute_dtype: torch.dtype, pool: BufferPool, device_timing: bool = False) -> None:
        self.model = model
        self.blocks = blocks
        self.slots: list[ParamSlot] = list(iter_slots(blocks))
        self.tier = tier
        self.method = method
        self.config = config
        self.pool = pool
        self._pass: Optional[ForwardPass] = None
        self.tail: Optional[Any] = None
        """The first-order tail's runner (``first_order.tail.TailRunner``): it runs the tail's blocks in training
        forwards, and the body's blocks then run under ``no_grad``; None without a tail."""
        streams = DeviceStreams(pool.device)
        asynchronous = streams.enabled and not tier.host_io
        self.times = PhaseTimes()
        # with streams, phases are timed by event pairs (two events per phase per block and group): only on request
        self._clock = PhaseClock(self.times, streams, device_timing=asynchronous,
                                 enabled=device_timing or not asynchronous)
        self.perturbation: Perturber = BlockPerturbation(method, noise, config, compute_dtype, pool, self._clock)
        self.movement = BlockMovement(blocks, tier, method, self.perturbation, config.prefetch_blocks, compute_dtype,
                                      pool, streams, self._clock)
        for slot in self.slots:
            for name, value in method.state_init.items():
                if slot.trainable and name not in slot.stored_state:
                    tier.create_state(slot, name, value)
        install_wrappers(blocks, self._run_block)

    # ------------------------------------------------------------------ the parts' state, as callers read it
    @property
    def asynchronous(self) -> bool:
        """Fetches and write-backs are queued on streams from this thread (else: a worker, or inline)."""
        return self.movement.asynchronous

    @property
    def fused(self) -> bool:
        """Perturbed copies and linear updates come from one noise kernel per block (z never materialised)."""
        return self.perturbation.fused

    @property
    def streams(self) -> DeviceStreams:
        return self.movement.streams

    @property
    def _worker(self) -> Optional[Any]:
        return self.movement.worker

    @property
    def trace(self) -> Optional[list[int]]:
        return self.movement.trace

    @property
    def pending(self) -> Optional[PendingUpdate]:
        return self.perturbation.pending

    @pending.setter
    def pending(self, update: Optional[PendingUpdate]) -> None:
        self.perturbation.pending = update

    @property
    def collect_checksums(self) -> bool:
        return self.movement.collect_checksums

    @collect_checksums.setter
    def collect_checksums(self, on: bool) -> None:
        self.movement.collect_checksums = on

    @property
    def checksums(self) -> dict[str, int]:
        return self.movement.checksums

    # ------------------------------------------------------------------ public
    @contextlib.contextmanager
    def forward_pass(self, forward: ForwardPass) -> Iterator[ForwardPass]:
        """Scope of one model call: every block entered inside it streams; all is released at exit."""
        if self._pass is not None:
            raise RuntimeError("a forward pass is already running (nested engine calls are not supported)")
        self._pass = forward
        completed = False
        try:
            self.movement.prefetch_from(0, forward)
            yield forward
            completed = True
        finally:
            try:
                self._finish_pass()
            finally:
                self._pass = None
            if completed and self.movement.trace is None and forward.visited:
                self.movement.trace = list(forward.visited)

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

        Under LOZO's window write-back it also merges every matrix's U_acc into its stored copy. Returns
        the blocks touched. Afterwards the tier holds the true weights and the host may read it
        (checkpoints, export).
        """
        touched = self._apply_pending_everywhere(merge=True)
        self.movement.drain(host_reads=True)
        return touched

    def _apply_pending_everywhere(self, merge: bool = False) -> int:
        if self._pass is not None:
            raise RuntimeError("flush() during a forward pass")
        stale = {id(s) for s in self.stale_slots()}
        if merge:  # --- window write-back: updates held beside the stored copy are merged into it
            stale.update(id(s) for s in self.perturbation.unmerged(self.slots))
        if not stale:
            return 0
        touched = 0
        movement = self.movement
        movement.drain()
        with self.perturbation.merging(merge):
            for block in self.blocks:
                if not any(id(s) in stale for s in block.slots):
                    continue
                movement.streams.wait(movement.submit(movement.acquire, block, None).result())
                self._release([s for s in block.slots if s.resident], None)
                stale.difference_update(id(s) for s in block.slots)
                touched += 1
            movement.drain(host_reads=True)
        return touched

    def read_parameters(self, visit: Callable[[ParamSlot, torch.Tensor], None]) -> None:
        """Stream every parameter through the device once, up to date, calling ``visit(slot, full_tensor)``."""
        if self._pass is not None:
            raise RuntimeError("read_parameters() during a forward pass")
        self.flush()
        movement = self.movement
        movement.drain()
        seen: set[int] = set()
        for block in self.blocks:
            todo = [s for s in block.slots if id(s) not in seen]
            if not todo:
                continue
            movement.streams.wait(movement.submit(movement.acquire, block, None).result())
            for slot in todo:
                visit(slot, slot.work)
                seen.add(id(slot))
            self._release([s for s in block.slots if s.resident], None)
            movement.drain(host_reads=True)

    def close(self) -> None:
        """Flush, restore the blocks' own forwards and stop the worker."""
        if self._pass is None:
            self.flush()
        remove_wrappers(self.blocks)
        self.movement.drain(host_reads=True)
        self.movement.close()

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

    # ------------------------------------------------------------------ a block's life
    def _run_block(self, block: Block, original: Callable, args: tuple, kwargs: dict) -> Any:
        forward = self._pass
        if forward is None:
            # The model was called outside the engine (generate(), a user's eval loop): stream it plainly.
            with self.forward_pass(ForwardPass(training=False, groups=[None], rows_per_group=0, step=-1,
                                               step_seed=0)):
                return self._run_block(block, original, args, kwargs)
        self.movement.bring_in(block, forward)
        try:
            if not forward.training:
                with self._clock("compute"):
                    return original(*args, **kwargs)
            if self.tail is not None:  # a first-order tail: it runs with autograd, the body without
                if self.tail.owns(block):
                    with self._clock("compute"):
                        return self.tail.run(block, original, args, kwargs, forward)
                self.tail.check_body(block, forward)
                with torch.no_grad():
                    return self._run_groups(block, original, args, kwargs, forward)
            return self._run_groups(block, original, args, kwargs, forward)
        finally:
            self._leave(block)

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
        perturbation = self.perturbation
        trainable = [s for s in block.slots if s.trainable]
        last_use = {g.direction: i for i, g in enumerate(forward.groups) if g is not None}
        scalings = perturbation.scalings(trainable)
        try:
            for g, group in enumerate(forward.groups):
                perturbation.perturb(trainable, group, forward, scalings)
                with self._clock("compute"):
                    run_group(g)
                if group is not None and last_use[group.direction] == g and self.config.exact_restore:
                    perturbation.drop_direction(trainable, group.direction)
        finally:
            perturbation.perturb(trainable, None, forward, scalings)

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

    def _leave(self, block: Block) -> None:
        """Release the block's own parameters; shared ones stay (with their noise, if cached) for the pass."""
        recycle: list[torch.Tensor] = []
        if not self.perturbation.cache_shared_noise:
            for slot in block.slots:
                if slot.shared:
                    recycle.extend(drop_noise(slot))
        self._release([s for s in block.slots if s.resident and not s.shared], recycle)

    def _release(self, slots: list[ParamSlot], recycle: Optional[list[torch.Tensor]]) -> None:
        self.movement.release(slots, recycle, self.pending.step if self.pending is not None else -1)

    def _finish_pass(self) -> None:
        errors = self.movement.settle_inflight()
        recycle: list[torch.Tensor] = []
        for slot in self.slots:
            if not slot.resident:
                recycle.extend(drop_noise(slot))
        self._release([s for s in self.slots if s.resident], recycle)
        self.movement.recycle_written_back()
        self.movement.drain()
        if errors:
            raise errors[0]

"""The perturbation part of the block pipeline: noise, perturbed copies or shifts, and the deferred update.

While a block is resident, ``BlockPerturbation`` points each trainable parameter at θ + scale·D·z for
the group being run (a perturbed copy, or with ``exact_restore`` false an in-place shift of the
working tensor), and brings freshly fetched parameters up to date with the pending update of the
previous step. Either z is drawn into pooled buffers and kept while the block needs it, or — for a
noise source with fused kernels (``NoiseSource.fused``) — copies, shifts and linear updates are
computed straight from the seeds, one launch per block. The method (MeZO, FZOO, HiZOO, LOZO) decides
seeds, noise kind, scaling D and the update rule; a new method plugs in there, not here.
"""
from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Iterator, Optional, Protocol

import torch

from .blocks import Block, ParamSlot
from .buffers import BufferPool
from .config import ZO2Config
from .methods import PendingUpdate, Perturbation, ZOMethod
from .noise import NoiseSource, parameter_seed
from .streams import PhaseClock
from .factored import FactoredLinears, resolve_lowrank_forward
from .window import WindowWriteBack

if TYPE_CHECKING:
    from .pipeline import ForwardPass


class Perturber(Protocol):
    """What the pipeline and the movement part ask of a perturbation part (``BlockPerturbation``)."""

    pending: Optional[PendingUpdate]
    """The update of the previous step, applied to each parameter when it is next fetched."""
    fused: bool
    cache_shared_noise: bool

    def bring_up_to_date(self, slots: list[ParamSlot], forward: Optional[ForwardPass] = None) -> None:
        """Called by the movement part right after the upload of ``slots`` (``forward`` None: a flush or a read)."""

    def stores_back(self, slot: ParamSlot) -> Optional[bool]:
        """Whether releasing ``slot`` writes it back: None when it is stored if changed (the per-step path);
        True or False for a matrix under LOZO's window write-back (True: its window was merged)."""

    def unmerged(self, slots: list[ParamSlot]) -> list[ParamSlot]:
        """The parameters whose stored copy lacks updates held beside it (LOZO's U_acc): a flush merges them."""

    def merging(self, on: bool) -> contextlib.AbstractContextManager:
        """Within it, every residency merges what is held beside the stored copy (a flush)."""

    def discard_held_updates(self) -> None:
        """Forget updates held beside the stored copies (a checkpoint load has rewritten them)."""

    def prepare_resident(self, block: Block, forward: Optional[ForwardPass]) -> None:
        """Called by the movement part once ``block`` is resident (``forward`` None: a flush or a read)."""

    def scalings(self, trainable: list[ParamSlot]) -> Optional[list[torch.Tensor]]: ...

    def perturb(self, slots: list[ParamSlot], perturbation: Optional[Perturbation], forward: ForwardPass,
                scalings: Optional[list[torch.Tensor]] = None) -> None:
        """Before a group runs (``perturbation`` None: restore the unperturbed parameters)."""

    def drop_direction(self, slots: list[ParamSlot], direction: int) -> None:
        """After the last group of ``direction`` in this block."""


class BlockPerturbation:
    """Perturbs resident parameters per group and applies the deferred update as they arrive."""

    def __init__(self, method: ZOMethod, noise: NoiseSource, config: ZO2Config, compute_dtype: torch.dtype,
                 pool: BufferPool, clock: PhaseClock) -> None:
        self.method = method
        self.noise = noise
        self.config = config
        self.compute_dtype = compute_dtype
        self.pool = pool
        self.clock = clock
        self.pending: Optional[PendingUpdate] = None
        self.fused = noise.fused
        """Perturbed copies and linear updates come from one noise kernel per block (z never materialised)."""
        self.cache_shared_noise = len(method.directions()) <= 1
        """One direction: a shared parameter keeps its z for the whole pass (the other owner needs it too)."""
        self.window: Optional[WindowWriteBack] = \
            WindowWriteBack(method, noise, config, pool, clock) if config.window_write_back else None
        """LOZO's window write-back (``zo2.write_back`` "window"): matrices' updates held as U_acc until a merge."""
        self.factored: Optional[FactoredLinears] = None
        """With the window write-back and ``zo2.lowrank_forward`` factored: linear layers run x·Wᵀ + (x·V)·Bᵀ."""
        if self.window is not None and resolve_lowrank_forward(config.lowrank_forward, pool.device) == "factored":
            self.factored = FactoredLinears(method, noise, self.window, pool, clock, compute_dtype)

    # ------------------------------------------------------------------ per group
    def scalings(self, trainable: list[ParamSlot]) -> Optional[list[torch.Tensor]]:
        """Each slot's D for the fused kernels (computed once per block), or None."""
        return [self.method.scaling(s.state) for s in trainable] if self.fused and self.method.uses_scaling \
            else None

    def perturb(self, slots: list[ParamSlot], perturbation: Optional[Perturbation], forward: ForwardPass,
                scalings: Optional[list[torch.Tensor]] = None) -> None:
        """Point each parameter at its perturbed (or, for None, unperturbed) compute tensor."""
        if self.fused:
            self._perturb_fused(slots, perturbation, forward, scalings)
            return
        done_with = slots
        if self.factored is not None:  # LOZO's factored layers: the group's term, no perturbed copy
            slots = [s for s in slots if not self.factored.perturb(s, perturbation)]
        if perturbation is not None:
            self.ensure_noise(slots, perturbation.direction, forward)
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
                with self.clock("perturb"):
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
        if perturbation is None and self.factored is not None:
            self.pool.put_many(self.factored.release(done_with))

    def _perturb_fused(self, slots: list[ParamSlot], perturbation: Optional[Perturbation], forward: ForwardPass,
                       scalings: Optional[list[torch.Tensor]]) -> None:
        """``perturb`` computing z inside the kernel: one launch for the block's copies, one for its shifts.

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

        with self.clock("perturb"):
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
        with self.clock("perturb"):
            slot.work.add_(direction, alpha=sign * perturbation.scale)
        slot.dirty = True  # the round trip leaves rounding drift in the working copy: every tier keeps it

    # ------------------------------------------------------------------ noise
    def _direction_noise(self, slot: ParamSlot, direction: int, forward: ForwardPass) -> torch.Tensor:
        """D·z of one direction for this slot (D: the method's scaling, e.g. 1/√H), kept while it is needed."""
        z = slot.noise.get(direction)
        if z is None:
            self.ensure_noise([slot], direction, forward)
            z = slot.noise[direction]
        return z

    def ensure_noise(self, slots: list[ParamSlot], direction: int, forward: ForwardPass) -> None:
        """Draw one direction's noise for every slot that lacks it, all chunks of all slots in parallel."""
        missing = [s for s in slots if direction not in s.noise]
        if not missing:
            return
        buffers = [self.pool.get(s.shape, torch.float32) for s in missing]
        with self.clock("noise"):
            self.noise.fill_many([(z, self.method.noise_seed(forward.step_seed, forward.step, direction, s.name))
                                  for s, z in zip(missing, buffers)], self.method.noise_kind)
        for slot, z in zip(missing, buffers):
            if self.method.uses_scaling:
                z.mul_(self.method.scaling(slot.state))
            slot.noise[direction] = z

    # ------------------------------------------------------------------ window write-back (LOZO)
    def stores_back(self, slot: ParamSlot) -> Optional[bool]:
        return self.window.stores_back(slot) if self.window is not None else None

    def unmerged(self, slots: list[ParamSlot]) -> list[ParamSlot]:
        return self.window.unmerged(slots) if self.window is not None else []

    @contextlib.contextmanager
    def merging(self, on: bool) -> Iterator[None]:
        if self.window is None or not on:
            yield
            return
        self.window.merge_all = True
        try:
            yield
        finally:
            self.window.merge_all = False

    def discard_held_updates(self) -> None:
        if self.window is not None:
            self.window.discard()

    @property
    def write_back_description(self) -> str:
        """`` write_back=window lowrank_forward=factored`` for the engine's banner under LOZO's window write-back."""
        if self.window is None:
            return ""
        return f" write_back=window lowrank_forward={'factored' if self.factored is not None else 'materialised'}"

    def _is_factored(self, slot: ParamSlot) -> bool:
        return self.factored is not None and self.factored.covers(slot)

    def prepare_resident(self, block: Block, forward: Optional[ForwardPass]) -> None:
        """Right after a block's fetch: with one direction and no fused kernels, draw its z once for all groups
        (a factored layer draws only its factors)."""
        if forward is not None and forward.training and len(self.method.directions()) == 1 and not self.fused:
            trainable = [s for s in block.slots if s.trainable]
            if self.factored is not None:
                self.factored.prepare(trainable, forward)
            self.ensure_noise([s for s in trainable if not self._is_factored(s)], self.method.directions()[0],
                              forward)

    def drop_direction(self, slots: list[ParamSlot], direction: int) -> None:
        """Recycle one direction's noise once this block has run its last group using it.

        Many-direction methods (FZOO) then hold one block's z at a time, not N of them; a shared
        parameter keeps it when the pass caches shared noise (one direction, needed by the other owner).
        """
        done = []
        for slot in slots:
            if slot.shared and self.cache_shared_noise:
                continue
            z = slot.noise.pop(direction, None)
            if z is not None:
                done.append(z)
        self.pool.put_many(done)  # one event for the block

    # ------------------------------------------------------------------ deferred update
    def bring_up_to_date(self, slots: list[ParamSlot], forward: Optional[ForwardPass] = None) -> None:
        """Apply the pending update to the slots that have not had it.

        With one noise direction (MeZO, HiZOO) the z of all the slots is drawn at once, in parallel;
        with several (FZOO) each slot draws its directions one after another (one z buffer at a time).
        Under LOZO's window write-back the matrices instead fold it into their U_acc (``window``).
        """
        update = self.pending
        if self.window is not None:
            held = [s for s in slots if self.window.covers(s)]
            self.window.bring_up_to_date(held, update, forward, self._is_factored)
            slots = [s for s in slots if not self.window.covers(s)]
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
            with self.clock("noise"):
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
        with self.clock("update"):
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
            with self.clock("noise"):
                seed = self.method.noise_seed(update.step_seed, update.step, direction, slot.name)
                out = self.noise.fill(buffer, seed, self.method.noise_kind)
            noise_time += time.perf_counter() - start
            return out

        if self.clock.device_timing:  # device time of the whole update; the noise it draws is also in "noise"
            with self.clock("update"):
                self.method.apply_update(slot.work, slot.state, update, slot.group_index, noise, scratch)
        else:
            start = time.perf_counter()
            self.method.apply_update(slot.work, slot.state, update, slot.group_index, noise, scratch)
            self.clock.add("update", time.perf_counter() - start - noise_time)
        slot.updated_through = update.step
        slot.dirty = True
        if drawn is None:
            self.pool.put(buffer)
        if scratch is not None:
            self.pool.put(scratch)

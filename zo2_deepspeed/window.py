"""Window write-back under LOZO: a weight matrix's stored copy stays read-only for a lazy window.

LOZO keeps V fixed for the ν = ``zo2.lazy_steps`` steps of a window, so the updates a matrix receives
within a window add up to a low-rank product. With W the tier's copy at the window's start,

    θ = a·W + U_acc·Vᵀ,     after step t:  a ← d_t·a,   U_acc ← d_t·U_acc − lr_t·c_t·U_t/√r

(d_t = 1 − lr_t·wd, the decoupled weight decay; U_acc is m × r, fp32, on the compute device: for r = 2
and n = 4096 it is 1/2048 of the matrix). Between window ends nothing of the matrix is written back:
after each upload the working tensor becomes a·W + U_acc·Vᵀ (one m × r × n GEMM, the size of the
product LOZO forms for z anyway) and the tier skips its store. The first residency of a training
step in a later window — or a request for the true weights (``BlockPipeline.flush``: save, export,
close) — merges: the working tensor is stored back (rounded to a 16-bit storage dtype once per
window, stochastically) and U_acc restarts at zero. Vectors and other non-matrix parameters keep
the per-step write-back.

``WindowWriteBack`` is used by the perturbation part (``perturbation.BlockPerturbation``); the
movement part only asks it, per parameter, whether a release stores (``stores_back``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from .blocks import ParamSlot
from .buffers import BufferPool
from .config import ZO2Config
from .lowrank import LowRankNoise, matrix_view, window_seed
from .methods import PendingUpdate, ZOMethod
from .noise import derive_seed
from .streams import PhaseClock

if TYPE_CHECKING:
    from .pipeline import ForwardPass


@dataclass
class MatrixWindow:
    """One matrix's updates since its stored copy was last written: θ = scale·W + u_acc·Vᵀ."""

    u_acc: Optional[torch.Tensor] = None
    """m × r fp32 on the compute device; None: nothing accumulated (θ = W)."""
    scale: float = 1.0
    """a, the product of the window's weight-decay factors."""
    window: int = -1
    """The lazy window whose V ``u_acc`` multiplies."""
    stores: bool = False
    """Merged during the current residency: the release writes the working tensor back."""

    @property
    def open(self) -> bool:
        return self.u_acc is not None

    def reset(self) -> None:
        self.u_acc, self.scale, self.window = None, 1.0, -1


class WindowWriteBack:
    """The U_acc of every LOZO weight matrix, folded at each upload and merged once per lazy window."""

    def __init__(self, method: ZOMethod, noise: LowRankNoise, config: ZO2Config, pool: BufferPool,
                 clock: PhaseClock) -> None:
        if not isinstance(noise, LowRankNoise):
            raise TypeError(f"window write-back needs LOZO's low-rank noise, got {type(noise).__name__}")
        self.method = method
        self.noise = noise
        self.lazy_steps = config.lazy_steps
        self.rank = config.rank
        self.base_seed = config.seed
        self.stochastic_rounding = config.stochastic_rounding
        self.pool = pool
        self.clock = clock
        self.merge_all = False
        """Set by the pipeline's flush: every open window merges at its next residency."""
        self.merges = 0
        """Matrices merged so far (a matrix counts once per merge)."""
        self._windows: dict[str, MatrixWindow] = {}

    # ------------------------------------------------------------------ queries
    @staticmethod
    def covers(slot: ParamSlot) -> bool:
        """Trainable matrices: their LOZO updates are low rank within a window."""
        return slot.trainable and matrix_view(slot.shape) is not None

    def window_of(self, step: int) -> int:
        return step // self.lazy_steps

    def state(self, slot: ParamSlot) -> MatrixWindow:
        window = self._windows.get(slot.name)
        if window is None:
            window = self._windows[slot.name] = MatrixWindow()
        return window

    def stores_back(self, slot: ParamSlot) -> Optional[bool]:
        """None: not held back (stored when changed); True: merged this residency; False: the store is skipped."""
        if not self.covers(slot):
            return None
        return self.state(slot).stores

    def unmerged(self, slots: list[ParamSlot]) -> list[ParamSlot]:
        """The matrices whose stored copy lacks updates (U_acc not yet merged)."""
        return [s for s in slots if self.covers(s) and self.state(s).open]

    def discard(self) -> None:
        """Forget every U_acc (a checkpoint load has just rewritten the stored copies)."""
        self._windows.clear()

    # ------------------------------------------------------------------ a residency
    def bring_up_to_date(self, slots: list[ParamSlot], update: Optional[PendingUpdate],
                         forward: Optional["ForwardPass"],
                         factored: Callable[[ParamSlot], bool] = lambda slot: False) -> None:
        """Right after the upload of ``slots`` (all covered): fold the pending update into U_acc, make the
        working tensors a·W + U_acc·Vᵀ, and merge where the window has ended or a flush asks for it.

        ``factored(slot)``: the training forward applies U_acc·Vᵀ itself (``factored.FactoredLinears``), so
        unless it merges, the working tensor only takes the factor a.
        """
        if not slots:
            return
        step = forward.step if forward is not None and forward.training else None
        stale = [s for s in slots if update is not None and s.updated_through < update.step]
        for slot in slots:
            self.state(slot).stores = False
        if stale:
            self._fold(stale, update)
        merging, current = [], []
        for slot in slots:
            window = self.state(slot)
            if not window.open:
                continue
            ended = step is not None and self.window_of(step) != window.window
            (merging if window.stores or ended or self.merge_all else current).append(slot)
        self._materialise(merging, merge=True)
        training = step is not None
        self._materialise([s for s in current if not (training and factored(s))], merge=False)
        self._scale([s for s in current if training and factored(s)])

    def _fold(self, slots: list[ParamSlot], update: PendingUpdate) -> None:
        """U_acc ← d·U_acc − lr·c·U_t/√r for the step of ``update`` (U_t regenerated from its seed)."""
        if len(update.terms) != 1:
            raise RuntimeError(f"window write-back folds one direction per step, got {len(update.terms)}")
        (direction, coefficient), = update.terms
        window = self.window_of(update.step)
        folds: list[tuple[ParamSlot, float, float]] = []
        for slot in slots:
            slot.updated_through = update.step
            linear = self.method.linear_update(update, slot.group_index)
            if linear is None:  # lr 0: nothing changes
                continue
            decay, ((_, step_coefficient),) = linear
            state = self.state(slot)
            if state.open and state.window != window:  # a step of a later window before a merge: merge first
                self._materialise([slot], merge=True)
            folds.append((slot, decay, step_coefficient))
        if not folds:
            return
        us = [self.pool.get((matrix_view(s.shape)[0], self.rank), torch.float32) for s, _, _ in folds]
        seed = self.method.noise_seed
        with self.clock("noise"):
            self.noise.fill_factors([(u, seed(update.step_seed, update.step, direction, s.name).u)
                                     for u, (s, _, _) in zip(us, folds)], self.method.noise_kind)
        with self.clock("update"):
            for u, (slot, decay, step_coefficient) in zip(us, folds):
                state = self.state(slot)
                if state.u_acc is None:
                    state.u_acc = torch.zeros(u.shape, dtype=torch.float32, device=u.device)
                    state.window = window
                elif decay != 1.0:
                    state.u_acc.mul_(decay)
                state.scale *= decay
                state.u_acc.add_(u.mul_(self.noise.scale), alpha=step_coefficient)
        self.pool.put_many(us)

    def _materialise(self, slots: list[ParamSlot], merge: bool) -> None:
        """Each working tensor ← a·W + U_acc·Vᵀ; with ``merge`` it is stored back at release and U_acc restarts."""
        if not slots:
            return
        (direction,) = self.method.directions()
        vs = [self.pool.get((matrix_view(s.shape)[1], self.rank), torch.float32) for s in slots]
        with self.clock("noise"):
            self.noise.fill_factors([(v, window_seed(self.base_seed, self.state(s).window, direction, s.name))
                                     for v, s in zip(vs, slots)], self.method.noise_kind)
        with self.clock("update"):
            for v, slot in zip(vs, slots):
                self._apply(slot, self.state(slot), v, merge)
        self.pool.put_many(vs)
        for slot in slots:
            state = self.state(slot)
            if merge:
                state.reset()
                state.stores = True
                self.merges += 1

    def _scale(self, slots: list[ParamSlot]) -> None:
        """Each working tensor ← a·W only (the factored forward adds U_acc·Vᵀ itself)."""
        with self.clock("update"):
            for slot in slots:
                state = self.state(slot)
                if state.scale != 1.0:
                    self._apply(slot, state, None, merge=False)

    def _apply(self, slot: ParamSlot, state: MatrixWindow, v: Optional[torch.Tensor], merge: bool) -> None:
        """The working tensor ← a·W + U_acc·Vᵀ (``v`` None: a·W)."""
        work = slot.work
        m, n = matrix_view(slot.shape)
        # a tier whose fetch hands out the stored tensor itself (resident): the sum goes to a buffer beside it
        aliased = slot.param.data.numel() > 0 and work.data_ptr() == slot.param.data.data_ptr()
        target = self.pool.get(slot.shape, work.dtype) if aliased else work
        if work.dtype == torch.float32:
            if aliased:
                torch.mul(work, state.scale, out=target)
            elif state.scale != 1.0:
                target.mul_(state.scale)
            if v is not None:
                target.view(m, n).addmm_(state.u_acc, v.t())
        else:  # a 16-bit working copy: the sum in fp32, rounded once (stochastically when it is stored)
            exact = self.pool.get(slot.shape, torch.float32)
            torch.mul(work, state.scale, out=exact)
            if v is not None:
                exact.view(m, n).addmm_(state.u_acc, v.t())
            if merge and self.stochastic_rounding:
                seed = derive_seed("zo2-merge", state.window, slot.name)
                target.copy_(self.noise.stochastic_round(exact, work.dtype, seed))
            else:
                target.copy_(exact)
            self.pool.put(exact)
        slot.work = target

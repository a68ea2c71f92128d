"""A ZO method is a perturbation plan: which groups run, and what update their losses imply.

The pipeline knows nothing of any method and a method knows nothing of blocks, tiers or ranks.
For one step a method says (a) for each group, which noise direction it adds and at which scale
(or none: the unperturbed group), and (b) from the vector of group losses, the update as
(direction, coefficient) pairs plus any per-parameter state change.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..config import ZO2Config
from ..noise import NoiseKind, NoiseSource, parameter_seed


@dataclass(frozen=True)
class Perturbation:
    """Group perturbation: θ + scale · D · z_direction (D: the method's per-parameter scaling, or 1)."""

    direction: int
    scale: float


@dataclass
class Estimate:
    """What a method makes of one step's group losses."""

    loss: float
    """The unperturbed-loss estimate reported to the user."""
    terms: list[tuple[int, float]]
    """θ ← θ − lr · Σ coefficient · D · z_direction (weight decay is added by the update)."""
    skip_reason: Optional[str] = None
    extras: dict[str, float] = field(default_factory=dict)


@dataclass
class PendingUpdate:
    """A committed step whose parameter update is applied at each parameter's next residency."""

    step: int
    step_seed: int
    terms: list[tuple[int, float]]
    lrs: list[float]
    weight_decays: list[float]
    extras: dict[str, float] = field(default_factory=dict)


NoiseFn = Callable[[int], torch.Tensor]
"""direction -> this parameter's z for that direction (a pooled buffer valid until the next call)."""


class ZOMethod(ABC):
    """Base of every ZO method; subclasses are one small file each."""

    name: str = "zo"
    noise_kind: NoiseKind = "gaussian"
    state_init: dict[str, float] = {}
    """Per-parameter fp32 state tensors (the parameter's shape) and their initial value, e.g. HiZOO's H = 1;
    they live in the parameter's tier and stream with it."""

    def __init__(self, config: ZO2Config) -> None:
        self.config = config
        self.eps = config.eps

    @abstractmethod
    def groups(self) -> list[Optional[Perturbation]]:
        """The perturbation of each group, in the order groups appear in the replicated batch."""

    @abstractmethod
    def estimate(self, losses: torch.Tensor) -> Estimate:
        """Turn the (data-parallel averaged) group losses into the step's update."""

    def tail_weights(self) -> list[float]:
        """Weight of each group's gradient in a first-order tail's gradient (``zo2.first_order``).

        The tail runs with autograd on every group's body output; its gradient is Σ_g w_g ∇L_g. Default:
        the unperturbed groups alone if there are any (the exact gradient at θ), else the plain mean.
        """
        groups = self.groups()
        plain = [g is None for g in groups]
        if any(plain):
            return [1.0 / sum(plain) if p else 0.0 for p in plain]
        return [1.0 / len(groups)] * len(groups)

    def directions(self) -> list[int]:
        return sorted({g.direction for g in self.groups() if g is not None})

    uses_scaling: bool = False
    """Whether ``scaling`` returns a per-parameter multiplier (then the update gets a scratch buffer)."""

    def scaling(self, state: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """Per-parameter multiplier D of the noise in perturbations and updates (None: 1)."""
        return None

    update_is_linear: bool = True
    """The update is θ ← decay·θ + Σ coefficient·D·z (``linear_update``), which a fused noise kernel can
    compute from the seeds in one pass; a method whose update does more (HiZOO's H) says False."""

    def linear_update(self, update: PendingUpdate, group: int) -> Optional[tuple[float, list[tuple[int, float]]]]:
        """(decay, [(direction, coefficient)]) with θ ← decay·θ + Σ coefficient·D·z_direction; None: no change (lr 0)."""
        lr, wd = update.lrs[group], update.weight_decays[group]
        if lr == 0:
            return None
        return 1.0 - lr * wd, [(direction, -lr * coefficient) for direction, coefficient in update.terms]

    @staticmethod
    def decay_in_place(work: torch.Tensor, update: PendingUpdate, group: int) -> float:
        """Apply the step's decoupled weight decay θ ← θ·(1 − lr·wd) to ``work``; returns the lr (0: no step)."""
        lr, wd = update.lrs[group], update.weight_decays[group]
        if lr and wd:
            work.mul_(1.0 - lr * wd)
        return lr

    def apply_update(self, work: torch.Tensor, state: dict[str, torch.Tensor], update: PendingUpdate,
                     group: int, noise: NoiseFn, scratch: Optional[torch.Tensor]) -> None:
        """SGD on the projected gradient: θ ← θ·(1 − lr·wd) − lr·Σ c·D·z, in place on ``work`` (z materialised)."""
        lr = self.decay_in_place(work, update, group)
        if lr == 0:
            return
        scale = self.scaling(state) if self.uses_scaling else None
        for direction, coefficient in update.terms:
            z = noise(direction)
            if scale is not None:
                z = torch.mul(z, scale, out=scratch)
            work.add_(z.to(work.dtype) if z.dtype != work.dtype else z, alpha=-lr * coefficient)

    def noise_seed(self, step_seed: int, step: int, direction: int, name: str) -> Any:
        """What the noise source gets to draw ``name``'s z of one direction at ``step`` (an int seed; a
        low-rank method returns its factors' seeds)."""
        return parameter_seed(step_seed, direction, name)

    def noise_source(self, base: NoiseSource) -> NoiseSource:
        """The noise source this method draws from, given the configured one (a low-rank method wraps it)."""
        return base

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

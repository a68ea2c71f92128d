"""ZO-SGD as a real ``torch.optim.Optimizer``, so DeepSpeed's and HF's LR schedulers drive it.

It never touches a gradient. ``step()`` is called by ``ZO2Engine.step()`` once the projected
gradient of a step is known; it snapshots each group's lr and weight decay into the pending
update, which the block pipeline applies at every parameter's next residency.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from .methods import Estimate, PendingUpdate


class ZOSGD(torch.optim.Optimizer):
    """SGD on a zeroth-order projected gradient: θ ← θ − lr·(Σ c·z + wd·θ), deferred and fused."""

    def __init__(self, params: Iterable[Any], lr: float, weight_decay: float = 0.0) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self._estimate: Optional[tuple[int, int, Estimate]] = None
        self.last_update: Optional[PendingUpdate] = None
        self.overflow = False
        """True when the engine skipped the last step (non-finite losses); Accelerate then holds its scheduler."""

    @classmethod
    def sharing_groups_of(cls, client: torch.optim.Optimizer) -> "ZOSGD":
        """ZO-SGD over a client optimizer's parameter groups: the same group dicts, not copies.

        A scheduler built on the client optimizer (an Accelerate script's scheduler, the HF
        Trainer's schedule on its AdamW) sets ``group["lr"]`` in those dicts, so it drives the ZO
        update too. Only each group's ``lr`` and ``weight_decay`` are used: the client's other
        settings (Adam's betas, eps) and its state have no meaning for a ZO step.
        """
        groups = client.param_groups
        if not groups:
            raise ValueError(f"the client {type(client).__name__} has no parameter groups")
        for i, group in enumerate(groups):
            lr = float(group.get("lr", -1.0))
            if lr < 0:
                raise ValueError(f"param_groups[{i}]['lr'] of the client {type(client).__name__} must be >= 0, "
                                 f"got {group.get('lr')!r}")
            group.setdefault("weight_decay", 0.0)
        return cls(groups, lr=float(groups[0]["lr"]))

    def prepare(self, step: int, step_seed: int, estimate: Estimate) -> None:
        """Called by the engine with the step's estimate just before ``step()``."""
        self._estimate = (step, step_seed, estimate)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        if closure is not None:
            raise RuntimeError("ZOSGD.step() takes no closure: the engine's forward already ran the ZO groups")
        if self._estimate is None:
            raise RuntimeError("ZOSGD.step() is driven by ZO2Engine.step(); call engine.step() after engine(batch)")
        step, seed, estimate = self._estimate
        self._estimate = None
        self.last_update = PendingUpdate(step=step, step_seed=seed, terms=list(estimate.terms),
                                         lrs=[float(g["lr"]) for g in self.param_groups],
                                         weight_decays=[float(g["weight_decay"]) for g in self.param_groups],
                                         extras=dict(estimate.extras))
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """There are no gradients; kept so training loops written for first-order optimizers run."""

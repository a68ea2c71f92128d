"""FZOO: N one-sided Rademacher estimates per step, normalised by the spread of the losses.

Groups: the unperturbed model and θ + ε·u_i for N Rademacher directions u_i (each from its own
seed). With l_0 the unperturbed loss and σ the population std of the N perturbed losses,
c_i = (l_i − l_0) / (N·σ) and θ ← θ − lr·(Σ c_i·u_i + wd·θ). Dividing by σ makes the step size
adapt to how much the perturbations move the loss (an Adam-like normalisation). σ = 0 (all
perturbed losses equal) carries no direction: the step is skipped and counted.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Estimate, Perturbation, ZOMethod


class FZOO(ZOMethod):
    name = "fzoo"
    noise_kind = "rademacher"

    def groups(self) -> list[Optional[Perturbation]]:
        return [None] + [Perturbation(i, self.eps) for i in range(self.config.num_perturbations)]

    def tail_weights(self) -> list[float]:
        """A first-order tail's gradient: the unperturbed group's alone, the exact gradient at θ.

        The N perturbed groups are one-sided (θ + ε·u_i): no pair cancels their O(ε) terms, so they run
        without autograd and only give the ZO part its losses.
        """
        return [1.0] + [0.0] * self.config.num_perturbations

    def estimate(self, losses: torch.Tensor) -> Estimate:
        values = [float(v) for v in losses]
        base, perturbed = values[0], values[1:]
        n = len(perturbed)
        mean = sum(perturbed) / n
        sigma = (sum((v - mean) ** 2 for v in perturbed) / n) ** 0.5
        if sigma == 0.0:
            return Estimate(loss=base, terms=[], skip_reason="FZOO: the perturbed losses are all equal (σ = 0)")
        return Estimate(loss=base, terms=[(i, (v - base) / (n * sigma)) for i, v in enumerate(perturbed)],
                        extras={"sigma": sigma})

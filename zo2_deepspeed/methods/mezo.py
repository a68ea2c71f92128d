"""MeZO-SGD: two-sided SPSA with one Gaussian direction per step (Malladi et al., 2023)."""
from __future__ import annotations

from typing import Optional

import torch

from .base import Estimate, Perturbation, ZOMethod


class MeZO(ZOMethod):
    """Groups +εz and −εz; projected gradient g = (L+ − L−) / 2ε; update θ ← θ − lr·(g·z + wd·θ)."""

    name = "mezo"
    noise_kind = "gaussian"

    def groups(self) -> list[Optional[Perturbation]]:
        return [Perturbation(0, self.eps), Perturbation(0, -self.eps)]

    def estimate(self, losses: torch.Tensor) -> Estimate:
        plus, minus = float(losses[0]), float(losses[1])
        return Estimate(loss=(plus + minus) / 2, terms=[(0, (plus - minus) / (2 * self.eps))])

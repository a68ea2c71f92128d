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

    def tail_weights(self) -> list[float]:
        """A first-order tail's gradient: the mean of the two groups' tail gradients, ½(g(+ε) + g(−ε)).

        With φ the tail's parameters and g(s) = ∇_φ L(θ + s·z, φ) the tail gradient when the body is
        perturbed by s·z, Taylor expansion in s gives g(s) = g(0) + s·∂g/∂s + ½s²·∂²g/∂s² + O(s³), so
        ½(g(ε) + g(−ε)) = g(0) + ½ε²·∂²g/∂s² + O(ε⁴): the odd terms cancel and the mean is the gradient at
        the unperturbed body up to O(ε²), at no extra forward (either group alone is off by O(ε)). LOZO
        inherits it: its z is another direction, the argument is the same.
        """
        return [0.5, 0.5]

    def estimate(self, losses: torch.Tensor) -> Estimate:
        plus, minus = float(losses[0]), float(losses[1])
        return Estimate(loss=(plus + minus) / 2, terms=[(0, (plus - minus) / (2 * self.eps))])

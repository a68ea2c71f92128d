"""HiZOO: MeZO preconditioned by a diagonal Hessian estimate H that the forwards themselves measure.

Groups: θ, θ + ε·z/√H, θ − ε·z/√H (z Gaussian). With L_0, L_+, L_− their losses,
  H ← (1 − α)·H + α·|L_+ + L_− − 2·L_0|·H·z² / (2ε²)        (α = zo2.hessian_smooth)
  θ ← θ − lr·((L_+ − L_−)/(2ε)·z/√H + wd·θ)                 (with the updated H)
H starts at 1, is fp32, lives in the parameter's tier (ZeRO-3 partition on CPU or NVMe) and streams
with its block; the update of both is deferred and fused into the next residency like MeZO's.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Estimate, NoiseFn, PendingUpdate, Perturbation, ZOMethod

HESSIAN = "hessian"


class HiZOO(ZOMethod):
    name = "hizoo"
    noise_kind = "gaussian"
    state_init = {HESSIAN: 1.0}
    uses_scaling = True
    update_is_linear = False  # the step also updates H from z²

    def groups(self) -> list[Optional[Perturbation]]:
        return [None, Perturbation(0, self.eps), Perturbation(0, -self.eps)]

    def tail_weights(self) -> list[float]:
        """A first-order tail's gradient: the unperturbed group's alone (weights 1, 0, 0).

        Any w₀·g(0) + w·(g(+ε) + g(−ε))/2 with w₀ + w = 1 is the gradient at θ up to O(ε²) (MeZO's
        argument for the pair); the unperturbed group alone is exact, and its backward runs over one
        group's rows instead of three.
        """
        return [1.0, 0.0, 0.0]

    def scaling(self, state: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        return state[HESSIAN].rsqrt()

    def estimate(self, losses: torch.Tensor) -> Estimate:
        base, plus, minus = (float(v) for v in losses)
        return Estimate(loss=base, terms=[(0, (plus - minus) / (2 * self.eps))],
                        extras={"curvature": abs(plus + minus - 2 * base)})

    def apply_update(self, work: torch.Tensor, state: dict[str, torch.Tensor], update: PendingUpdate,
                     group: int, noise: NoiseFn, scratch: Optional[torch.Tensor]) -> None:
        hessian = state[HESSIAN]
        z = noise(0)
        alpha = self.config.hessian_smooth
        gain = alpha * update.extras["curvature"] / (2 * self.eps ** 2)
        # H ← H·((1 − α) + gain·z²), in place and without a second tensor the size of H
        factor = torch.mul(z, z, out=scratch) if scratch is not None else z * z
        factor.mul_(gain).add_(1.0 - alpha)
        hessian.mul_(factor)
        lr = self.decay_in_place(work, update, group)
        if lr == 0:
            return
        (_, coefficient), = update.terms
        step = torch.div(z, hessian.sqrt(), out=factor)
        work.add_(step.to(work.dtype) if step.dtype != work.dtype else step, alpha=-lr * coefficient)

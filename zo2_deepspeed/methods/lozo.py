"""LOZO: MeZO's two-sided estimate along a low-rank direction per matrix (Chen et al., ICLR 2025).

For every weight matrix z = U·Vᵀ/√r with U (m × r) drawn anew each step and V (n × r) kept for
ν = ``zo2.lazy_steps`` consecutive steps (its seed is that of the window ⌊t/ν⌋); vectors and other
non-matrix parameters get a full Gaussian z, as in MeZO. Groups θ + ε·z and θ − ε·z; with
c = (L+ − L−)/(2ε), θ ← θ − lr·(c·z + wd·θ). Because z is U·Vᵀ scaled by 1/√r, this is exactly the
paper's estimator c'·U·Vᵀ/r with its perturbation radius ε' = ε/√r on the matrices. The
perturbation plan is MeZO's; only the noise differs (``lowrank.LowRankNoise``).
"""
from __future__ import annotations

from typing import Any

from ..lowrank import LowRankNoise, lowrank_seed
from ..noise import NoiseSource
from .mezo import MeZO


class LOZO(MeZO):
    name = "lozo"
    noise_kind = "gaussian"

    def noise_seed(self, step_seed: int, step: int, direction: int, name: str) -> Any:
        return lowrank_seed(self.config.seed, step_seed, step, self.config.lazy_steps, direction, name)

    def noise_source(self, base: NoiseSource) -> NoiseSource:
        return LowRankNoise(base, self.config.rank)

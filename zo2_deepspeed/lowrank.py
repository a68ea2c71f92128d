"""Low-rank perturbation noise (LOZO): a matrix's z is U·Vᵀ/√r, regenerated from two seeds.

For a parameter of shape (m, n, ...) — viewed as the matrix m × (n·...) — U is an m × r and V an
(n·...) × r Gaussian matrix, each from its own seed; z = U·Vᵀ/√r is formed with one small GEMM into
the pipeline's z buffer. The 1/√r gives z unit variance per entry, as a MeZO z has, so the same
two-sided estimate and update (θ ± ε·z, θ ← θ − lr·c·z) apply unchanged. Vectors (biases, norms) and
other non-matrix parameters get the wrapped source's full noise, as in MeZO.

U's seed changes every step (it is the parameter's ordinary seed); V's seed depends only on the
lazy window ⌊t/ν⌋, so V stays the same for ν consecutive steps. Nothing is stored across steps:
both factors are redrawn from their seeds wherever z is needed (perturbation, deferred update).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional, Union

import torch

from .noise import NoiseKind, NoiseSource, derive_seed, parameter_seed


class LowRankSeed(NamedTuple):
    """The seeds of one matrix's factors: U (this step) and V (this lazy window)."""

    u: int
    v: int


NoiseSeed = Union[int, LowRankSeed]


def lowrank_seed(base_seed: int, step_seed: int, step: int, lazy_steps: int, direction: int, name: str) -> LowRankSeed:
    """U from the step's seed (as MeZO's z); V from the window ⌊step/ν⌋, identical on every rank."""
    return LowRankSeed(u=parameter_seed(step_seed, direction, name),
                       v=window_seed(base_seed, step // lazy_steps, direction, name))


def window_seed(base_seed: int, window: int, direction: int, name: str) -> int:
    """The seed of V for the lazy window ``window`` (steps window·ν … window·ν + ν − 1)."""
    return derive_seed("zo2-lozo-v", base_seed, window, direction, name)


def matrix_view(shape: torch.Size | tuple) -> Optional[tuple[int, int]]:
    """(m, n) of a parameter perturbed in low rank, or None for vectors and scalars."""
    if len(shape) < 2:
        return None
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


class LowRankNoise(NoiseSource):
    """Wraps a noise source: ``LowRankSeed`` jobs on matrices become U·Vᵀ/√r, everything else passes through.

    The factors come from the wrapped source (torch's generator, or Philox with its Triton kernels on
    an accelerator), so the GEMM is the only work that scales with m·n. Never ``fused``: the pipeline
    materialises z per resident block.
    """

    name = "lowrank"
    fused = False

    def __init__(self, base: NoiseSource, rank: int, threads: Optional[int] = None) -> None:
        super().__init__(base.device)
        self.base = base
        self.rank = rank
        self._scale = 1.0 / math.sqrt(rank)
        n = threads if threads is not None else torch.get_num_threads()
        # on the CPU the products of a block's matrices run side by side, as the noise chunks do
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="zo2-lowrank") \
            if self.device.type == "cpu" and n > 1 else None

    @property
    def description(self) -> str:
        return f"rank-{self.rank} U·Vᵀ from {self.base.description}"

    def fill_many(self, jobs: list[tuple[torch.Tensor, NoiseSeed]], kind: NoiseKind = "gaussian") -> None:
        """Draw every job's factors (or full noise) in one call to the wrapped source, then one GEMM per matrix."""
        draws: list[tuple[torch.Tensor, int]] = []
        products: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for out, seed in jobs:
            shape = matrix_view(out.shape)
            if not isinstance(seed, LowRankSeed) or shape is None:
                draws.append((out, seed.u if isinstance(seed, LowRankSeed) else seed))
                continue
            m, n = shape
            u = torch.empty(m, self.rank, dtype=torch.float32, device=out.device)
            v = torch.empty(n, self.rank, dtype=torch.float32, device=out.device)
            draws += [(u, seed.u), (v, seed.v)]
            products.append((out.view(m, n), u, v))
        self.base.fill_many(draws, kind)
        self._count(sum(t.numel() for t, _ in draws))
        if self._pool is not None and len(products) > 1:
            list(self._pool.map(lambda job: self._product(*job), products))
        else:
            for job in products:
                self._product(*job)

    def fill_factors(self, jobs: list[tuple[torch.Tensor, int]], kind: NoiseKind = "gaussian") -> None:
        """Fill factor matrices (U: m × r, V: n × r) with their own seeds' noise, one call to the wrapped source.

        A factor equals the one ``fill_many`` draws for z with the same seed and shape: the window
        write-back regenerates U_t and V this way without forming z.
        """
        self.base.fill_many(jobs, kind)
        self._count(sum(t.numel() for t, _ in jobs))

    @property
    def scale(self) -> float:
        """1/√r: z = (U·scale)·Vᵀ."""
        return self._scale

    def _product(self, out: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
        """out = U·Vᵀ/√r (the scale folded into the small factor U)."""
        torch.mm(u.mul_(self._scale), v.t(), out=out)

    def stochastic_round(self, x: torch.Tensor, dtype: torch.dtype, seed: int, start: int = 0) -> torch.Tensor:
        return self.base.stochastic_round(x, dtype, seed, start)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.base.close()

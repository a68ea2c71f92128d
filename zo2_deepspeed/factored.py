"""LOZO's factored forward: a linear layer's perturbed weight applied as a low-rank term, never formed.

Under the window write-back a weight matrix, during a training step, is a·W + (U_acc + s·U_t/√r)·Vᵀ
for the group of scale s (±ε): the stored copy plus a rank-r term. Materialised, that costs per
block and step one m × r × n GEMM for U_acc·Vᵀ, one for z = U_t·Vᵀ/√r and a perturbed copy per group,
each a pass over the whole matrix. Factored, each ``nn.Linear`` inside a block runs, for the time of
a group, as

    y = x·(a·W)ᵀ + bias + (x·V)·B_gᵀ,     B_g = U_acc + s·U_t/√r   (m × r)

which adds two thin GEMMs (T × n × r and T × r × m for T rows of x) and touches W only in the
forward's own GEMM. Which form is faster depends on the device and the rows per group: see
``LOWRANK_FORWARD`` and docs/methods.md (LOZO: window write-back).

Only linear layers strictly inside a block are factored: their forward is called through the
module (``self.q_proj(x)``), so an instance ``forward`` set for the group's duration reaches it, as
the block wrappers themselves do. A matrix used any other way (embeddings, GPT-2's Conv1D, a bare
LM head block, a tied weight) keeps the materialised form. A model that reads a linear layer's
``weight`` directly inside its forward would bypass the term: ``zo2.lowrank_forward``
"materialised" is the choice for such a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Block, ParamSlot
from .buffers import BufferPool
from .lowrank import LowRankNoise, matrix_view, window_seed
from .methods import Perturbation, ZOMethod
from .streams import PhaseClock

if TYPE_CHECKING:
    from .pipeline import ForwardPass
    from .window import WindowWriteBack

LOWRANK_FORWARD: dict[str, str] = {"cpu": "factored", "cuda": "factored"}
"""``zo2.lowrank_forward`` "auto" per device type. cpu: measured (benchmarks/lowrank_forward.py, RESULTS.md:
factored 0.42-0.90 × the materialised time at 32-1024 rows per group, the less the fewer rows). cuda: estimated (the
materialised form's ~9 passes over each matrix against the forward's GEMM), to be confirmed by
``benchmarks/gpu.py``, which times both forms and prints which is faster. Other devices: materialised."""


def resolve_lowrank_forward(setting: str, device: torch.device) -> str:
    """"materialised" or "factored" for ``zo2.lowrank_forward`` on ``device``."""
    if setting != "auto":
        return setting
    return LOWRANK_FORWARD.get(torch.device(device).type, "materialised")


@dataclass
class _Term:
    """One factored layer's low-rank term for the group running now (``b`` None: none, plain forward)."""

    module: nn.Linear
    v: torch.Tensor
    """n × r in the compute dtype (the step's window)."""
    u: torch.Tensor
    """m × r fp32: U_t/√r of this step."""
    b: Optional[torch.Tensor] = None
    """m × r in the compute dtype: U_acc + s·U_t/√r."""


class FactoredLinears:
    """Runs the trainable linear layers of a resident block with their perturbation as a low-rank term."""

    def __init__(self, method: ZOMethod, noise: LowRankNoise, window: "WindowWriteBack", pool: BufferPool,
                 clock: PhaseClock, compute_dtype: torch.dtype) -> None:
        self.method = method
        self.noise = noise
        self.window = window
        self.pool = pool
        self.clock = clock
        self.compute_dtype = compute_dtype
        self._layer: dict[str, Optional[nn.Linear]] = {}
        """slot name -> the linear layer it is the weight of (None: not factored)."""
        self._terms: dict[str, _Term] = {}

    def covers(self, slot: ParamSlot) -> bool:
        """A trainable, unshared matrix that is the weight of exactly one nn.Linear strictly inside its block."""
        if slot.name not in self._layer:
            self._layer[slot.name] = self._find_layer(slot)
        return self._layer[slot.name] is not None

    @staticmethod
    def _find_layer(slot: ParamSlot) -> Optional[nn.Linear]:
        if not slot.trainable or slot.shared or len(slot.owners) != 1 or matrix_view(slot.shape) is None:
            return None
        block: Block = slot.owners[0]
        layers = [m for m in block.module.modules() if m is not block.module and isinstance(m, nn.Linear)
                  and m.weight is slot.param and "forward" not in vars(m)]
        return layers[0] if len(layers) == 1 else None

    def prepare(self, slots: list[ParamSlot], forward: "ForwardPass") -> None:
        """Draw this step's U_t and its window's V for the block's factored layers (z itself is never formed)."""
        slots = [s for s in slots if self.covers(s)]
        if not slots:
            return
        (direction,) = self.method.directions()
        window = self.window.window_of(forward.step)
        shapes = [matrix_view(s.shape) for s in slots]
        us = [self.pool.get((m, self.noise.rank), torch.float32) for m, _ in shapes]
        vs = [self.pool.get((n, self.noise.rank), torch.float32) for _, n in shapes]
        seed = self.method.noise_seed
        jobs = [(u, seed(forward.step_seed, forward.step, direction, s.name).u) for u, s in zip(us, slots)]
        jobs += [(v, window_seed(self.window.base_seed, window, direction, s.name)) for v, s in zip(vs, slots)]
        with self.clock("noise"):
            self.noise.fill_factors(jobs, self.method.noise_kind)
        with self.clock("perturb"):
            for slot, u, v in zip(slots, us, vs):
                u.mul_(self.noise.scale)
                if self.compute_dtype != torch.float32:
                    cast = self.pool.get(v.shape, self.compute_dtype)
                    cast.copy_(v)
                    self.pool.put(v)
                    v = cast
                held = self.window.state(slot)
                if held.open and held.window != window:
                    raise RuntimeError(f"{slot.name}: U_acc of window {held.window} is still held at step "
                                       f"{forward.step} (window {window}); it should have been merged")
                self._terms[slot.name] = _Term(self._layer[slot.name], v, u)

    def perturb(self, slot: ParamSlot, perturbation: Optional[Perturbation]) -> bool:
        """Point the layer at the group's term (None: no term); False when ``slot`` is not factored."""
        term = self._terms.get(slot.name)
        if term is None:
            return False
        slot.param.data = slot.compute
        if term.b is not None:
            self.pool.put(term.b)
            term.b = None
        if perturbation is None:
            term.module.__dict__.pop("forward", None)
            return True
        with self.clock("perturb"):
            held = self.window.state(slot).u_acc
            exact = self.pool.get(term.u.shape, torch.float32)
            if held is None:
                torch.mul(term.u, perturbation.scale, out=exact)
            else:
                torch.add(held, term.u, alpha=perturbation.scale, out=exact)
            if self.compute_dtype == torch.float32:
                term.b = exact
            else:
                term.b = self.pool.get(exact.shape, self.compute_dtype)
                term.b.copy_(exact)
                self.pool.put(exact)
        if "forward" not in vars(term.module):
            term.module.forward = _factored_forward(term)
        return True

    def release(self, slots: list[ParamSlot]) -> list[torch.Tensor]:
        """The factors of ``slots``' layers, for recycling, once their block has run its groups."""
        freed = []
        for slot in slots:
            term = self._terms.pop(slot.name, None)
            if term is None:
                continue
            term.module.__dict__.pop("forward", None)
            freed += [term.u, term.v] + ([term.b] if term.b is not None else [])
        return freed


def _factored_forward(term: _Term) -> Callable[[torch.Tensor], torch.Tensor]:
    """nn.Linear's forward plus the term: y = F.linear(x, W, bias) + (x·V)·Bᵀ."""
    module = term.module

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, module.weight, module.bias)
        if term.b is None:
            return y
        t = torch.matmul(x, term.v)
        flat = y.view(-1, y.shape[-1])
        flat.addmm_(t.reshape(-1, t.shape[-1]), term.b.t())
        return y

    return forward

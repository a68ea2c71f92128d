"""The tail's gradient: accumulated in float64 per chunk, reduced once per step, normalised in one place.

The tail's loss is the loss the ZO part sees: the sum of the token losses (per-example losses with a
``loss_fn``) of the step's micro-batches on every data-parallel replica, divided by their count. So the
gradient is accumulated as the gradient of *sums* (one float64 vector over all first-order parameters,
plus the count in its last element), all-reduced once per step in one flat bucket, and divided once by
the global count (``finish``): 1 rank, N ranks and gradient accumulation divide the same sum by the same
count.

Why float64 per chunk, and not one fp32 gradient per rank: the gradient of a chunk of rows is computed
in fp32 by one backward, and adding fp32 values in float64 is exact while their magnitudes stay within
2^29 of each other, so the sum does not depend on the order in which chunks arrive, on which rank
computed them, or on how micro-batches were accumulated; rounded to fp32 once, 2 ranks give the bits of
1 rank. An fp32 all-reduce of per-rank gradients rounds after every addition, in an order that depends on
the world size. The price is 8 bytes per first-order parameter for the accumulator, one float64 pass over
it per chunk, and an all-reduce of float64 (twice the bytes of fp32); ``chunk_rows`` trades chunks
(bit-identity across splits of the batch) for speed (docs/first-order-tail.md, measured there).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..blocks import ParamSlot
from ..comm import guarded
from ..distributed import ParallelGrid


class TailGradient:
    """One flat float64 buffer: the weighted gradient sums of every first-order parameter, then the count."""

    def __init__(self, slots: list[ParamSlot], device: torch.device, grid: ParallelGrid) -> None:
        self.slots = slots
        self.grid = grid
        sizes = [s.numel for s in slots]
        self.flat = torch.zeros(sum(sizes) + 1, dtype=torch.float64, device=device)
        self.views: dict[int, torch.Tensor] = {}
        offset = 0
        for slot, n in zip(slots, sizes):
            self.views[id(slot)] = self.flat[offset:offset + n].view(slot.shape)
            offset += n

    @property
    def count(self) -> float:
        return float(self.flat[-1])

    @property
    def empty(self) -> bool:
        return not bool(self.flat.any())

    def add(self, slot: ParamSlot, grad: torch.Tensor, weight: float) -> None:
        """Add ``weight`` × one chunk's fp32 gradient of ``slot`` (exact in float64; ``weight`` a power of two)."""
        self.views[id(slot)].add_(grad, alpha=weight)

    def add_count(self, count: float) -> None:
        """Count a micro-batch's tokens (or examples) once per replica: the ranks of a perturbation group run the
        same micro-batch, and only its first rank counts it."""
        if self.grid.slot == 0:
            self.flat[-1] += count

    def reduce(self, what: str) -> int:
        """Sum the buffer over every rank (replicas' data, perturbation ranks' groups); bytes sent by this rank."""
        if self.grid.world_size == 1:
            return 0
        from deepspeed import comm as dist
        with guarded(what):
            dist.all_reduce(self.flat, op=dist.ReduceOp.SUM)
        return self.flat.numel() * self.flat.element_size()

    def finish(self) -> tuple[list[torch.Tensor], Optional[str]]:
        """The step's fp32 gradient of each parameter: the only division of the sums by the count.

        Returns (gradients, a reason to skip the step or None)."""
        count = self.count
        if count <= 0:
            return [], "first-order tail: no token was counted in the step (every label is ignored)"
        grads = [(self.views[id(s)] / count).float() for s in self.slots]
        bad = next((s.name for s, g in zip(self.slots, grads) if not bool(torch.isfinite(g).all())), None)
        return grads, (f"first-order tail: non-finite gradient of {bad}" if bad else None)

    def clear(self) -> None:
        self.flat.zero_()

    def state(self) -> torch.Tensor:
        return self.flat

    def load(self, values: torch.Tensor) -> None:
        if values.numel() != self.flat.numel():
            raise ValueError(f"accumulated first-order gradient of {values.numel()} elements, expected "
                             f"{self.flat.numel()}")
        self.flat.copy_(values.view(-1))

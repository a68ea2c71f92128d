"""Parameters stay whole on the compute device (no ZeRO-3): the plain MeZO baseline."""
from __future__ import annotations

from typing import Optional

import torch

from ..blocks import ParamSlot
from .base import Tier


class ResidentTier(Tier):
    """The working copy is the parameter tensor itself: nothing moves, updates land in place."""

    name = "resident"

    def work_dtype(self, slot: ParamSlot) -> torch.dtype:
        return slot.param.dtype

    def fetch(self, slots: list[ParamSlot]) -> list[torch.Tensor]:
        self.stats.block_fetches += 1
        self.stats.param_fetches += len(slots)
        return [slot.param.data for slot in slots]

    def store(self, slots: list[ParamSlot], works: list[torch.Tensor], dirty: list[bool],
              rounding_seeds: Optional[list[int]] = None) -> None:
        for slot, work in zip(slots, works):
            slot.param.data = work

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
              rounding_seeds: Optional[list[int]] = None) -> list[torch.Tensor]:
        for slot, work in zip(slots, works):
            slot.param.data = work
        return []  # the working tensors are the parameters themselves

    def create_state(self, slot: ParamSlot, name: str, value: float) -> None:
        slot.stored_state[name] = torch.full(slot.shape, value, dtype=torch.float32, device=self.device)

    def fetch_state(self, slots: list[ParamSlot], name: str) -> list[torch.Tensor]:
        return [slot.stored_state[name] for slot in slots]

    def store_state(self, slots: list[ParamSlot], name: str, tensors: list[torch.Tensor],
                    dirty: list[bool]) -> list[torch.Tensor]:
        """The fetched tensor is the stored one: updates already landed."""
        return []

    def read_partition(self, slot: ParamSlot) -> torch.Tensor:
        return slot.param.data.detach().reshape(-1).to("cpu", copy=True)

    def write_partition(self, slot: ParamSlot, values: torch.Tensor) -> None:
        slot.param.data.copy_(values.view(slot.shape))

    def read_state_partition(self, slot: ParamSlot, name: str) -> torch.Tensor:
        return slot.stored_state[name].detach().reshape(-1).to("cpu", copy=True)

    def write_state_partition(self, slot: ParamSlot, name: str, values: torch.Tensor) -> None:
        slot.stored_state[name].copy_(values.view(slot.shape))

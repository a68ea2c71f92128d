"""Parameters stay whole on the compute device (no ZeRO-3): the plain MeZO baseline."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..blocks import ParamSlot
from .base import Tier


class ResidentTier(Tier):
    """The working copy is the parameter tensor itself: nothing moves, updates land in place.

    A working tensor may also be a buffer beside the parameter (LOZO's window write-back keeps the
    parameter as its read-only base between merges): a store then copies it in when it changed,
    and hands the buffer back either way.
    """

    name = "resident"

    def __init__(self, device: torch.device, pool: Any, compute_dtype: torch.dtype) -> None:
        super().__init__(device, pool, compute_dtype)
        self._at_rest: dict[int, torch.Tensor] = {}
        """id(slot) -> the parameter's tensor as fetched (``param.data`` points elsewhere while resident)."""

    def work_dtype(self, slot: ParamSlot) -> torch.dtype:
        return slot.param.dtype

    def fetch(self, slots: list[ParamSlot]) -> list[torch.Tensor]:
        self.stats.block_fetches += 1
        self.stats.param_fetches += len(slots)
        for slot in slots:
            self._at_rest[id(slot)] = slot.param.data
        return [slot.param.data for slot in slots]

    def store(self, slots: list[ParamSlot], works: list[torch.Tensor], dirty: list[bool],
              rounding_seeds: Optional[list[int]] = None) -> list[torch.Tensor]:
        beside = []
        for slot, work, changed in zip(slots, works, dirty):
            stored = self._at_rest.pop(id(slot), work)
            if work.data_ptr() != stored.data_ptr():
                if changed:
                    stored.copy_(work)
                beside.append(work)
            slot.param.data = stored
        return beside  # the other working tensors are the parameters themselves

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

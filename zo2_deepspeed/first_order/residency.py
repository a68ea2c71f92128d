"""Where the tail's parameters live: resident on the device for the whole run, with fp32 masters for the optimizer.

The tail's blocks are fetched once from their tier (a ZeRO-3 gather, an NVMe read) and stay resident,
never streamed, never perturbed. Their tier keeps the at-rest copy, which ``write_through`` refreshes
whenever the host is about to read the tier (a checkpoint, an export, the end of training): the stream of
the body is unchanged, and checkpoints, ``zo2-export`` and ``save_pretrained`` see the tail as they see
every parameter.

The optimizer works on fp32 master tensors. A parameter's working tensor (the precision of its storage
and compute dtypes combined) is its master when it is fp32 and on the optimizer's device, so nothing is
copied; otherwise (16-bit storage and compute, or the optimizer state offloaded to the CPU) the master is
a separate fp32 copy and each step copies it back to the working tensor. Masters that differ from what the
tier stores (16-bit storage) are saved with the optimizer state, so a resumed run continues from the same
bits.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..blocks import Block, ParamSlot
from ..noise import derive_seed
from ..tiers.base import Tier


class TailResidency:
    """Pins the tail's blocks, owns the fp32 masters of its first-order parameters, and writes them through."""

    def __init__(self, blocks: list[Block], first_order: list[ParamSlot], movement: Any, tier: Tier,
                 master_device: torch.device, pin_memory: bool = False) -> None:
        self.blocks = blocks
        self.first_order = first_order
        self.movement = movement
        self.tier = tier
        self.master_device = torch.device(master_device)
        self.pin_memory = pin_memory
        self.slots: list[ParamSlot] = []
        self.masters: list[torch.Tensor] = []
        self.pinned = False

    # ------------------------------------------------------------------ pinning
    def pin(self) -> None:
        """Fetch the tail's blocks once and keep them (and their fp32 masters) resident."""
        movement = self.movement
        movement.drain()
        seen: set[int] = set()
        for block in self.blocks:
            movement.streams.wait(movement.submit(movement.acquire, block, None).result())
            fresh = [s for s in block.slots if id(s) not in seen and not s.pinned]
            seen.update(id(s) for s in fresh)
            for slot in fresh:
                slot.pinned = True
            movement.submit(self.tier.settle_pinned, fresh).result()
            self.slots.extend(fresh)
        movement.drain(host_reads=True)
        self.masters = [self._master_of(s) for s in self.first_order]
        self.pinned = True

    def _master_of(self, slot: ParamSlot) -> torch.Tensor:
        work = slot.work
        if work.dtype == torch.float32 and work.device == self.master_device:
            return work
        master = torch.empty(work.shape, dtype=torch.float32, device=self.master_device,
                             pin_memory=self.pin_memory and self.master_device.type == "cpu")
        master.copy_(work)
        return master

    def separate(self, index: int) -> bool:
        """Whether first-order parameter ``index`` has a master apart from its working tensor."""
        return self.masters[index] is not self.first_order[index].work

    # ------------------------------------------------------------------ after an optimizer step
    def publish(self) -> None:
        """Bring the working and compute tensors (what the forwards read) up to the masters."""
        for slot, master in zip(self.first_order, self.masters):
            if master is not slot.work:
                slot.work.copy_(master)
            if slot.compute is not slot.work:
                slot.compute.copy_(slot.work)

    # ------------------------------------------------------------------ the tier's at-rest copy
    def _seeds(self, slots: list[ParamSlot], step: int) -> list[int]:
        return [derive_seed("zo2-round", step, s.name) if s.work.dtype != self.tier.storage_dtype(s) else 0
                for s in slots]

    def write_through(self, step: int) -> None:
        """Refresh the tier's at-rest copy of the first-order parameters (before the host reads the tier)."""
        if not self.pinned:
            return
        movement = self.movement
        movement.drain()
        slots = self.first_order
        movement.submit(self.tier.write_through, slots, [s.work for s in slots], self._seeds(slots, step)).result()
        movement.drain(host_reads=True)

    def release(self, step: int) -> None:
        """Write through and put the tail at rest in its tier (engine.close): the model is as after a ZO run."""
        if not self.pinned:
            return
        self.write_through(step)
        for slot in self.slots:
            slot.pinned = False
            slot.dirty = False  # written through just now
        self.movement.release(list(self.slots), None, step)
        self.movement.drain(host_reads=True)
        self.pinned = False

    def reload(self) -> None:
        """Take up parameters a checkpoint load just wrote into the tier: refetch them into the resident tensors."""
        if not self.pinned:
            return
        movement = self.movement
        movement.drain()
        fetched = movement.submit(self.tier.fetch, self.slots).result()
        movement.submit(self.tier.settle_pinned, self.slots).result()
        movement.drain(host_reads=True)
        for slot, work in zip(self.slots, fetched):
            if work.data_ptr() != slot.work.data_ptr():
                slot.work.copy_(work)
                self.movement.pool.put(work)
            if slot.compute is not slot.work:
                slot.compute.copy_(slot.work)
            slot.param.data = slot.compute
        for slot, master in zip(self.first_order, self.masters):
            if master is not slot.work:
                master.copy_(slot.work)

    def load_masters(self, masters: dict[int, torch.Tensor]) -> None:
        """Saved fp32 masters (by first-order index) replace the ones refetched from the tier."""
        for i, values in masters.items():
            self.masters[i].copy_(values.view(self.masters[i].shape))
        self.publish()

    def bytes_by_kind(self) -> dict[str, tuple[int, Optional[torch.device]]]:
        """Bytes (and device) of the tail's resident tensors, for the start-up memory line."""
        work = sum(s.work.numel() * s.work.element_size() for s in self.slots)
        compute = sum(s.compute.numel() * s.compute.element_size() for s in self.slots if s.compute is not s.work)
        masters = sum(m.numel() * 4 for i, m in enumerate(self.masters) if self.separate(i))
        device = self.slots[0].work.device if self.slots else None
        return {"parameters": (work + compute, device), "masters": (masters, self.master_device)}

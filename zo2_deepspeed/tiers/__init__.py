"""Storage tiers: ``resident`` (no ZeRO-3), ``device`` / ``cpu`` (ZeRO-3 partitions there), ``nvme``."""
from __future__ import annotations

import torch

from ..buffers import BufferPool
from .base import MovementStats, Tier
from .partitioned import PartitionedTier, is_partitioned
from .resident import ResidentTier


def build_tier(name: str, device: torch.device, pool: BufferPool, compute_dtype: torch.dtype,
               stochastic_rounding: bool) -> Tier:
    if name == "resident":
        return ResidentTier(device, pool, compute_dtype)
    if name in ("device", "cpu"):
        return PartitionedTier(device, pool, compute_dtype, name, stochastic_rounding)
    if name == "nvme":
        from .nvme import NVMeTier
        return NVMeTier(device, pool, compute_dtype, stochastic_rounding)
    raise ValueError(f"unknown tier {name!r}")


__all__ = ["MovementStats", "Tier", "PartitionedTier", "ResidentTier", "build_tier", "is_partitioned"]

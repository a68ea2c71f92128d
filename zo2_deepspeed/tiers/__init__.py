"""Storage tiers: ``resident`` (no ZeRO-3), ``device`` / ``cpu`` (ZeRO-3 partitions there), ``nvme``."""
from __future__ import annotations

from typing import Optional

import torch

from ..buffers import BufferPool
from .base import MovementStats, Tier
from .partitioned import PartitionedTier, RoundFn, RoundManyFn, is_partitioned
from .resident import ResidentTier


def build_tier(name: str, device: torch.device, pool: BufferPool, compute_dtype: torch.dtype,
               stochastic_rounding: bool, round_fn: Optional[RoundFn] = None,
               round_many: Optional[RoundManyFn] = None) -> Tier:
    """The tier ``name``; ``round_fn`` does stochastic rounding to 16-bit partitions (the noise source's),
    ``round_many`` a block's worth of it at once."""
    if name == "resident":
        return ResidentTier(device, pool, compute_dtype)
    if name in ("device", "cpu"):
        tier = PartitionedTier(device, pool, compute_dtype, name, stochastic_rounding, round_fn=round_fn)
    elif name == "nvme":
        from .nvme import NVMeTier
        tier = NVMeTier(device, pool, compute_dtype, stochastic_rounding, round_fn=round_fn)
    else:
        raise ValueError(f"unknown tier {name!r}")
    tier.round_many = round_many
    return tier


__all__ = ["MovementStats", "Tier", "PartitionedTier", "ResidentTier", "build_tier", "is_partitioned"]

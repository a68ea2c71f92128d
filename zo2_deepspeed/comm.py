"""Data-parallel communication of the ZO step: a handful of floats per step, never O(parameters)."""
from __future__ import annotations

import torch


def world_size() -> int:
    from deepspeed import comm as dist
    return dist.get_world_size() if dist.is_initialized() else 1


def average_across_ranks(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean of ``values`` over data-parallel ranks; returns (mean, bytes all-reduced by this rank)."""
    n = world_size()
    if n == 1:
        return values, 0
    from deepspeed import comm as dist
    reduced = values.detach().clone().float()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / n, reduced.numel() * reduced.element_size()

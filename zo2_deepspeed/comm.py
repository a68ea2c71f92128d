"""Data-parallel communication of the ZO step: a handful of floats per step, never O(parameters).

Every collective goes through ``guarded``: a rank that died or hangs makes the others fail with
a ``RankSyncError`` naming the operation and the step (after ``zo2.comm_timeout_s`` for a hang),
instead of waiting forever.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from .errors import RankSyncError


def world_size() -> int:
    from deepspeed import comm as dist
    return dist.get_world_size() if dist.is_initialized() else 1


@contextlib.contextmanager
def guarded(what: str) -> Iterator[None]:
    """Turn a failed collective into an error that says what was happening and why it likely failed."""
    try:
        yield
    except RankSyncError:
        raise
    except RuntimeError as e:  # gloo/NCCL errors (DistBackendError subclasses RuntimeError)
        raise RankSyncError(f"{what} failed: another rank died, hung past zo2.comm_timeout_s, or left the job "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def average_across_ranks(values: torch.Tensor, what: str = "all-reduce of the group losses"
                         ) -> tuple[torch.Tensor, int]:
    """Mean of ``values`` over data-parallel ranks; returns (mean, bytes all-reduced by this rank)."""
    n = world_size()
    if n == 1:
        return values, 0
    from deepspeed import comm as dist
    reduced = values.detach().clone().float()
    with guarded(what):
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / n, reduced.numel() * reduced.element_size()


def first_disagreement(values: torch.Tensor, what: str) -> Optional[int]:
    """Index of the first entry of an int64 vector that is not the same on every rank (None: all agree)."""
    if world_size() == 1:
        return None
    from deepspeed import comm as dist
    low, high = values.clone(), values.clone()
    with guarded(what):
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = (low != high).nonzero()
    return int(differ[0]) if differ.numel() else None


def bit_checksum(t: torch.Tensor) -> int:
    """Integer sum of a tensor's bit patterns: a change in any element changes it (barring exact cancellation)."""
    flat = t.detach().reshape(-1)
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    return int(flat.view(ints).sum(dtype=torch.int64))

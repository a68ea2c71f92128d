"""Communication of the ZO step: a handful of floats per step, never O(parameters).

Data parallel: the replicas' records of the step's losses (``loss.LossSums``: per group the float64
sum of the item losses, the item and row counts) are summed once per step and divided once
(``reduce_and_divide``). Perturbation parallel (``zo2.parallel.perturbation`` P > 1): the P ranks of
a replica each compute a share of the G group loss sums of one micro-batch; after every forward they
assemble the whole vector within their perturbation group (a sub-group created once per engine),
together with a digest of the micro-batch each ran, which must agree.

Every collective goes through ``guarded``: a rank that died or hangs makes the others fail with
a ``RankSyncError`` naming the operation and the step (after ``zo2.comm_timeout_s`` for a hang),
instead of waiting forever.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping, Optional

import torch

from .distributed import ParallelGrid
from .errors import RankSyncError
from .loss import LossSums


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


@dataclass
class ReducedLosses:
    """A step's losses after the reduction over every micro-batch, replica and perturbation rank."""

    losses: torch.Tensor
    """[G] float64 holding fp32 values: Σ sums / Σ items over the whole step, rounded to fp32 once (the update's input)."""
    total: LossSums
    """The step's whole record: ``total.items`` is the step's global item (token) count, ``total.rows`` its samples."""
    bytes_all_reduced: int


def reduce_loss_sums(local: LossSums, grid: Optional[ParallelGrid] = None, device: Optional[torch.device] = None,
                     what: str = "all-reduce of the group losses") -> tuple[LossSums, int]:
    """The sum of the data-parallel replicas' records; returns (it, on the host; bytes all-reduced by this rank).

    One float64 all-reduce of [G sums, items, rows] (on ``device``: NCCL reduces device tensors). The sums
    are exact and counts below 2^53 are exact, so the result does not depend on the reduction's order.
    With perturbation ranks (``grid.perturbation`` > 1) the ranks of a replica hold the same record: only
    slot 0 of each replica contributes (the others add zeros, which is exact), so one all-reduce over the
    world sums the replicas' records once each, as plain data parallelism does.
    """
    n = world_size()
    replicas = grid.replicas if grid is not None else n
    if n == 1 or replicas == 1:
        return LossSums(local.sums.detach().double().cpu(), local.items, local.rows), 0
    from deepspeed import comm as dist
    groups = local.sums.numel()
    buffer = torch.empty(groups + 2, dtype=torch.float64)
    buffer[:groups] = local.sums.detach().double().cpu()
    buffer[groups], buffer[groups + 1] = float(local.items), float(local.rows)
    if grid is not None and grid.slot != 0:
        buffer.zero_()
    buffer = buffer.to(device) if device is not None else buffer
    with guarded(what):
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    values = buffer.cpu()
    return (LossSums(values[:groups].clone(), int(values[groups]), int(values[groups + 1])),
            buffer.numel() * buffer.element_size())


def reduce_and_divide(local: LossSums, grid: Optional[ParallelGrid] = None,
                      device: Optional[torch.device] = None) -> ReducedLosses:
    """A step's group losses from this rank's record of its micro-batches: sum over the replicas, divide once.

    Every item (token) of the step weighs the same whatever the split: 1 rank of B rows, N ranks of B/N,
    accumulation, uneven or padded batches and a short last batch all give Σ sums / Σ items of the same
    items, the same float64, rounded to fp32 once (``LossSums.step_losses``).
    """
    total, sent = reduce_loss_sums(local, grid, device)
    return ReducedLosses(total.step_losses(), total, sent)


def perturbation_group(grid: ParallelGrid, timeout_s: float) -> Any:
    """This rank's perturbation group (the P ranks of its replica) as a process group; None when P is 1.

    Creating a group is collective over the world, so every rank creates every replica's group, in
    replica order, once (at engine construction). torch.distributed (the layer under deepspeed.comm)
    creates it because deepspeed.comm.new_group takes no timeout, and a group's own default is 30
    minutes: with ``zo2.comm_timeout_s`` a hung rank fails its group's collectives in time.
    """
    if grid.perturbation == 1:
        return None
    import torch.distributed as torch_dist
    mine = None
    with guarded("creating the perturbation groups"):
        for replica in range(grid.replicas):
            group = torch_dist.new_group(grid.replica_ranks(replica), timeout=timedelta(seconds=timeout_s))
            if replica == grid.replica:
                mine = group
    return mine


DIGEST_BITS = 52
"""Batch digests are exact in a float64, so they travel in the same all-reduce as the group losses."""


def batch_digest(batch: Mapping[str, Any]) -> int:
    """A digest of a micro-batch's tensors (names, shapes and bytes): equal digests, same micro-batch."""
    h = hashlib.blake2b(digest_size=8)
    for key in sorted(batch):
        value = batch[key]
        if isinstance(value, torch.Tensor):
            flat = value.detach().reshape(-1).contiguous().cpu()
            h.update(f"{key}:{str(value.dtype)}:{tuple(value.shape)}".encode())
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> (64 - DIGEST_BITS)


def gather_group_losses(local: torch.Tensor, grid: ParallelGrid, groups: int, digest: int, group: Any,
                        what: str) -> tuple[torch.Tensor, list[int], int]:
    """The whole vector of G group values (loss sums) of this replica's micro-batch, assembled from each rank's share.

    One all-reduce (sum) within the perturbation group of a float64 vector: the G values, each written by
    the one rank that computed it (zeros elsewhere: exact), then one batch digest per rank. Returns
    (the G values as float64, exactly as computed; the P digests; bytes all-reduced by this rank).
    """
    share = grid.share(groups)
    if len(share) != local.numel():
        raise RuntimeError(f"rank {grid.rank} computed {local.numel()} group losses for its share of {len(share)}")
    from deepspeed import comm as dist
    buffer = torch.zeros(groups + grid.perturbation, dtype=torch.float64, device=local.device)
    buffer[share.start:share.stop] = local.detach().to(torch.float64)
    buffer[groups + grid.slot] = float(digest)
    with guarded(what):
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    values = buffer.cpu()
    return values[:groups], [int(v) for v in values[groups:]], buffer.numel() * buffer.element_size()


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

"""Ranks acting together: a step every rank runs, whose failure on one rank raises on all; rank-0 logs."""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, TypeVar

from ..errors import CheckpointError, RankSyncError

T = TypeVar("T")


def _warn_rank0(message: str) -> None:
    """A warning on rank 0 (or in a process without a process group): DeepSpeed shows WARNING by default."""
    from deepspeed import comm as dist
    from deepspeed.utils import log_dist, logger
    if dist.is_initialized():
        log_dist(message, ranks=[0], level=logging.WARNING)
    else:
        logger.warning(message)


def _log_info(message: str) -> None:
    """Info on rank 0 (or in a process without a process group, e.g. the export CLI)."""
    from deepspeed import comm as dist
    from deepspeed.utils import log_dist, logger
    if dist.is_initialized():
        log_dist(message, ranks=[0])
    else:
        logger.info(message)


def _gather(world_size: int, what: str, value: Any) -> list[Any]:
    """Every rank's small picklable ``value``, in rank order; a dead or hung rank raises RankSyncError."""
    if world_size == 1:
        return [value]
    from deepspeed import comm as dist
    from ..comm import guarded
    values: list[Any] = [None] * world_size
    with guarded(f"checkpoint: {what}"):
        dist.all_gather_object(values, value)
    return values


def together(world_size: int, what: str, fn: Callable[[], T],
             share: Optional[Callable[[T], Any]] = None) -> tuple[T, list[Any]]:
    """Run ``fn`` on every rank, then make its outcome common: a failure on one rank raises on all.

    Why: a rank that raised on its own would leave the others waiting at the next collective until
    the comm timeout. Here the failing rank raises its own exception, the others a CheckpointError
    naming that rank and its error. It doubles as the guarded barrier of saves, loads and
    ``engine.save_pretrained``. Returns ``fn``'s result and every rank's ``share(result)``.
    """
    error: Optional[Exception] = None
    result: Any = None
    try:
        result = fn()
    except Exception as e:  # reported to the other ranks, then re-raised below
        error = e
    summary = f"{type(error).__name__}: {error}" if error is not None else None
    try:
        outcomes = _gather(world_size, what, (summary, share(result) if share and error is None else None))
    except RankSyncError:
        if error is not None:
            raise error
        raise
    if error is not None:
        raise error
    failed = [(rank, message) for rank, (message, _) in enumerate(outcomes) if message]
    if failed:
        rank, message = failed[0]
        raise CheckpointError(f"{what} failed on rank {rank}: {message}")
    return result, [shared for _, shared in outcomes]



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
             share: Optional[Callable[[T], Any]] = None, last: bool = False) -> tuple[T, list[Any]]:
    """Run ``fn`` on every rank, then make its outcome common: a failure on one rank raises on all.

    Why: a rank that raised on its own would leave the others waiting at the next collective until
    the comm timeout. Here the failing rank raises its own exception, the others a CheckpointError
    naming that rank and its error. It doubles as the guarded barrier of saves, loads and
    ``engine.save_pretrained``. Returns ``fn``'s result and every rank's ``share(result)``.

    A ``BaseException`` counts as a failure too: a second Ctrl-C during a save (``SystemExit`` from
    ``StopOnSignal``, or ``KeyboardInterrupt``) reaches the other ranks, which stop at this step
    instead of waiting out ``zo2.comm_timeout_s``. A second signal that arrives inside the exchange
    itself is held (``stopping.held_during``) and fails the next step on every rank, or is raised
    after the exchange of the ``last`` step, once every rank has finished.
    """
    from ..stopping import held_during, take_held
    error: Optional[BaseException] = take_held()  # a stop held by the previous step's exchange: fail this one
    result: Any = None
    if error is None:
        try:
            result = fn()
        except BaseException as e:  # reported to the other ranks, then re-raised below
            error = e
    summary = _describe(error) if error is not None else None
    try:
        with held_during():
            outcomes = _gather(world_size, what, (summary, share(result) if share and error is None else None))
    except RankSyncError:
        if error is not None:
            raise error
        raise
    if error is not None:
        raise error
    failed = [(rank, message) for rank, (message, _) in enumerate(outcomes) if message]
    if failed:
        stop = take_held()
        rank, message = failed[0]
        failure = CheckpointError(f"{what} failed on rank {rank}: {message}")
        if stop is not None:
            raise stop from failure
        raise failure
    if last:
        raise_held()
    return result, [shared for _, shared in outcomes]


def raise_held() -> None:
    """Raise a second stop signal held by the last exchange of an operation, now that every rank has done it."""
    from ..stopping import take_held
    stop = take_held()
    if stop is not None:
        raise stop


def _describe(error: BaseException) -> str:
    """One line for the other ranks; an interrupt says so."""
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        code = f" {error.code}" if isinstance(error, SystemExit) and error.code is not None else ""
        return f"{type(error).__name__}{code} (interrupted: a signal, or the program exiting)"
    return f"{type(error).__name__}: {error}"

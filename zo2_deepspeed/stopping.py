"""Stop a training loop at a step boundary on SIGINT/SIGTERM instead of raising in the middle of a step.

Python runs signal handlers in the main thread only, between bytecodes; the default SIGINT handler
raises ``KeyboardInterrupt`` wherever the main thread happens to be, e.g. waiting on a buffer lock
while a prefetch thread uploads the next block, and the step (and everything since the last save)
is lost. ``StopOnSignal`` installs handlers that only record the signal; the loop asks
``requested()`` after each optimizer step, finishes cleanly and saves. Worker threads never see the
signal. A second signal stops at once (``SystemExit``, no traceback), for a loop stuck elsewhere.

Except inside a collective step of several ranks (``held_during``, used by ``checkpoint.together``): a
rank that left such a step half-way would leave the others waiting in it until ``zo2.comm_timeout_s``
(NCCL does not notice a peer that is gone). There the second signal is held, and so is the
``KeyboardInterrupt`` of Python's default SIGINT handler; the ranks' next common step reports it to
all of them, so every rank stops within that step (``take_held``).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType
from typing import Any, Callable, Iterator, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_holding = 0
"""Depth of ``held_during`` blocks: while positive, a second signal is recorded instead of raised."""
_held: Optional[BaseException] = None
"""The interrupt recorded inside ``held_during``, until ``take_held`` hands it out."""


def _hold_keyboard_interrupt(signum: int, frame: Optional[FrameType]) -> None:
    global _held
    _held = _held or KeyboardInterrupt()


@contextlib.contextmanager
def held_during() -> Iterator[None]:
    """While the block runs (a collective every rank must finish), an interrupt waits in ``take_held``."""
    global _holding
    default = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if default:
        signal.signal(signal.SIGINT, _hold_keyboard_interrupt)
    _holding += 1
    try:
        yield
    finally:
        _holding -= 1
        if default:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def take_held() -> Optional[BaseException]:
    """The ``SystemExit`` (second stop signal) or ``KeyboardInterrupt`` held by ``held_during``, once; else None."""
    global _held
    held, _held = _held, None
    return held


class StopOnSignal:
    """Context manager: while active, SIGINT/SIGTERM set a flag that ``requested()`` reports.

    With several ranks ``requested()`` is agreed by all of them (an all-reduce of the flag), so every
    rank stops after the same step even when the signal reached only some of them, or reached them
    during different steps: the checkpoint the loop then saves is collective.
    """

    def __init__(self, announce: bool = True) -> None:
        self.signum: Optional[int] = None
        self._announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        global _held
        if self.signum is not None:
            # os.write, not print: the main thread may be inside a write to the same stream (tqdm)
            os.write(2, f"\n[train] second {signal.Signals(signum).name}: stopping now, without saving\n".encode())
            if _holding:
                _held = _held or SystemExit(128 + signum)
                return
            raise SystemExit(128 + signum)
        self.signum = signum
        if self._announce:
            os.write(2, f"\n[train] {self.name}: finishing the current step, then saving a checkpoint "
                        f"(send it again to stop at once without saving)\n".encode())

    def requested(self, all_reduce: Optional[Callable[[bool], bool]] = None) -> bool:
        """Whether to stop now; ``all_reduce(flag) -> any rank's flag`` makes the ranks agree."""
        local = self.signum is not None
        return all_reduce(local) if all_reduce is not None else local


def any_rank(device: Any) -> Callable[[bool], bool]:
    """An ``all_reduce`` for ``StopOnSignal.requested``: True when the flag is set on any rank (one collective)."""
    import torch
    from deepspeed import comm as dist

    def reduce(flag: bool) -> bool:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    return reduce

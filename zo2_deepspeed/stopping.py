"""Stop a training loop at a step boundary on SIGINT/SIGTERM instead of raising in the middle of a step.

Python runs signal handlers in the main thread only, between bytecodes; the default SIGINT handler
raises ``KeyboardInterrupt`` wherever the main thread happens to be, e.g. waiting on a buffer lock
while a prefetch thread uploads the next block, and the step (and everything since the last save)
is lost. ``StopOnSignal`` installs handlers that only record the signal; the loop asks
``requested()`` after each optimizer step, finishes cleanly and saves. Worker threads never see the
signal. A second signal stops at once (``SystemExit``, no traceback), for a loop stuck elsewhere.
"""
from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any, Callable, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
        if self.signum is not None:
            # os.write, not print: the main thread may be inside a write to the same stream (tqdm)
            os.write(2, f"\n[train] second {signal.Signals(signum).name}: stopping now, without saving\n".encode())
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

"""Streams that move blocks beside compute, the events that order them, and phase clocks.

On an accelerator with streams, uploads (and the pending update applied right after them) run on
a fetch stream and write-backs on a store stream, all issued from the thread that runs compute:
the copies overlap the forwards without a second thread competing for kernel launches. Events
order the three streams; nothing waits on the host except where the host itself reads the data.
Every stream is named with its device: the current device need not be the engine's (a script may
have initialised distributed on another).
On the CPU there are no streams: every method here is a no-op and work is done when its call returns.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Any, Iterator, Optional

import torch


@dataclasses.dataclass
class DeviceWork:
    """Host-side stream work of this process, cumulative: what a step costs the thread that queues it.

    ``events``: events recorded; ``stream_waits``: a stream made to wait for an event; ``host_waits``:
    the host blocked on a stream or event. Counted where the pipeline and the buffer pool make them
    (benchmarks/gpu.py reports them per step; the tests hold them to a stand-in accelerator's counts).
    """

    events: int = 0
    stream_waits: int = 0
    host_waits: int = 0

    def snapshot(self) -> "DeviceWork":
        return dataclasses.replace(self)

    def since(self, earlier: "DeviceWork") -> dict[str, int]:
        return {k: v - getattr(earlier, k) for k, v in dataclasses.asdict(self).items()}


DEVICE_WORK = DeviceWork()


def stream_accelerator(device: torch.device) -> Any:
    """DeepSpeed's accelerator when ``device`` has streams and events (CUDA, ROCm, XPU, ...), else None.

    ``get_accelerator().Stream/Event`` are None on the CPU accelerator.
    """
    if torch.device(device).type == "cpu":
        return None
    from deepspeed.accelerator import get_accelerator
    accel = get_accelerator()
    if getattr(accel, "Stream", None) is None or getattr(accel, "Event", None) is None:
        return None
    return accel


class DeviceStreams:
    """A fetch stream and a store stream beside the compute (current) stream of ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.fetch: Any = None
        self.store: Any = None
        self._accel: Any = stream_accelerator(self.device)
        if self._accel is not None:
            self.fetch = self._accel.Stream(device=self.device)
            self.store = self._accel.Stream(device=self.device)

    @property
    def enabled(self) -> bool:
        return self._accel is not None

    def on(self, stream: Any) -> contextlib.AbstractContextManager:
        """Make ``stream`` current inside the block (nothing without streams)."""
        return self._accel.stream(stream) if self.enabled and stream is not None else contextlib.nullcontext()

    def record(self, timing: bool = False) -> Any:
        """An event marking what the current stream has queued so far (None without streams)."""
        if not self.enabled:
            return None
        event = self._accel.Event(enable_timing=timing)
        event.record(self.current())
        DEVICE_WORK.events += 1
        return event

    def current(self) -> Any:
        """The current stream of this device (not of the current device)."""
        return self._accel.current_stream(self.device)

    def wait(self, event: Any) -> None:
        """Make the current stream wait for ``event`` (a no-op for None)."""
        if event is not None:
            self.current().wait_event(event)
            DEVICE_WORK.stream_waits += 1

    def synchronize(self) -> None:
        """Block the host until every stream's queued work is done (before the host reads moved data)."""
        if self.enabled:
            for stream in (self.fetch, self.store):
                stream.synchronize()
            self.current().synchronize()
            DEVICE_WORK.host_waits += 3


class PhaseClock:
    """Adds the time of a phase to one field of a PhaseTimes.

    With ``device_timing`` a phase is the device time between two events on the stream current when
    it is entered (the phase's own stream: concurrent phases on other streams each count in full);
    ``settle()`` turns finished event pairs into seconds. Otherwise phases are host wall time,
    thread-safe (a background worker's phases overlap compute). Disabled (``enabled`` False), it
    records nothing.
    """

    def __init__(self, times: Any, streams: DeviceStreams, device_timing: bool, enabled: bool = True) -> None:
        self.times = times
        self.streams = streams
        self.enabled = enabled
        """False: phases are not timed at all (no events, no clock reads)."""
        self.device_timing = device_timing and streams.enabled and enabled
        self._lock = threading.Lock()
        self._pending: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.device_timing:
            start = self.streams.record(timing=True)
            try:
                yield
            finally:
                self._pending.append((phase, start, self.streams.record(timing=True)))
            return
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - began)

    def add(self, phase: str, seconds: float) -> None:
        if not self.enabled:
            return
        with self._lock:
            setattr(self.times, phase, getattr(self.times, phase) + seconds)

    def settle(self, wait: bool = False) -> None:
        """Fold the finished device phases into ``times``; with ``wait``, wait for the unfinished ones first."""
        still: list[tuple[str, Any, Any]] = []
        for phase, start, end in self._pending:
            if wait:
                end.synchronize()
                DEVICE_WORK.host_waits += 1
            elif not end.query():
                still.append((phase, start, end))
                continue
            self.add(phase, start.elapsed_time(end) / 1000.0)
        self._pending = still


def wait_for(event: Optional[Any]) -> None:
    """Make the current stream wait for ``event`` recorded on another stream (None: nothing to wait for)."""
    if event is not None:
        event.wait()
        DEVICE_WORK.stream_waits += 1

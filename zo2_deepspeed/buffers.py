"""Reused device buffers for gathered, perturbed and noise tensors.

Allocating a fresh multi-megabyte tensor per block per step costs page faults on every touch (on
CPU this halves memcpy and noise throughput); a block's buffers are recycled for the next block.
On an accelerator a buffer may still be read or written by queued work on some stream when it is
returned: ``put`` records an event on the current stream (or takes one), and ``get`` makes the
current stream wait for it before the buffer's next use, so reuse is ordered without host waits.

Free buffers are kept per size, but not beyond the most the pool ever had in use at once: when a
buffer of a new size is needed, free buffers of the sizes used longest ago are dropped first. Without
that bound the free lists of every size the pass met (embeddings at its ends, layers in between)
would add up to more than the pipeline ever uses together.

Dropping never makes the host wait: PyTorch's caching allocator hands a freed block out again
only to allocations on the stream it was allocated on, so that stream is made to wait for the
buffer's ready event before the block is dropped (what ``Tensor.record_stream`` would otherwise
do with a host-side query). With the embedding twice a layer's size the free lists trade sizes
every step; each trade is two stream waits, not a stall of the thread that queues the forwards.
"""
from __future__ import annotations

import threading
from collections import defaultdict, deque
from typing import Any, Iterable, Optional

import torch

from . import streams


RECENT_WAITS = 16
"""Ready events remembered per stream: a block's buffers come back under a few events."""


class BufferPool:
    """Free lists of flat tensors keyed by (numel, dtype); thread-safe, one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._free: dict[tuple[int, torch.dtype], list[tuple[torch.Tensor, Any]]] = defaultdict(list)
        self._recent_waits: dict[Any, deque] = {}
        """Stream -> the last ready events it was made to wait for (waiting again would change nothing)."""
        self._home: dict[int, Any] = {}
        """Address -> the stream a buffer was allocated on (accelerators with streams)."""
        self._lock = threading.Lock()
        self.bytes_in_use = 0
        self.peak_bytes_in_use = 0
        self._most_in_use = 0
        """The most bytes ever in use at once (peak_bytes_in_use can be reset): the bound on what is held."""
        self._free_bytes = 0
        self._last_used: dict[tuple[int, torch.dtype], int] = {}
        self._uses = 0
        self._accel: Any = streams.stream_accelerator(self.device)

    def get(self, shape: torch.Size | tuple, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of ``shape`` (contents undefined), safe to use on the current stream."""
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        evicted: list[tuple[torch.Tensor, Any]] = []
        with self._lock:
            free = self._free.get((numel, dtype))
            flat, ready = free.pop() if free else (None, None)
            self.bytes_in_use += nbytes
            self.peak_bytes_in_use = max(self.peak_bytes_in_use, self.bytes_in_use)
            self._most_in_use = max(self._most_in_use, self.bytes_in_use)
            self._uses += 1
            self._last_used[(numel, dtype)] = self._uses
            if flat is None:
                evicted = self._evict_beyond(self._most_in_use - self.bytes_in_use)
            else:
                self._free_bytes -= nbytes
        self._drop(evicted)
        del evicted
        if flat is None:
            flat = torch.empty(numel, dtype=dtype, device=self.device)
            if self._accel is not None:
                with self._lock:
                    self._home[flat.data_ptr()] = self._accel.current_stream(self.device)
        elif ready is not None:
            stream = self._accel.current_stream(self.device)
            with self._lock:
                recent = self._recent_waits.setdefault(stream, deque(maxlen=RECENT_WAITS))
                waited = any(e is ready for e in recent)
                if not waited:
                    recent.append(ready)
            if not waited:  # buffers returned together share an event: the stream waits for it once
                ready.wait(stream)
                streams.DEVICE_WORK.stream_waits += 1
        return flat.view(shape)

    def ready_event(self) -> Any:
        """An event after everything queued so far on the current stream (None on the CPU)."""
        if self._accel is None:
            return None
        event = self._accel.Event()
        event.record(self._accel.current_stream(self.device))
        streams.DEVICE_WORK.events += 1
        return event

    def put(self, tensor: torch.Tensor, ready: Optional[Any] = None) -> None:
        """Return a tensor from ``get``; queued work may still use it until ``ready`` (default: the current stream)."""
        self.put_many([tensor], ready)

    def put_many(self, tensors: Iterable[torch.Tensor], ready: Optional[Any] = None) -> None:
        """Return several tensors that are free once one event (default: now on the current stream) has passed."""
        tensors = list(tensors)
        if not tensors:
            return
        if any(not t.is_contiguous() for t in tensors):
            raise ValueError("only contiguous pool tensors can be returned")
        if ready is None:
            ready = self.ready_event()
        with self._lock:
            for tensor in tensors:
                self._free[(tensor.numel(), tensor.dtype)].append((tensor.view(-1), ready))
                self.bytes_in_use -= tensor.numel() * tensor.element_size()
                self._free_bytes += tensor.numel() * tensor.element_size()

    def _evict_beyond(self, keep: int) -> list[tuple[torch.Tensor, Any]]:
        """Take free buffers off the lists, least recently used size first, until at most ``keep`` bytes are free
        (called with the lock held, before a new allocation)."""
        evicted = []
        while self._free_bytes > keep:
            key = min((k for k, v in self._free.items() if v), key=lambda k: self._last_used.get(k, 0))
            flat, ready = self._free[key].pop(0)
            self._free_bytes -= flat.numel() * flat.element_size()
            evicted.append((flat, ready))
        return evicted

    @property
    def free_bytes(self) -> int:
        """Bytes held in the free lists (allocated on the device, not in use)."""
        with self._lock:
            return sum(t.numel() * t.element_size() for free in self._free.values() for t, _ in free)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_bytes_in_use = self.bytes_in_use

    def clear(self) -> None:
        """Drop every free buffer (memory returns to the allocator once queued work on it is done)."""
        with self._lock:
            entries = [e for free in self._free.values() for e in free]
            self._free.clear()
            self._free_bytes = 0
        self._drop(entries)

    def _drop(self, entries: list[tuple[torch.Tensor, Any]]) -> None:
        """Give buffers back to the allocator once the work queued on them is done, without a host wait.

        The stream each was allocated on waits for its ready event: the allocator reuses the memory only
        for later work on that stream. A buffer of unknown origin (not from ``get``) is waited for on the host.
        """
        for flat, ready in entries:
            if ready is None:
                continue
            with self._lock:
                home = self._home.pop(flat.data_ptr(), None)
            if home is not None:
                home.wait_event(ready)
                streams.DEVICE_WORK.stream_waits += 1
            else:
                ready.synchronize()
                streams.DEVICE_WORK.host_waits += 1

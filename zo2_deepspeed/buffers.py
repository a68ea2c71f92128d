"""Reused device buffers for gathered, perturbed and noise tensors.

Allocating a fresh multi-megabyte tensor per block per step costs page faults on every touch (on
CPU this halves memcpy and noise throughput); a block's buffers are recycled for the next block.
"""
from __future__ import annotations

import threading
from collections import defaultdict

import torch


class BufferPool:
    """Free lists of flat tensors keyed by (numel, dtype); thread-safe, one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()
        self.bytes_in_use = 0
        self.peak_bytes_in_use = 0

    def get(self, shape: torch.Size | tuple, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of ``shape`` (contents undefined)."""
        numel = 1
        for d in shape:
            numel *= int(d)
        with self._lock:
            free = self._free.get((numel, dtype))
            flat = free.pop() if free else None
            self.bytes_in_use += numel * torch.empty((), dtype=dtype).element_size()
            self.peak_bytes_in_use = max(self.peak_bytes_in_use, self.bytes_in_use)
        if flat is None:
            flat = torch.empty(numel, dtype=dtype, device=self.device)
        return flat.view(shape)

    def put(self, tensor: torch.Tensor) -> None:
        """Return a tensor from ``get``; the caller must hold no other reference that it still uses."""
        if not tensor.is_contiguous():
            raise ValueError("only contiguous pool tensors can be returned")
        with self._lock:
            self._free[(tensor.numel(), tensor.dtype)].append(tensor.view(-1))
            self.bytes_in_use -= tensor.numel() * tensor.element_size()

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_bytes_in_use = self.bytes_in_use

    def clear(self) -> None:
        """Drop every free buffer (memory returns to the allocator)."""
        with self._lock:
            self._free.clear()

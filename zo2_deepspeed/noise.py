"""Seeded perturbation noise. z is never stored: it is a pure function of (seed, parameter name).

A parameter's z is drawn in chunks of ``CHUNK_ELEMENTS``, each from its own seed derived from the
parameter's seed and the chunk index. That makes z independent of the order in which parameters
are visited, of ZeRO sharding and of the world size (every rank regenerates the whole tensor), and
lets the chunks of all of a block's parameters be drawn on several CPU threads at once (most
tensors of a layer are smaller than a million elements, so parallelism must span tensors).
"""
from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

import torch

CHUNK_ELEMENTS = 1 << 18
NoiseKind = Literal["gaussian", "rademacher"]

_SIGN_TABLE: dict[torch.device, torch.Tensor] = {}


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (never Python's salted ``hash()``)."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _sign_table(device: torch.device) -> torch.Tensor:
    """Row b holds the 8 signs (bit k set -> +1, clear -> -1) of the byte value b."""
    table = _SIGN_TABLE.get(device)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = (bits.float() * 2 - 1).to(device)
        _SIGN_TABLE[device] = table
    return table


class NoiseSource:
    """Fills flat fp32 buffers with seeded Gaussian or Rademacher noise and counts what it draws."""

    def __init__(self, device: torch.device | str, threads: Optional[int] = None) -> None:
        self.device = torch.device(device)
        self.elements_generated = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        n = threads if threads is not None else torch.get_num_threads()
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="zo2-noise") if self.device.type == "cpu" and n > 1 \
            else None

    def _generator(self) -> torch.Generator:
        gen = getattr(self._local, "gen", None)
        if gen is None:
            gen = torch.Generator(device=self.device)
            self._local.gen = gen
        return gen

    def _fill_chunk(self, out: torch.Tensor, seed: int, index: int, kind: NoiseKind) -> None:
        gen = self._generator()
        gen.manual_seed(derive_seed(seed, index))
        n = out.numel()
        if kind == "gaussian":
            torch.randn(n, generator=gen, out=out, dtype=out.dtype, device=out.device)
            return
        words = (n + 63) // 64
        bits = torch.randint(-(1 << 63), (1 << 63) - 1, (words,), dtype=torch.int64, generator=gen,
                             device=out.device)
        index_bytes = bits.view(torch.uint8).int()
        table = _sign_table(out.device)
        if n == words * 64:
            torch.index_select(table, 0, index_bytes, out=out.view(-1, 8))
        else:
            out.copy_(torch.index_select(table, 0, index_bytes).view(-1)[:n])

    def fill(self, out: torch.Tensor, seed: int, kind: NoiseKind = "gaussian") -> torch.Tensor:
        """Fill the contiguous fp32 tensor ``out`` (any shape) with the noise of ``seed``; returns ``out``."""
        self.fill_many([(out, seed)], kind)
        return out

    def fill_many(self, jobs: list[tuple[torch.Tensor, int]], kind: NoiseKind = "gaussian") -> None:
        """Fill several tensors at once, ``(out, seed)`` each; their chunks share the thread pool."""
        chunks = []
        total = 0
        for out, seed in jobs:
            if not out.is_contiguous() or out.dtype != torch.float32:
                raise ValueError("noise buffers must be contiguous fp32 tensors")
            flat = out.view(-1)
            n = flat.numel()
            total += n
            chunks += [(flat[i:i + CHUNK_ELEMENTS], seed, i // CHUNK_ELEMENTS, kind) for i in range(0, n, CHUNK_ELEMENTS)]
        if self._pool is not None and len(chunks) > 1:
            list(self._pool.map(lambda args: self._fill_chunk(*args), chunks))
        else:
            for args in chunks:
                self._fill_chunk(*args)
        with self._lock:
            self.elements_generated += total

    def draw(self, shape: torch.Size | tuple, seed: int, kind: NoiseKind = "gaussian") -> torch.Tensor:
        """A new tensor of noise (tests and reference loops; the pipeline fills pooled buffers)."""
        return self.fill(torch.empty(shape, dtype=torch.float32, device=self.device), seed, kind)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def parameter_seed(step_seed: int, direction: int, name: str) -> int:
    """Seed of direction ``direction``'s noise for the parameter called ``name`` at one step."""
    return derive_seed(step_seed, direction, name)


def step_seed(base_seed: int, global_step: int) -> int:
    """Seed of one training step: identical on every rank, stable across runs and Python versions."""
    return derive_seed("zo2-step", base_seed, global_step)

"""Seeded perturbation noise. z is never stored: it is a pure function of (seed, parameter name).

Two sources, one interface (``NoiseSource``), chosen by ``zo2.noise_generator``:

* ``TorchNoise`` ("torch", the CPU default): torch's generator. A parameter's z is drawn in chunks
  of ``CHUNK_ELEMENTS`` on the CPU, each from its own seed derived from the parameter's seed and the
  chunk index, so the chunks of all of a block's parameters are drawn on several threads at once
  (most tensors of a layer are smaller than a million elements: parallelism must span tensors). On
  an accelerator a whole tensor is one chunk (one launch). The pipeline materialises z in buffers
  and reuses it while a block is resident.
* ``PhiloxNoise`` ("philox", the accelerator default): z[i] is Philox by element index (see
  ``philox.py``); Triton kernels compute a block's perturbed copies and deferred updates from the
  seeds in one launch each, never materialising z (``fused``). Without Triton the same stream comes
  from plain torch, slowly (tests and CPU runs that want the very z a GPU run uses).

Either way z is independent of the order in which parameters are visited, of ZeRO sharding and of
the world size (every rank regenerates the whole tensor); the two sources give different z.
"""
from __future__ import annotations

import functools
import hashlib
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

import torch

CHUNK_ELEMENTS = 1 << 18
"""Elements per independently seeded chunk of torch's generator on the CPU."""
WHOLE_TENSOR = 1 << 62
"""The chunk size on accelerators: one chunk (one launch) per tensor."""
TILE_CHECK = 1024
SELF_CHECK_SEED = 0x5EED_2025_0A11
MAX_CHECK_TERMS = 9
"""More noise terms than one launch sums: the start-up check also covers a split update."""
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


class NoiseSource(ABC):
    """Fills fp32 buffers with seeded Gaussian or Rademacher noise, rounds to 16 bits, counts what it draws."""

    name = "noise"
    fused = False
    """True when ``combine`` computes z inside its kernel: the pipeline then never materialises z."""
    batched_rounding = False
    """True when ``stochastic_round_many`` is one launch (worth holding a block's rounded values at once)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.elements_generated = 0
        self._lock = threading.Lock()

    @property
    def description(self) -> str:
        """The generator and how it runs, for the log."""
        return self.name

    def _count(self, elements: int) -> None:
        with self._lock:
            self.elements_generated += elements

    @abstractmethod
    def fill_many(self, jobs: list[tuple[torch.Tensor, int]], kind: NoiseKind = "gaussian") -> None:
        """Fill several contiguous fp32 tensors, ``(out, seed)`` each, with their seeds' noise."""

    def fill(self, out: torch.Tensor, seed: int, kind: NoiseKind = "gaussian") -> torch.Tensor:
        """Fill the contiguous fp32 tensor ``out`` (any shape) with the noise of ``seed``; returns ``out``."""
        self.fill_many([(out, seed)], kind)
        return out

    def draw(self, shape: torch.Size | tuple, seed: int, kind: NoiseKind = "gaussian") -> torch.Tensor:
        """A new tensor of noise (tests and reference loops; the pipeline fills pooled buffers)."""
        return self.fill(torch.empty(shape, dtype=torch.float32, device=self.device), seed, kind)

    @abstractmethod
    def stochastic_round(self, x: torch.Tensor, dtype: torch.dtype, seed: int, start: int = 0) -> torch.Tensor:
        """fp32 ``x`` stochastically rounded to bf16/fp16 with the seed's randomness (``start``: x's first index)."""

    def stochastic_round_many(self, jobs: list[tuple[torch.Tensor, torch.dtype, int, int]]) -> list[torch.Tensor]:
        """``stochastic_round`` of each (x, dtype, seed, start): a block's write-back (one launch with a kernel)."""
        return [self.stochastic_round(x, dtype, seed, start) for x, dtype, seed, start in jobs]

    def combine(self, dsts: list[torch.Tensor], srcs: Optional[list[torch.Tensor]], decays: list[float],
                terms: list[list[tuple[int, float]]], kind: NoiseKind,
                scalings: Optional[list[torch.Tensor]] = None) -> None:
        """dst_t = src_t·decay_t + Σ coeff·D_t·z(seed) over ``terms[t]`` ((seed, coeff) pairs), z never stored.

        Only sources with ``fused`` implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} materialises z; it has no fused combine")

    def close(self) -> None:
        """Stop worker threads."""


class NoiseKernelError(RuntimeError):
    """The Triton noise kernels failed to compile, launch or match their reference at start-up."""


def _check_buffer(out: torch.Tensor) -> None:
    if not out.is_contiguous() or out.dtype != torch.float32:
        raise ValueError("noise buffers must be contiguous fp32 tensors")


class TorchNoise(NoiseSource):
    """torch's generator, reseeded per chunk; chunks of many tensors are drawn on a CPU thread pool."""

    name = "torch"

    def __init__(self, device: torch.device | str, threads: Optional[int] = None,
                 chunk_elements: Optional[int] = None) -> None:
        super().__init__(device)
        on_cpu = self.device.type == "cpu"
        self.chunk_elements = chunk_elements or (CHUNK_ELEMENTS if on_cpu else WHOLE_TENSOR)
        self._local = threading.local()
        n = threads if threads is not None else torch.get_num_threads()
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="zo2-noise") if on_cpu and n > 1 else None

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

    def fill_many(self, jobs: list[tuple[torch.Tensor, int]], kind: NoiseKind = "gaussian") -> None:
        """Fill several tensors at once; their chunks share the thread pool."""
        chunks = []
        total = 0
        size = self.chunk_elements
        for out, seed in jobs:
            _check_buffer(out)
            flat = out.view(-1)
            n = flat.numel()
            total += n
            chunks += [(flat[i:i + size], seed, i // size, kind) for i in range(0, n, size)]
        if self._pool is not None and len(chunks) > 1:
            list(self._pool.map(lambda args: self._fill_chunk(*args), chunks))
        else:
            for args in chunks:
                self._fill_chunk(*args)
        self._count(total)

    def stochastic_round(self, x: torch.Tensor, dtype: torch.dtype, seed: int, start: int = 0) -> torch.Tensor:
        from .rounding import stochastic_round
        return stochastic_round(x, dtype, seed)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class PhiloxNoise(NoiseSource):
    """Philox by element index: fused Triton kernels where they run, else the torch reference (slow)."""

    name = "philox"
    fused = True

    def __init__(self, device: torch.device | str, use_triton: Optional[bool] = None) -> None:
        super().__init__(device)
        from . import kernels
        reason = kernels.unavailable_reason(self.device)
        if use_triton and reason is not None:
            raise RuntimeError(f"Triton noise kernels cannot run on {self.device}: {reason}")
        self.triton = None
        self.unavailable_reason = reason
        if reason is None and use_triton is not False:
            self.triton = self._start_kernels()
        self.batched_rounding = self.triton is not None

    def _start_kernels(self) -> "kernels.TritonNoiseKernels":
        """The kernels, compiled, launched and checked once, or a NoiseKernelError naming the cause."""
        from . import kernels
        try:
            triton_kernels = kernels.kernels_for(self.device)
            self.triton = triton_kernels
            if not triton_kernels.checked:  # once per process and device: the compiled kernels stay the same
                self._self_check()
                triton_kernels.checked = True
        except NoiseKernelError:
            raise
        except Exception as error:  # no C compiler for the launcher, a driver older than the bundled ptxas, ...
            raise NoiseKernelError(f"the Triton noise kernels cannot compile or launch on {self.device} "
                                   f"({type(error).__name__}: {error}); set zo2.noise_generator to \"torch\" to "
                                   f"train with torch's generator instead") from error
        return triton_kernels

    @property
    def description(self) -> str:
        return "philox (Triton kernels)" if self.triton is not None else "philox (torch reference)"

    def _self_check(self) -> None:
        """The kernels against the reference on a few thousand elements: a miscompiled kernel fails here, loudly.

        Every variant a run launches is compiled separately, so each is checked: fills, perturbed copies
        into 16-bit tensors, 16-bit in-place shifts, multi-term updates with a decay, HiZOO's scalings,
        and views that start off a 16-byte boundary (the kernels' scalar path).
        """
        from . import philox
        n = 3 * TILE_CHECK + 5
        for kind, tolerance in (("gaussian", 1e-5), ("rademacher", 0.0)):
            out = torch.empty(n, dtype=torch.float32, device=self.device)
            self.triton.combine([out], None, [1.0], [[SELF_CHECK_SEED]], [[1.0]], kind)
            reference = philox.stream(kind, SELF_CHECK_SEED, n, device=self.device)
            error = float((out - reference).abs().max())
            if not error <= tolerance:
                raise NoiseKernelError(f"the Triton {kind} noise kernel differs from its reference by {error:g} on "
                                       f"{self.device}; set zo2.noise_generator to \"torch\" to train without it")
        for case in self._check_cases():  # one full tile and a partial one each: both branches of the kernel
            self._check_combine(TILE_CHECK + 5, **case)
        x = torch.linspace(-3, 3, n, device=self.device)  # finite: NaN payloads may differ by converter
        for dtype in (torch.bfloat16, torch.float16):
            got = self.triton.stochastic_round(x, torch.empty(n, dtype=dtype, device=self.device), SELF_CHECK_SEED)
            if not torch.equal(got.view(torch.int16), philox.stochastic_round(x, dtype, SELF_CHECK_SEED).view(torch.int16)):
                raise NoiseKernelError(f"the Triton stochastic-rounding kernel ({dtype}) differs from its reference on "
                                   f"{self.device}; set zo2.noise_generator to \"torch\" to train without it")

    @staticmethod
    def _check_cases() -> list[dict]:
        """(src dtype or None for in place, dst dtype, terms, decay, scaling, first element) per variant."""
        f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
        cases = []
        for kind in ("gaussian", "rademacher"):
            cases += [dict(kind=kind, src=f32, dst=bf16, terms=1, decay=1.0, scaling=False, offset=0),
                      dict(kind=kind, src=f32, dst=f16, terms=1, decay=1.0, scaling=True, offset=0),
                      dict(kind=kind, src=None, dst=bf16, terms=2, decay=1.0, scaling=False, offset=0),
                      dict(kind=kind, src=None, dst=f32, terms=MAX_CHECK_TERMS, decay=0.99, scaling=False, offset=1),
                      dict(kind=kind, src=None, dst=f32, terms=2, decay=0.99, scaling=True, offset=0),
                      dict(kind=kind, src=bf16, dst=bf16, terms=1, decay=1.0, scaling=False, offset=3)]
        return cases

    def _check_combine(self, n: int, kind: NoiseKind, src: Optional[torch.dtype], dst: torch.dtype, terms: int,
                       decay: float, scaling: bool, offset: int) -> None:
        """One launch of ``combine`` against ``_combine_reference``: z's tolerance times the coefficients,
        plus one rounding of the destination's dtype."""
        gen = torch.Generator().manual_seed(SELF_CHECK_SEED & 0xFFFF)
        base = torch.randn(n + offset, generator=gen).to(self.device)
        target = base.to(dst)[offset:]
        source = base.to(src)[offset:] if src is not None else target
        scale = (torch.rand(n + offset, generator=gen) + 0.5).to(self.device)[offset:] if scaling else None
        seeds = [(SELF_CHECK_SEED + j, 1e-2 * (j + 1)) for j in range(terms)]
        expected = torch.empty(n, dtype=torch.float32, device=self.device)
        self._combine_reference(expected, source, decay, seeds, kind, scale)
        self.triton.combine([target], [source], [decay], [[s for s, _ in seeds]], [[c for _, c in seeds]], kind,
                            [scale] if scale is not None else None)
        weight = sum(abs(c) for _, c in seeds) * (1.5 if scaling else 1.0)
        bound = 1e-5 * weight + expected.abs() * torch.finfo(dst).eps + 1e-30
        error = (target.float() - expected).abs()
        if not bool((error <= bound).all()):
            variant = (f"{kind}, {'in place' if src is None else str(src).replace('torch.', '') + ' source'}, "
                       f"{str(dst).replace('torch.', '')} destination, {terms} term(s), decay {decay}"
                       f"{', scaling' if scaling else ''}{', unaligned' if offset else ''}")
            raise NoiseKernelError(f"the Triton noise kernel ({variant}) differs from its reference by "
                                   f"{float(error.max()):g} on {self.device}; set zo2.noise_generator to \"torch\" "
                                   f"to train without it")

    def fill_many(self, jobs: list[tuple[torch.Tensor, int]], kind: NoiseKind = "gaussian") -> None:
        for out, _ in jobs:
            _check_buffer(out)
        self.combine([out.view(-1) for out, _ in jobs], None, [1.0] * len(jobs), [[(seed, 1.0)] for _, seed in jobs],
                     kind)

    def combine(self, dsts: list[torch.Tensor], srcs: Optional[list[torch.Tensor]], decays: list[float],
                terms: list[list[tuple[int, float]]], kind: NoiseKind,
                scalings: Optional[list[torch.Tensor]] = None) -> None:
        if not dsts:
            return
        self._count(sum(d.numel() * len(t) for d, t in zip(dsts, terms)))
        if self.triton is None:
            for i, dst in enumerate(dsts):
                self._combine_reference(dst, srcs[i] if srcs is not None else None, decays[i], terms[i], kind,
                                        scalings[i] if scalings is not None else None)
            return
        # one launch per combination of dtypes and number of terms
        groups: dict[tuple, list[int]] = {}
        for i, dst in enumerate(dsts):
            key = (dst.dtype, srcs[i].dtype if srcs is not None else None,
                   scalings[i].dtype if scalings is not None else None, len(terms[i]))
            groups.setdefault(key, []).append(i)
        for idx in groups.values():
            self.triton.combine([dsts[i].view(-1) for i in idx],
                                [srcs[i].view(-1) for i in idx] if srcs is not None else None,
                                [decays[i] for i in idx], [[s for s, _ in terms[i]] for i in idx],
                                [[c for _, c in terms[i]] for i in idx], kind,
                                [scalings[i].view(-1) for i in idx] if scalings is not None else None)

    @staticmethod
    def _combine_reference(dst: torch.Tensor, src: Optional[torch.Tensor], decay: float,
                           terms: list[tuple[int, float]], kind: NoiseKind, scaling: Optional[torch.Tensor]) -> None:
        from . import philox
        n = dst.numel()
        acc = src.reshape(-1).float() * decay if src is not None else torch.zeros(n, device=dst.device)
        for seed, coeff in terms:
            z = philox.stream(kind, seed, n, device=dst.device)
            if scaling is not None:
                z = z * scaling.reshape(-1).float()
            acc = acc + coeff * z
        dst.view(-1).copy_(acc)

    def stochastic_round(self, x: torch.Tensor, dtype: torch.dtype, seed: int, start: int = 0) -> torch.Tensor:
        if x.dtype != torch.float32 or dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"stochastic rounding maps fp32 to bf16 or fp16, got {x.dtype} -> {dtype}")
        if self.triton is None:
            from . import philox
            return philox.stochastic_round(x, dtype, seed, start)
        flat = x.contiguous().view(-1)
        out = torch.empty(flat.numel(), dtype=dtype, device=x.device)
        return self.triton.stochastic_round(flat, out, seed, start).view(x.shape)

    def stochastic_round_many(self, jobs: list[tuple[torch.Tensor, torch.dtype, int, int]]) -> list[torch.Tensor]:
        if self.triton is None:
            return super().stochastic_round_many(jobs)
        for x, dtype, _, _ in jobs:
            if x.dtype != torch.float32 or dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(f"stochastic rounding maps fp32 to bf16 or fp16, got {x.dtype} -> {dtype}")
        flats = [x.contiguous().view(-1) for x, _, _, _ in jobs]
        outs = [torch.empty(f.numel(), dtype=dtype, device=f.device) for f, (_, dtype, _, _) in zip(flats, jobs)]
        self.triton.stochastic_round_many(flats, outs, [seed for _, _, seed, _ in jobs], [start for *_, start in jobs])
        return [out.view(x.shape) for out, (x, _, _, _) in zip(outs, jobs)]


def _logger():
    from deepspeed.utils import logger
    return logger


def build_noise(generator: str, device: torch.device) -> NoiseSource:
    """The noise source that ``zo2.noise_generator`` names ("auto": philox with Triton on an accelerator, else torch)."""
    from . import kernels
    device = torch.device(device)
    if generator == "torch":
        return TorchNoise(device)
    if generator == "philox":
        source = PhiloxNoise(device)
        if source.triton is None:
            _logger().warning(f"zo2.noise_generator=philox on {device} without Triton kernels "
                              f"({source.unavailable_reason}): z comes from the torch reference, many times slower")
        return source
    if generator != "auto":
        raise ValueError(f"unknown noise generator {generator!r}")
    if device.type == "cpu":
        return TorchNoise(device)
    reason = kernels.unavailable_reason(device)
    if reason is None:
        try:
            return PhiloxNoise(device, use_triton=True)
        except NoiseKernelError as error:  # the run goes on, slower, and says why
            reason = str(error)
    elif kernels.triton is None:
        reason += " (install Triton for fused noise kernels)"
    _logger().warning(f"zo2.noise_generator=auto on {device}: {reason}. Falling back to torch's generator: one "
                      f"launch per tensor, z materialised in fp32")
    return TorchNoise(device)


@functools.lru_cache(maxsize=1 << 16)
def parameter_seed(step_seed: int, direction: int, name: str) -> int:
    """Seed of direction ``direction``'s noise for the parameter called ``name`` at one step."""
    return derive_seed(step_seed, direction, name)


def step_seed(base_seed: int, global_step: int) -> int:
    """Seed of one training step: identical on every rank, stable across runs and Python versions."""
    return derive_seed("zo2-step", base_seed, global_step)

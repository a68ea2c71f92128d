"""Triton kernels for counter-based noise: z is computed in registers, never stored.

One launch covers a whole list of tensors (a block's parameters): a table of tiles names, for
every program, the tensor and the tile within it, and per-tensor tables hold the addresses,
sizes, seeds and coefficients. ``combine`` computes, per tensor t,

    dst_t = src_t · decay_t + Σ_j coeff_tj · D_t · z(seed_tj)        (fp32 inside, one rounding out)

which is a perturbed copy (θ' = θ + s·z), an in-place shift, the deferred SGD update
θ ← θ·(1 − lr·wd) − lr·Σ c_j·z_j, or (without src) z itself. ``stochastic_round`` writes fp32
values to bf16/fp16 with Philox uniforms. The streams are those of ``philox.py`` (the torch
reference the tests hold these kernels to, also under ``TRITON_INTERPRET=1`` on the CPU).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Optional, Sequence

import torch

from .philox import GAUSSIAN_LANES, RADEMACHER_LANES, TWO_PI, UNIFORM_SCALE
from .streams import DEVICE_WORK

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # the CPU wheel of torch does not bring Triton
    triton = None
    tl = None
    libdevice = None

TILE_ELEMENTS = 1024
"""Elements per program (a multiple of both lane counts)."""
ROUND_BLOCK = TILE_ELEMENTS
"""Elements per program of the rounding kernels (their tile tables are the combine kernel's)."""
MAX_TERMS = 8
"""Noise terms summed by one launch (the loop over them is unrolled at compile time)."""


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when these kernels can run on ``device``, else why not (for the log)."""
    if triton is None:
        return "Triton is not installed"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels run on the CPU only under TRITON_INTERPRET=1"
        return None
    if device.type != "cuda":
        return f"no Triton backend for device type {device.type!r}"
    return None


if triton is not None:
    # compiled kernels may read module globals only when they are constexpr
    _UNIFORM_SCALE = tl.constexpr(UNIFORM_SCALE)
    _TWO_PI = tl.constexpr(TWO_PI)

    @triton.jit
    def _cos_sin(v, FAST_TRIG: tl.constexpr):
        """cos and sin of 2π·v for v in [0, 1), from an angle reduced to [−π, π).

        cos(2πv) = −cos(2π(v − ½)) and likewise for sin; v − ½ is exact, so the reduced angle is as
        accurate as 2πv. FAST_TRIG: the GPU's approximate sin/cos (MUFU, absolute error below 2^-20.9
        on [−π, π], no slow path for huge angles); otherwise the precise functions (the interpreter
        has no device library).
        """
        angle = _TWO_PI * (v - 0.5)
        if FAST_TRIG:
            return -libdevice.fast_cosf(angle), -libdevice.fast_sinf(angle)
        return -tl.cos(angle), -tl.sin(angle)

    @triton.jit
    def _noise(seed, counter, lane, GAUSSIAN: tl.constexpr, FAST_TRIG: tl.constexpr):
        """z for the [rows, 1] int64 ``counter`` and the [1, lanes] ``lane`` (see philox.py).

        The log stays precise: a fast log loses its relative accuracy near u = 1, where r is small.
        """
        w0, w1, w2, w3 = tl.randint4x(seed, counter)
        if GAUSSIAN:
            u1 = ((w0 >> 8).to(tl.float32) + 1.0) * _UNIFORM_SCALE
            v1 = (w1 >> 8).to(tl.float32) * _UNIFORM_SCALE
            u2 = ((w2 >> 8).to(tl.float32) + 1.0) * _UNIFORM_SCALE
            v2 = (w3 >> 8).to(tl.float32) * _UNIFORM_SCALE
            r1 = tl.sqrt(-2.0 * tl.log(u1))
            r2 = tl.sqrt(-2.0 * tl.log(u2))
            c1, s1 = _cos_sin(v1, FAST_TRIG)
            c2, s2 = _cos_sin(v2, FAST_TRIG)
            z = tl.where(lane == 0, r1 * c1, tl.where(lane == 1, r1 * s1, tl.where(lane == 2, r2 * c2, r2 * s2)))
        else:
            word = tl.where(lane < 32, w0, tl.where(lane < 64, w1, tl.where(lane < 96, w2, w3)))
            bit = (word >> (lane & 31).to(tl.uint32)) & 1
            z = bit.to(tl.float32) * 2.0 - 1.0
        return z

    @triton.jit
    def _address(meta, index, example, ALIGNED: tl.constexpr):
        """The pointer stored at meta[index], typed like ``example``; ALIGNED: known 16-byte aligned."""
        pointer = tl.load(meta + index).to(example.dtype)
        if ALIGNED:
            pointer = tl.multiple_of(pointer, 16)
        return pointer

    @triton.jit
    def _load(pointers, mask, MASKED: tl.constexpr):
        if MASKED:
            return tl.load(pointers, mask=mask, other=0.0)
        return tl.load(pointers)

    @triton.jit
    def _combine_tile(meta, factors, n_tensors, t, start, numel, src_example, dst_example, scaling_example,
                      TERMS: tl.constexpr, HAS_SRC: tl.constexpr, HAS_SCALING: tl.constexpr,
                      GAUSSIAN: tl.constexpr, LANES: tl.constexpr, ROWS: tl.constexpr,
                      ALIGNED: tl.constexpr, MASKED: tl.constexpr, FAST_TRIG: tl.constexpr):
        row = tl.arange(0, ROWS).to(tl.int64)[:, None]
        lane = tl.arange(0, LANES)[None, :]
        offsets = start + row * LANES + lane
        mask = offsets < numel
        counter = start // LANES + row
        acc = tl.zeros([ROWS, LANES], dtype=tl.float32)
        if HAS_SRC:
            src = _address(meta, t, src_example, ALIGNED)
            acc = _load(src + offsets, mask, MASKED).to(tl.float32) * tl.load(factors + t)
        if HAS_SCALING:
            scaling = _address(meta, 2 * n_tensors + t, scaling_example, ALIGNED)
            d = _load(scaling + offsets, mask, MASKED).to(tl.float32)
        for j in tl.static_range(TERMS):
            seed = tl.load(meta + 4 * n_tensors + t * TERMS + j)
            coeff = tl.load(factors + n_tensors + t * TERMS + j)
            z = _noise(seed, counter, lane, GAUSSIAN, FAST_TRIG)
            if HAS_SCALING:
                z = z * d
            acc += coeff * z
        dst = _address(meta, n_tensors + t, dst_example, ALIGNED)
        if MASKED:
            tl.store(dst + offsets, acc.to(dst_example.dtype.element_ty), mask=mask)
        else:
            tl.store(dst + offsets, acc.to(dst_example.dtype.element_ty))

    @triton.jit
    def _combine_kernel(tiles, meta, factors, n_tensors,
                        src_example, dst_example, scaling_example,
                        TERMS: tl.constexpr, HAS_SRC: tl.constexpr, HAS_SCALING: tl.constexpr,
                        GAUSSIAN: tl.constexpr, LANES: tl.constexpr, ROWS: tl.constexpr, ALIGNED: tl.constexpr,
                        FAST_TRIG: tl.constexpr):
        """One tile of one tensor per program.

        ``tiles`` (int32): the tensor of each program, then its tile number. ``meta`` (int64), per
        tensor: src, dst and scaling addresses, sizes, then the seeds [tensor, term]. ``factors``
        (fp32): one decay per tensor, then the coefficients [tensor, term]. ALIGNED: every address is
        a multiple of 16 bytes. Full tiles run without a mask, so loads and stores can be vectorised
        and each thread holds whole Philox rows (one generator call per LANES-wide row, not per element).
        """
        pid = tl.program_id(0)
        t = tl.load(tiles + pid).to(tl.int64)
        tile = tl.load(tiles + tl.num_programs(0) + pid).to(tl.int64)
        numel = tl.load(meta + 3 * n_tensors + t)
        start = tile * (ROWS * LANES)
        if start + ROWS * LANES <= numel:
            _combine_tile(meta, factors, n_tensors, t, start, numel, src_example, dst_example,
                          scaling_example, TERMS, HAS_SRC, HAS_SCALING, GAUSSIAN, LANES, ROWS, ALIGNED, False,
                          FAST_TRIG)
        else:
            _combine_tile(meta, factors, n_tensors, t, start, numel, src_example, dst_example,
                          scaling_example, TERMS, HAS_SRC, HAS_SCALING, GAUSSIAN, LANES, ROWS, ALIGNED, True,
                          FAST_TRIG)

    @triton.jit
    def _round_values(x, u, TO_BF16: tl.constexpr):
        """fp32 ``x`` to bf16/fp16, away from zero where u·gap < remainder (see philox.stochastic_round)."""
        finite = tl.abs(x) < float("inf")
        safe = tl.where(finite, x, 0.0)
        if TO_BF16:
            low_bits = safe.to(tl.int32, bitcast=True) & -65536
            low = low_bits.to(tl.float32, bitcast=True)
            high = (low_bits + 65536).to(tl.float32, bitcast=True)
            gap = tl.abs(high) - tl.abs(low)
            out = tl.where(u * gap < tl.abs(safe) - tl.abs(low), high, low).to(tl.bfloat16)
            out = tl.where(finite, out, x.to(tl.bfloat16))
        else:
            nearest = safe.to(tl.float16)
            bits = nearest.to(tl.int16, bitcast=True)
            bits = tl.where(tl.abs(nearest.to(tl.float32)) > tl.abs(safe), bits - 1, bits)
            low = bits.to(tl.float16, bitcast=True)
            high = (bits + 1).to(tl.float16, bitcast=True)
            gap = tl.abs(high.to(tl.float32)) - tl.abs(low.to(tl.float32))
            out = tl.where(u * gap < tl.abs(safe) - tl.abs(low.to(tl.float32)), high, low)
            out = tl.where(finite, out, x.to(tl.float16))
        return out

    @triton.jit
    def _uniform(w0, w1, w2, w3, word):
        w = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
        return (w >> 8).to(tl.float32) * _UNIFORM_SCALE

    @triton.jit
    def _round_tile(src, dst, n, seed, start, tile, TO_BF16: tl.constexpr, ROWS: tl.constexpr,
                    START_ALIGNED: tl.constexpr, MASKED: tl.constexpr):
        """Elements tile·4·ROWS .. of one tensor: fp32 ``src`` stochastically rounded into ``dst``.

        MASKED False: the whole tile lies inside the tensor (loads and stores can be vectorised)."""
        row = tl.arange(0, ROWS).to(tl.int64)[:, None]
        word = tl.arange(0, 4)[None, :]
        local = tile * (ROWS * 4) + row * 4 + word
        mask = local < n
        x = _load(src + local, mask, MASKED)
        if START_ALIGNED:
            w0, w1, w2, w3 = tl.randint4x(seed, start // 4 + tile * ROWS + row)
            u = _uniform(w0, w1, w2, w3, word)
        else:
            index = start + local
            w0, w1, w2, w3 = tl.randint4x(seed, index // 4)
            u = _uniform(w0, w1, w2, w3, (index % 4).to(tl.int32))
        if MASKED:
            tl.store(dst + local, _round_values(x, u, TO_BF16), mask=mask)
        else:
            tl.store(dst + local, _round_values(x, u, TO_BF16))

    @triton.jit
    def _round_kernel(src, dst, n, seed, start, TO_BF16: tl.constexpr, ROWS: tl.constexpr,
                      START_ALIGNED: tl.constexpr):
        """fp32 -> bf16/fp16 with stochastic rounding; element i uses the uniform of index start + i.

        START_ALIGNED (start % 4 == 0): a row of 4 elements is one Philox call, held by one thread;
        otherwise every element finds its own counter and word (the same values, 4 calls per row).
        """
        _round_tile(src, dst, n, seed, start, tl.program_id(0).to(tl.int64), TO_BF16, ROWS, START_ALIGNED, True)

    @triton.jit
    def _round_many_kernel(tiles, meta, n_tensors, src_example, dst_example, TO_BF16: tl.constexpr,
                           ROWS: tl.constexpr, START_ALIGNED: tl.constexpr, ALIGNED: tl.constexpr):
        """``_round_kernel`` over a list of tensors in one launch (a block's write-back).

        ``tiles`` as in ``_combine_kernel``; ``meta`` (int64), per tensor: src and dst addresses, sizes,
        seeds, first indices.
        """
        pid = tl.program_id(0)
        t = tl.load(tiles + pid).to(tl.int64)
        tile = tl.load(tiles + tl.num_programs(0) + pid).to(tl.int64)
        src = _address(meta, t, src_example, ALIGNED)
        dst = _address(meta, n_tensors + t, dst_example, ALIGNED)
        n = tl.load(meta + 2 * n_tensors + t)
        seed = tl.load(meta + 3 * n_tensors + t)
        start = tl.load(meta + 4 * n_tensors + t)
        if (tile + 1) * (ROWS * 4) <= n:
            _round_tile(src, dst, n, seed, start, tile, TO_BF16, ROWS, START_ALIGNED, False)
        else:
            _round_tile(src, dst, n, seed, start, tile, TO_BF16, ROWS, START_ALIGNED, True)


def _lanes(kind: str) -> int:
    if kind == "gaussian":
        return GAUSSIAN_LANES
    if kind == "rademacher":
        return RADEMACHER_LANES
    raise ValueError(f"unknown noise kind {kind!r}")


class TritonNoiseKernels:
    """Host side of the kernels: builds the tables of a launch and keeps the tile tables per shape."""

    def __init__(self, device: torch.device) -> None:
        reason = unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(reason)
        self.device = device
        self.fast_trig = device.type == "cuda" and torch.version.hip is None
        """The GPU's approximate sin/cos for the Gaussian transform (NVIDIA only; the interpreter has none)."""
        self.launches = 0
        self.checked = False
        """Set once the start-up check (``PhiloxNoise._self_check``) has passed on these kernels."""
        """Kernel launches so far (the per-step report of benchmarks/gpu.py)."""
        self._tile_tables: dict[tuple[int, ...], torch.Tensor] = {}
        # The interpreter (CPU) keeps global launch state: launches from the worker and the main thread take turns.
        self._launch_lock = threading.Lock()

    def _tiles(self, numels: tuple[int, ...]) -> torch.Tensor:
        """[2, programs] int32: tensor index, tile number; built once per list of sizes.

        Made with a blocking copy: later launches on any stream may read it at once.
        """
        table = self._tile_tables.get(numels)
        if table is None:
            counts = torch.tensor([-(-n // TILE_ELEMENTS) for n in numels], dtype=torch.int64)
            owner = torch.repeat_interleave(torch.arange(len(numels)), counts)
            first = torch.cumsum(counts, 0) - counts
            number = torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)
            table = torch.cat([owner, number]).to(torch.int32).to(self.device)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
                DEVICE_WORK.host_waits += 1
            self._tile_tables[numels] = table
        return table

    def _upload(self, meta: list[int], factors: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """The launch's int64 and fp32 tables on the device, in one copy queued on the current stream.

        From page-locked memory: a copy from pageable memory may make the host wait until the stream
        has drained, which would stall the thread that queues the forwards (and, on the fetch stream,
        wait for the block's upload). PyTorch's caching host allocator keeps the pinned block until
        the copy has run.
        """
        meta_bytes = 8 * len(meta)
        host = torch.empty(meta_bytes + 4 * len(factors), dtype=torch.uint8)
        host[:meta_bytes].view(torch.int64).copy_(torch.tensor(meta, dtype=torch.int64))
        host[meta_bytes:].view(torch.float32).copy_(torch.tensor(factors, dtype=torch.float32))
        if self.device.type == "cuda":
            host = host.pin_memory()
        blob = host.to(self.device, non_blocking=True)
        return blob[:meta_bytes].view(torch.int64), blob[meta_bytes:].view(torch.float32)

    def combine(self, dsts: Sequence[torch.Tensor], srcs: Optional[Sequence[torch.Tensor]],
                decays: Sequence[float], seeds: Sequence[Sequence[int]], coeffs: Sequence[Sequence[float]],
                kind: str, scalings: Optional[Sequence[torch.Tensor]] = None) -> None:
        """dst_t = src_t·decay_t + Σ_j coeff_tj·D_t·z(seed_tj) for every t, in one launch.

        Every dst (and src, scaling) must be contiguous and of one dtype per list; dst may be src.
        """
        with self._on_device():  # the tables' copies and the launch go to this device's current stream
            self._combine(dsts, srcs, decays, seeds, coeffs, kind, scalings)

    def _combine(self, dsts: Sequence[torch.Tensor], srcs: Optional[Sequence[torch.Tensor]],
                 decays: Sequence[float], seeds: Sequence[Sequence[int]], coeffs: Sequence[Sequence[float]],
                 kind: str, scalings: Optional[Sequence[torch.Tensor]]) -> None:
        keep = [i for i, d in enumerate(dsts) if d.numel() > 0]
        if not keep:
            return
        dsts = [dsts[i] for i in keep]
        srcs = [srcs[i] for i in keep] if srcs is not None else None
        scalings = [scalings[i] for i in keep] if scalings is not None else None
        seeds = [list(seeds[i]) for i in keep]
        coeffs = [list(coeffs[i]) for i in keep]
        decays = [float(decays[i]) for i in keep]
        n_terms = len(seeds[0])
        if any(len(s) != n_terms for s in seeds) or any(len(c) != n_terms for c in coeffs):
            raise ValueError("every tensor of one launch needs the same number of noise terms")
        if n_terms > MAX_TERMS:  # the terms loop is unrolled: long sums run as several launches, in place
            self._combine(dsts, srcs, decays, [s[:MAX_TERMS] for s in seeds], [c[:MAX_TERMS] for c in coeffs],
                          kind, scalings)
            self._combine(dsts, dsts, [1.0] * len(dsts), [s[MAX_TERMS:] for s in seeds],
                          [c[MAX_TERMS:] for c in coeffs], kind, scalings)
            return
        for group in (dsts, srcs or [], scalings or []):
            if any(not t.is_contiguous() or t.device != self.device or t.dtype != group[0].dtype for t in group):
                raise ValueError("noise kernels need contiguous tensors of one dtype per role, on the device")
        numels = tuple(int(d.numel()) for d in dsts)
        if srcs is not None and any(int(s.numel()) != n for s, n in zip(srcs, numels)):
            raise ValueError("src and dst sizes differ")
        tiles = self._tiles(numels)
        zero = [0] * len(dsts)
        meta, factors = self._upload(([s.data_ptr() for s in srcs] if srcs is not None else zero)
                                     + [d.data_ptr() for d in dsts]
                                     + ([s.data_ptr() for s in scalings] if scalings is not None else zero)
                                     + list(numels) + [s for row in seeds for s in row],
                                     decays + [c for row in coeffs for c in row])
        programs = tiles.numel() // 2
        aligned = all(x.data_ptr() % 16 == 0 for group in (dsts, srcs or [], scalings or []) for x in group)
        with self._launch_lock:
            self._launch_combine(programs, tiles, meta, factors, dsts, srcs, scalings, n_terms, kind, aligned)
            self.launches += 1

    def _on_device(self) -> contextlib.AbstractContextManager:
        """Make this object's device current for a launch: Triton launches on the current device."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _launch_combine(self, programs: int, tiles: torch.Tensor, meta: torch.Tensor, factors: torch.Tensor,
                        dsts: Sequence[torch.Tensor], srcs: Optional[Sequence[torch.Tensor]],
                        scalings: Optional[Sequence[torch.Tensor]], n_terms: int, kind: str, aligned: bool) -> None:
        lanes = _lanes(kind)
        _combine_kernel[(programs,)](
            tiles, meta, factors, len(dsts),
            srcs[0] if srcs is not None else dsts[0], dsts[0], scalings[0] if scalings is not None else dsts[0],
            TERMS=n_terms, HAS_SRC=srcs is not None, HAS_SCALING=scalings is not None, GAUSSIAN=kind == "gaussian",
            LANES=lanes, ROWS=TILE_ELEMENTS // lanes, ALIGNED=aligned, FAST_TRIG=self.fast_trig)

    def stochastic_round(self, x: torch.Tensor, out: torch.Tensor, seed: int, start: int = 0) -> torch.Tensor:
        """``out`` (bf16/fp16, x's size) = x (contiguous fp32) stochastically rounded; element i uses index start + i."""
        n = x.numel()
        if n:
            grid = (triton.cdiv(n, ROUND_BLOCK),)
            with self._launch_lock, self._on_device():
                _round_kernel[grid](x, out, n, seed, start, TO_BF16=out.dtype == torch.bfloat16,
                                    ROWS=ROUND_BLOCK // 4, START_ALIGNED=start % 4 == 0)
            self.launches += 1
        return out


    def stochastic_round_many(self, xs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], seeds: Sequence[int],
                              starts: Sequence[int]) -> None:
        """``stochastic_round`` of every x into its out, one launch per (16-bit dtype, start % 4 == 0) group."""
        groups: dict[tuple[torch.dtype, bool], list[int]] = {}
        for i, (x, out) in enumerate(zip(xs, outs)):
            if x.numel():
                groups.setdefault((out.dtype, starts[i] % 4 == 0), []).append(i)
        with self._on_device():
            for (dtype, start_aligned), idx in groups.items():
                numels = tuple(int(xs[i].numel()) for i in idx)
                tiles = self._tiles(numels)
                meta, _ = self._upload([xs[i].data_ptr() for i in idx] + [outs[i].data_ptr() for i in idx]
                                       + list(numels) + [int(seeds[i]) for i in idx] + [int(starts[i]) for i in idx],
                                       [])
                aligned = all(xs[i].data_ptr() % 16 == 0 and outs[i].data_ptr() % 16 == 0 for i in idx)
                with self._launch_lock:
                    _round_many_kernel[(tiles.numel() // 2,)](
                        tiles, meta, len(idx), xs[idx[0]], outs[idx[0]], TO_BF16=dtype == torch.bfloat16,
                        ROWS=ROUND_BLOCK // 4, START_ALIGNED=start_aligned, ALIGNED=aligned)
                    self.launches += 1


@functools.lru_cache(maxsize=None)
def kernels_for(device: torch.device) -> TritonNoiseKernels:
    return TritonNoiseKernels(device)

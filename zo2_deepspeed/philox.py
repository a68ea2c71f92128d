"""Counter-based noise: z[i] is a pure function of (seed, i), computed wherever it is needed.

The stream is Philox-4x32-10 (Salmon et al., SC'11) keyed by the 64-bit seed (low word, high word)
with the counter (j, j >> 32, 0, 0); one call gives four 32-bit words:

* Gaussian: element i uses counter j = i // 4 and lane i % 4. Words (w0, w1) and (w2, w3) each give
  a Box-Muller pair from 24-bit uniforms u = ((w >> 8) + 1)·2^-24 (never 0, so the log is finite)
  and v = (w >> 8)·2^-24: lanes 0, 1 = r1·cos θ1, r1·sin θ1 and lanes 2, 3 = r2·cos θ2, r2·sin θ2.
* Rademacher: element i uses counter j = i // 128 and bit i % 128 of the 128 bits (w0 holds bits
  0..31, w1 bits 32..63, ...): +1 where the bit is set, −1 where it is clear.
* Stochastic rounding: element i uses counter i // 4 and the uniform (w >> 8)·2^-24 of word i % 4.

Because an element's value depends on nothing but (seed, i), z is the same however a tensor is
cut into launches, tiles or ZeRO shards, on every rank. This module is the reference: plain torch
integer arithmetic, exact on any device (16-bit limbs, so no product overflows int64). The Triton
kernels in ``kernels.py`` compute the same numbers in registers; the integer parts agree bit for
bit, the Gaussian transform to within a few ulps of the device's log/sin/cos.
"""
from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
ROUNDS = 10
MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
GAUSSIAN_LANES = 4
"""Gaussian elements per Philox call (two Box-Muller pairs)."""
RADEMACHER_LANES = 128
"""Rademacher elements per Philox call (one per bit)."""
UNIFORM_LANES = 4
"""Uniforms per Philox call (one per word)."""
UNIFORM_SCALE = 2.0 ** -24
TWO_PI = 2.0 * math.pi


def _mulhilo(multiplier: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``multiplier · c`` for c < 2^32, without int64 overflow."""
    high_half, low_half = multiplier >> 16, multiplier & 0xFFFF
    a = c * high_half  # < 2^48
    b = c * low_half   # < 2^48
    hi = (a + (b >> 16)) >> 16
    lo = (((a & 0xFFFF) << 16) + b) & MASK32
    return hi, lo


def philox4x32(key: tuple[int, int], c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
               c3: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 of the counter words (int64 tensors holding values < 2^32) under the 2-word key."""
    k0, k1 = key
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(MULTIPLIERS[0], c0)
        hi1, lo1 = _mulhilo(MULTIPLIERS[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + KEY_STEPS[0]) & MASK32, (k1 + KEY_STEPS[1]) & MASK32
    return c0, c1, c2, c3


def philox_words(seed: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four 32-bit words (as int64 in [0, 2^32)) for each int64 counter j: key = seed, counter = (j, j >> 32, 0, 0)."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    counters = counters.to(torch.int64)
    zeros = torch.zeros_like(counters)
    return philox4x32((seed & MASK32, (seed >> 32) & MASK32), counters & MASK32, (counters >> 32) & MASK32, zeros,
                      zeros)


def _box_muller(w_radius: torch.Tensor, w_angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u = ((w_radius >> 8).to(torch.float32) + 1.0) * UNIFORM_SCALE
    v = (w_angle >> 8).to(torch.float32) * UNIFORM_SCALE
    r = torch.sqrt(-2.0 * torch.log(u))
    theta = TWO_PI * v
    return r * torch.cos(theta), r * torch.sin(theta)


def _counters(start: int, numel: int, lanes: int, device: torch.device | str) -> torch.Tensor:
    """The Philox counters whose ``lanes`` values each cover elements ``start .. start + numel − 1``."""
    first = start // lanes
    last = (start + numel - 1) // lanes if numel else first - 1
    return torch.arange(first, last + 1, dtype=torch.int64, device=device)


def _window(values: torch.Tensor, start: int, numel: int, lanes: int) -> torch.Tensor:
    """Elements ``start ..`` of the flattened values of the counters from ``_counters`` (``lanes`` per counter)."""
    offset = start - (start // lanes) * lanes
    return values.reshape(-1)[offset:offset + numel]


def gaussian(seed: int, numel: int, start: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements ``start .. start + numel − 1`` of the Gaussian stream of ``seed`` (fp32)."""
    w0, w1, w2, w3 = philox_words(seed, _counters(start, numel, GAUSSIAN_LANES, device))
    n0, n1 = _box_muller(w0, w1)
    n2, n3 = _box_muller(w2, w3)
    return _window(torch.stack([n0, n1, n2, n3], dim=1), start, numel, GAUSSIAN_LANES)


def rademacher(seed: int, numel: int, start: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements ``start .. start + numel − 1`` of the ±1 stream of ``seed`` (fp32)."""
    words = torch.stack(philox_words(seed, _counters(start, numel, RADEMACHER_LANES, device)), dim=1)  # [calls, 4]
    bits = (words.unsqueeze(-1) >> torch.arange(32, device=device)) & 1    # [calls, 4, 32]
    return _window(bits.to(torch.float32) * 2.0 - 1.0, start, numel, RADEMACHER_LANES)


def uniform(seed: int, numel: int, start: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """24-bit uniforms in [0, 1) for elements ``start ..`` (the stochastic-rounding stream)."""
    words = torch.stack(philox_words(seed, _counters(start, numel, UNIFORM_LANES, device)), dim=1)
    return (_window(words, start, numel, UNIFORM_LANES) >> 8).to(torch.float32) * UNIFORM_SCALE


def stream(kind: str, seed: int, numel: int, start: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``kind`` ("gaussian" or "rademacher") stream of ``seed``, elements ``start ..``."""
    if kind == "gaussian":
        return gaussian(seed, numel, start, device)
    if kind == "rademacher":
        return rademacher(seed, numel, start, device)
    raise ValueError(f"unknown noise kind {kind!r}")


def _toward_zero(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded toward zero to ``dtype`` (finite inputs; overflow saturates at the largest finite)."""
    if dtype == torch.bfloat16:  # bf16 is the top half of fp32: clearing the low half truncates
        return (x.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    nearest = x.to(dtype)
    overshot = nearest.float().abs() > x.abs()
    bits = nearest.view(torch.int16)
    return torch.where(overshot, bits - 1, bits).view(dtype)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int, start: int = 0) -> torch.Tensor:
    """fp32 ``x`` rounded to bf16/fp16, up (away from zero) with probability equal to the remainder's share.

    With t the value toward zero and t' the next one away from zero, t' is taken when u·(|t'| − |t|)
    < |x| − |t| for the stream's uniform u: every operand is exact in fp32, so this decision is the
    same bit for bit wherever it is computed. Values already representable stay unchanged; NaN and
    ±inf are converted as by ``Tensor.to``. Element i of ``x`` uses the uniform of index start + i,
    so a shard rounds exactly as the same elements of the whole tensor would.
    """
    if x.dtype != torch.float32 or dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"stochastic rounding maps fp32 to bf16 or fp16, got {x.dtype} -> {dtype}")
    flat = x.contiguous().view(-1)
    finite = torch.isfinite(flat)
    safe = torch.where(finite, flat, torch.zeros_like(flat))
    low = _toward_zero(safe, dtype)
    int_type = torch.int16
    high = (low.view(int_type) + 1).view(dtype)
    gap = high.float().abs() - low.float().abs()
    remainder = safe.abs() - low.float().abs()
    u = uniform(seed, flat.numel(), start, flat.device)
    rounded = torch.where(u * gap < remainder, high, low)
    return torch.where(finite, rounded, flat.to(dtype)).view(x.shape)

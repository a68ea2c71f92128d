"""Writing fp32 working values into 16-bit storage without losing small updates on average.

Round-to-nearest drops any change smaller than half an ulp of the stored value, which is exactly
the size of a typical ZO step. Stochastic rounding picks the upper or lower neighbour with
probability proportional to proximity, so the stored value is unbiased: E[round(x)] = x. Seeds come
from (step, parameter name), so runs are reproducible.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

_BF16_LOW_BITS = (1 << 16) - 1


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``x`` (fp32) rounded stochastically to ``dtype`` (bf16 or fp16)."""
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic rounding expects fp32 input, got {x.dtype}")
    gen = _generator(x.device, seed)
    if dtype == torch.bfloat16:
        # bf16 is the top half of fp32: add a uniform 16-bit value to the bits, then truncate.
        noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=gen)
        bits = x.contiguous().view(torch.int32)
        rounded = ((bits + noise) & ~_BF16_LOW_BITS).view(torch.float32)
        rounded = torch.where(torch.isfinite(x) & torch.isfinite(rounded), rounded, x)
        return rounded.to(torch.bfloat16)
    if dtype == torch.float16:
        nearest = x.to(torch.float16)
        towards = torch.where(nearest.float() < x, torch.full_like(nearest, float("inf")),
                              torch.full_like(nearest, float("-inf")))
        other = torch.nextafter(nearest, towards)
        gap = (other.float() - nearest.float()).abs()
        p_other = torch.where(gap > 0, (x - nearest.float()).abs() / gap, torch.zeros_like(x))
        take_other = torch.rand(x.shape, device=x.device, generator=gen) < p_other
        return torch.where(take_other & torch.isfinite(other), other, nearest)
    raise ValueError(f"stochastic rounding targets bf16 or fp16, got {dtype}")


def to_storage(x: torch.Tensor, dtype: torch.dtype, stochastic: bool, seed: int,
               round_fn: Optional[Callable[[torch.Tensor, torch.dtype, int, int], torch.Tensor]] = None,
               start: int = 0) -> torch.Tensor:
    """Convert working values to the storage dtype (a no-op view when they already match).

    ``round_fn(x, dtype, seed, start)`` replaces ``stochastic_round`` (a noise source's own rounding,
    e.g. a device kernel); ``start`` is the index of x's first value in the whole tensor.
    """
    if x.dtype == dtype:
        return x
    if stochastic and x.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16):
        return round_fn(x, dtype, seed, start) if round_fn is not None else stochastic_round(x, dtype, seed)
    return x.to(dtype)

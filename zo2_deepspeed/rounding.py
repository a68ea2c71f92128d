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


BF16_CHUNK = 1 << 22
"""Elements rounded to bf16 at a time on the CPU: the temporaries stay some 40 MiB whatever the
tensor's size. An accelerator rounds a tensor in one go (a chunk loop would cost launches and host syncs)."""


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``x`` (fp32) rounded stochastically to ``dtype`` (bf16 or fp16)."""
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic rounding expects fp32 input, got {x.dtype}")
    gen = _generator(x.device, seed)
    if dtype == torch.bfloat16:
        return _stochastic_round_bf16(x, gen)
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


def _stochastic_round_bf16(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """bf16 is the top half of fp32: add a uniform 16-bit value to the bits, then truncate.

    On the CPU chunk by chunk from one generator, which draws the same values as one call over the whole
    tensor; a non-finite input (or a value rounded up to infinity) keeps the nearest rounding of its fp32 value.
    """
    flat = x.contiguous().view(-1)
    on_cpu = x.device.type == "cpu"
    chunk = BF16_CHUNK if on_cpu else max(1, flat.numel())
    out = torch.empty(flat.shape, dtype=torch.bfloat16, device=x.device)
    noise = torch.empty(min(chunk, flat.numel()), dtype=torch.int32, device=x.device)
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk]
        draws = noise[:part.numel()]
        torch.randint(0, 1 << 16, draws.shape, dtype=torch.int32, device=x.device, generator=gen, out=draws)
        rounded = (part.view(torch.int32) + draws).bitwise_and_(~_BF16_LOW_BITS).view(torch.float32)
        target = out[start:start + part.numel()]
        target.copy_(rounded)
        # a sum is finite only if every element is (a rare overflow just takes the exact path)
        if not on_cpu or not (torch.isfinite(part.sum()) and torch.isfinite(target.sum())):
            target.copy_(torch.where(torch.isfinite(part) & torch.isfinite(rounded), rounded, part))
    return out.view(x.shape)


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

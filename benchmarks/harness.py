"""What the benchmarks share: random models and batches, engine configs, the plain loops a user would
otherwise write, and one interleaved timing loop that measures variants side by side.

Every timed step is bracketed by a device synchronisation, so on a GPU the time is the step's own
(queued kernels included), and the variants take turns step by step: a noisy machine slows them
alike, and only ratios within one run are reported.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch

import zo2_deepspeed

EPS, LR = 1e-3, 1e-7


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lm_batch(vocab: int, rows: int, seq: int, device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """Random token ids as input and labels (the LM loss over every position)."""
    ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def zo2_config(tier: str, rows: int, method: str = "mezo", lr: float = LR, eps: float = EPS, n: int = 8,
               prefetch: int = 1, storage: str = "fp32", compute: Optional[str] = None, nvme_path: str = "",
               pin_memory: bool = False, **zo2: Any) -> dict:
    """A DeepSpeed config with a zo2 section; tier: resident (stage 0), cpu or nvme (stage 3 offload)."""
    offload: dict[str, Any] = {"cpu": {"device": "cpu"}, "nvme": {"device": "nvme", "nvme_path": nvme_path}}.get(tier, {})
    if offload and pin_memory:
        offload["pin_memory"] = True
    zero = {"stage": 3, "offload_param": offload} if offload else {"stage": 0}
    section = {"method": method, "eps": eps, "num_perturbations": n, "prefetch_blocks": prefetch,
               "storage_dtype": storage, **zo2}
    if compute is not None:
        section["compute_dtype"] = compute
    return {"train_micro_batch_size_per_gpu": rows, "steps_per_print": 10**9, "zero_optimization": zero,
            "optimizer": {"type": "SGD", "params": {"lr": lr}}, "zo2": section,
            "wall_clock_breakdown": True}  # phase times on device streams (events; off by default)


def llama(layers: int = 30, hidden: int = 576, inter: int = 1536, heads: int = 9, kv: int = 3, vocab: int = 49152,
          tied: bool = True, seed: int = 0, positions: int = 2048, rope_theta: float = 100000.0) -> torch.nn.Module:
    """A random LLaMA; the defaults are SmolLM2-135M's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=kv, max_position_embeddings=positions,
                                        tie_word_embeddings=tied, rope_theta=rope_theta)).eval()


def engine_step(engine: Any, batch: dict) -> float:
    """Seconds of one training step of an engine (forward, backward, step), device work included."""
    synchronize(engine.device)
    start = time.perf_counter()
    loss = engine(**batch)
    engine.backward(loss)
    engine.step()
    synchronize(engine.device)
    return time.perf_counter() - start


class Variant(Protocol):
    name: str
    phase: dict[str, float]

    def step(self, batch: dict, seed: int) -> None:
        """One training step on ``batch`` (``seed``: the step's noise seed, for the plain loops)."""


def _lm_loss(model: torch.nn.Module, batch: dict) -> float:
    with torch.no_grad():
        return float(model(**batch, use_cache=False).loss)


class PlainMeZO:
    """MeZO's reference loop: in-place perturbations, z regenerated from the step seed each time (4 times a step)."""

    name = "plain MeZO"

    def __init__(self, model: torch.nn.Module, lr: float = LR, eps: float = EPS) -> None:
        self.model, self.lr, self.eps = model, lr, eps
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.phase = {"forward": 0.0, "noise+update": 0.0}

    def _add_noise(self, seed: int, scale: float) -> None:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.shape, dtype=p.dtype, device=p.device, generator=gen)
            p.data.add_(z, alpha=scale)

    def step(self, batch: dict, seed: int) -> None:
        sync = lambda: synchronize(self.device)  # noqa: E731
        t0 = time.perf_counter()
        self._add_noise(seed, self.eps)
        sync()
        t1 = time.perf_counter()
        plus = _lm_loss(self.model, batch)
        t2 = time.perf_counter()
        self._add_noise(seed, -2 * self.eps)
        sync()
        t3 = time.perf_counter()
        minus = _lm_loss(self.model, batch)
        t4 = time.perf_counter()
        self._add_noise(seed, self.eps)
        self._add_noise(seed, -self.lr * (plus - minus) / (2 * self.eps))
        sync()
        t5 = time.perf_counter()
        self.phase["forward"] += (t2 - t1) + (t4 - t3)
        self.phase["noise+update"] += (t1 - t0) + (t3 - t2) + (t5 - t4)


class PlainFZOO:
    """The FZOO loop written plainly: N+1 forwards, Rademacher signs regenerated to restore and to update."""

    name = "plain FZOO"

    def __init__(self, model: torch.nn.Module, n: int, lr: float = LR, eps: float = EPS) -> None:
        self.model, self.n, self.lr, self.eps = model, n, lr, eps
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.phase = {"forward": 0.0, "noise+update": 0.0}

    def _shift(self, seed: int, scale: float) -> None:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for p in self.params:
            u = torch.empty_like(p).bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
            p.data.add_(u, alpha=scale)

    def _timed_loss(self, batch: dict) -> tuple[float, float]:
        synchronize(self.device)
        start = time.perf_counter()
        loss = _lm_loss(self.model, batch)
        return loss, time.perf_counter() - start

    def step(self, batch: dict, seed: int) -> None:
        t0 = time.perf_counter()
        base, forward = self._timed_loss(batch)
        losses = []
        for i in range(self.n):
            self._shift(seed * 1000 + i, self.eps)
            loss, seconds = self._timed_loss(batch)
            losses.append(loss)
            forward += seconds
            self._shift(seed * 1000 + i, -self.eps)
        sigma = statistics.pstdev(losses) or 1.0
        for i, loss in enumerate(losses):
            self._shift(seed * 1000 + i, -self.lr * (loss - base) / (self.n * sigma))
        synchronize(self.device)
        self.phase["forward"] += forward
        self.phase["noise+update"] += time.perf_counter() - t0 - forward


@dataclass
class EngineVariant:
    """The ZO2 engine as one variant; keeps per-step records and the summed phase times."""

    name: str
    engine: Any
    phase: dict[str, float] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    @classmethod
    def build(cls, name: str, model: torch.nn.Module, config: dict) -> "EngineVariant":
        engine, *_ = zo2_deepspeed.initialize(model=model, config=config)
        return cls(name, engine)

    @property
    def trainable(self) -> int:
        return sum(s.numel for s in self.engine.pipeline.slots if s.trainable)

    def step(self, batch: dict, seed: int) -> None:
        loss = self.engine(**batch)
        self.engine.backward(loss)
        self.engine.step()
        self.records.append(self.engine.last_step)
        for k, v in self.engine.last_step["phase_s"].items():
            self.phase[k] = self.phase.get(k, 0.0) + v

    def settle(self) -> None:
        """Fold phases still running on device streams into the totals (call after the timed steps)."""
        before = vars(self.engine.pipeline.times.snapshot())
        after = vars(self.engine.pipeline.settle_times(wait=True))
        for k in after:
            self.phase[k] = self.phase.get(k, 0.0) + after[k] - before[k]

    def close(self) -> None:
        self.engine.close()


def measure(variants: list, batch: dict, repeats: int, warmup: int, device: torch.device = torch.device("cpu"),
            before_step: Any = None, after_step: Any = None) -> dict[str, list[float]]:
    """Seconds per step of each variant: ``warmup`` untimed steps each, then ``repeats`` rounds in turn.

    ``before_step(variant)`` and ``after_step(variant)``, if given, run just outside each timed step
    (memory probes).
    """
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for v in variants:
        for w in range(warmup):
            v.step(batch, 10_000 + w)
        synchronize(device)
        v.phase = {k: 0.0 for k in v.phase}
        if isinstance(v, EngineVariant):
            v.engine.pipeline.settle_times(wait=True)
            v.phase = {}
            v.records.clear()
    for r in range(repeats):
        for v in variants:
            if before_step is not None:
                before_step(v)
            synchronize(device)
            start = time.perf_counter()
            v.step(batch, r)
            synchronize(device)
            times[v.name].append(time.perf_counter() - start)
            if after_step is not None:
                after_step(v)
    for v in variants:
        if isinstance(v, EngineVariant):
            v.settle()
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)

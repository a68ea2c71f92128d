"""Step time of ZO2 against the plain loops users would otherwise write, on the same model and batch.

    python benchmarks/step_time.py                 # SmolLM2-135M shape (random) and the real SmolLM2-135M
    python benchmarks/step_time.py --models shape --repeats 5

Variants, measured round-robin in one run (the machine is noisy: only ratios within a run count):
  plain MeZO   two full forwards; z regenerated for +εz, −2εz, +εz and the update (MeZO's reference loop)
  zo2 resident the engine without ZeRO-3 (parameters on the device)
  zo2 cpu      the engine with ZeRO-3 partitions in CPU memory (offload_param cpu), streamed per block
               (also with prefetch_blocks 1: a background worker fetching and updating the next block)
  plain FZOO   N+1 full forwards; Rademacher u_i from bernoulli_, regenerated to restore and to update
  zo2 FZOO     the engine, method fzoo, resident
Writes the "step_time" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import zo2_deepspeed  # noqa: E402
from results import table, write_section  # noqa: E402

EPS, LR = 1e-3, 1e-7


def smollm2_shape_model(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=100000.0)
    return LlamaForCausalLM(config).eval()


def real_smollm2() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from zo2_deepspeed.assets import smollm2_model_dir
    return AutoModelForCausalLM.from_pretrained(smollm2_model_dir(), dtype=torch.float32).eval()


def lm_loss(model: torch.nn.Module, batch: dict) -> float:
    with torch.no_grad():
        return float(model(**batch, use_cache=False).loss)


class PlainMeZO:
    """MeZO's reference loop: in-place perturbations, z regenerated from the step seed each time."""

    name = "plain MeZO"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.phase = {"forward": 0.0, "noise+update": 0.0}

    def _perturb(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.shape, dtype=p.dtype)
            p.data.add_(z, alpha=scale * EPS)

    def step(self, batch: dict, seed: int) -> None:
        t0 = time.perf_counter()
        self._perturb(seed, 1.0)
        t1 = time.perf_counter()
        plus = lm_loss(self.model, batch)
        t2 = time.perf_counter()
        self._perturb(seed, -2.0)
        t3 = time.perf_counter()
        minus = lm_loss(self.model, batch)
        t4 = time.perf_counter()
        self._perturb(seed, 1.0)
        g = (plus - minus) / (2 * EPS)
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.shape, dtype=p.dtype)
            p.data.add_(z, alpha=-LR * g)
        t5 = time.perf_counter()
        self.phase["forward"] += (t2 - t1) + (t4 - t3)
        self.phase["noise+update"] += (t1 - t0) + (t3 - t2) + (t5 - t4)


class PlainFZOO:
    """The FZOO loop written plainly: N+1 forwards, bernoulli_ signs regenerated to restore and update."""

    name = "plain FZOO"

    def __init__(self, model: torch.nn.Module, n: int) -> None:
        self.model, self.n = model, n
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.phase = {"forward": 0.0, "noise+update": 0.0}

    def _shift(self, seed: int, scale: float) -> None:
        gen = torch.Generator().manual_seed(seed)
        for p in self.params:
            u = torch.empty_like(p).bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
            p.data.add_(u, alpha=scale)

    def step(self, batch: dict, seed: int) -> None:
        forward = 0.0
        t0 = time.perf_counter()
        s = time.perf_counter()
        base = lm_loss(self.model, batch)
        forward += time.perf_counter() - s
        losses = []
        for i in range(self.n):
            self._shift(seed * 1000 + i, EPS)
            s = time.perf_counter()
            losses.append(lm_loss(self.model, batch))
            forward += time.perf_counter() - s
            self._shift(seed * 1000 + i, -EPS)
        sigma = statistics.pstdev(losses) or 1.0
        for i, loss in enumerate(losses):
            self._shift(seed * 1000 + i, -LR * (loss - base) / (self.n * sigma))
        self.phase["forward"] += forward
        self.phase["noise+update"] += time.perf_counter() - t0 - forward


class ZO2:
    def __init__(self, name: str, model: torch.nn.Module, tier: str, method: str, n: int, rows: int,
                 prefetch: int = 1) -> None:
        self.name = name
        zero = {"resident": {"stage": 0}, "cpu": {"stage": 3, "offload_param": {"device": "cpu"}}}[tier]
        config = {"train_micro_batch_size_per_gpu": rows, "steps_per_print": 10**9, "zero_optimization": zero,
                  "optimizer": {"type": "SGD", "params": {"lr": LR}},
                  "zo2": {"method": method, "eps": EPS, "num_perturbations": n, "prefetch_blocks": prefetch}}
        self.engine, *_ = zo2_deepspeed.initialize(model=model, config=config)
        self.trainable = sum(s.numel for s in self.engine.pipeline.slots if s.trainable)
        self.phase: dict[str, float] = {}
        self.noise_ratio = 0.0
        self.moved_ratio = 0.0

    def step(self, batch: dict, seed: int) -> None:
        loss = self.engine(**batch)
        self.engine.backward(loss)
        self.engine.step()
        last = self.engine.last_step
        for k, v in last["phase_s"].items():
            self.phase[k] = self.phase.get(k, 0.0) + v
        self.noise_ratio = last["noise_elements"] / self.trainable
        self.moved_ratio = (last["bytes_read"] + last["bytes_written"]) / (4 * self.trainable)


def measure(variants: list, batch: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for v in variants:
        for w in range(warmup):
            v.step(batch, 10_000 + w)
        v.phase = {k: 0.0 for k in v.phase}
    for r in range(repeats):
        for v in variants:
            start = time.perf_counter()
            v.step(batch, r)
            times[v.name].append(time.perf_counter() - start)
    return times


def run_model(label: str, build: Callable[[], torch.nn.Module], args: argparse.Namespace) -> tuple[list, list]:
    base = build()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.rows, args.seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    pf = args.prefetch
    mezo = [PlainMeZO(copy.deepcopy(base)),
            ZO2("zo2 resident", copy.deepcopy(base), "resident", "mezo", args.n, args.rows, pf),
            ZO2("zo2 cpu", copy.deepcopy(base), "cpu", "mezo", args.n, args.rows, pf),
            ZO2("zo2 cpu, prefetch 1", copy.deepcopy(base), "cpu", "mezo", args.n, args.rows, 1)]
    fzoo = [PlainFZOO(copy.deepcopy(base), args.n),
            ZO2("zo2 FZOO", copy.deepcopy(base), "resident", "fzoo", args.n, args.rows, pf)] if args.fzoo else []
    del base
    times = measure(mezo, batch, args.repeats, args.warmup)
    if fzoo:
        times.update(measure(fzoo, batch, max(2, args.repeats // 2), 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [[label, "zo2 resident / plain MeZO", f"{med['zo2 resident'] / med['plain MeZO']:.3f}", "≤ 0.85"],
              [label, "zo2 cpu / plain MeZO", f"{med['zo2 cpu'] / med['plain MeZO']:.3f}", "≤ 0.90"],
              [label, "zo2 cpu / zo2 resident", f"{med['zo2 cpu'] / med['zo2 resident']:.3f}", "≤ 1.10"],
              [label, "zo2 cpu with prefetch_blocks 1 / plain MeZO",
               f"{med['zo2 cpu, prefetch 1'] / med['plain MeZO']:.3f}", "(background worker on this machine)"],
              [label, "noise elements / trainable (MeZO)", f"{mezo[1].noise_ratio:.2f}", "≤ 2"],
              [label, "bytes moved / parameter bytes (cpu, fp32)", f"{mezo[2].moved_ratio:.2f}", "≤ 2.0"]]
    if fzoo:
        ratios.append([label, "zo2 FZOO / plain FZOO (N=%d)" % args.n,
                       f"{med['zo2 FZOO'] / med['plain FZOO']:.3f}", "≤ 0.80"])
    rows = []
    for v in mezo + fzoo:
        runs = len(times[v.name])
        phases = ", ".join(f"{k} {t / runs:.2f}" for k, t in v.phase.items() if t / runs >= 0.005)
        rows.append([label, v.name, f"{med[v.name]:.2f}", f"{min(times[v.name]):.2f}", phases])
    for v in mezo + fzoo:
        if isinstance(v, ZO2):
            v.engine.close()
    return ratios, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="shape,real", help="comma list of: shape (random SmolLM2-135M "
                                                              "shape), real (SmolLM2-135M-Instruct)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--n", type=int, default=8, help="FZOO directions")
    parser.add_argument("--no_fzoo", dest="fzoo", action="store_false")
    parser.add_argument("--prefetch", type=int, default=0, help="zo2.prefetch_blocks of the zo2 variants (a "
                        "variant with 1 is always added): on a CPU with few cores the background worker competes "
                        "with compute")
    args = parser.parse_args()
    builders = {"shape": ("SmolLM2-135M shape (random)", smollm2_shape_model),
                "real": ("SmolLM2-135M-Instruct", real_smollm2)}
    all_ratios, all_rows = [], []
    for key in args.models.split(","):
        label, build = builders[key]
        try:
            ratios, rows = run_model(label, build, args)
        except FileNotFoundError as e:  # the real model's package is not installed
            print(f"skipping {label}: {e}", file=sys.stderr)
            continue
        all_ratios += ratios
        all_rows += rows
        print(table(["model", "ratio", "measured", "target"], ratios), flush=True)
    body = (f"Batch {args.rows} × {args.seq} tokens, LM loss, fp32, {args.repeats} interleaved repeats (median), "
            f"zo2 variants with prefetch_blocks {args.prefetch} unless named.\n\n"
            + table(["model", "ratio", "measured", "target"], all_ratios) + "\n\nPer variant (seconds per step; "
            "phases are per-step means, zo2 phases from the pipeline's own clocks — the prefetch worker's phases "
            "overlap with compute):\n\n"
            + table(["model", "variant", "median s", "min s", "phases (s)"], all_rows))
    write_section("step_time", body)
    print(body)


if __name__ == "__main__":
    main()

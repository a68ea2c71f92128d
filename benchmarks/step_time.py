"""Step time of ZO2 against the plain loops users would otherwise write, on the same model and batch.

    python benchmarks/step_time.py                 # SmolLM2-135M shape (random) and the real SmolLM2-135M
    python benchmarks/step_time.py --models shape --repeats 5

Variants, measured round-robin in one run (the machine is noisy: only ratios within a run count):
  plain MeZO   two full forwards; z regenerated for +εz, −2εz, +εz and the update (MeZO's reference loop)
  zo2 resident the engine without ZeRO-3 (parameters on the device)
  zo2 cpu      the engine with ZeRO-3 partitions in CPU memory (offload_param cpu), streamed per block
               (also with prefetch_blocks 1: a background worker fetching and updating the next block)
  zo2 LOZO cpu the cpu variant with method lozo (rank-2 U·Vᵀ per matrix: noise r(m+n) numbers, one GEMM)
  plain FZOO   N+1 full forwards; Rademacher u_i from bernoulli_, regenerated to restore and to update
  zo2 FZOO     the engine, method fzoo, resident
Writes the "step_time" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import EngineVariant, PlainFZOO, PlainMeZO, lm_batch, llama, measure, median, zo2_config  # noqa: E402
from results import table, write_section  # noqa: E402


def smollm2_shape_model(seed: int = 0) -> torch.nn.Module:
    return llama(seed=seed)


def real_smollm2() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from zo2_deepspeed.assets import smollm2_model_dir
    return AutoModelForCausalLM.from_pretrained(smollm2_model_dir(), dtype=torch.float32).eval()


def zo2(name: str, model: torch.nn.Module, tier: str, method: str, n: int, rows: int, prefetch: int = 1
        ) -> EngineVariant:
    return EngineVariant.build(name, model, zo2_config(tier, rows, method=method, n=n, prefetch=prefetch))


def noise_ratio(v: EngineVariant) -> float:
    return v.records[-1]["noise_elements"] / v.trainable


def moved_ratio(v: EngineVariant) -> float:
    last = v.records[-1]
    return (last["bytes_read"] + last["bytes_written"]) / (4 * v.trainable)


def run_model(label: str, build: Callable[[], torch.nn.Module], args: argparse.Namespace) -> tuple[list, list]:
    base = build()
    batch = lm_batch(base.config.vocab_size, args.rows, args.seq)
    pf = args.prefetch
    mezo = [PlainMeZO(copy.deepcopy(base)),
            zo2("zo2 resident", copy.deepcopy(base), "resident", "mezo", args.n, args.rows, pf),
            zo2("zo2 cpu", copy.deepcopy(base), "cpu", "mezo", args.n, args.rows, pf),
            zo2("zo2 cpu, prefetch 1", copy.deepcopy(base), "cpu", "mezo", args.n, args.rows, 1),
            zo2("zo2 LOZO cpu", copy.deepcopy(base), "cpu", "lozo", args.n, args.rows, pf)]
    fzoo = [PlainFZOO(copy.deepcopy(base), args.n),
            zo2("zo2 FZOO", copy.deepcopy(base), "resident", "fzoo", args.n, args.rows, pf)] if args.fzoo else []
    del base
    times = measure(mezo, batch, args.repeats, args.warmup)
    if fzoo:
        times.update(measure(fzoo, batch, max(2, args.repeats // 2), 1))
    med = {k: median(v) for k, v in times.items()}
    ratios = [[label, "zo2 resident / plain MeZO", f"{med['zo2 resident'] / med['plain MeZO']:.3f}", "≤ 0.85"],
              [label, "zo2 cpu / plain MeZO", f"{med['zo2 cpu'] / med['plain MeZO']:.3f}", "≤ 0.90"],
              [label, "zo2 cpu / zo2 resident", f"{med['zo2 cpu'] / med['zo2 resident']:.3f}", "≤ 1.10"],
              [label, "zo2 cpu with prefetch_blocks 1 / plain MeZO",
               f"{med['zo2 cpu, prefetch 1'] / med['plain MeZO']:.3f}", "(background worker on this machine)"],
              [label, "zo2 LOZO cpu / zo2 cpu (MeZO)", f"{med['zo2 LOZO cpu'] / med['zo2 cpu']:.3f}", "≤ 1.00"],
              [label, "noise elements / trainable (MeZO)", f"{noise_ratio(mezo[1]):.2f}", "≤ 2"],
              [label, "bytes moved / parameter bytes (cpu, fp32)", f"{moved_ratio(mezo[2]):.2f}", "≤ 2.0"]]
    if fzoo:
        ratios.append([label, "zo2 FZOO / plain FZOO (N=%d)" % args.n,
                       f"{med['zo2 FZOO'] / med['plain FZOO']:.3f}", "≤ 0.80"])
    rows = []
    for v in mezo + fzoo:
        runs = len(times[v.name])
        phases = ", ".join(f"{k} {t / runs:.2f}" for k, t in v.phase.items() if t / runs >= 0.005)
        rows.append([label, v.name, f"{med[v.name]:.2f}", f"{min(times[v.name]):.2f}", phases])
    for v in mezo + fzoo:
        if isinstance(v, EngineVariant):
            v.close()
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

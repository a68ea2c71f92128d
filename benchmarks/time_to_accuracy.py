"""Time to accuracy: ZO methods and first-order ZeRO-3 AdamW on equal wall-clock budgets, interleaved.

    python benchmarks/convergence.py --wall_budget 1800           # SmolLM2-135M-Instruct, tweet sentiment

Called from convergence.py (same model, task, batches and evaluation). The machine is shared and its
load changes by the minute, so the variants do not run one after the other: they take turns in
slices of ``--slice_s`` seconds of training, round-robin, in one process, until each has trained for
``--wall_budget`` seconds of its own. A load spike then hits every variant in the same round, and a
variant's clock is the sum of its own slices (evaluation excluded). The process CPU time of each
slice is recorded too (only one variant runs at a time), a second, load-independent clock; with
``--clock cpu`` the budgets, slices and evaluation spacing are counted on it instead.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import zo2_deepspeed

ROOT = Path(__file__).resolve().parents[1]
ADAM_CONFIG = ROOT / "ds_configs" / "zero3_adam_cpu.json"


@dataclass
class Racer:
    """One variant: its engine, its own data stream, clocks and evaluation points."""

    name: str
    lr: float
    engine: Any
    batches: Iterator[dict]
    train_step: Callable[[dict], None]
    forwards_per_step: int
    """Forward passes per step (ZO: one per perturbation group; Adam: 1, plus its backward)."""
    train_s: float = 0.0
    cpu_s: float = 0.0
    forwards: int = 0
    steps: int = 0
    next_eval_s: float = 0.0
    points: list[dict] = field(default_factory=list)


def _cycle(loader: Any) -> Iterator[dict]:
    while True:
        yield from loader


def zo_config(method: str, lr: float, args: argparse.Namespace) -> dict:
    """The DeepSpeed config of one ZO variant (resident parameters: the benchmark measures the method)."""
    return {"train_micro_batch_size_per_gpu": args.batch, "steps_per_print": 10**9,
            "optimizer": {"type": "SGD", "params": {"lr": lr}},
            "zo2": {"method": method, "eps": args.eps, "seed": args.seed, "num_perturbations": args.n,
                    "hessian_smooth": args.hessian_smooth, "rank": args.rank, "lazy_steps": args.lazy_steps,
                    "prefetch_blocks": 0}}


def zo_racer(method: str, lr: float, args: argparse.Namespace, model_dir: Path, task: Any) -> Racer:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = zo_config(method, lr, args)
    engine, _, loader, _ = zo2_deepspeed.initialize(model=model, config=config, training_data=task.train,
                                                    collate_fn=task.collate, loss_fn=task.loss_fn)

    def step(batch: dict) -> None:
        engine(**batch)
        engine.step()

    return Racer(method, lr, engine, _cycle(loader), step, len(engine.method.groups()))


def adam_racer(lr: float, args: argparse.Namespace, model_dir: Path, task: Any) -> Racer:
    """First-order AdamW under DeepSpeed ZeRO-3 (ds_configs/zero3_adam_cpu.json, lr and batch as the ZO runs)."""
    from transformers import AutoModelForCausalLM
    config = json.loads(ADAM_CONFIG.read_text())
    config["optimizer"]["params"]["lr"] = lr
    config["train_micro_batch_size_per_gpu"] = args.batch
    config["steps_per_print"] = 10**9
    with zo2_deepspeed.zero_init(config, enabled=True):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine, _, loader, _ = zo2_deepspeed.initialize(model=model, config=config, training_data=task.train,
                                                    collate_fn=task.collate)

    def step(batch: dict) -> None:
        loss = task.first_order_loss(engine(**task.model_inputs(batch)), batch)
        engine.backward(loss)
        engine.step()

    return Racer("adam", lr, engine, _cycle(loader), step, 1)


def evaluate(racer: Racer, task: Any, args: argparse.Namespace) -> None:
    racer.engine.eval()
    val = task.evaluate(lambda **b: racer.engine(**b), args.eval_batch, args.eval_samples)
    racer.engine.train()
    racer.points.append({"train_s": racer.train_s, "cpu_s": racer.cpu_s, "forwards": racer.forwards,
                         "steps": racer.steps, "val_loss": val["loss"], "val_accuracy": val["accuracy"]})
    print(f"[{racer.name}] t={racer.train_s:.0f}s cpu={racer.cpu_s:.0f}s forwards={racer.forwards} "
          f"val_acc={val['accuracy']:.3f}", flush=True)


def race(racers: list[Racer], task: Any, args: argparse.Namespace) -> None:
    """Round-robin slices until every racer has trained ``args.wall_budget`` seconds of its own on ``args.clock``."""
    from tqdm import tqdm
    clock = "train_s" if args.clock == "wall" else "cpu_s"
    spent = lambda r: getattr(r, clock)  # noqa: E731
    bar = tqdm(total=round(args.wall_budget * len(racers)), desc="time to accuracy", unit="s", dynamic_ncols=True)
    while any(spent(r) < args.wall_budget for r in racers):
        for r in racers:
            if spent(r) >= args.wall_budget:
                continue
            if spent(r) >= r.next_eval_s:
                evaluate(r, task, args)
                r.next_eval_s += args.eval_every_s
            before, wall0, cpu0 = spent(r), r.train_s, r.cpu_s
            wall, cpu = time.perf_counter(), time.process_time()
            # at least one step per slice; a slice ends at its length, the budget or the next evaluation
            while True:
                r.train_step(next(r.batches))
                r.steps += 1
                r.forwards += r.forwards_per_step
                r.train_s = wall0 + time.perf_counter() - wall
                r.cpu_s = cpu0 + time.process_time() - cpu
                if spent(r) - before >= args.slice_s or spent(r) >= args.wall_budget or spent(r) >= r.next_eval_s:
                    break
            bar.update(min(spent(r), args.wall_budget) - before)
    bar.close()
    for r in racers:
        evaluate(r, task, args)


def first_reaching(racer: Racer, accuracy: float, clock: str) -> float:
    """The racer's clock (``train_s``, ``cpu_s`` or ``forwards``) at its first evaluation with at least ``accuracy``."""
    for p in racer.points:
        if p["val_accuracy"] >= accuracy:
            return p[clock]
    return float("nan")


def accuracy_at(racer: Racer, seconds: float, clock: str) -> float:
    """Validation accuracy of the last evaluation at or before ``seconds`` of training on ``clock``."""
    return [p["val_accuracy"] for p in racer.points if p[clock] <= seconds + 1e-9][-1]


def clock_key(args: argparse.Namespace) -> str:
    return "train_s" if args.clock == "wall" else "cpu_s"


def plot(racers: list[Racer], path: Path, clock: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in racers:
        label = f"{r.name} (lr {r.lr:g})"
        a.plot([p[clock] for p in r.points], [p["val_accuracy"] for p in r.points], marker="o", label=label)
        b.plot([p["forwards"] for p in r.points], [p["val_accuracy"] for p in r.points], marker="o", label=label)
    a.set_xlabel(("training" if clock == "train_s" else "process CPU") + " seconds (own slices, interleaved)")
    b.set_xlabel("forward passes (Adam: + one backward each)")
    for ax in (a, b):
        ax.set_ylabel("validation accuracy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(racers: list[Racer], args: argparse.Namespace, plot_name: str, json_name: str) -> str:
    """The section body: per-variant table, then the two targets, measured."""
    from results import table
    by = {r.name: r for r in racers}
    clock = clock_key(args)
    mezo_final = by["mezo"].points[-1]["val_accuracy"] if "mezo" in by else None
    rows = []
    for r in racers:
        first, last = r.points[0], r.points[-1]
        if mezo_final is not None:
            t = first_reaching(r, mezo_final, clock)
            reach = f"{t:.0f} s, {first_reaching(r, mezo_final, 'forwards'):.0f} fw" if t == t else "not reached"
        else:
            reach = "—"
        rows.append([r.name, f"{r.lr:g}", r.steps, r.forwards, f"{last['train_s']:.0f}", f"{last['cpu_s']:.0f}",
                     f"{first['val_accuracy']:.3f} → {last['val_accuracy']:.3f}", reach])
    body = (f"SmolLM2-135M-Instruct, tweet sentiment prompt task, batch {args.batch}, ε {args.eps}, seed "
            f"{args.seed}, all parameters trained; every variant trains {args.wall_budget:g} s of its own "
            f"({'wall' if args.clock == 'wall' else 'process CPU'} time), in "
            f"round-robin slices of {args.slice_s:g} s in one process (load hits all alike; evaluation not "
            f"counted), validation accuracy on {args.eval_samples} examples every {args.eval_every_s:g} s of "
            f"training. LOZO rank {args.rank}, ν {args.lazy_steps}; FZOO N={args.n}; Adam: "
            f"`ds_configs/zero3_adam_cpu.json` (ZeRO-3, parameters and optimizer offloaded to CPU). CPU s: process "
            f"CPU time during the variant's own slices (load-independent). Curves (accuracy against seconds and "
            f"against forwards) in `benchmarks/{plot_name}`, raw data in `benchmarks/{json_name}`.\n\n"
            + table(["variant", "lr", "steps", "forwards", "train s", "CPU s", "val accuracy",
                     f"to reach MeZO's final accuracy ({'wall' if args.clock == 'wall' else 'CPU'} s)"], rows))
    targets = []
    if "mezo" in by and "lozo" in by:
        t_mezo = first_reaching(by["mezo"], mezo_final, clock)
        t_lozo = first_reaching(by["lozo"], mezo_final, clock)
        if not t_mezo > 0:
            measured = "MeZO did not improve on its start"
        elif t_lozo != t_lozo:
            measured = "not reached"
        else:
            measured = f"{t_lozo / t_mezo:.2f} ({t_lozo:.0f} s / {t_mezo:.0f} s)"
        targets.append(["LOZO's time to MeZO's final accuracy / MeZO's", measured, "≤ 0.50"])
    if "adam" in by:
        zo = [r for r in racers if r.name != "adam"]
        if zo:
            best = max(zo, key=lambda r: r.points[-1]["val_accuracy"])
            gap = accuracy_at(by["adam"], best.points[-1][clock], clock) - best.points[-1]["val_accuracy"]
            targets.append([f"Adam's accuracy − best ZO's ({best.name}) at the same wall time",
                            f"{100 * gap:+.1f} points", "≤ 3 points"])
    if targets:
        body += "\n\n" + table(["target", "measured", "goal"], targets)
    return body


def run(args: argparse.Namespace, model_dir: Path, task: Any, here: Path, write: Callable[[str, str], None]) -> str:
    """Build every variant, race them, write the JSON, the plot and the section."""
    racers = []
    for name in args.methods.split(","):
        racers.append(adam_racer(args.lr_adam, args, model_dir, task) if name == "adam"
                      else zo_racer(name, getattr(args, f"lr_{name}"), args, model_dir, task))
    try:
        race(racers, task, args)
    finally:
        for r in racers:
            if hasattr(r.engine, "close"):
                r.engine.close()
    json_name, plot_name = "time_to_accuracy.json", "time_to_accuracy.png"
    (here / json_name).write_text(json.dumps([{"variant": r.name, "lr": r.lr, "steps": r.steps, "points": r.points}
                                              for r in racers]))
    plot(racers, here / plot_name, clock_key(args))
    body = report(racers, args, plot_name, json_name)
    write("time_to_accuracy", body)
    return body

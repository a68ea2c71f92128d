"""Time to accuracy: ZO methods, hybrids (a first-order tail) and first-order ZeRO-3 AdamW on equal wall-clock
budgets, interleaved.

    python benchmarks/convergence.py --wall_budget 1800           # SmolLM2-135M-Instruct, tweet sentiment
    python benchmarks/convergence.py --sweep --sweep_budget 180   # the learning-rate sweep the race reads

Variants: ``mezo``, ``fzoo``, ``hizoo``, ``lozo`` (ZO, resident parameters), ``hybrid0`` (the head first-order,
the body ZO with ``--hybrid_method``), ``hybrid1`` (the last layer and the head first-order), ``adam``
(DeepSpeed ZeRO-3, parameters and optimizer offloaded to the CPU). Accuracy is measured on the whole
validation split (``--eval_samples 0``) and reported with its 95 % (Wilson) interval. Each variant's peak
host RSS is measured in a process of its own (``--rss_steps`` steps), so that no variant's peak hides
another's. The sweep trains every (variant, lr) of a small grid for ``--sweep_budget`` seconds, interleaved
the same way, scores them on a dev slice held out of the training split (never on the validation split),
and writes the chosen lrs to ``time_to_accuracy_lrs.json``, which the race reads with ``--lrs_from``.

Called from convergence.py (same model, task, batches and evaluation). The machine is shared and its
load changes by the minute, so the variants do not run one after the other: they take turns in
slices of ``--slice_s`` seconds of training, round-robin, in one process, until each has trained for
``--wall_budget`` seconds of its own. A load spike then hits every variant in the same round, and a
variant's clock is the sum of its own slices (evaluation excluded). The process CPU time of each
slice is recorded too (only one variant runs at a time), a second, load-independent clock; with
``--clock cpu`` the budgets, slices and evaluation spacing are counted on it instead.

With ``--jobs N`` (and ``--clock cpu``) every (variant, lr) trains in a process of its own instead, N at a time,
each process pinned to one core with one thread: the CPU-time budgets stay per variant, the machine's cores all
work, and no process holds more than one model (the sweep's AdamW runs take about 7 GB each).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

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
    process: Optional[dict] = None
    """Where it trained when in a process of its own (``--jobs``): that process's cores and torch threads."""

    def summary(self) -> dict:
        """What the report needs of a finished racer (its engine released)."""
        return {"variant": self.name, "lr": self.lr, "steps": self.steps, "forwards": self.forwards,
                "train_s": self.train_s, "cpu_s": self.cpu_s, "points": self.points, "process": self.process}

    @classmethod
    def finished(cls, summary: dict) -> "Racer":
        """A racer that trained in another process, rebuilt from its :meth:`summary`."""
        return cls(summary["variant"], summary["lr"], None, iter(()), _finished, 0, summary["train_s"],
                   summary["cpu_s"], summary["forwards"], summary["steps"], points=summary["points"],
                   process=summary["process"])


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


HYBRIDS = {"hybrid0": 0, "hybrid1": 1}
"""Hybrid variants and their number of first-order layers (with the head). SmolLM2-135M ties its head to the input
embedding (21 % of the model): with one layer the tail is 23.7 %, with two 26.3 %, above the default 25 % cap."""


def hybrid_config(name: str, lr: float, args: argparse.Namespace) -> dict:
    """A hybrid variant: the ZO body with ``--hybrid_method`` at ``--lr_hybrid_zo``, the tail with AdamW at ``lr``."""
    config = zo_config(args.hybrid_method, args.lr_hybrid_zo, args)
    config["zo2"]["first_order"] = {"blocks": HYBRIDS[name], "head": True, "gradient_clipping": 1.0,
                                    "max_fraction": args.max_fraction,
                                    "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0}}}
    return config


def zo_racer(method: str, lr: float, args: argparse.Namespace, model_dir: Path, task: Any) -> Racer:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = hybrid_config(method, lr, args) if method in HYBRIDS else zo_config(method, lr, args)
    engine, _, loader, _ = zo2_deepspeed.initialize(model=model, config=config, training_data=task.train,
                                                    collate_fn=task.collate, loss_fn=task.loss_fn)

    def step(batch: dict) -> None:
        engine(**batch)
        engine.step()

    return Racer(method, lr, engine, _cycle(loader), step, len(engine.method.groups()))


def make_racer(name: str, lr: float, args: argparse.Namespace, model_dir: Path, task: Any) -> Racer:
    return adam_racer(lr, args, model_dir, task) if name == "adam" else zo_racer(name, lr, args, model_dir, task)


def wilson(correct: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of an accuracy of ``correct`` out of ``n``."""
    if n <= 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_text(point: dict) -> str:
    low, high = point.get("val_interval", (float("nan"), float("nan")))
    return f"{point['val_accuracy']:.3f} [{low:.3f}, {high:.3f}]"


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
    data = getattr(args, "eval_data", None)
    limit = args.eval_samples or None  # 0: the whole split
    val = task.evaluate(lambda **b: racer.engine(**b), args.eval_batch, None if data is not None else limit, data=data)
    racer.engine.train()
    count = min(limit or len(data if data is not None else task.validation),
                len(data if data is not None else task.validation))
    racer.points.append({"train_s": racer.train_s, "cpu_s": racer.cpu_s, "forwards": racer.forwards,
                         "steps": racer.steps, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                         "val_examples": count, "val_interval": wilson(val["accuracy"] * count, count)})
    print(f"[{racer.name}] t={racer.train_s:.0f}s cpu={racer.cpu_s:.0f}s forwards={racer.forwards} "
          f"val_acc={val['accuracy']:.3f}", flush=True)


def race(racers: list[Racer], task: Any, args: argparse.Namespace) -> None:
    """Round-robin slices until every racer has trained ``args.wall_budget`` seconds of its own on ``args.clock``."""
    from tqdm import tqdm
    clock = "train_s" if args.clock == "wall" else "cpu_s"
    spent = lambda r: getattr(r, clock)  # noqa: E731
    bar = tqdm(total=round(args.wall_budget * len(racers)), desc="time to accuracy", unit="s", dynamic_ncols=True)
    for r in racers:
        r.next_eval_s = getattr(args, "first_eval_s", 0.0)
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


def _targets(racers: list[Racer], clock: str, rss: dict[str, dict]) -> list[list[str]]:
    """The race's targets, each measured and called a hit or a miss with its reason."""
    by = {r.name: r for r in racers}
    rows: list[list[str]] = []
    mezo_final = by["mezo"].points[-1]["val_accuracy"] if "mezo" in by else None
    t_mezo = first_reaching(by["mezo"], mezo_final, clock) if "mezo" in by else float("nan")
    if "mezo" in by and "lozo" in by:
        t_lozo = first_reaching(by["lozo"], mezo_final, clock)
        measured = f"{t_lozo / t_mezo:.2f} ({t_lozo:.0f} s / {t_mezo:.0f} s)" if t_mezo > 0 and t_lozo == t_lozo \
            else ("MeZO did not improve on its start" if not t_mezo > 0 else "not reached")
        rows.append(["LOZO's time to MeZO's final accuracy / MeZO's", measured, "≤ 0.50"])
    hybrids = [r for r in racers if r.name in HYBRIDS]
    best = max(hybrids, key=lambda r: r.points[-1]["val_accuracy"]) if hybrids else None
    if best is not None and "adam" in by:
        at = best.points[-1][clock]
        adam = accuracy_at(by["adam"], at, clock)
        gap = adam - best.points[-1]["val_accuracy"]
        verdict = "hit" if gap <= 0.01 else f"miss: {best.name} ends {100 * gap:.1f} points below AdamW"
        rows.append([f"AdamW's accuracy − best hybrid's ({best.name}) at the same wall time",
                     f"{100 * gap:+.1f} points ({verdict})", "≤ 1 point"])
    if best is not None and "mezo" in by:
        t = first_reaching(best, mezo_final, clock)
        if not t_mezo > 0:
            measured = "MeZO did not improve on its start: no time to compare (miss)"
        elif t != t:
            measured = f"not reached by {best.name} (miss)"
        else:
            ratio = t / t_mezo
            measured = f"{ratio:.2f} ({t:.0f} s / {t_mezo:.0f} s; {'hit' if ratio <= 0.2 else 'miss'})"
        rows.append([f"best hybrid's ({best.name}) time to MeZO's final accuracy / MeZO's", measured, "≤ 0.20"])
    if best is not None and "mezo" in rss and best.name in rss:
        bound = rss["mezo"]["peak_rss_bytes"] + rss[best.name]["first_order_bytes"]
        got = rss[best.name]["peak_rss_bytes"]
        verdict = "hit" if got <= bound else f"miss by {(got - bound) / 2**20:.0f} MiB"
        rows.append([f"peak host RSS of {best.name} − (MeZO's + its first-order part's bytes)",
                     f"{(got - bound) / 2**20:+.0f} MiB ({verdict})", "≤ 0"])
    elif "adam" in by and hybrids == [] and "mezo" in by:
        zo = [r for r in racers if r.name != "adam"]
        best_zo = max(zo, key=lambda r: r.points[-1]["val_accuracy"])
        gap = accuracy_at(by["adam"], best_zo.points[-1][clock], clock) - best_zo.points[-1]["val_accuracy"]
        rows.append([f"Adam's accuracy − best ZO's ({best_zo.name}) at the same wall time", f"{100 * gap:+.1f} points",
                     "≤ 3 points"])
    return rows


def report(racers: list[Racer], args: argparse.Namespace, plot_name: str, json_name: str,
           rss: Optional[dict[str, dict]] = None) -> str:
    """The section body: per-variant table, peak RSS, then the targets, each a hit or a miss."""
    from results import table
    rss = rss or {}
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
        memory = rss.get(r.name, {})
        rows.append([r.name, f"{r.lr:g}", r.steps, r.forwards, f"{last['train_s']:.0f}", f"{last['cpu_s']:.0f}",
                     f"{first['val_accuracy']:.3f} → {accuracy_text(last)}", reach,
                     f"{memory['peak_rss_bytes'] / 2**20:.0f}" if memory else "—"])
    examples = racers[0].points[-1].get("val_examples", args.eval_samples)
    hybrid = (f" Hybrids: the body {args.hybrid_method} at lr {args.lr_hybrid_zo:g}, the tail (hybrid0: the head, "
              f"tied to the input embedding; hybrid1: the last layer and the head) AdamW at the lr in the table, "
              f"gradient clipping 1.0." if any(r.name in HYBRIDS for r in racers) else "")
    lrs = f" Learning rates from {args.lrs_from}." if getattr(args, "lrs_from", None) else ""
    body = (f"SmolLM2-135M-Instruct, tweet sentiment prompt task, batch {args.batch}, ε {args.eps}, seed "
            f"{args.seed}, all parameters trained; every variant trains {args.wall_budget:g} s of its own "
            f"({'wall' if args.clock == 'wall' else 'process CPU'} time), {where_runs_train(args)}, validation "
            f"accuracy on {examples} examples (95 % Wilson interval in brackets) every "
            f"{args.eval_every_s:g} s of training. LOZO rank {args.rank}, ν {args.lazy_steps}; FZOO N={args.n}; Adam: "
            f"`ds_configs/zero3_adam_cpu.json` (ZeRO-3, parameters and optimizer offloaded to CPU).{hybrid}{lrs} "
            f"CPU s: process CPU time of the variant's own training (load-independent). Peak RSS: each variant "
            f"alone in a process of its own for {getattr(args, 'rss_steps', 0)} steps. Curves in "
            f"`benchmarks/{plot_name}`, raw data in `benchmarks/{json_name}`.\n\n"
            + table(["variant", "lr", "steps", "forwards", "train s", "CPU s", "val accuracy [95 %]",
                     f"to reach MeZO's final accuracy ({'wall' if args.clock == 'wall' else 'CPU'} s)",
                     "peak RSS MiB"], rows))
    targets = _targets(racers, clock, rss)
    if targets:
        body += "\n\n" + table(["target", "measured", "goal"], targets)
    if getattr(args, "second_task_note", None):
        body += "\n\n" + args.second_task_note
    return body


def lrs_of(args: argparse.Namespace) -> dict[str, float]:
    """Each variant's lr: ``--lr_<variant>``, or the sweep's choice with ``--lrs_from``."""
    chosen = json.loads(Path(args.lrs_from).read_text())["chosen"] if getattr(args, "lrs_from", None) else {}
    return {name: float(chosen.get(name, getattr(args, f"lr_{name}"))) for name in args.methods.split(",")}


def run(args: argparse.Namespace, model_dir: Path, task: Any, here: Path, write: Callable[[str, str], None],
        section: str = "time_to_accuracy") -> str:
    """Build every variant, race them, measure their peak RSS one process each, write the JSON, plot and section."""
    lrs = lrs_of(args)
    racers = race_runs(list(lrs.items()), args, model_dir, task)
    json_name, plot_name = f"{section}.json", f"{section}.png"

    def publish(rss: dict[str, dict]) -> str:
        (here / json_name).write_text(json.dumps([{"variant": r.name, "lr": r.lr, "steps": r.steps, "points": r.points,
                                                   "rss": rss.get(r.name), "process": r.process} for r in racers]))
        plot(racers, here / plot_name, clock_key(args))
        body = report(racers, args, plot_name, json_name, rss)
        write(section, body)
        return body

    body = publish({})  # the race is on disk before the RSS probes, which start a model of their own each
    if args.rss_steps:
        body = publish({name: rss_in_own_process(name, lr, args) for name, lr in lrs.items()})
    return body


def release(racers: list[Racer]) -> None:
    """Close every racer's engine and drop it (its model, optimizer state and data stream), keeping the results.

    The RSS probes that follow each build a model of their own: with the race's models still held, the
    probe and this process together can exceed the host's memory (a race of five SmolLM2-135M variants
    holds about 10 GB).
    """
    import gc
    for r in racers:
        if hasattr(r.engine, "close"):
            r.engine.close()
        r.engine, r.batches, r.train_step = None, iter(()), _finished
    gc.collect()


def _finished(batch: dict) -> None:
    raise RuntimeError("this racer's engine was released after the race")


# ------------------------------------------------------------------------------------- where the runs train
def race_runs(runs: list[tuple[str, float]], args: argparse.Namespace, model_dir: Path, task: Any) -> list[Racer]:
    """Train every (variant, lr) run for the budget: interleaved in this process, or with ``--jobs N`` each in a
    process of its own (:func:`race_in_processes`). Returns the finished racers, their engines released."""
    if getattr(args, "jobs", 1) > 1:
        return race_in_processes(runs, args)
    racers = [make_racer(name, lr, args, model_dir, task) for name, lr in runs]
    try:
        race(racers, task, args)
    finally:
        release(racers)
    return racers


EVALUATION_LINE = re.compile(r"\[\w+\] t=\S+ cpu=\S+ forwards=\d+ val_acc=\S+")
"""What :func:`evaluate` prints, found in a run's log."""


def race_in_processes(runs: list[tuple[str, float]], args: argparse.Namespace) -> list[Racer]:
    """Each run in a process of its own (``--run_one``), ``--jobs`` at a time, each pinned to one core of this
    process's affinity set with one thread. Their evaluation lines are relayed as they come; a failed run stops
    the others and raises with the end of its log."""
    import subprocess
    import sys
    import tempfile
    from zo2_deepspeed.distributed import without_launch_vars
    if args.clock != "cpu":
        raise SystemExit("--jobs > 1 needs --clock cpu: runs in parallel processes share the machine, so only "
                         "each process's own CPU time is a fair budget")
    cores = sorted(os.sched_getaffinity(0))
    if args.jobs > len(cores):
        raise SystemExit(f"--jobs {args.jobs}: this process may run on {len(cores)} core(s) only ({cores})")
    env = {**without_launch_vars(os.environ), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    script = Path(__file__).resolve().parent / "convergence.py"
    queue, free = list(enumerate(runs)), cores[:args.jobs]
    running: dict[Any, tuple[int, int, Path, Path]] = {}
    offsets: dict[Path, int] = {}
    done: dict[int, Racer] = {}

    def relay(log: Path, lr: float) -> None:
        """Print the evaluation lines the run wrote since the last call (whole lines only; tqdm's carriage
        returns share the log with them)."""
        text = log.read_text(errors="replace")
        end = text.rfind("\n") + 1
        for match in EVALUATION_LINE.finditer(text, offsets.get(log, 0), max(end, offsets.get(log, 0))):
            print(f"{match.group(0)} lr={lr:g}", flush=True)
        offsets[log] = max(end, offsets.get(log, 0))

    with tempfile.TemporaryDirectory(prefix="zo2_race_") as tmp:
        try:
            while queue or running:
                while queue and free:
                    (index, (name, lr)), core = queue.pop(0), free.pop(0)
                    out, log = Path(tmp) / f"{index}.json", Path(tmp) / f"{index}.log"
                    command = [sys.executable, str(script), *sys.argv[1:], "--run_one", f"{name}:{lr!r}",
                               "--run_out", str(out)]
                    with open(log, "w") as sink:
                        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                                preexec_fn=lambda core=core: os.sched_setaffinity(0, {core}))
                    running[proc] = (index, core, out, log)
                    print(f"[{name}] lr {lr:g}: training in a process of its own on core {core}", flush=True)
                time.sleep(1.0)
                for proc, (index, core, out, log) in list(running.items()):
                    finished = proc.poll() is not None  # before the relay, so that its last lines are in the log
                    relay(log, runs[index][1])
                    if not finished:
                        continue
                    del running[proc]
                    free.append(core)
                    if proc.returncode != 0:
                        raise RuntimeError(f"run {runs[index][0]} (lr {runs[index][1]:g}) exited with "
                                           f"{proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
                    done[index] = Racer.finished(json.loads(out.read_text()))
        finally:
            for proc in running:
                proc.kill()
                proc.wait()
    return [done[index] for index in range(len(runs))]


def run_one(args: argparse.Namespace, model_dir: Path, task: Any) -> None:
    """``--run_one NAME:LR``, in a process started by :func:`race_in_processes`: train that run alone (with the
    sweep's dev split and budget under ``--sweep``) and write its summary to ``--run_out``."""
    name, lr = args.run_one.split(":", 1)
    if args.sweep:
        args, _ = sweep_args(args, task)
    args.jobs = 1  # this process is the job: train here
    racer, = race_runs([(name, float(lr))], args, model_dir, task)
    racer.process = {"cores": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads()}
    Path(args.run_out).write_text(json.dumps(racer.summary()))


def where_runs_train(args: argparse.Namespace) -> str:
    """How the runs shared the machine, for the sections' text."""
    if getattr(args, "jobs", 1) > 1:
        return (f"each run in a process of its own, {args.jobs} at a time, each pinned to one core with one "
                f"thread (evaluation not counted)")
    return f"in round-robin slices of {args.slice_s:g} s in one process (load hits all alike; evaluation not counted)"


# ------------------------------------------------------------------------------------- peak RSS, one process each
def rss_in_own_process(name: str, lr: float, args: argparse.Namespace) -> dict:
    """Run ``--rss_probe`` for one variant in a fresh process; its peak RSS and the first-order part's bytes."""
    import subprocess
    import sys
    argv = [a for a in sys.argv[1:]]
    command = [sys.executable, str(Path(__file__).resolve().parent / "convergence.py"), *argv,
               "--rss_probe", name, "--rss_lr", repr(lr)]
    from zo2_deepspeed.distributed import without_launch_vars
    # a process group of its own: not this process's rendezvous (its port is taken)
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600,
                            env=without_launch_vars(os.environ))
    if result.returncode != 0:
        raise RuntimeError(f"the RSS probe of {name} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def rss_probe(name: str, lr: float, args: argparse.Namespace, model_dir: Path, task: Any) -> dict:
    """In a process of its own: build ``name``, train ``--rss_steps`` steps, evaluate once; peak RSS in bytes."""
    import resource
    racer = make_racer(name, lr, args, model_dir, task)
    for _ in range(args.rss_steps):
        racer.train_step(next(racer.batches))
    evaluate(racer, task, args)
    part = getattr(racer.engine, "first_order", None)
    extra = 0 if part is None else sum(size or 0 for key, (size, _) in part.memory.items() if key != "parameters")
    if hasattr(racer.engine, "close"):
        racer.engine.close()
    return {"variant": name, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "first_order_bytes": extra}


# ------------------------------------------------------------------------------------- the learning-rate sweep
SWEEP_GRID = {"mezo": [1e-5, 3e-5, 1e-4], "lozo": [1e-5, 3e-5, 1e-4], "fzoo": [3e-4, 1e-3, 3e-3],
              "hizoo": [1e-5, 3e-5, 1e-4], "hybrid0": [1e-5, 1e-4, 1e-3], "hybrid1": [1e-5, 1e-4, 1e-3],
              "adam": [3e-6, 1e-5, 3e-5]}
"""The lrs each variant tries (hybrids: the tail's AdamW lr; their ZO body keeps --lr_hybrid_zo)."""


def sweep_args(args: argparse.Namespace, task: Any) -> tuple[argparse.Namespace, int]:
    """The sweep's view of the arguments: ``--sweep_budget`` per run, one evaluation at its end, on a dev slice of
    ``--sweep_dev`` examples held out of the training split (``task.train`` loses them: never trained on)."""
    dev_size = min(args.sweep_dev, len(task.train) // 5)
    cut = len(task.train) - dev_size
    task.train, dev = task.train.select(range(cut)), task.train.select(range(cut, len(task.train)))
    view = argparse.Namespace(**vars(args))
    view.wall_budget = view.eval_every_s = view.first_eval_s = args.sweep_budget
    view.eval_data = dev
    return view, dev_size


def best_run(runs: list[Racer]) -> Racer:
    """The sweep's choice among one variant's runs: best dev accuracy, then lowest dev loss."""
    return max(runs, key=lambda r: (r.points[-1]["val_accuracy"], -r.points[-1]["val_loss"]))


def beyond_edge(runs: list[Racer]) -> Optional[float]:
    """The lr to try next when the best of ``runs`` (one variant's) is the lowest or the highest lr tried: one step
    beyond it, at the ratio of the two lrs on that edge (two significant digits); None when it lies inside."""
    lrs = sorted(r.lr for r in runs)
    if len(lrs) < 2:
        return None
    best = best_run(runs).lr
    if best == lrs[-1]:
        return float(f"{lrs[-1] * lrs[-1] / lrs[-2]:.2g}")
    if best == lrs[0]:
        return float(f"{lrs[0] * lrs[0] / lrs[1]:.2g}")
    return None


def sweep(args: argparse.Namespace, model_dir: Path, task: Any, here: Path, write: Callable[[str, str], None]) -> str:
    """Every (variant, lr) of the grid trained ``--sweep_budget`` s; scored on a dev slice of the training split;
    the best lr of each variant (dev accuracy, then dev loss) written for the race."""
    from results import table
    grid = json.loads(args.sweep_grid) if args.sweep_grid else SWEEP_GRID
    view, dev_size = sweep_args(args, task)
    started = time.perf_counter()
    names = args.methods.split(",")
    racers = race_runs([(name, lr) for name in names for lr in grid[name]], view, model_dir, task)
    for _ in range(args.sweep_widen):  # a best lr at the edge of those tried: try the next one beyond it
        beyond = [(name, lr) for name in names
                  if (lr := beyond_edge([r for r in racers if r.name == name])) is not None]
        if not beyond:
            break
        racers += race_runs(beyond, view, model_dir, task)
    chosen: dict[str, float] = {}
    rows, at_edge = [], []
    for name in names:
        mine = sorted((r for r in racers if r.name == name), key=lambda r: r.lr)
        best = best_run(mine)
        chosen[name] = best.lr
        if beyond_edge(mine) is not None:
            at_edge.append(name)
        for r in mine:
            rows.append([name, f"{r.lr:g}", r.steps, f"{r.points[-1]['train_s']:.0f}", accuracy_text(r.points[-1]),
                         f"{r.points[-1]['val_loss']:.4f}",
                         ", ".join(([] if r.lr in grid[name] else ["widened"]) + (["chosen"] if r is best else []))])
    wall = time.perf_counter() - started
    (here / "time_to_accuracy_lrs.json").write_text(json.dumps(
        {"chosen": chosen, "grid": grid, "widen": args.sweep_widen, "at_edge": at_edge,
         "sweep_budget_s": args.sweep_budget, "dev_examples": dev_size,
         "runs": [{"variant": r.name, "lr": r.lr, "steps": r.steps, "points": r.points, "process": r.process}
                  for r in racers]}))
    body = (f"Learning rates for the time-to-accuracy race: every (variant, lr) below trained "
            f"{args.sweep_budget:g} s of its own ({'wall' if args.clock == 'wall' else 'process CPU'} time), "
            f"{where_runs_train(args)}, then scored on {dev_size} examples held out of the training "
            f"split (not trained on; the validation split is left to the race). The sweep took {wall / 60:.0f} min "
            f"of wall time for {len(racers)} runs ({len(racers) * args.sweep_budget / 60:.0f} min of training). "
            f"Hybrids: the tail's AdamW lr (the body {args.hybrid_method} at lr {args.lr_hybrid_zo:g}). The choice "
            f"(best dev accuracy, then lowest dev loss) is in `benchmarks/time_to_accuracy_lrs.json`; the race reads "
            f"it with `--lrs_from benchmarks/time_to_accuracy_lrs.json`. A variant whose best lr lay at the edge of "
            f"the lrs it had tried got the next lr beyond that edge (the same ratio), up to {args.sweep_widen} "
            f"time(s): the rows marked widened."
            + (f" Still at the edge of what was tried: {', '.join(at_edge)}." if at_edge else
               " Every chosen lr lies inside the lrs tried.") + "\n\n"
            + table(["variant", "lr", "steps", "train s", "dev accuracy [95 %]", "dev loss", ""], rows))
    write("time_to_accuracy_sweep", body)
    return body

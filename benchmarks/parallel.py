"""Perturbation parallelism: FZOO (N = 8) at a micro-batch that cannot be split (batch 1), one rank against
two perturbation ranks (``"zo2": {"parallel": {"perturbation": 2}}``), one thread per rank, in one run.

    python benchmarks/parallel.py                  # writes the "parallel" section of benchmarks/RESULTS.md
    python benchmarks/parallel.py --seq 256 --rounds 1 --steps 2 --results /tmp/R.md   # a quick look

A step runs the 9 forwards of FZOO on one row: with one rank all of them, with two ranks 5 and 4, the
group losses gathered between them (9 floats and 2 batch digests). Each variant runs in its own
processes, started by this script (the two ranks with a free port, gloo); rounds alternate between the
variants so that a noisy machine slows both alike, and only the ratio of their medians is reported.
Both variants start from the same model and seeds, so they must end with bit-identical parameters:
the script checks it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import engine_step, llama, lm_batch, median, zo2_config  # noqa: E402
from results import RESULTS, table, write_section  # noqa: E402

from zo2_deepspeed.distributed import free_port, without_launch_vars  # noqa: E402

TARGET = 0.6
WORKER_ARGS = ("seq", "n", "layers", "hidden", "inter", "heads", "kv", "vocab", "steps", "warmup")
"""The options a variant's processes are started with."""
"""Step time of two perturbation ranks over one rank's (FZOO, N = 8, batch 1)."""


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    return llama(layers=args.layers, hidden=args.hidden, inter=args.inter, heads=args.heads, kv=args.kv,
                 vocab=args.vocab, positions=max(2048, args.seq))


def worker(args: argparse.Namespace) -> None:
    """One rank of one variant: warm-up steps, timed steps; rank 0 writes times, phases and a parameter digest."""
    import zo2_deepspeed
    from zo2_deepspeed.comm import bit_checksum
    torch.set_num_threads(1)
    model = build_model(args)
    config = zo2_config("resident", 1, method="fzoo", n=args.n, prefetch=0,
                        parallel={"perturbation": args.perturbation})
    engine, *_ = zo2_deepspeed.initialize(model=model, config=config)
    batch = lm_batch(args.vocab, 1, args.seq)
    for _ in range(args.warmup):
        engine_step(engine, batch)
    times, phases = [], {}
    for _ in range(args.steps):
        times.append(engine_step(engine, batch))
        for k, v in engine.last_step["phase_s"].items():
            phases[k] = phases.get(k, 0.0) + v / args.steps
    digest = sum(bit_checksum(t) for t in engine.parameter_snapshot().values())
    if engine.global_rank == 0:
        Path(args.worker_json).write_text(json.dumps({
            "times": times, "phases": phases, "digest": digest, "bytes_all_reduced": engine.bytes_all_reduced,
            "steps": engine.global_steps, "group_losses": engine.last_step["group_losses"],
            "trainable": sum(s.numel for s in engine.pipeline.slots if s.trainable)}))
    engine.close()


def run_variant(args: argparse.Namespace, ranks: int, out: Path) -> dict:
    """Start ``ranks`` processes of this script as one job (one thread each) and return rank 0's report."""
    shape = [f"--{k}={getattr(args, k)}" for k in WORKER_ARGS]
    cmd = [sys.executable, str(Path(__file__).resolve()), *shape, f"--worker_json={out}", f"--perturbation={ranks}"]
    port = str(free_port())
    procs = []
    for rank in range(ranks):
        env = without_launch_vars(os.environ)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if ranks > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errors = []
    for rank, p in enumerate(procs):
        _, err = p.communicate()
        if p.returncode != 0:
            errors.append(f"rank {rank} of {ranks} failed:\n{err[-3000:]}")
    if errors:
        raise SystemExit("\n".join(errors))
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024, help="tokens of the one row")
    parser.add_argument("--n", type=int, default=8, help="FZOO directions (N + 1 forwards per step)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--inter", type=int, default=688)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating the variants")
    parser.add_argument("--results", default=str(RESULTS), help="markdown file whose 'parallel' section is written")
    parser.add_argument("--perturbation", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker_json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_json:
        worker(args)
        return

    load = os.getloadavg()[0]  # the two ranks need both cores here: anything else running slows them first
    reports: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for ranks in (1, 2):
                report = run_variant(args, ranks, Path(tmp) / f"round{r}_p{ranks}.json")
                reports[ranks].append(report)
                print(f"round {r}: {ranks} rank(s): median {median(report['times']):.3f} s/step", flush=True)
    times = {p: [t for rep in reps for t in rep["times"]] for p, reps in reports.items()}
    med = {p: median(t) for p, t in times.items()}
    digests = {rep["digest"] for reps in reports.values() for rep in reps}
    identical = len(digests) == 1
    ratio = med[2] / med[1]
    one, two = reports[1][0], reports[2][0]
    phase = lambda rep: ", ".join(f"{k} {v:.3f}" for k, v in rep["phases"].items() if v >= 0.0005)  # noqa: E731
    rounds = lambda p: ", ".join(f"{median(rep['times']):.3f}" for rep in reports[p])  # noqa: E731
    rows = [["1 rank", f"{med[1]:.3f}", rounds(1), f"{min(times[1]):.3f}", args.n + 1,
             one["bytes_all_reduced"] // one["steps"], phase(one)],
            ["2 perturbation ranks", f"{med[2]:.3f}", rounds(2), f"{min(times[2]):.3f}",
             f"{(args.n + 2) // 2} and {(args.n + 1) // 2}", two["bytes_all_reduced"] // two["steps"], phase(two)]]
    body = (f"FZOO (N = {args.n}: {args.n + 1} forwards per step), batch 1 × {args.seq} tokens, random LLaMA "
            f"({args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; {one['trainable']:,} trainable), "
            f"resident, fp32; one thread per rank (OMP_NUM_THREADS=1), gloo; {args.rounds} rounds × "
            f"{args.steps} timed steps per variant (after {args.warmup} warm-up), rounds alternating; 1-minute load "
            f"average {load:.2f} at the start.\n\n"
            + table(["ratio", "measured", "target"],
                    [["2 perturbation ranks / 1 rank, step time", f"{ratio:.3f}", f"≤ {TARGET}"],
                     ["parameters after the run bit-identical", "yes" if identical else "NO", "yes"]])
            + "\n\n" + table(["variant", "median s", "per-round medians", "min s", "forwards per rank",
                              "bytes exchanged per step", "phases per step on rank 0 (s)"], rows))
    write_section("parallel", body, args.results)
    print(body)
    if not identical:
        raise SystemExit("the two variants ended with different parameters")


if __name__ == "__main__":
    main()

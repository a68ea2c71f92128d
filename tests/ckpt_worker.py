"""A training process for the checkpoint tests: trains from (or resumes) a save_dir, saving every step.

    python ckpt_worker.py --save_dir D --steps M [--resume] [--die_after K] [--out params.pt]

Data come from the engine's own loader (so the data order must survive a resume). With
``--die_after K`` the process SIGKILLs itself right after the save of step K. Started as one rank of
several (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set), it trains data parallel; the fault options
make one rank's save fail (``--fail_write_rank``), rank 0's ``save_pretrained`` fail
(``--fail_pretrained``), or print the tensor files a load opened (``--print_opened``).

``--stop_on_signal`` trains as ``launch/train.py`` does: under ``StopOnSignal``, the ranks agreeing on a
stop after each step, then a last save and exit 128 + signal. ``--pause_in_save_from K`` makes each
rank print ``in save K: rank R wrote its file`` from the save of step K on, and rank ``--pause_rank``
print ``in save K: rank R is writing`` and wait there (up to 10 minutes) before it writes: a test can
then send the second signal to a save in progress. ``--linger_s S``: a process stopped by a signal waits
S seconds before it exits, as one does whose peers cannot see it is gone (NCCL does not notice a dead
peer; gloo notices the closed connections when the process exits).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zo2_deepspeed  # noqa: E402
from conftest import ds_config  # noqa: E402
from tiny_models import batches, make_model  # noqa: E402
from zo2_deepspeed import checkpoint  # noqa: E402
from zo2_deepspeed.stopping import StopOnSignal, any_rank  # noqa: E402


def dataset(n: int = 40) -> list[dict]:
    rows = batches(1, rows=n, seed=3)[0]
    return [{k: v[i] for k, v in rows.items()} for i in range(n)]


def fail_writes_from(step: int, engine) -> None:
    """Make this rank's file writes run out of space, half way, from the save of ``step`` on."""
    write = checkpoint.save._write_hashed

    def failing(path, chunks):
        if engine.global_steps >= step:
            path.write_bytes(bytes(100))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(path, chunks)

    checkpoint.save._write_hashed = failing


def pause_in_save(engine, from_step: int, pause_rank: int) -> None:
    """From the save of ``from_step`` on: announce each rank's file write, and hold ``pause_rank`` inside it."""
    write = checkpoint.save._write_rank

    def announced(plan, partial, rank, space):
        if engine.global_steps < from_step:
            return write(plan, partial, rank, space)
        if rank == pause_rank:
            print(f"in save {engine.global_steps}: rank {rank} is writing", flush=True)
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:  # a signal's handler runs between these sleeps
                time.sleep(0.05)
        entry = write(plan, partial, rank, space)
        print(f"in save {engine.global_steps}: rank {rank} wrote its file", flush=True)
        return entry

    checkpoint.save._write_rank = announced


def print_opened() -> None:
    """Print the name of every tensor file a load opens (stdout, one line each)."""
    open_file = checkpoint.shards._open_safetensors

    def recording(file, tag):
        print(f"opened {Path(file).name}", flush=True)
        return open_file(file, tag)

    checkpoint.shards._open_safetensors = recording


def train(engine, loader, args, stop, agree) -> None:
    """Steps until ``--steps``, a save after each; with ``stop``, a signal ends the loop after a last save."""
    while engine.global_steps < args.steps:
        for batch in loader:
            loss = engine(**batch)
            engine.backward(loss)
            engine.step()
            engine.flush()  # the save's own flush is then a no-op: "saving" marks the file writes
            print(f"trained {engine.global_steps}", flush=True)
            if stop is not None and stop.requested(agree):
                print(f"stopping after step {engine.global_steps}", flush=True)
                engine.save_checkpoint(args.save_dir, client_state={"step": engine.global_steps})
                print(f"saved {engine.global_steps}", flush=True)
                raise SystemExit(128 + (stop.signum or 0))
            print(f"saving {engine.global_steps}", flush=True)
            start = time.perf_counter()
            engine.save_checkpoint(args.save_dir, client_state={"step": engine.global_steps})
            print(f"saved {engine.global_steps} in {time.perf_counter() - start:.3f}s", flush=True)
            if engine.global_steps == args.die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if engine.global_steps >= args.steps:
                break


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save_dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tier", default="cpu")
    parser.add_argument("--method", default="mezo")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--die_after", type=int, default=-1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--timeout", type=float, default=1800.0, help="zo2.comm_timeout_s")
    parser.add_argument("--fail_write_rank", type=int, default=-1)
    parser.add_argument("--fail_save_step", type=int, default=0)
    parser.add_argument("--save_pretrained", default=None, help="export here at the end")
    parser.add_argument("--fail_pretrained", action="store_true", help="rank 0's save_pretrained raises")
    parser.add_argument("--print_opened", action="store_true")
    parser.add_argument("--stop_on_signal", action="store_true", help="stop at a step boundary on SIGINT/SIGTERM")
    parser.add_argument("--pause_in_save_from", type=int, default=-1)
    parser.add_argument("--pause_rank", type=int, default=0)
    parser.add_argument("--linger_s", type=float, default=0.0)
    parser.add_argument("--first_order", action="store_true", help="a first-order tail (zo2.first_order): the last "
                        "layer and the head, AdamW with a warm-up")
    parser.add_argument("--storage", default=None, help="zo2.storage_dtype")
    args = parser.parse_args()
    config = ds_config(args.tier, method=args.method, micro_batch=4, lr=1e-2, weight_decay=0.01,
                       num_perturbations=3, hessian_smooth=0.1, comm_timeout_s=args.timeout,
                       **({"storage_dtype": args.storage} if args.storage else {}))
    if args.first_order:
        config["zo2"]["first_order"] = {
            "blocks": 1, "head": True, "max_fraction": 0.9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3, "warmup_max_lr": 1e-3}}}
    config["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                                "warmup_num_steps": 2, "total_num_steps": 20}}
    engine, _, loader, _ = zo2_deepspeed.initialize(model=make_model(hidden=args.hidden), config=config,
                                                    training_data=dataset())
    if engine.global_rank == args.fail_write_rank:
        fail_writes_from(args.fail_save_step, engine)
    if args.print_opened:
        print_opened()
    if args.pause_in_save_from >= 0:
        pause_in_save(engine, args.pause_in_save_from, args.pause_rank)
    if args.resume:
        path, client = engine.load_checkpoint(args.save_dir)
        assert path is not None and client["step"] == engine.global_steps, (path, client)
    stop = StopOnSignal(announce=False) if args.stop_on_signal else contextlib.nullcontext()
    agree = any_rank(engine.device)
    try:
        with stop:
            train(engine, loader, args, stop if args.stop_on_signal else None, agree)
    except (SystemExit, KeyboardInterrupt) as e:
        if args.linger_s:
            print(f"interrupted ({type(e).__name__} {getattr(e, 'code', '')}); lingering {args.linger_s} s", flush=True)
            time.sleep(args.linger_s)
        raise
    if args.save_pretrained:
        if args.fail_pretrained and engine.global_rank == 0:
            def full_disk(*_, **__):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            engine.module.save_pretrained = full_disk
        engine.save_pretrained(args.save_pretrained)
    snapshot = engine.parameter_snapshot()
    if args.out and engine.global_rank == 0:
        torch.save(snapshot, args.out)
    engine.close()


if __name__ == "__main__":
    main()

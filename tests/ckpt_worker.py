"""A training process for the checkpoint tests: trains from (or resumes) a save_dir, saving every step.

    python ckpt_worker.py --save_dir D --steps M [--resume] [--die_after K] [--out params.pt]

Data come from the engine's own loader (so the data order must survive a resume). With
``--die_after K`` the process SIGKILLs itself right after the save of step K. Started as one rank of
several (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set), it trains data parallel; the fault options
make one rank's save fail (``--fail_write_rank``), rank 0's ``save_pretrained`` fail
(``--fail_pretrained``), or print the tensor files a load opened (``--print_opened``).
"""
from __future__ import annotations

import argparse
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


def print_opened() -> None:
    """Print the name of every tensor file a load opens (stdout, one line each)."""
    open_file = checkpoint.shards._open_safetensors

    def recording(file, tag):
        print(f"opened {Path(file).name}", flush=True)
        return open_file(file, tag)

    checkpoint.shards._open_safetensors = recording


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
    if args.resume:
        path, client = engine.load_checkpoint(args.save_dir)
        assert path is not None and client["step"] == engine.global_steps, (path, client)
    while engine.global_steps < args.steps:
        for batch in loader:
            loss = engine(**batch)
            engine.backward(loss)
            engine.step()
            engine.flush()  # the save's own flush is then a no-op: "saving" marks the file writes
            print(f"saving {engine.global_steps}", flush=True)
            start = time.perf_counter()
            engine.save_checkpoint(args.save_dir, client_state={"step": engine.global_steps})
            print(f"saved {engine.global_steps} in {time.perf_counter() - start:.3f}s", flush=True)
            if engine.global_steps == args.die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if engine.global_steps >= args.steps:
                break
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

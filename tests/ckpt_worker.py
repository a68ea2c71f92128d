"""A training process for the checkpoint tests: trains from (or resumes) a save_dir, saving every step.

    python ckpt_worker.py --save_dir D --steps M [--resume] [--die_after K] [--out params.pt]

Data come from the engine's own loader (so the data order must survive a resume). With
``--die_after K`` the process SIGKILLs itself right after the save of step K.
"""
from __future__ import annotations

import argparse
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


def dataset(n: int = 40) -> list[dict]:
    rows = batches(1, rows=n, seed=3)[0]
    return [{k: v[i] for k, v in rows.items()} for i in range(n)]


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
    args = parser.parse_args()
    config = ds_config(args.tier, method=args.method, micro_batch=4, lr=1e-2, weight_decay=0.01,
                       num_perturbations=3, hessian_smooth=0.1)
    config["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                                "warmup_num_steps": 2, "total_num_steps": 20}}
    engine, _, loader, _ = zo2_deepspeed.initialize(model=make_model(hidden=args.hidden), config=config,
                                                    training_data=dataset())
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
    if args.out:
        torch.save(engine.parameter_snapshot(), args.out)
    engine.close()


if __name__ == "__main__":
    main()

"""One rank of a data-parallel ZO run on a tiny model, launched by the multi-rank tests.

Each step uses the global batch ``batches(steps, rows=global_rows)[t]``; rank r takes its contiguous
slice of rows and splits it into ``gas`` micro-batches. At the end every rank saves the gathered
parameters and its step records to OUT/rank<r>.pt.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tier", default="cpu")
    parser.add_argument("--method", default="mezo")
    parser.add_argument("--global_rows", type=int, default=8)
    parser.add_argument("--gas", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--fail", default="none", choices=["none", "kill", "hang", "diverge"])
    parser.add_argument("--fail_step", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--check_sync_every", type=int, default=0)
    # ε = 1e-2: batch-composition rounding (~1e-7 of the loss) enters the update as Δloss/2ε
    parser.add_argument("--eps", type=float, default=1e-2)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    from zo2_deepspeed.distributed import ensure_distributed
    ensure_distributed(args.timeout)
    from deepspeed import comm as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = args.global_rows // world
    micro = rows // args.gas
    config = ds_config(args.tier, method=args.method, micro_batch=micro, gas=args.gas, lr=args.lr, eps=args.eps,
                       weight_decay=0.01,
                       comm_timeout_s=args.timeout, check_sync_every=args.check_sync_every)
    engine, *_ = zo2_deepspeed.initialize(model=make_model("llama", layers=args.layers, hidden=args.hidden),
                                          config=config)
    records = []
    for t, batch in enumerate(batches(args.steps, rows=args.global_rows)):
        if t == args.fail_step and rank == 1:
            if args.fail == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if args.fail == "hang":
                time.sleep(3600)
            if args.fail == "diverge":
                with torch.no_grad():
                    engine.module.model.layers[1].mlp.up_proj.weight.add_(1e-3)
        mine = {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}
        for m in range(args.gas):
            part = {k: v[m * micro:(m + 1) * micro] for k, v in mine.items()}
            loss = engine(**part)
            engine.backward(loss)
            engine.step()
        records.append(dict(engine.last_step, bytes_all_reduced=engine.bytes_all_reduced))
    params = engine.parameter_snapshot()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"params": params, "records": records, "world": world}, out / f"rank{rank}.pt")
    engine.close()


if __name__ == "__main__":
    main()

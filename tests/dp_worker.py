"""One rank of a data-parallel (and perturbation-parallel) ZO run on a tiny model, launched by the multi-rank tests.

Each step uses the global batch ``batches(steps, rows=global_rows)[t]`` (with ``--padded``, rows of
different token counts and a last batch of ``--last_rows`` rows: ``padded_batches``); the ranks of
data-parallel replica d (ranks d·P … d·P + P − 1 with ``--perturbation P``) take its d-th contiguous slice
of rows and split it into ``gas`` micro-batches (slices as even as the rows allow: ``split_rows``). With ``--loader`` the batches come from the engine's own loader
over those rows instead. ``--load_dir`` resumes from a checkpoint before training (step t then uses
batch t), ``--save_dir`` saves one after it. At the end every rank saves the gathered parameters and
its step records to OUT/rank<r>.pt.
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
from tiny_models import batches, make_model, padded_batches, split_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tier", default="cpu", help="none, device, cpu or nvme")
    parser.add_argument("--method", default="mezo")
    parser.add_argument("--global_rows", type=int, default=8)
    parser.add_argument("--gas", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--perturbation", type=int, default=1, help="zo2.parallel.perturbation")
    parser.add_argument("--directions", type=int, default=8, help="FZOO's num_perturbations")
    parser.add_argument("--loader", action="store_true", help="batches from initialize(training_data=...)")
    parser.add_argument("--save_dir", default=None)
    parser.add_argument("--load_dir", default=None)
    parser.add_argument("--fail", default="none", choices=["none", "kill", "hang", "diverge", "other_batch"])
    parser.add_argument("--fail_step", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--check_sync_every", type=int, default=0)
    # ε = 1e-2, as the reference tests; how the batch is split does not round the losses (float64 sums)
    parser.add_argument("--eps", type=float, default=1e-2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--noise", default="auto", help="zo2.noise_generator")
    parser.add_argument("--storage", default=None, help="zo2.storage_dtype")
    parser.add_argument("--lazy_steps", type=int, default=None, help="LOZO's zo2.lazy_steps (ν)")
    parser.add_argument("--padded", action="store_true", help="rows of different token counts (padded_batches)")
    parser.add_argument("--last_rows", type=int, default=None, help="with --padded: rows of the last step's batch")
    parser.add_argument("--first_order", type=int, default=-1, help="zo2.first_order.blocks (with the head; AdamW)")
    parser.add_argument("--chunk_rows", type=int, default=None, help="zo2.first_order.chunk_rows")
    args = parser.parse_args()

    from zo2_deepspeed.distributed import ensure_distributed
    ensure_distributed(args.timeout)
    from deepspeed import comm as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    replica = rank // args.perturbation
    rows = args.global_rows // (world // args.perturbation)
    micro = rows // args.gas
    config = ds_config("cpu" if args.tier == "nvme" else args.tier, method=args.method, micro_batch=micro,
                       gas=args.gas, lr=args.lr, eps=args.eps,
                       weight_decay=0.01, num_perturbations=args.directions, hessian_smooth=0.1,
                       comm_timeout_s=args.timeout, check_sync_every=args.check_sync_every,
                       parallel={"perturbation": args.perturbation}, noise_generator=args.noise,
                       **({"storage_dtype": args.storage} if args.storage else {}),
                       **({"lazy_steps": args.lazy_steps} if args.lazy_steps else {}))
    config["train_batch_size"] = args.global_rows  # micro × accumulation × data-parallel size (world/P)
    if args.first_order >= 0:
        config["zo2"]["first_order"] = {"blocks": args.first_order, "head": True, "max_fraction": 0.9,
                                        "chunk_rows": args.chunk_rows,
                                        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}}
    if args.tier == "nvme":  # partitions of at least 1 MiB go to files (--hidden 512), smaller ones stay in memory
        Path(args.out).mkdir(parents=True, exist_ok=True)  # nvme_path's parent must exist (a typo there is refused)
        config["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": str(Path(args.out) / "nvme")}
    data = (padded_batches(args.steps, rows=args.global_rows, last_rows=args.last_rows) if args.padded
            else batches(args.steps, rows=args.global_rows))
    rows_of = batches(4, rows=args.global_rows)  # --loader: the same 4 batches' rows whatever --steps is
    examples = [{k: v[i] for k, v in b.items()} for b in rows_of for i in range(args.global_rows)]
    engine, _, loader, _ = zo2_deepspeed.initialize(
        model=make_model("llama", layers=args.layers, hidden=args.hidden), config=config,
        training_data=examples if args.loader else None)
    if args.load_dir:
        engine.load_checkpoint(args.load_dir)
    calls = []  # a block runs its forward once per perturbation group: count the groups this rank ran
    engine.module.model.layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    loaded = (batch for _ in iter(int, 1) for batch in loader) if args.loader else None  # epoch after epoch
    records, returned = [], []
    for t in range(engine.global_steps, args.steps):
        batch = data[t]
        if t == args.fail_step and rank == 1:
            if args.fail in ("kill", "hang"):  # when the peers' wait begins, for tests that time how long it lasts
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / "failed_at").write_text(repr(time.time()))
            if args.fail == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if args.fail == "hang":
                time.sleep(3600)
            if args.fail == "diverge":
                with torch.no_grad():
                    engine.module.model.layers[1].mlp.up_proj.weight.add_(1e-3)
            if args.fail == "other_batch":
                batch = data[t - 1]
        ours = split_rows(len(batch["input_ids"]), world // args.perturbation)[replica]
        mine = {k: v[ours] for k, v in batch.items()}
        for rows_m in split_rows(len(mine["input_ids"]), args.gas):
            part = next(loaded) if loaded is not None else {k: v[rows_m] for k, v in mine.items()}
            loss = engine(**part)
            returned.append(float(loss))
            engine.backward(loss)
            engine.step()
        records.append(dict(engine.last_step, bytes_all_reduced=engine.bytes_all_reduced))
    if args.save_dir:
        engine.save_checkpoint(args.save_dir)
    params = engine.parameter_snapshot()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from zo2_deepspeed.tiers.nvme import on_nvme
    surface = {"dp_rank": engine.get_data_parallel_rank(), "dp_world_size": engine.dp_world_size,
               "mpu": [engine.mpu.get_data_parallel_rank(), engine.mpu.get_data_parallel_world_size(),
                       engine.mpu.get_model_parallel_rank(), engine.mpu.get_model_parallel_world_size()],
               "shard": list(engine.deepspeed_io(examples).sampler)}  # DeepSpeed's getters, per replica
    torch.save({"params": params, "records": records, "returned": returned, "world": world, "surface": surface,
                "noise": engine.noise.description,
                "group_forwards": len(calls), "on_nvme": sum(on_nvme(p) for p in engine.module.parameters())},
               out / f"rank{rank}.pt")
    engine.close()


if __name__ == "__main__":
    main()

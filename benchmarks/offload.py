"""Movement between the storage tier and the device: bytes, step time, device memory, host memory.

    python benchmarks/offload.py                       # all parts (the NVMe parts need libaio; ~15 min)
    python benchmarks/offload.py --parts bytes,time    # a subset: bytes, time, layers, rss

Parts, each measured side by side in one run:
  bytes   bytes moved per step / fp32 parameter bytes: ZO2 with fp32 and bf16 partitions (cpu tier) and
          NVMe, against the naive alternative — DeepSpeed's own ZeRO-3 parameter offload with the plain
          MeZO loop (two full forwards, perturbations through GatheredParameters), counted at DeepSpeed's
          gather and partition calls.
  time    step time of the cpu and nvme tiers relative to resident parameters (same model, interleaved).
  layers  peak device-resident bytes (the pipeline's own accounting of working, perturbed and noise
          buffers) for 4, 8, 16 and 32 layers: it must stay flat (at most ~3 blocks + the tied embedding).
  rss     peak host RSS of a process training a model of >= 4 GB fp32 parameters (and one twice as deep)
          with the NVMe tier, built under zo2_deepspeed.zero_init (never whole in RAM), relative to the
          model's bytes; with glibc's default allocator and with a fixed mmap threshold.
Writes the "offload" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import zo2_deepspeed  # noqa: E402
from harness import EPS, LR, EngineVariant, engine_step, lm_batch, measure, median  # noqa: E402
from harness import llama as harness_llama  # noqa: E402
from harness import zo2_config as harness_config  # noqa: E402
from results import table, write_section  # noqa: E402
from zo2_deepspeed.distributed import without_launch_vars  # noqa: E402


def llama(layers: int = 30) -> torch.nn.Module:
    """SmolLM2-135M's shape (tied embeddings), 512 positions."""
    return harness_llama(layers=layers, positions=512, rope_theta=10000.0)


def batch_for(model: torch.nn.Module, rows: int, seq: int) -> dict:
    return lm_batch(model.config.vocab_size, rows, seq)


def zo2_config(tier: str, rows: int, nvme_path: str = "", storage: str = "fp32", prefetch: int = 1) -> dict:
    return harness_config(tier, rows, nvme_path=nvme_path, storage=storage, prefetch=prefetch)


step = engine_step


# ------------------------------------------------------------------------------------- bytes

class DeepSpeedByteCounter:
    """Counts partition bytes DeepSpeed ZeRO-3 brings in (gathers) and writes back (updated partitions)."""

    def __init__(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import Init
        self.init_cls = Init
        self.read = self.written = 0
        self._gather = Init._ensure_availability_of_partitioned_params
        self._partition = Init._partition_param
        counter = self

        def gather(init: Any, params: Any) -> Any:
            counter.read += sum(p.ds_tensor.ds_numel * p.ds_tensor.element_size() for p in params
                                if p.ds_status.name == "NOT_AVAILABLE")
            return counter._gather(init, params)

        def partition(init: Any, param: Any, buffer: Any = None, has_been_updated: bool = False,
                      free_data: bool = True) -> Any:
            if has_been_updated:
                counter.written += param.ds_tensor.ds_numel * param.ds_tensor.element_size()
            return counter._partition(init, param, buffer, has_been_updated, free_data)

        Init._ensure_availability_of_partitioned_params = gather
        Init._partition_param = partition

    def close(self) -> None:
        self.init_cls._ensure_availability_of_partitioned_params = self._gather
        self.init_cls._partition_param = self._partition


class NaiveZeRO3MeZO:
    """DeepSpeed ZeRO-3 with parameter offload and the plain MeZO loop a user would write on it."""

    def __init__(self, model: torch.nn.Module, rows: int) -> None:
        import deepspeed
        config = {"train_micro_batch_size_per_gpu": rows, "steps_per_print": 10**9,
                  "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                        "stage3_param_persistence_threshold": 0}}
        self.engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=None)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _modify(self, seed: int, scale: float) -> None:
        import deepspeed
        torch.manual_seed(seed)
        for p in self.params:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.add_(torch.normal(0, 1, size=p.shape), alpha=scale)

    def step(self, batch: dict, seed: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            self._modify(seed, EPS)
            plus = float(self.engine(**batch, use_cache=False).loss)
            self._modify(seed, -2 * EPS)
            minus = float(self.engine(**batch, use_cache=False).loss)
            self._modify(seed, EPS)
            self._modify(seed, -LR * (plus - minus) / (2 * EPS))
        return time.perf_counter() - start


def part_bytes(args: argparse.Namespace, nvme: bool) -> list[list[Any]]:
    base = llama(layers=args.layers)
    batch = batch_for(base, args.rows, args.seq)
    fp32_bytes = sum(p.numel() for p in base.parameters()) * 4
    rows = []
    variants = [("ZO2 cpu tier, fp32 partitions", "cpu", "fp32"), ("ZO2 cpu tier, bf16 partitions", "cpu", "bf16")]
    if nvme:
        variants.append(("ZO2 nvme tier, fp32 partitions", "nvme", "fp32"))
    for label, tier, storage in variants:
        with tempfile.TemporaryDirectory(dir=args.nvme_dir) as folder:
            engine, *_ = zo2_deepspeed.initialize(model=copy.deepcopy(base),
                                                  config=zo2_config(tier, args.rows, folder, storage))
            for s in range(3):
                step(engine, batch)
            moved = engine.last_step["bytes_read"] + engine.last_step["bytes_written"]
            disk = getattr(engine.tier, "disk_stats", None)
            engine.close()
        rows.append([label, f"{moved / fp32_bytes:.2f}", "≤ 2.0" if storage == "fp32" else "≤ 1.0",
                     "" if disk is None else "NVMe I/O counted at the swapper"])
    counter = DeepSpeedByteCounter()
    try:
        naive = NaiveZeRO3MeZO(copy.deepcopy(base), args.rows)
        naive.step(batch, 0)
        counter.read = counter.written = 0
        naive.step(batch, 1)
        rows.append(["naive: DeepSpeed ZeRO-3 offload + plain MeZO loop",
                     f"{(counter.read + counter.written) / fp32_bytes:.2f}", "(reference)",
                     f"read {counter.read / fp32_bytes:.2f}×, written {counter.written / fp32_bytes:.2f}×"])
    finally:
        counter.close()
    return rows


# ------------------------------------------------------------------------------------- time

def part_time(args: argparse.Namespace, nvme: bool) -> list[list[Any]]:
    base = llama(layers=args.layers)
    batch = batch_for(base, args.rows, args.seq)
    tiers = ["resident", "cpu"] + (["nvme"] if nvme else [])
    folder = tempfile.mkdtemp(dir=args.nvme_dir)
    variants = [EngineVariant.build(t, copy.deepcopy(base), zo2_config(t, args.rows, folder, prefetch=args.prefetch))
                for t in tiers]
    times = measure(variants, batch, args.repeats, warmup=1)
    phases = {v.name: v.records[-1]["phase_s"] for v in variants}
    for v in variants:
        v.close()
    med = {t: median(v) for t, v in times.items()}
    rows = [["cpu tier / resident", f"{med['cpu'] / med['resident']:.3f}", "≤ 1.10"]]
    if nvme:
        rows.append(["nvme tier / resident", f"{med['nvme'] / med['resident']:.3f}", "≤ 1.5"])
    for t in tiers:
        rows.append([f"{t}: median step", f"{med[t]:.2f} s",
                     ", ".join(f"{k} {v:.2f}" for k, v in phases[t].items() if v >= 0.005)])
    return rows


# ------------------------------------------------------------------------------------- layers

def part_layers(args: argparse.Namespace) -> list[list[Any]]:
    rows = []
    for layers in (4, 8, 16, 32):
        model = llama(layers=layers)
        batch = batch_for(model, args.rows, args.seq)
        engine, *_ = zo2_deepspeed.initialize(model=model, config=zo2_config("cpu", args.rows))
        layer_bytes = max(b.numel for b in engine.blocks if "layers" in b.name) * 4
        shared = sum(s.numel for s in engine.pipeline.slots if s.shared) * 4
        engine.pool.reset_peak()
        step(engine, batch)
        step(engine, batch)
        peak = engine.pool.peak_bytes_in_use
        total = sum(s.numel for s in engine.pipeline.slots) * 4
        engine.close()
        rows.append([layers, f"{total / 2**20:.0f}", f"{layer_bytes / 2**20:.1f}", f"{shared / 2**20:.1f}",
                     f"{peak / 2**20:.1f}", f"{(peak - 3 * shared) / layer_bytes:.2f}"])
    return rows


# ------------------------------------------------------------------------------------- rss

RSS_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})


def peak_rss():
    # VmHWM belongs to this process image; ru_maxrss would carry over the forking parent's peak across exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024


import zo2_deepspeed
from transformers import LlamaConfig, AutoModelForCausalLM
config = json.loads({config!r})
shape = json.loads({shape!r})
rss_imports = peak_rss()
start = time.perf_counter()
with zo2_deepspeed.zero_init(config):
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shape))
built = time.perf_counter() - start
params = sum(p.ds_numel for p in model.parameters())
rss_built = peak_rss()
engine, *_ = zo2_deepspeed.initialize(model=model, config=config)
ids = torch.randint(0, shape["vocab_size"], (config["train_micro_batch_size_per_gpu"], 32))
times = []
for step in range({steps}):
    t = time.perf_counter()
    loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    engine.step()
    times.append(time.perf_counter() - t)
working = engine.pool.peak_bytes_in_use
engine.close()
print(json.dumps(dict(params=params, rss=peak_rss(),
                      rss_imports=rss_imports, rss_built=rss_built, build_s=built, step_s=times,
                      working=working, loss=float(loss))))
"""

# glibc grows its mmap threshold after large frees, after which big tensors come from the heap and freed
# pages stay in the process; a fixed threshold returns them. Measured both ways.
ALLOCATORS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=1 MiB": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}}


def rss_child(args: argparse.Namespace, layers: int, allocator_env: dict[str, str]) -> dict[str, Any]:
    shape = dict(vocab_size=8192, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                 num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
                 tie_word_embeddings=False)
    with tempfile.TemporaryDirectory(dir=args.nvme_dir) as folder:
        config = zo2_config("nvme", 1, folder, prefetch=0)
        # Built from a config (no model yet to size them from): the fullest block, a layer's 7 matrices, each
        # up to the largest matrix (the embeddings). The engine checks this and names the field if too small.
        buffer_size = shape["vocab_size"] * shape["hidden_size"]
        config["zero_optimization"]["offload_param"].update(buffer_count=7, buffer_size=buffer_size)
        code = RSS_CHILD.format(root=str(HERE.parent), config=json.dumps(config), shape=json.dumps(shape),
                                steps=args.rss_steps)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env={**without_launch_vars(os.environ), **allocator_env}, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["pinned"] = 7 * buffer_size * 4
    return out


def part_rss(args: argparse.Namespace) -> list[list[Any]]:
    rows = []
    for layers in args.rss_layers:
        for name, env in ALLOCATORS.items():
            out = rss_child(args, layers, env)
            model_bytes = out["params"] * 4
            gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
            rows.append([f"{out['params'] / 1e9:.2f} B ({layers} layers)", gib(model_bytes), name,
                         gib(out["rss_imports"]), gib(out["pinned"]), gib(out["working"]), gib(out["rss_built"]),
                         gib(out["rss"]), f"**{out['rss'] / model_bytes:.2f}**", "< 0.5",
                         f"{out['build_s']:.0f}", ", ".join(f"{t:.1f}" for t in out["step_s"])])
            print(rows[-1], flush=True)
    return rows


def nvme_available() -> bool:
    from zo2_deepspeed.tiers.nvme import nvme_unavailable_reason
    return nvme_unavailable_reason() is None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="bytes,time,layers,rss")
    parser.add_argument("--layers", type=int, default=30, help="layers of the SmolLM2-135M-shaped model")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--rss_steps", type=int, default=2)
    parser.add_argument("--rss_layers", type=lambda v: [int(x) for x in v.split(",")], default=[22, 44],
                        help="layers of the ~1B-parameter (22) model in the rss part; 44 doubles it")
    parser.add_argument("--nvme_dir", default=None, help="where NVMe swap files go (default: the temp dir)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    nvme = nvme_available()
    sections = []
    if not nvme:
        sections.append("NVMe tier unavailable here (no libaio / AsyncIO op): its rows are missing.")
    if "bytes" in parts:
        rows = part_bytes(args, nvme)
        sections.append(f"**Bytes moved per step / fp32 parameter bytes** (SmolLM2-135M shape, {args.layers} layers, "
                        f"batch {args.rows}×{args.seq}):\n\n" + table(["variant", "ratio", "target", "note"], rows))
        print(sections[-1], flush=True)
    if "time" in parts:
        rows = part_time(args, nvme)
        sections.append(f"**Step time relative to resident parameters** (same model and batch, {args.repeats} "
                        f"interleaved steps, prefetch_blocks={args.prefetch}):\n\n"
                        + table(["ratio / variant", "measured", "target or phases (s)"], rows))
        print(sections[-1], flush=True)
    if "layers" in parts:
        rows = part_layers(args)
        sections.append("**Peak device-resident bytes vs depth** (cpu tier; working + perturbed + noise buffers "
                        "from the pipeline's own accounting; the tied embedding stays resident for a pass):\n\n"
                        + table(["layers", "model MiB", "largest layer MiB", "tied embedding MiB", "peak MiB",
                                 "(peak − 3·embedding) / layer"], rows))
        print(sections[-1], flush=True)
    if "rss" in parts and nvme:
        rows = part_rss(args)
        sections.append(
            "**Peak host RSS with the NVMe tier** (built under zero_init from a config, never whole in RAM; batch "
            "1×32; prefetch_blocks 0). RSS includes the Python/torch/DeepSpeed imports, DeepSpeed's pinned swap "
            "buffers, and — on this CPU-only machine, where the compute device is host memory — the pipeline's "
            "working set, which on a GPU lives in device memory:\n\n"
            + table(["parameters", "fp32 GiB", "allocator", "imports GiB", "pinned swap buffers GiB",
                     "working set GiB", "RSS after build GiB", "peak RSS GiB", "peak RSS / model", "target",
                     "build s", "step s"], rows))
        print(sections[-1], flush=True)
    write_section("offload", "\n\n".join(sections))


if __name__ == "__main__":
    main()

"""Fine-tune a model that cannot fit in this machine's memory, through the NVMe tier, end to end.

    python benchmarks/beyond_ram.py                  # >= 9 B parameters, fp32 size >= 1.5 x RAM (about an hour here)
    python benchmarks/beyond_ram.py --layers 40 --hidden 1024 --inter 2816 --heads 16 --kv_heads 8 \\
        --min_params 0 --no_results                  # the same flow at 0.5 B parameters, a few minutes

A LLaMA-shaped model (untied embeddings, grouped-query attention, the 32,000-word vocabulary of the
LLaMA-2 tokenizer) is built with random weights straight into NVMe swap files under
``zo2_deepspeed.zero_init`` — bf16 partitions with stochastic rounding, never whole in memory — and then:

  1. trains ``--steps`` MeZO steps (batch 1 x 32 tokens), timing each and splitting it into disk read,
     disk write, compute, noise and the rest (pipeline clocks and the tier's own I/O clocks);
  2. saves a checkpoint, runs one more step and an eval forward, loads the checkpoint back and runs
     that step and eval again: losses, projected gradient and a streamed parameter must agree bitwise;
  3. closes the engine, deletes the swap files, exports the checkpoint as a Hugging Face directory
     tensor by tensor (``zo2_deepspeed.export``), and checks every exported tensor against the
     checkpoint and its names and shapes against the model's;
  4. measures the disk's own O_DIRECT read and write bandwidth (DeepSpeed's async I/O with the run's
     aio settings) before and after, so each step is compared with its I/O floor
     (bytes read / read bandwidth + bytes written / write bandwidth).

The work runs in a child process whose peak resident set (VmHWM) is the figure reported; it runs with
``MALLOC_MMAP_THRESHOLD_=1048576`` (``--mmap_threshold 0`` for glibc's default, which keeps freed blocks
in its heaps once its dynamic threshold has grown: about 1 GiB more here, growing with every pass). Free disk
space is checked first against what the run needs at its peak (swap files and checkpoint, then
checkpoint and export); the working folder is removed at exit, also after an error or Ctrl-C.
Writes the "beyond_ram" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

GB = 10**9
GIB = 2**30
RSS_TARGET = 6 * GIB
MIN_AIO_BYTES = 1 << 20
"""DeepSpeed's swap threshold: smaller partitions stay in CPU memory (deepspeed.runtime.swap_tensor.utils)."""
AIO = {"block_size": 1 << 20, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
       "overlap_events": True}
MMAP_THRESHOLD = 1 << 20
"""The run's MALLOC_MMAP_THRESHOLD_ (docs/tiers.md): freed tensors go back to the system, not to a heap."""
SLACK_BYTES = 2 * GIB
"""Kept free beyond the run's own need: others write to the same disk."""


# ------------------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class Shape:
    """A LLaMA's dimensions (untied embeddings)."""

    vocab: int = 32000
    hidden: int = 3072
    inter: int = 8192
    heads: int = 24
    kv_heads: int = 8
    layers: int = 0

    def matrices(self) -> list[tuple[str, int]]:
        """(name, elements) of every parameter, layer by layer (the norms included)."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        layer = [("self_attn.q_proj.weight", self.hidden * self.hidden), ("self_attn.k_proj.weight", self.hidden * kv),
                 ("self_attn.v_proj.weight", self.hidden * kv), ("self_attn.o_proj.weight", self.hidden * self.hidden),
                 ("mlp.gate_proj.weight", self.hidden * self.inter), ("mlp.up_proj.weight", self.hidden * self.inter),
                 ("mlp.down_proj.weight", self.inter * self.hidden), ("input_layernorm.weight", self.hidden),
                 ("post_attention_layernorm.weight", self.hidden)]
        out = [("model.embed_tokens.weight", self.vocab * self.hidden)]
        out += [(f"model.layers.{i}.{name}", n) for i in range(self.layers) for name, n in layer]
        return out + [("model.norm.weight", self.hidden), ("lm_head.weight", self.vocab * self.hidden)]

    @property
    def params(self) -> int:
        return sum(n for _, n in self.matrices())

    def per_layer(self) -> int:
        return Shape(self.vocab, self.hidden, self.inter, self.heads, self.kv_heads, 1).params - \
            Shape(self.vocab, self.hidden, self.inter, self.heads, self.kv_heads, 0).params

    def hf_config(self) -> dict:
        return dict(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.inter,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                    max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=500000.0)


def layers_for(shape: Shape, min_params: int, min_fp32_bytes: int) -> int:
    """The fewest layers that give at least ``min_params`` parameters and ``min_fp32_bytes`` of fp32 weights."""
    fixed = Shape(**{**asdict(shape), "layers": 0}).params
    need = max(min_params, -(-min_fp32_bytes // 4))
    return max(1, -(-(need - fixed) // shape.per_layer()))


def mem_total() -> int:
    """Bytes of RAM (MemTotal)."""
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemTotal")


# ------------------------------------------------------------------------------------- disk

@dataclass(frozen=True)
class DiskNeed:
    """Bytes the run writes, and the most it holds at once."""

    swap: int
    checkpoint: int
    export: int

    @property
    def peak(self) -> int:
        """The swap files are deleted before the export is written: at most two of the three exist at once."""
        return max(self.swap + self.checkpoint, self.checkpoint + self.export)


def disk_need(shape: Shape, element_size: int = 2) -> DiskNeed:
    """Swap files (O_DIRECT-aligned, only partitions above DeepSpeed's threshold), checkpoint and export bytes."""
    align = 1024 * AIO["intra_op_parallelism"] // element_size
    min_numel = max(MIN_AIO_BYTES, AIO["block_size"]) // element_size
    swap = sum(-(-n // align) * align * element_size for _, n in shape.matrices() if n >= min_numel)
    tensors = shape.params * element_size
    headers = 200 * len(shape.matrices()) + (1 << 20)  # safetensors headers, manifest, config files
    return DiskNeed(swap=swap, checkpoint=tensors + headers, export=tensors + headers)


def check_free_space(folder: Path, need: DiskNeed, slack: int = SLACK_BYTES) -> int:
    """Free bytes at ``folder``; exits with the space needed (and what needs it) when there is not enough."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    wanted = need.peak + slack
    if free < wanted:
        raise SystemExit(f"error: this run needs {wanted / GB:.1f} GB free in {probe} (swap files {need.swap / GB:.1f} "
                         f"GB + checkpoint {need.checkpoint / GB:.1f} GB, later checkpoint + export "
                         f"{need.export / GB:.1f} GB, plus {slack / GB:.1f} GB to spare) but only {free / GB:.1f} GB "
                         f"are free: free space, or pass --workdir on a larger disk, or a smaller --layers")
    return free


def disk_bandwidth(folder: Path, total_bytes: int, file_bytes: int = 64 << 20, batch: int = 8) -> dict[str, float]:
    """The disk's O_DIRECT write and read bandwidth (bytes/s) with DeepSpeed's async I/O and the run's aio settings.

    ``total_bytes`` in files of ``file_bytes``, ``batch`` transfers in flight and then waited for, as the
    swapper moves a block's partitions.
    """
    import torch
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from zo2_deepspeed.tiers.nvme import aio_options
    from deepspeed.runtime.swap_tensor import constants as c
    handle = AsyncIOBuilder().load(verbose=False).aio_handle(**aio_options({
        c.AIO_BLOCK_SIZE: AIO["block_size"], c.AIO_QUEUE_DEPTH: AIO["queue_depth"],
        c.AIO_SINGLE_SUBMIT: AIO["single_submit"], c.AIO_OVERLAP_EVENTS: AIO["overlap_events"],
        c.AIO_INTRA_OP_PARALLELISM: AIO["intra_op_parallelism"]}))
    buffers = [handle.new_cpu_locked_tensor(file_bytes, torch.empty(0, dtype=torch.uint8)) for _ in range(batch)]
    for b in buffers:
        b.copy_(torch.randint(0, 256, (file_bytes,), dtype=torch.uint8))  # incompressible
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"probe{i}.bin") for i in range(max(batch, total_bytes // file_bytes))]
    seconds = {}
    try:
        # the first pass allocates the files (untimed): swap files too are written in place after the build
        for what, submit in (("allocate", handle.async_pwrite), ("write", handle.async_pwrite),
                             ("read", handle.async_pread)):
            start = time.perf_counter()
            for i in range(0, len(paths), batch):
                group = paths[i:i + batch]
                for buffer, path in zip(buffers, group):
                    if submit(buffer, path) != 0:
                        raise OSError(f"async {what} of {path} could not be submitted")
                if handle.wait() != len(group):
                    raise OSError(f"async {what}: fewer than {len(group)} transfers completed in {folder}")
            seconds[what] = time.perf_counter() - start
    finally:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        for b in buffers:
            handle.free_cpu_locked_tensor(b)
    moved = len(paths) * file_bytes
    return {"write_Bps": moved / seconds["write"], "read_Bps": moved / seconds["read"], "bytes": moved}


# ------------------------------------------------------------------------------------- the child: the run itself

def vm_hwm() -> int:
    """Peak resident set of this process (VmHWM), in bytes: page-locked swap buffers included."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def run_config(shape: Shape, swap_dir: str, prefetch: int, lr: float) -> dict:
    """The run's DeepSpeed config: NVMe tier, bf16 partitions with stochastic rounding, MeZO."""
    from harness import zo2_config
    config = zo2_config("nvme", 1, nvme_path=swap_dir, storage="bf16", prefetch=prefetch, lr=lr, seed=0,
                        stochastic_rounding=True)
    # Built from a config, so the swapper cannot be sized from the model: a layer's 7 matrices per resident
    # block, each up to the largest (the embedding). Buffers are pinned per shard size only as needed.
    config["zero_optimization"]["offload_param"].update(buffer_count=7 * (1 + prefetch),
                                                        buffer_size=shape.vocab * shape.hidden)
    config["aio"] = dict(AIO)
    return config


def checksum(tensor: Any) -> str:
    """xxh3-128 of a tensor's bytes: equal checksums mean bitwise-equal tensors."""
    import xxhash
    return xxhash.xxh3_128(tensor.contiguous().view(-1).view(__import__("torch").uint8).numpy()).hexdigest()


class Run:
    """The flow of one run in this (child) process; each phase records its figures in ``self.out``."""

    def __init__(self, plan: dict) -> None:
        import torch
        self.torch = torch
        self.plan = plan
        self.shape = Shape(**plan["shape"])
        self.work = Path(plan["workdir"])
        self.out: dict[str, Any] = {"rss": {"imports": vm_hwm()}, "steps": [], "checks": {}, "seconds": {}}
        from harness import lm_batch
        self.batch = lm_batch(self.shape.vocab, 1, plan["seq"], seed=1)
        self.eval_batch = lm_batch(self.shape.vocab, 1, plan["seq"], seed=2)
        self.engine: Any = None
        self.model: Any = None

    def phase(self, name: str, fn: Callable[[], Any]) -> Any:
        print(f"[beyond_ram] {name} ...", flush=True)
        start = time.perf_counter()
        result = fn()
        self.out["seconds"][name] = time.perf_counter() - start
        self.out["rss"][name] = vm_hwm()
        print(f"[beyond_ram] {name}: {self.out['seconds'][name]:.1f} s, peak RSS so far "
              f"{self.out['rss'][name] / GIB:.2f} GiB", flush=True)
        return result

    # -- build and train
    def build(self) -> None:
        from transformers import AutoModelForCausalLM, LlamaConfig

        import zo2_deepspeed
        self.config = run_config(self.shape, str(self.work / "swap"), self.plan["prefetch"], self.plan["lr"])
        with zo2_deepspeed.zero_init(self.config):
            self.model = AutoModelForCausalLM.from_config(LlamaConfig(**self.shape.hf_config()))
        from zo2_deepspeed.tiers.nvme import on_nvme
        params = list(self.model.named_parameters())
        swap_files = [f for f in (self.work / "swap").rglob("*.swp")]
        self.out["model"] = {
            "params": sum(p.ds_numel for _, p in params),
            "fp32_bytes": sum(p.ds_numel for _, p in params) * 4,
            "swap_bytes": sum(f.stat().st_size for f in swap_files), "swap_files": len(swap_files),
            "on_nvme": sum(on_nvme(p) for _, p in params), "in_ram": sum(not on_nvme(p) for _, p in params),
            "in_ram_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for _, p in params if not on_nvme(p)),
        }
        assert all(p.numel() == 0 for _, p in params), "a parameter is whole in memory after zero_init"

    def initialize(self) -> None:
        import zo2_deepspeed
        self.engine, *_ = zo2_deepspeed.initialize(model=self.model, config=self.config)
        probe = f"model.layers.{self.shape.layers // 2}.mlp.down_proj.weight"
        self.probe = next(s for s in self.engine.pipeline.slots if s.name == probe)
        from zo2_deepspeed.tiers.nvme import on_nvme
        assert on_nvme(self.probe.param), f"{probe} should be streamed from NVMe"
        self.out["checks"]["probe"] = probe
        self.out["checks"]["probe_before"] = self.probe_checksum()

    def probe_checksum(self) -> str:
        """The probe parameter's bytes on NVMe, up to date (only its own partition is read)."""
        self.engine.flush()
        return checksum(self.engine.tier.read_partition(self.probe))

    def step(self, label: str) -> dict:
        engine = self.engine
        disk_before = engine.tier.disk_stats.snapshot()
        start = time.perf_counter()
        loss = engine(**self.batch)
        engine.backward(loss)
        engine.step()
        seconds = time.perf_counter() - start
        disk = engine.tier.disk_stats.since(disk_before)
        last = engine.last_step
        record = {"label": label, "step": last["step"], "loss": float(last["loss"]),
                  "group_losses": last["group_losses"], "projected_grad": last["projected_grad"],
                  "seconds": seconds, "phase_s": last["phase_s"], "disk_read_s": disk.read_s,
                  "disk_write_s": disk.write_s, "disk_bytes_read": disk.bytes_read,
                  "disk_bytes_written": disk.bytes_written, "bytes_read": last["bytes_read"],
                  "bytes_written": last["bytes_written"], "pinned_bytes": self.pinned_bytes()}
        self.out["steps"].append(record)
        print(f"[beyond_ram] {label}: loss {record['loss']:.4f}, {seconds:.1f} s, read "
              f"{disk.bytes_read / GB:.2f} GB in {disk.read_s:.1f} s, wrote {disk.bytes_written / GB:.2f} GB in "
              f"{disk.write_s:.1f} s, phases " + ", ".join(f"{k} {v:.1f}" for k, v in last["phase_s"].items()),
              flush=True)
        return record

    def pinned_bytes(self) -> int:
        return int(getattr(self.probe.param.nvme_swapper, "peak_pinned_bytes", 0))

    def evaluate(self) -> float:
        torch = self.torch
        self.engine.eval()
        with torch.no_grad():
            loss = float(self.engine(**self.eval_batch).loss)
        self.engine.train()
        return loss

    # -- checkpoint and resume
    def save(self) -> None:
        self.engine.save_checkpoint(str(self.work / "checkpoint"))
        self.out["checkpoint_bytes"] = sum(f.stat().st_size for f in (self.work / "checkpoint").rglob("*")
                                           if f.is_file())
        self.out["checks"]["probe_saved"] = self.probe_checksum()

    def continue_and_eval(self, label: str) -> dict:
        record = self.step(f"step {self.engine.global_steps} ({label})")
        return {"group_losses": record["group_losses"], "projected_grad": record["projected_grad"],
                "eval_loss": self.evaluate(), "probe": self.probe_checksum()}

    def load(self) -> None:
        path, _ = self.engine.load_checkpoint(str(self.work / "checkpoint"))
        assert path is not None, "the checkpoint was not found"

    # -- export
    def close_and_drop_swap(self) -> None:
        self.engine.close()
        self.out["pinned_peak_bytes"] = self.pinned_bytes()
        self.engine = None
        shutil.rmtree(self.work / "swap")

    def export(self) -> None:
        from zo2_deepspeed.export import export
        export(str(self.work / "checkpoint"), str(self.work / "export"), verify=True,
               max_shard_bytes=self.plan["max_shard_bytes"])
        self.out["export_bytes"] = sum(f.stat().st_size for f in (self.work / "export").iterdir())
        self.out["export_files"] = sorted(f.name for f in (self.work / "export").iterdir())

    def verify_export(self) -> None:
        """Every tensor of the export equals the checkpoint's; names and shapes are the model's."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from zo2_deepspeed.checkpoint import open_full_state
        torch = self.torch
        folder = self.work / "export"
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
        expected = {n: list(p.shape) for n, p in skeleton.named_parameters()}
        exported = ExportReader(folder)
        assert set(exported.names()) == set(expected), "the export's tensors are not the model's parameters"
        shards, meta = open_full_state(str(self.work / "checkpoint"), verify=False)
        checked = 0
        for entry in meta["parameters"]:
            got = exported.read(entry["name"])
            assert list(got.shape) == expected[entry["name"]], entry["name"]
            want = shards.full(f"param/{entry['name']}", entry["numel"]).view(entry["shape"])
            assert got.dtype == want.dtype and torch.equal(got.reshape(-1).view(torch.uint8),
                                                           want.reshape(-1).view(torch.uint8)), \
                f"{entry['name']} differs between the export and the checkpoint"
            if entry["name"] == self.out["checks"]["probe"]:
                self.out["checks"]["probe_exported"] = checksum(got)
            checked += 1
        self.out["checks"]["export_tensors_checked"] = checked
        self.out["checks"]["export_dtype"] = str(config.dtype)

    def drop_outputs(self) -> None:
        shutil.rmtree(self.work / "export")
        shutil.rmtree(self.work / "checkpoint")

    def run(self) -> dict:
        torch = self.torch
        self.phase("build", self.build)
        self.phase("initialize", self.initialize)
        for _ in range(self.plan["steps"]):
            self.phase(f"step {self.engine.global_steps}", lambda: self.step(f"step {self.engine.global_steps}"))
        self.phase("save checkpoint", self.save)
        self.out["checks"]["probe_changed"] = self.out["checks"]["probe_saved"] != self.out["checks"]["probe_before"]
        uninterrupted = self.phase("step + eval (uninterrupted)", lambda: self.continue_and_eval("uninterrupted"))
        self.phase("load checkpoint", self.load)
        resumed = self.phase("step + eval (resumed)", lambda: self.continue_and_eval("resumed"))
        checks = self.out["checks"]
        checks["uninterrupted"], checks["resumed"] = uninterrupted, resumed
        checks["resume_bitwise"] = uninterrupted == resumed
        checks["losses_finite"] = all(math.isfinite(s["loss"]) for s in self.out["steps"]) and \
            math.isfinite(uninterrupted["eval_loss"])
        self.phase("close, delete swap files", self.close_and_drop_swap)
        self.phase("export", self.export)
        self.phase("verify export", self.verify_export)
        checks["export_probe_matches"] = checks.get("probe_exported") == checks["probe_saved"]
        self.phase("delete checkpoint and export", self.drop_outputs)
        self.out["rss"]["peak"] = vm_hwm()
        self.out["torch_threads"] = torch.get_num_threads()
        return self.out


class ExportReader:
    """Tensors of a Hugging Face safetensors directory, read one at a time with plain reads (no memory map)."""

    def __init__(self, folder: Path) -> None:
        from zo2_deepspeed.checkpoint import _tensor_index
        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
            ["model.safetensors"]
        self.where = {}
        for name in files:
            entries, start = _tensor_index(folder / name)
            for key, entry in entries.items():
                self.where[key] = (folder / name, start, entry)

    def names(self) -> list[str]:
        return list(self.where)

    def read(self, name: str) -> Any:
        import torch

        from zo2_deepspeed.checkpoint import SAFETENSORS_NAMES
        path, start, entry = self.where[name]
        begin, end = entry["data_offsets"]
        out = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(start + begin)
            view, done = memoryview(out.numpy()), 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise EOFError(f"{path} ends inside {name}")
                done += n
        return out.view(SAFETENSORS_NAMES[entry["dtype"]]).view(entry["shape"])


def child_main(plan_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text())
    out = Run(plan).run()
    Path(plan["result"]).write_text(json.dumps(out))
    return 0


# ------------------------------------------------------------------------------------- the parent: plan, guard, report

def run_child(plan: dict, timeout_s: float) -> dict:
    """Run the flow in a child process; Ctrl-C or SIGTERM reach it and the parent waits for it to stop."""
    plan_path = Path(plan["workdir"]) / "plan.json"
    plan_path.write_text(json.dumps(plan))
    from zo2_deepspeed.distributed import without_launch_vars
    env = without_launch_vars(os.environ)
    if plan["mmap_threshold"]:
        env["MALLOC_MMAP_THRESHOLD_"] = str(plan["mmap_threshold"])
    child = subprocess.Popen([sys.executable, __file__, "--_child", str(plan_path)], env=env)
    try:
        code = child.wait(timeout=timeout_s)
    except BaseException:  # Ctrl-C, SIGTERM, timeout: stop the child before its files are removed
        _stop(child)
        raise
    if code != 0:
        raise SystemExit(f"error: the run failed (exit status {code}); see its output above")
    return json.loads(Path(plan["result"]).read_text())


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _raise_on_sigterm() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


def summarize(plan: dict, out: dict, bandwidth: list[dict], ram: int) -> tuple[str, dict]:
    """The RESULTS.md section and the figures the targets are judged by."""
    from results import table
    model, steps = out["model"], out["steps"]
    read_bw = sum(b["read_Bps"] for b in bandwidth) / len(bandwidth)
    write_bw = sum(b["write_Bps"] for b in bandwidth) / len(bandwidth)
    rows, ratios = [], []
    for s in steps:
        floor = s["disk_bytes_read"] / read_bw + s["disk_bytes_written"] / write_bw
        p = s["phase_s"]
        cpu = sum(p.values()) - s["disk_read_s"] - s["disk_write_s"]  # phases of both threads, disk waits out
        other = cpu - p["compute"] - p["noise"]
        ratios.append({"io_floor_s": floor, "cpu_s": cpu, "step_over_floor": s["seconds"] / floor,
                       "step_over_cpu": s["seconds"] / cpu})
        rows.append([s["label"], f"{s['loss']:.4f}", f"{s['seconds']:.1f}", f"{s['disk_read_s']:.1f}",
                     f"{s['disk_write_s']:.1f}", f"{p['compute']:.1f}", f"{p['noise']:.1f}", f"{other:.1f}",
                     f"{s['disk_bytes_read'] / GB:.2f}", f"{s['disk_bytes_written'] / GB:.2f}", f"{floor:.1f}",
                     f"{s['seconds'] / floor:.2f}", f"{s['seconds'] / cpu:.2f}"])
    timed = [r for r, s in zip(ratios, steps) if s["step"] > 0]  # step 0 writes nothing back (no pending update)
    checks, rss = out["checks"], out["rss"]
    verdict = {
        "params": model["params"], "fp32_over_ram": model["fp32_bytes"] / ram, "peak_rss": rss["peak"],
        "rss_ok": rss["peak"] < RSS_TARGET,
        "step_over_floor": max(r["step_over_floor"] for r in timed) if timed else None,
        "step_over_cpu": max(r["step_over_cpu"] for r in timed) if timed else None,
        "compute_dominates": all(r["cpu_s"] > r["io_floor_s"] for r in timed),
        "checks_ok": bool(checks["probe_changed"] and checks["resume_bitwise"] and checks["losses_finite"]
                          and checks["export_probe_matches"]),
    }
    shape = plan["shape"]
    gb = lambda b: f"{b / GB:.1f} GB"  # noqa: E731
    speeds = lambda key: " / ".join(f"{b[key] / GB:.2f}" for b in bandwidth)  # noqa: E731
    shards = sum(f.endswith(".safetensors") for f in out["export_files"])
    figures = table(["", "measured", "target"], [
        ["parameters", f"{model['params'] / 1e9:.2f} B", "≥ 9 B"],
        [f"fp32 weights / RAM ({ram / GIB:.1f} GiB)",
         f"{gb(model['fp32_bytes'])} = **{verdict['fp32_over_ram']:.2f} ×**", "≥ 1.5 ×"],
        ["bytes on disk (bf16 swap files)", f"{gb(model['swap_bytes'])} in {model['swap_files']} files; "
         f"{model['in_ram']} small tensors ({model['in_ram_bytes'] / 2**20:.1f} MiB) stay in RAM", ""],
        ["peak RSS of the run (VmHWM)", f"**{rss['peak'] / GIB:.2f} GiB**", "< 6 GiB"],
        ["peak page-locked swap buffers", f"{out['pinned_peak_bytes'] / GIB:.2f} GiB", ""],
        ["disk bandwidth, O_DIRECT, the run's aio settings (before / after)",
         f"read {speeds('read_Bps')} GB/s, write {speeds('write_Bps')} GB/s", ""],
        ["step time / I/O floor (worst step after the first)", f"**{verdict['step_over_floor']:.2f}**", "≤ 1.5, or"],
        [f"step time / CPU work (worst step after the first; compute dominates: {verdict['compute_dominates']})",
         f"**{verdict['step_over_cpu']:.2f}**", "≤ 1.2 where compute dominates"],
        [f"a streamed parameter changed ({checks['probe']})",
         f"{checks['probe_before'][:12]} → {checks['probe_saved'][:12]}: {checks['probe_changed']}", "changed"],
        ["resumed step = uninterrupted step, bitwise (group losses, projected gradient, eval loss, streamed "
         "parameter)", f"{checks['resume_bitwise']} (eval loss {checks['resumed']['eval_loss']:.6f})", "equal"],
        ["checkpoint", f"{gb(out['checkpoint_bytes'])}, saved in {out['seconds']['save checkpoint']:.0f} s, loaded "
         f"in {out['seconds']['load checkpoint']:.0f} s", ""],
        ["Hugging Face export, tensor by tensor", f"{gb(out['export_bytes'])} in {shards} shards, "
         f"{out['seconds']['export']:.0f} s; {checks['export_tensors_checked']} tensors equal to the checkpoint's, "
         f"dtype {checks['export_dtype']}", "equal"],
    ])
    steps_table = table(["step", "loss", "time", "read", "write", "compute", "noise", "other", "GB read",
                         "GB written", "I/O floor", "time / floor", "time / CPU work"], rows)
    phase_rss = table(["after", "s", "peak RSS GiB"], [[k, f"{out['seconds'].get(k, 0):.0f}", f"{v / GIB:.2f}"]
                                                        for k, v in rss.items() if k != "peak"])
    allocator = (f"`MALLOC_MMAP_THRESHOLD_={plan['mmap_threshold']}`" if plan["mmap_threshold"] else
                 "glibc's default allocator")
    vocab = f"{shape['vocab']:,}" + (" (the LLaMA-2 tokenizer's)" if shape["vocab"] == 32000 else "")
    text = f"""**A model that cannot fit in RAM, trained through the NVMe tier.** LLaMA shape: {shape['layers']} layers,
hidden {shape['hidden']}, MLP {shape['inter']}, {shape['heads']} heads / {shape['kv_heads']} KV heads, vocabulary
{vocab}, untied embeddings; random weights built by `zo2_deepspeed.zero_init` straight into bf16 NVMe
partitions with stochastic rounding; MeZO, batch 1 × {plan['seq']} tokens, prefetch_blocks {plan['prefetch']},
torch's noise generator on {out['torch_threads']} threads; {allocator}.

{figures}

Per step (seconds unless marked). **read** / **write**: the tier's own clocks around DeepSpeed's swap-in and
swap-out; **compute** (the blocks' forwards), **noise** (drawing z) and **other** (perturbed copies, the
deferred update, bf16↔fp32 conversion, stochastic rounding) from the pipeline's clocks, summed over the
calling thread and the prefetch worker, which overlap; **I/O floor** = GB read / read bandwidth + GB written /
write bandwidth; **CPU work** = all phases but the disk waits. The first step has no pending update, so it
writes nothing back, and runs without prefetch (its pass records the block order that prefetch follows); the
step after the checkpoint finds the update already applied by the save's flush.

{steps_table}

Peak RSS (VmHWM, so monotone) after each phase, and the phase's duration:

{phase_rss}
"""
    return text, verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=0, help="0: the fewest that meet --min_params and --ram_factor")
    parser.add_argument("--hidden", type=int, default=Shape.hidden)
    parser.add_argument("--inter", type=int, default=Shape.inter)
    parser.add_argument("--heads", type=int, default=Shape.heads)
    parser.add_argument("--kv_heads", type=int, default=Shape.kv_heads)
    parser.add_argument("--vocab", type=int, default=Shape.vocab)
    parser.add_argument("--min_params", type=float, default=9e9, help="at least this many parameters")
    parser.add_argument("--ram_factor", type=float, default=1.5, help="fp32 weights at least this times RAM")
    parser.add_argument("--min_fp32_gb", type=float, default=36.0, help="fp32 weights at least this many GB")
    parser.add_argument("--steps", type=int, default=3, help="MeZO steps before the checkpoint")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--max_shard_bytes", type=int, default=5 * GB)
    parser.add_argument("--probe_gb", type=float, default=4.0, help="bytes each way of the bandwidth measurement")
    parser.add_argument("--workdir", default=None,
                        help="a new folder for swap files, checkpoint and export (default: one under $TMPDIR)")
    parser.add_argument("--mmap_threshold", type=int, default=MMAP_THRESHOLD,
                        help="MALLOC_MMAP_THRESHOLD_ of the run (glibc then returns freed blocks to the system; "
                             "0: glibc's default, whose growing threshold keeps them in its heaps)")
    parser.add_argument("--timeout_h", type=float, default=6.0)
    parser.add_argument("--json", default=None, help="also write the measurements here")
    parser.add_argument("--results", default=None, help="the markdown file to write (default benchmarks/RESULTS.md)")
    parser.add_argument("--no_results", action="store_true", help="do not write a RESULTS.md section")
    args = parser.parse_args()
    if args._child:
        return child_main(args._child)

    ram = mem_total()
    shape = Shape(args.vocab, args.hidden, args.inter, args.heads, args.kv_heads, args.layers)
    if not args.layers:
        shape = Shape(**{**asdict(shape), "layers": layers_for(
            shape, int(args.min_params), int(max(args.ram_factor * ram, args.min_fp32_gb * GB)))})
    need = disk_need(shape)
    parent = Path(args.workdir).resolve().parent if args.workdir else Path(tempfile.gettempdir())
    free = check_free_space(parent, need)
    print(f"[beyond_ram] {shape.params / 1e9:.2f} B parameters ({shape.layers} layers): fp32 "
          f"{shape.params * 4 / GB:.1f} GB = {shape.params * 4 / ram:.2f} x RAM; disk: swap {need.swap / GB:.1f} GB, "
          f"checkpoint {need.checkpoint / GB:.1f} GB, export {need.export / GB:.1f} GB, at most "
          f"{need.peak / GB:.1f} GB at once ({free / GB:.1f} GB free)", flush=True)
    if args.workdir:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=False)  # a new folder: everything in it is removed at exit
    else:
        work = Path(tempfile.mkdtemp(prefix="beyond_ram-"))
    _raise_on_sigterm()
    plan = {"shape": asdict(shape), "workdir": str(work), "steps": args.steps, "seq": args.seq,
            "prefetch": args.prefetch, "lr": args.lr, "max_shard_bytes": args.max_shard_bytes,
            "mmap_threshold": args.mmap_threshold,
            "result": str(work / "result.json")}
    try:
        bandwidth = [disk_bandwidth(work / "probe", int(args.probe_gb * GB))]
        print(f"[beyond_ram] disk: read {bandwidth[0]['read_Bps'] / GB:.2f} GB/s, write "
              f"{bandwidth[0]['write_Bps'] / GB:.2f} GB/s", flush=True)
        out = run_child(plan, args.timeout_h * 3600)
        bandwidth.append(disk_bandwidth(work / "probe", int(args.probe_gb * GB)))
    except KeyboardInterrupt:
        print("[beyond_ram] interrupted: removing the swap files", file=sys.stderr, flush=True)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text, verdict = summarize(plan, out, bandwidth, ram)
    print(text, flush=True)
    print(json.dumps(verdict), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"plan": plan, "out": out, "bandwidth": bandwidth,
                                               "verdict": verdict}, indent=1))
    if not args.no_results:
        from results import RESULTS, write_section
        write_section("beyond_ram", text, args.results or RESULTS)
    return 0 if verdict["checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

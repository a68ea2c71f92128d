"""GPU speed: the engine against plain MeZO / FZOO loops, and the block pipeline against the host-link floor.

    python benchmarks/gpu.py                      # on a GPU: every part below (a few minutes on an H200)
    python benchmarks/gpu.py --parts probe,mezo   # a subset: probe, mezo, writeback, kernels, fzoo, depth, large
    python benchmarks/gpu.py --json out.json      # also write every number as JSON (after every part)
    python benchmarks/gpu.py --deadline_s 420     # start no part or setting after 420 s (listed as skipped)
    python benchmarks/gpu.py --render out.json    # write the RESULTS.md section from a JSON written elsewhere

On a machine without a GPU it runs a tiny OPT shape on the CPU: a smoke test of this script (CI runs it).

Parts, all variants of a part measured in one process, step by step in turn (ratios, not absolute times):
  probe  pinned-memory copy bandwidth, host to device and back, one direction at a time and both at once.
  mezo   random OPT shapes (untied head; OPT-1.3B and OPT-2.7B), fp16 B1 × T2048 and bf16 B8 × T512: a plain
         MeZO loop on the GPU (torch.normal per tensor, z regenerated 4 times a step), the engine with the
         model resident (ZeRO stage 0), and the engine with 16-bit ZeRO-3 partitions in pinned CPU memory
         (offload_param cpu) with prefetch_blocks 0 and 1. The cpu tier's transfer floor is
         max(bytes up / H2D bandwidth, bytes down / D2H bandwidth) from the probe; losses of the resident
         and cpu-tier engines must be identical.
  fzoo   FZOO (N = 8) with the engine resident against a plain FZOO loop (fp16 B1 × T2048).
  depth  peak allocated memory of the cpu tier at the OPT-2.7B width for 8, 16 and 32 layers (flat in depth).
  kernels  effective bandwidth of the fused noise kernels (fill, perturbed copy to 16 bits, 16-bit in-place shift,
         update with one and with 8 terms) on 2^28-element tensors, against torch.randn's fill.
  writeback  LOZO's upload-only offload (issue 32): MeZO, LOZO writing back every step and LOZO writing a
         matrix back once per lazy window, cpu tier (16-bit pinned partitions), OPT-1.3B bf16 B1 × T2048,
         ν = --lazy_steps: bytes up and down per step over a whole window against MeZO's (target ≤ 0.55 ×,
         reached for ν > 10; the ratio for LOZO's default ν = 50 is computed from the measured steps), step
         times and the host-link floor; and the perturbed linear layers formed against applied factored
         (benchmarks/lowrank_forward.py) at that width, which says whether ``factored.LOWRANK_FORWARD["cuda"]``
         keeps the faster form.
  large  the largest OPT shape whose fp16 weights fit in host memory (OPT-30B is 60 GB), built straight into
         pinned CPU partitions under zo2_deepspeed.zero_init, trained with the device memory capped at 18 GiB
         (torch.cuda.set_per_process_memory_fraction); in a child process, as the cap is process-wide.
Every engine variant of the mezo part also reports one extra untimed step's host-side work (phase timing
off): kernel launches of the noise kernels, parameter copies up, events, stream waits and host waits.
Writes the "gpu" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from harness import (EngineVariant, PlainFZOO, PlainMeZO, lm_batch, measure, median, synchronize,  # noqa: E402
                     zo2_config)
from results import RESULTS, provenance, table, write_section  # noqa: E402
from zo2_deepspeed import hostmem  # noqa: E402
from zo2_deepspeed.streams import DEVICE_WORK  # noqa: E402
from zo2_deepspeed.distributed import without_launch_vars  # noqa: E402

GiB = 1 << 30
OPT_SHAPES = {  # hidden, ffn, layers, heads (the OPT paper's Table 1)
    "opt-tiny": (64, 256, 2, 4),
    "opt-1.3b": (2048, 8192, 24, 32),
    "opt-2.7b": (2560, 10240, 32, 32),
    "opt-6.7b": (4096, 16384, 32, 32),
    "opt-13b": (5120, 20480, 40, 40),
    "opt-30b": (7168, 28672, 48, 56),
}
LARGE_CANDIDATES = ["opt-30b", "opt-13b", "opt-6.7b"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def opt_config(shape: str, layers: Optional[int] = None) -> Any:
    from transformers import OPTConfig
    hidden, ffn, depth, heads = OPT_SHAPES[shape]
    return OPTConfig(vocab_size=50272 if shape != "opt-tiny" else 512, hidden_size=hidden, ffn_dim=ffn,
                     num_hidden_layers=layers or depth, num_attention_heads=heads, word_embed_proj_dim=hidden,
                     max_position_embeddings=2048, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     tie_word_embeddings=False, do_layer_norm_before=True)


def build_opt(shape: str, dtype: torch.dtype, device: torch.device, layers: Optional[int] = None) -> torch.nn.Module:
    """A random OPT built on ``device`` (seconds on a GPU, minutes on a CPU for billions of parameters)."""
    from transformers import OPTForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = OPTForCausalLM(opt_config(shape, layers))
    return model.to(dtype).eval()


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ------------------------------------------------------------------------------------- probe

def copy_probe(device: torch.device, nbytes: int = GiB, repeats: int = 5) -> dict[str, float]:
    """GB/s of pinned host <-> device copies: each direction alone, then both at once on two streams."""
    if device.type != "cuda":
        return {}
    host_up = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    host_down = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev_up = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev_down = torch.empty(nbytes, dtype=torch.uint8, device=device)
    up_stream, down_stream = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def timed(copies: list[tuple[Any, torch.Tensor, torch.Tensor]]) -> float:
        best = float("inf")
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for stream, dst, src in copies:
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        return best

    h2d = nbytes / timed([(up_stream, dev_up, host_up)]) / 1e9
    d2h = nbytes / timed([(down_stream, host_down, dev_down)]) / 1e9
    both = timed([(up_stream, dev_up, host_up), (down_stream, host_down, dev_down)])
    return {"h2d_GBps": h2d, "d2h_GBps": d2h, "both_each_GBps": nbytes / both / 1e9}


def transfer_floor_s(bytes_up: int, bytes_down: int, probe: dict[str, float]) -> Optional[float]:
    """max(bytes up / H2D, bytes down / D2H): the step time of a pipeline bound by the host link alone."""
    if not probe:
        return None
    return max(bytes_up / (probe["h2d_GBps"] * 1e9), bytes_down / (probe["d2h_GBps"] * 1e9))


# ------------------------------------------------------------------------------------- memory

class MemoryProbe:
    """Peak allocated device memory of one variant's step, less what the other variants hold at rest."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peaks: dict[str, int] = {}
        self._others = 0

    @staticmethod
    def own_at_rest(variant: Any) -> int:
        """Device bytes a variant holds between steps: its parameters on the device and its pooled buffers."""
        if isinstance(variant, EngineVariant):
            engine = variant.engine
            held = engine.pool.free_bytes
            if engine.settings.tier == "resident":
                held += sum(s.param.numel() * s.param.element_size() for s in engine.pipeline.slots)
            return held
        return sum(p.numel() * p.element_size() for p in variant.params if p.device.type != "cpu")

    def before(self, variant: Any) -> None:
        if self.device.type != "cuda":
            return
        synchronize(self.device)
        self._others = torch.cuda.memory_allocated(self.device) - self.own_at_rest(variant)
        torch.cuda.reset_peak_memory_stats(self.device)

    def after(self, variant: Any) -> None:
        if self.device.type != "cuda":
            return
        synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - self._others
        self.peaks[variant.name] = max(self.peaks.get(variant.name, 0), peak)


def measure_with_memory(variants: list, batch: dict, args: argparse.Namespace, device: torch.device
                        ) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Interleaved step times, and each variant's own peak allocated memory over its timed steps."""
    memory = MemoryProbe(device)
    times = measure(variants, batch, args.repeats, args.warmup, device, memory.before, memory.after)
    return times, memory.peaks


# ------------------------------------------------------------------------------------- mezo

def engine_on(shape_model: torch.nn.Module, tier: str, dtype_name: str, rows: int, prefetch: int, method: str,
              n: int, device: torch.device) -> EngineVariant:
    name = {"resident": "engine resident", "cpu": f"engine cpu tier, prefetch {prefetch}"}[tier]
    if method != "mezo":
        name = f"engine {method.upper()} resident"
    model = copy.deepcopy(shape_model)
    if tier == "cpu":
        model = model.to("cpu")
    storage = dtype_name if tier != "resident" else "fp32"
    config = zo2_config(tier, rows, method=method, n=n, prefetch=prefetch, storage=storage, compute=dtype_name,
                        pin_memory=device.type == "cuda")
    return EngineVariant.build(name, model, config)


def run_mezo_setting(shape: str, dtype_name: str, rows: int, seq: int, args: argparse.Namespace,
                     device: torch.device, probe: dict[str, float]) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    started = time.perf_counter()
    base = build_opt(shape, dtype, device)
    built = time.perf_counter() - started
    batch = lm_batch(base.config.vocab_size, rows, seq, device)
    plain = PlainMeZO(copy.deepcopy(base))
    engines = [engine_on(base, "resident", dtype_name, rows, 0, "mezo", 8, device),
               engine_on(base, "cpu", dtype_name, rows, 0, "mezo", 8, device),
               engine_on(base, "cpu", dtype_name, rows, 1, "mezo", 8, device)]
    params = sum(p.numel() for p in base.parameters())
    del base
    variants = [plain, *engines]
    times, peaks = measure_with_memory(variants, batch, args, device)
    med = {k: median(v) for k, v in times.items()}
    resident, cpu0, cpu1 = engines
    last = cpu1.records[-1]
    floor = transfer_floor_s(last["bytes_read"], last["bytes_written"], probe)
    same = all(a["group_losses"] == b["group_losses"] == c["group_losses"]
               for a, b, c in zip(resident.records, cpu0.records, cpu1.records))
    result = {
        "shape": shape, "dtype": dtype_name, "rows": rows, "seq": seq, "parameters": params, "build_s": built,
        "median_s": med, "peak_bytes": peaks, "floor_s": floor, "bytes_up": last["bytes_read"],
        "bytes_down": last["bytes_written"], "losses_identical": same,
        "phases": {v.name: {k: t / max(1, len(times[v.name])) for k, t in v.phase.items()} for v in variants},
        "noise": resident.engine.noise.description, "movement": "streams" if cpu1.engine.pipeline.asynchronous
        else "worker",
    }
    result["step_work"] = {e.name: step_work(e, batch) for e in engines}
    for e in engines:
        e.close()
    return result


# ------------------------------------------------------------------------------------- writeback (LOZO, issue 32)

WRITEBACK_VARIANTS = {"MeZO": {"method": "mezo"}, "LOZO step": {"method": "lozo", "write_back": "step"},
                      "LOZO window": {"method": "lozo", "write_back": "window"}}


def run_writeback(shape: str, dtype_name: str, rows: int, seq: int, args: argparse.Namespace, device: torch.device,
                  probe: dict[str, float]) -> dict[str, Any]:
    """MeZO / LOZO step / LOZO window on the cpu tier for one whole window (steps 1..ν after step 0), and the two
    forms of a perturbed linear layer at the shape's width."""
    from lowrank_forward import measure_forms

    from zo2_deepspeed.factored import LOWRANK_FORWARD
    dtype = DTYPES[dtype_name]
    nu = args.lazy_steps
    base = build_opt(shape, dtype, device).to("cpu")
    batch = lm_batch(base.config.vocab_size, rows, seq, device)
    variants = []
    for name, zo2 in WRITEBACK_VARIANTS.items():
        extra = dict(zo2, rank=2, lazy_steps=nu) if zo2["method"] == "lozo" else zo2
        config = zo2_config("cpu", rows, prefetch=1, storage=dtype_name, compute=dtype_name,
                            pin_memory=device.type == "cuda", **extra)
        variants.append(EngineVariant.build(name, copy.deepcopy(base), config))
    hidden, ffn, _, _ = OPT_SHAPES[shape]
    del base
    times = measure(variants, batch, repeats=nu, warmup=1, device=device)  # records: steps 1..ν
    per_step = {v.name: {"read": sum(r["bytes_read"] for r in v.records) / len(v.records),
                         "written": sum(r["bytes_written"] for r in v.records) / len(v.records),
                         "inner_written": [r["bytes_written"] for r in v.records if not r["bytes_merged"]],
                         "merge_written": [r["bytes_written"] for r in v.records if r["bytes_merged"]],
                         "median_s": median(times[v.name]),
                         "phases": {k: t / len(v.records) for k, t in v.phase.items()}} for v in variants}
    for v in variants:
        v.close()
    forms = measure_forms(hidden, ffn, hidden, [rows * seq], 2, dtype, device, repeats=5)
    return {"shape": shape, "dtype": dtype_name, "rows": rows, "seq": seq, "nu": nu, "per_step": per_step,
            "forms": forms, "auto": LOWRANK_FORWARD.get(device.type, "materialised"), "probe": probe}


def writeback_rows(r: dict[str, Any]) -> tuple[list[list[Any]], list[list[Any]]]:
    per = r["per_step"]
    mezo = per["MeZO"]["read"] + per["MeZO"]["written"]
    window = per["LOZO window"]
    inner = window["inner_written"]
    merge = window["merge_written"]
    at50 = None
    if inner and merge:
        at50 = (window["read"] + (sum(merge) / len(merge) + 49 * sum(inner) / len(inner)) / 50) / mezo
    rows = []
    for name, v in per.items():
        floor = transfer_floor_s(v["read"], v["written"], r["probe"] or {})
        rows.append([name, f"{v['read'] / 2**20:.0f}", f"{v['written'] / 2**20:.0f}",
                     f"**{(v['read'] + v['written']) / mezo:.3f}**", f"{1000 * v['median_s']:.1f}",
                     f"{v['median_s'] / per['MeZO']['median_s']:.2f}", f"{1000 * floor:.1f}" if floor else "—"])
    if at50 is not None:
        rows.append(["LOZO window at ν = 50 (computed)", "", "", f"**{at50:.3f}**", "", "", ""])
    forms = [[f["rows"], f"{1000 * f['materialised_s']:.2f}", f"{1000 * f['factored_s']:.2f}", f"{f['ratio']:.2f}",
              f["faster"], r["auto"]] for f in r["forms"]]
    return rows, forms


def step_work(variant: EngineVariant, batch: dict) -> dict[str, int]:
    """One more step with phase timing off, counting what it queues: what a step costs the host."""
    engine = variant.engine
    engine.pipeline.time_phases(False)
    kernels = getattr(engine.noise, "triton", None)
    launched = kernels.launches if kernels is not None else 0
    fetched, work = engine.tier.stats.param_fetches, DEVICE_WORK.snapshot()
    variant.step(batch, 99_999)
    counts = {"noise_launches": (kernels.launches if kernels is not None else 0) - launched,
              "param_copies_up": engine.tier.stats.param_fetches - fetched, **DEVICE_WORK.since(work),
              "blocks": len(engine.pipeline.blocks), "parameters": len(engine.pipeline.slots)}
    engine.pipeline.time_phases(True)
    return counts


def work_rows(r: dict[str, Any]) -> list[list[Any]]:
    label = f"{r['shape']} {r['dtype']} B{r['rows']}×T{r['seq']}"
    return [[label, name, c["blocks"], c["parameters"], c["noise_launches"], c["param_copies_up"], c["events"],
             c["stream_waits"], c["host_waits"]] for name, c in r.get("step_work", {}).items()]


# ------------------------------------------------------------------------------------- kernels

def run_kernels(device: torch.device, numel: int = 1 << 28, repeats: int = 5) -> list[list[Any]]:
    """Effective bandwidth (bytes the kernel must read and write / its time) of each fused-kernel variant."""
    from zo2_deepspeed.noise import PhiloxNoise
    noise = PhiloxNoise(device, use_triton=True)
    f32, bf16 = torch.float32, torch.bfloat16
    work32 = torch.randn(numel, device=device)
    work16 = work32.to(bf16)
    out16 = torch.empty(numel, dtype=bf16, device=device)
    out32 = torch.empty(numel, device=device)
    seeds = list(range(8))
    cases = [  # name, dst, src, terms, kind, bytes moved per element
        ("fill fp32 (Gaussian)", out32, None, 1, "gaussian", 4),
        ("perturbed copy fp32 -> bf16", out16, work32, 1, "gaussian", 6),
        ("in-place shift bf16", work16, work16, 1, "gaussian", 4),
        ("update fp32, 1 term", work32, work32, 1, "gaussian", 8),
        ("FZOO update fp32, 8 Rademacher terms", work32, work32, 8, "rademacher", 8),
    ]
    rows = []

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        return median(times)

    for name, dst, src, terms, kind, per_element in cases:
        seconds = timed(lambda: noise.combine([dst], [src] if src is not None else None, [1.0],
                                              [[(s, 1e-3) for s in seeds[:terms]]], kind))
        rows.append([name, f"{1000 * seconds:.2f}", f"{numel * per_element / seconds / 1e9:.0f}",
                     f"{numel / seconds / 1e9:.1f}"])
    seconds = timed(lambda: torch.randn(numel, device=device, out=out32))
    rows.append(["torch.randn fill fp32 (reference)", f"{1000 * seconds:.2f}", f"{numel * 4 / seconds / 1e9:.0f}",
                 f"{numel / seconds / 1e9:.1f}"])
    return rows


def mezo_rows(r: dict[str, Any]) -> tuple[list[list[Any]], list[list[Any]]]:
    label = f"{r['shape']} {r['dtype']} B{r['rows']}×T{r['seq']}"
    med, peaks = r["median_s"], r["peak_bytes"]
    tokens = r["rows"] * r["seq"]
    variants = []
    for name, seconds in med.items():
        phases = ", ".join(f"{k} {1000 * t:.1f}" for k, t in r["phases"].get(name, {}).items() if t >= 5e-5)
        peak = f"{peaks[name] / GiB:.2f}" if name in peaks else "n/a"
        variants.append([label, name, f"{1000 * seconds:.1f}", f"{tokens / seconds:,.0f}", peak, phases])
    plain, resident = med["plain MeZO"], med["engine resident"]
    cpu0, cpu1 = med["engine cpu tier, prefetch 0"], med["engine cpu tier, prefetch 1"]
    ratios = [[label, "engine resident / plain MeZO", f"{resident / plain:.2f}", "≤ 0.80"],
              [label, "cpu tier prefetch 1 / resident", f"{cpu1 / resident:.2f}", "≤ 1.10 where compute dominates"],
              [label, "cpu tier prefetch 1 / prefetch 0", f"{cpu1 / cpu0:.2f}", "≤ 1.00"]]
    if r["floor_s"]:
        ratios.append([label, "cpu tier prefetch 1 / transfer floor", f"{cpu1 / r['floor_s']:.2f}",
                       f"≤ 1.25 (floor {1000 * r['floor_s']:.1f} ms: {r['bytes_up'] / GiB:.2f} GiB up, "
                       f"{r['bytes_down'] / GiB:.2f} GiB down)"])
    cpu_peak = peaks.get("engine cpu tier, prefetch 1")
    if cpu_peak is not None:
        target = "≤ 2.6 GiB" if r["shape"] == "opt-2.7b" and r["dtype"] == "fp16" and r["rows"] == 1 else ""
        ratios.append([label, "cpu tier peak allocated", f"{cpu_peak / GiB:.2f} GiB", target])
    ratios.append([label, "resident and cpu-tier losses identical", "yes" if r["losses_identical"] else "NO", "yes"])
    return ratios, variants


# ------------------------------------------------------------------------------------- fzoo

def run_fzoo(shape: str, dtype_name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    rows, seq = 1, args.seq
    base = build_opt(shape, DTYPES[dtype_name], device)
    batch = lm_batch(base.config.vocab_size, rows, seq, device)
    plain = PlainFZOO(copy.deepcopy(base), args.n)
    engine = engine_on(base, "resident", dtype_name, rows, 0, "fzoo", args.n, device)
    del base
    times = measure([plain, engine], batch, max(2, args.repeats // 2), 1, device)
    result = {"shape": shape, "dtype": dtype_name, "seq": seq, "n": args.n,
              "median_s": {k: median(v) for k, v in times.items()},
              "phases": {v.name: {k: t / len(times[v.name]) for k, t in v.phase.items()} for v in (plain, engine)}}
    engine.close()
    return result


# ------------------------------------------------------------------------------------- depth

def run_depth(shape: str, depths: list[int], args: argparse.Namespace, device: torch.device) -> list[list[Any]]:
    rows = []
    for layers in depths:
        base = build_opt(shape, torch.float16, device, layers=layers)
        batch = lm_batch(base.config.vocab_size, 1, args.seq, device)
        engine = engine_on(base, "cpu", "fp16", 1, 1, "mezo", 8, device)
        del base
        _, peaks = measure_with_memory([engine], batch, argparse.Namespace(warmup=1, repeats=1), device)
        rows.append([shape, layers, f"{peaks.get(engine.name, 0) / GiB:.2f}" if peaks else "n/a"])
        engine.close()
    return rows


# ------------------------------------------------------------------------------------- large

def available_host_bytes() -> int:
    return hostmem.available_host_bytes() or 0


def pick_large_shape(requested: str) -> Optional[str]:
    """The largest candidate whose fp16 weights (plus 12 GiB of headroom) fit in available host memory."""
    if requested != "auto":
        return requested
    free = available_host_bytes()
    for shape in LARGE_CANDIDATES:
        params = sum(p for p in shape_parameter_count(shape))
        if params * 2 + 12 * GiB < free:
            return shape
    return None


def shape_parameter_count(shape: str) -> tuple[int, ...]:
    hidden, ffn, layers, _ = OPT_SHAPES[shape]
    per_layer = 4 * hidden * hidden + 4 * hidden + 2 * hidden * ffn + ffn + hidden + 4 * hidden
    return (2 * 50272 * hidden, 2050 * hidden, layers * per_layer, 2 * hidden)


LARGE_CHILD = """
import json, sys, time, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
import zo2_deepspeed
from gpu import opt_config
from harness import lm_batch, zo2_config
from transformers import AutoModelForCausalLM
device = torch.device("cuda")
cap = {cap_gib} * 2**30
torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(device).total_memory))
config = zo2_config("cpu", 1, storage="fp16", compute="fp16", prefetch=1, pin_memory=True)
start = time.perf_counter()
with zo2_deepspeed.zero_init(config):
    model = AutoModelForCausalLM.from_config(opt_config({shape!r}))
build_s = time.perf_counter() - start
params = sum(int(p.ds_numel) for p in model.parameters())
engine, *_ = zo2_deepspeed.initialize(model=model, config=config)
batch = lm_batch(model.config.vocab_size, 1, {seq}, device)
times = []
torch.cuda.reset_peak_memory_stats(device)
for step in range({steps}):
    torch.cuda.synchronize(); t = time.perf_counter()
    loss = engine(**batch); engine.step()
    torch.cuda.synchronize(); times.append(time.perf_counter() - t)
last = engine.last_step
print(json.dumps(dict(shape={shape!r}, params=params, build_s=build_s, step_s=times, loss=float(loss),
                      peak=torch.cuda.max_memory_allocated(device), cap=cap, bytes_up=last["bytes_read"],
                      bytes_down=last["bytes_written"], phases=last["phase_s"])))
engine.close()
"""


def run_large(args: argparse.Namespace, timeout_s: float) -> dict[str, Any]:
    shape = pick_large_shape(args.large_shape)
    if shape is None:
        return {"skipped": f"no candidate fits in {available_host_bytes() / GiB:.0f} GiB of available host memory"}
    code = LARGE_CHILD.format(root=str(HERE.parent), bench=str(HERE), cap_gib=args.cap_gib, shape=shape,
                              seq=args.seq, steps=args.large_steps)
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=without_launch_vars(os.environ), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"shape": shape, "failed": f"did not finish within {timeout_s:.0f} s"}
    if result.returncode != 0:
        return {"shape": shape, "failed": result.stderr[-3000:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- report

def render(report: dict[str, Any]) -> str:
    """The RESULTS.md section body of a report (measured here, or read back with --render)."""
    args = report["args"]
    sections = []
    if report["device"] == "cpu":
        sections.append("No GPU on this machine: a tiny OPT shape on the CPU, as a smoke test of the script "
                        "(the GPU figures come from running the same command on a GPU).")
    probe = report.get("probe")
    if probe:
        sections.append("**Pinned-memory copies** (1 GiB, best of 5): host→device "
                        f"{probe['h2d_GBps']:.1f} GB/s, device→host {probe['d2h_GBps']:.1f} GB/s, both at once "
                        f"{probe['both_each_GBps']:.1f} GB/s each way.")
    runs = report.get("mezo")
    if runs:
        ratios, variants = [], []
        for run in runs:
            r, v = mezo_rows(run)
            ratios += r
            variants += v
        sections.append(f"**MeZO: the engine against the plain loop and the host link** (noise: {runs[0]['noise']}; "
                        f"block movement: {runs[0]['movement']}; median of {args['repeats']} steps after "
                        f"{args['warmup']} warm-ups):\n\n"
                        + table(["setting", "ratio", "measured", "target"], ratios) + "\n\n"
                        + table(["setting", "variant", "ms / step", "tokens / s", "peak GiB", "phases (ms per step)"],
                                variants))
        work = [row for run in runs for row in work_rows(run)]
        if work:
            sections.append("**Host-side work of one step** (phase timing off; noise launches: the fused kernels "
                            "only):\n\n" + table(["setting", "variant", "blocks", "parameters", "noise launches",
                                                   "param copies up", "events", "stream waits", "host waits"], work))
    for run in report.get("writeback", []):
        rows, forms = writeback_rows(run)
        sections.append(
            f"**LOZO upload-only offload** ({run['shape']} {run['dtype']} B{run['rows']}×T{run['seq']}, cpu tier, "
            f"{run['dtype']} partitions in pinned memory, ν = {run['nu']}; MiB and ms per step over steps 1..ν, one "
            "whole window; "
            "target: up + down ≤ 0.55 × MeZO's):\n\n"
            + table(["variant", "MiB up", "MiB down", "(up + down) / MeZO", "ms / step", "time / MeZO",
                     "host-link floor ms"], rows)
            + "\n\nA perturbed linear layer formed or applied factored (one LLaMA-style layer at this width, "
              "two groups; `zo2.lowrank_forward` auto picks the last column on this device):\n\n"
            + table(["rows per group", "materialised ms", "factored ms", "factored / materialised", "faster",
                     "auto"], forms))
    if report.get("kernels"):
        sections.append("**Fused noise kernels** (2^28 elements, median of 5; effective bandwidth = bytes the "
                        "variant must read and write / time):\n\n"
                        + table(["variant", "ms", "GB/s", "G elements / s"], report["kernels"]))
    fzoo = report.get("fzoo")
    if fzoo:
        rows = []
        for run in fzoo:
            med = run["median_s"]
            rows.append([f"{run['shape']} {run['dtype']} B1×T{run['seq']}", f"{1000 * med['plain FZOO']:.1f}",
                         f"{1000 * med['engine FZOO resident']:.1f}",
                         f"{med['engine FZOO resident'] / med['plain FZOO']:.2f}", "≤ 0.60"])
        sections.append(f"**FZOO (N = {fzoo[0]['n']}): engine resident / plain FZOO loop**:\n\n"
                        + table(["setting", "plain ms", "engine ms", "ratio", "target"], rows))
    if report.get("depth"):
        sections.append(f"**cpu tier peak allocated vs depth** (OPT-2.7B width, fp16 B1×T{args['seq']}, prefetch 1):"
                        "\n\n" + table(["shape", "layers", "peak GiB"], report["depth"]))
    large = report.get("large")
    if large is not None:
        if "params" in large:
            floor = transfer_floor_s(large["bytes_up"], large["bytes_down"], probe or {})
            steps = ", ".join(f"{s:.2f}" for s in large["step_s"])
            sections.append(
                f"**Large model under a device-memory cap** ({large['shape']}, {large['params'] / 1e9:.1f} B "
                f"parameters, fp16 partitions in pinned CPU memory, built under zero_init in "
                f"{large['build_s']:.0f} s): steps {steps} s; peak allocated {large['peak'] / GiB:.2f} GiB under "
                f"a {large['cap'] / GiB:.0f} GiB cap"
                + (f"; transfer floor {floor:.2f} s" if floor else "") + ".")
        else:
            sections.append(f"**Large model under a device-memory cap**: {large}")
    if report.get("skipped"):
        sections.append(f"**Not measured** (past `--deadline_s {args['deadline_s']}`): "
                        + ", ".join(report["skipped"]) + ".")
    return "\n\n".join(sections)


def publish(report: dict[str, Any], args: argparse.Namespace) -> None:
    """Write the JSON (if asked) and the RESULTS.md section: after every part, so a run cut short keeps its numbers."""
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    name = "gpu" if report["device"] != "cpu" else "gpu (CPU smoke test)"
    write_section(name, render(report), args.results, ran=report.get("ran"))


# ------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=None, help="comma list of probe, mezo, writeback, kernels, fzoo, depth, "
                        "large (default: all on a GPU; mezo,writeback,fzoo on a tiny shape without one)")
    parser.add_argument("--lazy_steps", type=int, default=None, help="ν of the writeback part (default 12; 3 on "
                        "the CPU smoke test)")
    parser.add_argument("--shapes", default=None, help="OPT shapes of the mezo part (default opt-1.3b,opt-2.7b)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row of the B1 settings")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--n", type=int, default=8, help="FZOO directions")
    parser.add_argument("--large_shape", default="auto", help="OPT shape of the large part, or auto")
    parser.add_argument("--cap_gib", type=float, default=18.0)
    parser.add_argument("--large_steps", type=int, default=3)
    parser.add_argument("--large_timeout", type=int, default=900)
    parser.add_argument("--deadline_s", type=float, default=None,
                        help="start no part or setting after this many seconds (they are listed as not measured); "
                        "the large run is cut off two minutes past it")
    parser.add_argument("--json", default=None, help="also write every number here (after every part)")
    parser.add_argument("--render", default=None, help="only write the RESULTS.md section from this JSON report")
    parser.add_argument("--results", default=str(RESULTS), help="the markdown file whose section is written")
    args = parser.parse_args()
    if args.render:
        report = json.loads(Path(args.render).read_text())
        publish(report, argparse.Namespace(json=None, results=args.results))
        print(render(report))
        return
    gpu = torch.cuda.is_available()
    device = torch.device("cuda") if gpu else torch.device("cpu")
    if gpu:
        parts = (args.parts or "probe,writeback,mezo,kernels,fzoo,depth,large").split(",")
        args.lazy_steps = args.lazy_steps or 12
        shapes = (args.shapes or "opt-1.3b,opt-2.7b").split(",")
        settings = [("fp16", 1, args.seq), ("bf16", 8, args.seq // 4)]
    else:  # smoke test: the same code on a tiny shape
        parts = (args.parts or "mezo,writeback,fzoo").split(",")
        args.lazy_steps = args.lazy_steps or 3
        shapes = (args.shapes or "opt-tiny").split(",")
        args.seq = min(args.seq, 64)
        settings = [("fp32", 1, args.seq), ("bf16", 4, args.seq // 4)]
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if gpu else "cpu", "ran": provenance(),
                              "args": vars(args), "skipped": []}
    started = time.perf_counter()

    def may_start(what: str) -> bool:
        if args.deadline_s is not None and time.perf_counter() - started > args.deadline_s:
            report["skipped"].append(what)
            return False
        return True

    if "probe" in parts and may_start("probe"):
        report["probe"] = copy_probe(device)
        publish(report, args)
    if "mezo" in parts:
        for shape in shapes:
            for dtype_name, rows, seq in settings:
                if may_start(f"MeZO {shape} {dtype_name} B{rows}×T{seq}"):
                    run = run_mezo_setting(shape, dtype_name, rows, seq, args, device, report.get("probe") or {})
                    report.setdefault("mezo", []).append(run)
                    print(table(["setting", "ratio", "measured", "target"], mezo_rows(run)[0]), flush=True)
                    publish(report, args)
    if "writeback" in parts and may_start("writeback"):
        dtype_name, rows, seq = settings[0] if not gpu else ("bf16", 1, args.seq)
        run = run_writeback(shapes[0], dtype_name, rows, seq, args, device, report.get("probe") or {})
        report.setdefault("writeback", []).append(run)
        print(table(["variant", "MiB up", "MiB down", "(up + down) / MeZO", "ms / step", "time / MeZO",
                     "host-link floor ms"], writeback_rows(run)[0]), flush=True)
        publish(report, args)
    if "fzoo" in parts:
        for shape in shapes:
            if may_start(f"FZOO {shape}"):
                report.setdefault("fzoo", []).append(run_fzoo(shape, settings[0][0], args, device))
                publish(report, args)
    if "kernels" in parts and gpu and may_start("kernels"):
        report["kernels"] = run_kernels(device)
        publish(report, args)
    if "depth" in parts and gpu and may_start("depth"):
        report["depth"] = run_depth("opt-2.7b", [8, 16, 32], args, device)
        publish(report, args)
    if "large" in parts and gpu and may_start("large"):
        left = args.large_timeout if args.deadline_s is None else \
            max(60.0, args.deadline_s + 120 - (time.perf_counter() - started))
        report["large"] = run_large(args, min(args.large_timeout, left))
    publish(report, args)
    print(render(report))


if __name__ == "__main__":
    main()

"""Upload-only offload: MeZO, LOZO writing back every step, and LOZO writing back once per lazy window.

    python benchmarks/write_back.py                   # NVMe (>= 1 B parameters) and the cpu tier (~40 min here)
    python benchmarks/write_back.py --tiers cpu --layers 2 --hidden 256 --inter 704 --heads 4 --kv_heads 2 \\
        --vocab 512 --lazy_steps 3 --no_results      # a rehearsal of the same flow in a minute

For each tier, every variant is a child process of its own (so its peak RSS is its own), built one at a
time: a LLaMA shape (untied embeddings, as ``beyond_ram.py``) with random weights made by
``zo2_deepspeed.zero_init`` straight into bf16 partitions (NVMe swap files, or pinned CPU memory) with
stochastic rounding. The children then take turns step by step, ``lazy_steps + 1`` steps each (step 0
has no update to write back; steps 1..ν are one whole window: ν − 1 steps inside it and the step that
merges it), with the variant order rotated every round:

  mezo          MeZO (writes every block back every step: today's floor of 2× the parameter bytes);
  lozo-step     LOZO with ``zo2.write_back`` "step" (the same bytes as MeZO);
  lozo-window   LOZO with ``zo2.write_back`` "window" (LOZO's default): matrices written once per window;
  lozo-window-materialised   (cpu tier) the same with ``zo2.lowrank_forward`` "materialised", to measure
                the factored forward in place.

Per step: wall time, bytes read from and written to the tier (the tier's counters), bytes merged, SSD bytes
written (the NVMe tier's own O_DIRECT counters, and /proc/diskstats of the disk holding the swap files,
which counts every process's writes to that disk), peak RSS (VmHWM) and the pipeline's phase times. The
targets of issue 32 are judged on steps 1..ν. Writes the "write_back" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from beyond_ram import AIO, GB, GIB, MMAP_THRESHOLD, Shape, vm_hwm  # noqa: E402

REPLY = "@write_back@ "
"""Prefix of a child's reply lines on its stdout (DeepSpeed's own log lines go there too)."""
VARIANTS: dict[str, dict[str, Any]] = {
    "mezo": {"method": "mezo"},
    "lozo-step": {"method": "lozo", "write_back": "step"},
    "lozo-window": {"method": "lozo", "write_back": "window"},
    "lozo-window-materialised": {"method": "lozo", "write_back": "window", "lowrank_forward": "materialised"},
}
MIB = 2**20
DEFAULT_NU = 50
"""LOZO's default ``lazy_steps``: the steady state a run with the default config reaches."""


# ------------------------------------------------------------------------------------- the child: one variant

def variant_config(plan: dict, swap_dir: str) -> dict:
    from harness import zo2_config
    tier, shape = plan["tier"], Shape(**plan["shape"])
    zo2 = dict(VARIANTS[plan["variant"]])
    if zo2["method"] == "lozo":
        zo2.update(rank=plan["rank"], lazy_steps=plan["lazy_steps"])
    config = zo2_config(tier, plan["rows"], nvme_path=swap_dir, storage="bf16", prefetch=plan["prefetch"],
                        lr=plan["lr"], seed=0, stochastic_rounding=True, pin_memory=tier == "cpu", **zo2)
    if tier == "nvme":  # built from a config: sized for a layer's 7 matrices per resident block (as beyond_ram)
        config["zero_optimization"]["offload_param"].update(buffer_count=7 * (1 + plan["prefetch"]),
                                                            buffer_size=shape.vocab * shape.hidden)
        config["aio"] = dict(AIO)
    return config


def reply(message: dict) -> None:
    sys.stdout.write(REPLY + json.dumps(message) + "\n")
    sys.stdout.flush()


def vm_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child_main(plan_path: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import zo2_deepspeed
    from harness import lm_batch
    from zo2_deepspeed.lowrank import matrix_view
    plan = json.loads(Path(plan_path).read_text())
    shape = Shape(**plan["shape"])
    config = variant_config(plan, plan["swap_dir"])
    start = time.perf_counter()
    with zo2_deepspeed.zero_init(config):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape.hf_config()))
    engine, *_ = zo2_deepspeed.initialize(model=model, config=config)
    tier = engine.tier
    matrices = vectors = 0
    for slot in engine.pipeline.slots:
        size = tier.partition_size(slot) * tier.storage_dtype(slot).itemsize
        if matrix_view(slot.shape) is not None:
            matrices += size
        else:
            vectors += size
    batch = lm_batch(shape.vocab, plan["rows"], plan["seq"], seed=1)
    reply({"event": "ready", "build_s": time.perf_counter() - start, "rss": vm_hwm(),
           "params": sum(s.numel for s in engine.pipeline.slots), "matrix_bytes": matrices, "vector_bytes": vectors,
           "threads": torch.get_num_threads(), "noise": engine.noise.description,
           "factored": engine.pipeline.perturbation.factored is not None})
    disk_stats = getattr(tier, "disk_stats", None)
    for line in sys.stdin:
        command = json.loads(line)
        if command["do"] == "quit":
            break
        disk_before = disk_stats.snapshot() if disk_stats is not None else None
        begin = time.perf_counter()
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()
        seconds = time.perf_counter() - begin
        last = engine.last_step
        record = {"event": "step", "step": last["step"], "seconds": seconds, "loss": float(last["loss"]),
                  "bytes_read": last["bytes_read"], "bytes_written": last["bytes_written"],
                  "bytes_merged": last["bytes_merged"], "phase_s": last["phase_s"], "rss": vm_hwm(),
                  "rss_now": vm_rss(), "window": last.get("window")}
        if disk_before is not None:
            disk = disk_stats.since(disk_before)
            record.update(ssd_read=disk.bytes_read, ssd_written=disk.bytes_written, read_s=disk.read_s,
                          write_s=disk.write_s)
        reply(record)
    engine.close()
    reply({"event": "closed", "rss": vm_hwm()})
    return 0


# ------------------------------------------------------------------------------------- the parent

def device_sectors_written(path: Path) -> Optional[int]:
    """Sectors written (512 bytes) to the block device holding ``path``, from /proc/diskstats (all processes)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    try:
        for line in open("/proc/diskstats"):
            fields = line.split()
            if int(fields[0]) == major and int(fields[1]) == minor:
                return int(fields[9])
    except OSError:
        return None
    return None


class Child:
    """One variant's process: started, waited for until built, then stepped on request."""

    def __init__(self, plan: dict, work: Path) -> None:
        self.name = plan["variant"]
        path = work / f"{plan['tier']}-{self.name}.json"
        path.write_text(json.dumps(plan))
        from zo2_deepspeed.distributed import without_launch_vars
        env = without_launch_vars(os.environ)
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
        self.proc = subprocess.Popen([sys.executable, __file__, "--_child", str(path)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=1)
        self.ready = self.read()
        if self.ready.get("event") != "ready":
            raise SystemExit(f"error: the {self.name} child did not start: {self.ready}")
        self.steps: list[dict] = []

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        code = self.proc.wait()
        raise SystemExit(f"error: the {self.name} child ended (exit status {code}); see its output above")

    def step(self) -> dict:
        self.proc.stdin.write(json.dumps({"do": "step"}) + "\n")
        self.proc.stdin.flush()
        record = self.read()
        self.steps.append(record)
        return record

    def close(self) -> dict:
        if self.proc.poll() is not None:
            return {}
        self.proc.stdin.write(json.dumps({"do": "quit"}) + "\n")
        self.proc.stdin.flush()
        closed = self.read()
        self.proc.wait(timeout=600)
        return closed

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_tier(tier: str, shape: Shape, variants: list[str], args: argparse.Namespace, work: Path) -> dict:
    """Build every variant's child, then step them in turn; the per-step records."""
    children: list[Child] = []
    swap_root = work / f"{tier}-swap"
    swap_root.mkdir(parents=True, exist_ok=True)
    try:
        for name in variants:
            plan = {"tier": tier, "variant": name, "shape": asdict(shape), "rows": args.rows, "seq": args.seq,
                    "prefetch": args.prefetch, "lr": args.lr, "rank": args.rank, "lazy_steps": args.lazy_steps,
                    "swap_dir": str(swap_root / name)}
            print(f"[write_back] {tier}: building {name} ...", flush=True)
            child = Child(plan, work)
            print(f"[write_back] {tier}: {name} ready in {child.ready['build_s']:.0f} s, "
                  f"{child.ready['params'] / 1e9:.2f} B parameters, RSS {child.ready['rss'] / GIB:.2f} GiB", flush=True)
            children.append(child)
        loads = []
        for r in range(args.lazy_steps + 1):
            order = children[r % len(children):] + children[:r % len(children)]
            for child in order:
                sectors = device_sectors_written(swap_root)
                loads.append(os.getloadavg()[0])
                record = child.step()
                after = device_sectors_written(swap_root)
                record["disk_written"] = (after - sectors) * 512 if sectors is not None and after is not None \
                    else None
                print(f"[write_back] {tier} {child.name} step {record['step']}: {record['seconds']:.1f} s, "
                      f"read {record['bytes_read'] / MIB:.0f} MiB, wrote {record['bytes_written'] / MIB:.0f} MiB "
                      f"(merged {record['bytes_merged'] / MIB:.0f}), RSS {record['rss'] / GIB:.2f} GiB, "
                      f"load {loads[-1]:.1f}", flush=True)
        out = {"tier": tier, "variants": {}, "load": {"min": min(loads), "max": max(loads),
                                                      "mean": sum(loads) / len(loads)}}
        for child in children:
            closed = child.close()
            out["variants"][child.name] = {"ready": child.ready, "steps": child.steps,
                                           "peak_rss": max([closed.get("rss", 0)] + [s["rss"] for s in child.steps])}
        return out
    finally:
        for child in children:
            child.kill()
        shutil.rmtree(swap_root, ignore_errors=True)


# ------------------------------------------------------------------------------------- the report

def window_average(steps: list[dict], key: str) -> float:
    """Mean of ``key`` over steps 1..ν: one whole window in steady state (ν − 1 inner steps and a merge)."""
    values = [s[key] for s in steps if s["step"] > 0 and s.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


def at_window_length(steps: list[dict], key: str, nu: int) -> float:
    """Mean of ``key`` per step over a window of ν steps, from the run's measured inner and merging steps (the
    pattern is fixed: ν − 1 steps like the inner ones, one like the merge)."""
    inner = [s[key] for s in steps if s["step"] > 0 and not s["bytes_merged"]]
    merge = [s[key] for s in steps if s["bytes_merged"]]
    if not inner or not merge:
        return float("nan")
    return (sum(merge) / len(merge) + (nu - 1) * sum(inner) / len(inner)) / nu


def judge(result: dict, nu: int) -> dict:
    """The targets: written ≤ today's/ν + non-matrix; (read + written) ≤ 0.55 × MeZO's; step time / MeZO's."""
    variants = result["variants"]
    mezo, step, window = variants["mezo"], variants["lozo-step"], variants["lozo-window"]
    today = window_average(step["steps"], "bytes_written")
    vectors = window["ready"]["vector_bytes"]
    written = window_average(window["steps"], "bytes_written")
    moved = lambda v: window_average(v["steps"], "bytes_read") + window_average(v["steps"], "bytes_written")  # noqa
    times = {name: statistics.median(s["seconds"] for s in v["steps"] if s["step"] > 0)
             for name, v in variants.items()}
    verdict = {
        "written_per_step": written, "written_bound": today / nu + vectors, "today_written": today,
        "vector_bytes": vectors, "written_ok": written <= today / nu + vectors,
        "moved_over_mezo": moved(window) / moved(mezo), "moved_ok": moved(window) / moved(mezo) <= 0.55,
        "moved_bound_for_nu": 0.5 + 0.5 / nu,
        "moved_over_mezo_at_default": (at_window_length(window["steps"], "bytes_read", DEFAULT_NU)
                                       + at_window_length(window["steps"], "bytes_written", DEFAULT_NU)) / moved(mezo),
        "time_over_mezo": {name: t / times["mezo"] for name, t in times.items()},
        "median_s": times,
    }
    return verdict


def phase_rows(result: dict) -> list[list[Any]]:
    rows = []
    for name, v in result["variants"].items():
        timed = [s for s in v["steps"] if s["step"] > 0]
        phases: dict[str, float] = {}
        for s in timed:
            for k, t in s["phase_s"].items():
                phases[k] = phases.get(k, 0.0) + t / len(timed)
        io = [sum(s.get(k, 0.0) for s in timed) / len(timed) for k in ("read_s", "write_s")]
        rows.append([name, f"{statistics.median(s['seconds'] for s in timed):.2f}",
                     *[f"{phases.get(k, 0.0):.2f}" for k in ("compute", "noise", "update", "perturb", "fetch",
                                                              "store")],
                     f"{io[0]:.2f}" if result["tier"] == "nvme" else "—",
                     f"{io[1]:.2f}" if result["tier"] == "nvme" else "—"])
    return rows


def step_rows(result: dict) -> list[list[Any]]:
    rows = []
    nvme = result["tier"] == "nvme"
    for name, v in result["variants"].items():
        for s in v["steps"]:
            disk = s.get("disk_written")
            rows.append([name, s["step"], f"{s['seconds']:.2f}", f"{s['bytes_read'] / MIB:.0f}",
                         f"{s['bytes_written'] / MIB:.0f}", f"{s['bytes_merged'] / MIB:.0f}",
                         f"{s['ssd_written'] / MIB:.0f}" if nvme else "—",
                         f"{disk / MIB:.0f}" if nvme and disk is not None else "—", f"{s['rss'] / GIB:.2f}"])
    return rows


def count(params: int) -> str:
    return f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.1f} M"


def render(results: list[dict], shapes: dict[str, Shape], args: argparse.Namespace) -> tuple[str, dict]:
    from results import table
    parts, verdicts = [], {}
    nu = args.lazy_steps
    for result in results:
        tier, shape = result["tier"], shapes[result["tier"]]
        verdict = verdicts[tier] = judge(result, nu)
        ready = result["variants"]["mezo"]["ready"]
        window = result["variants"]["lozo-window"]
        summary = [[name, count(v["ready"]["params"]),
                    f"{window_average(v['steps'], 'bytes_read') / MIB:.0f}",
                    f"{window_average(v['steps'], 'bytes_written') / MIB:.0f}",
                    f"{window_average(v['steps'], 'ssd_written') / MIB:.0f}" if tier == "nvme" else "—",
                    f"{verdict['median_s'][name]:.2f}", f"{verdict['time_over_mezo'][name]:.2f}",
                    f"{v['peak_rss'] / GIB:.2f}"]
                   for name, v in result["variants"].items()]
        hit = lambda ok: "**hit**" if ok else "**miss**"  # noqa: E731
        targets = table(["target", "measured", "verdict"], [
            [f"steady-state bytes written per step ≤ today's / ν + non-matrix = {verdict['today_written'] / MIB:.0f} / "
             f"{nu} + {verdict['vector_bytes'] / MIB:.2f} = {verdict['written_bound'] / MIB:.1f} MiB",
             f"{verdict['written_per_step'] / MIB:.1f} MiB", hit(verdict["written_ok"])],
            ["bytes per step, up and down together, ≤ 0.55 × MeZO's",
             f"{verdict['moved_over_mezo']:.3f} × (0.5 + 0.5/ν = {verdict['moved_bound_for_nu']:.3f} at ν = {nu})",
             hit(verdict["moved_ok"]) + ("" if verdict["moved_ok"] else
                                        ": reading every block every step is half of MeZO's bytes by itself, the "
                                        "window's one write adds 0.5/ν (plus the vectors): ≤ 0.55 needs ν > 10")],
            [f"the same at LOZO's default ν = {DEFAULT_NU} (this run's inner and merging steps, weighted "
             f"{DEFAULT_NU - 1} : 1)", f"{verdict['moved_over_mezo_at_default']:.3f} ×",
             hit(verdict["moved_over_mezo_at_default"] <= 0.55)],
            ["step time (median of steps 1..ν) / MeZO's: no target on this CPU",
             ", ".join(f"{k} {v:.2f}" for k, v in verdict["time_over_mezo"].items()), "reported"],
        ])
        title = "NVMe tier (ZeRO-Infinity swap files)" if tier == "nvme" else "cpu tier (pinned CPU partitions)"
        parts.append(f"""### {title}

LLaMA shape: {shape.layers} layers, hidden {shape.hidden}, MLP {shape.inter}, {shape.heads} heads / {shape.kv_heads}
KV heads, vocabulary {shape.vocab:,}, untied embeddings, {count(ready['params'])} parameters; bf16
partitions with stochastic rounding; batch {args.rows} × {args.seq} tokens; LOZO rank {args.rank}, ν =
`lazy_steps` {nu}; prefetch_blocks {args.prefetch}; {ready['threads']} torch threads; noise {ready['noise']}.
Load average during the steps: {result['load']['min']:.1f}–{result['load']['max']:.1f} (mean
{result['load']['mean']:.1f}) on {os.cpu_count()} cores.

Window averages over steps 1..ν (MiB per step):

{table(["variant", "parameters", "read", "written", "SSD written", "median s", "time / MeZO", "peak RSS GiB"],
       summary)}

{targets}

Where a step's time goes (seconds per step, mean over steps 1..ν; pipeline phases of the calling thread and the
prefetch worker, which overlap; disk read/write: the NVMe tier's own clocks, inside fetch and store):

{table(["variant", "median s", "compute", "noise", "update", "perturb", "fetch", "store", "disk read",
        "disk write"], phase_rows(result))}

Every step (MiB; SSD written: the tier's O_DIRECT bytes; disk written: /proc/diskstats of the swap disk, every
process's writes included):

{table(["variant", "step", "s", "read", "written", "merged", "SSD written", "disk written", "peak RSS GiB"],
       step_rows(result))}
""")
    text = """**Upload-only offload under LOZO** (issue 32): MeZO, LOZO writing back every step, and LOZO writing a
matrix back once per lazy window (U_acc held beside the read-only stored copy, merged at the window's end).
Each variant runs in a process of its own (its peak RSS is its own); the processes take turns step by step.

""" + "\n".join(parts)
    return text, verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--tiers", default="nvme,cpu")
    parser.add_argument("--layers", type=int, default=22, help="NVMe model layers (22: 1.1 B parameters)")
    parser.add_argument("--cpu_layers", type=int, default=None, help="cpu-tier model layers (default: --layers "
                                                                     "for a rehearsal, else 8)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--min_params", type=float, default=1e9, help="the NVMe model has at least this many")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--lazy_steps", type=int, default=12, help="ν; every variant runs ν + 1 steps")
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--variants", default=None, help="comma list (default: mezo, lozo-step, lozo-window, and "
                                                         "lozo-window-materialised on the cpu tier)")
    parser.add_argument("--workdir", default=None, help="a new folder for the swap files (default: under $TMPDIR)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no_results", action="store_true")
    args = parser.parse_args()
    if args._child:
        return child_main(args._child)
    tiers = args.tiers.split(",")
    nvme_shape = Shape(args.vocab, args.hidden, args.inter, args.heads, args.kv_heads, args.layers)
    if "nvme" in tiers and nvme_shape.params < args.min_params:
        raise SystemExit(f"error: the NVMe model has {nvme_shape.params / 1e9:.2f} B parameters, fewer than "
                         f"--min_params {args.min_params:g}: raise --layers or lower --min_params")
    rehearsal = args.min_params < 1e9
    cpu_layers = args.cpu_layers or (args.layers if rehearsal else 8)
    shapes = {"nvme": nvme_shape, "cpu": Shape(args.vocab, args.hidden, args.inter, args.heads, args.kv_heads,
                                               cpu_layers)}
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="write_back-"))
    work.mkdir(parents=True, exist_ok=True)
    if "nvme" in tiers:
        need = 3 * nvme_shape.params * 2 + 2 * GB
        free = shutil.disk_usage(work).free
        if free < need:
            raise SystemExit(f"error: {need / GB:.1f} GB of swap files need room in {work}, {free / GB:.1f} GB free")
    results = []
    try:
        for tier in tiers:
            names = args.variants.split(",") if args.variants else \
                ["mezo", "lozo-step", "lozo-window"] + (["lozo-window-materialised"] if tier == "cpu" else [])
            results.append(run_tier(tier, shapes[tier], names, args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text, verdicts = render(results, shapes, args)
    print(text, flush=True)
    print(json.dumps(verdicts), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "verdicts": verdicts}, indent=1))
    if not args.no_results:
        from results import write_section
        write_section("write_back", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

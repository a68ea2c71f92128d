"""Crash-point harness: a checkpoint save, a zo2-export, save_pretrained and an NVMe run, each killed (SIGKILL)
at every one of its file-system mutations, and what the next run then finds.

    python tests/crash_harness.py SCENARIO [SCENARIO ...] [--json results.json] [--no-exchange]

One process per call: it builds the engines and the reference states once, then forks one child per crash
point (copy-on-write: no import, no model build per point). The child installs ``CrashPoints(kill_at=N)``
and runs the operation, which kills it just before mutation N; a child with N past the last mutation
completes. The parent then checks, as the next run would:

- checkpoints: ``load_checkpoint(save_dir)`` restores the previous or the new checkpoint bitwise (every
  partition and state, the counters, optimizer, scheduler and client_state; with ``checkpoint-hybrid-*``,
  a first-order tail's masters, optimizer state and scheduler too), never a mix and never an
  error, or starts fresh with its warning where there was no previous one; one more step from there equals
  the uninterrupted run's; and the next save into the directory succeeds and leaves no leftovers;
- exports (``zo2-export``, ``engine.save_pretrained``): the directory holds exactly the files of the
  previous export or of the new one (a symlinked directory stays a symlink), and the next export succeeds;
- the NVMe run: a new run on the same ``nvme_path`` starts, removes the dead run's folder (and only it:
  a live run's folder and another host's stay), resumes from ``latest`` and trains bitwise as the
  uninterrupted run did, and leaves ``nvme_path`` as it found it.

``--no-exchange`` makes directories be replaced by two renames (where the file system has no
``RENAME_EXCHANGE``). Each scenario's result (points, recovered, data lost, hangs, failures, durability
gaps, seconds) is printed as one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)  # one thread: nothing to lose at fork, and the same rounding in every process

from conftest import deepspeed_warnings  # noqa: E402
from crash_points import CrashPoints, durability_gaps  # noqa: E402

CHILD_TIMEOUT_S = 180.0
"""A child (or a check) still running after this is a hang."""


@dataclass
class Result:
    scenario: str
    operation: str
    points: int = 0
    recovered: int = 0
    data_lost: int = 0
    hangs: int = 0
    failures: list = field(default_factory=list)
    durability_gaps: list = field(default_factory=list)
    kinds: dict = field(default_factory=dict)
    seconds: float = 0.0


class Lost(AssertionError):
    """What the next run found is neither the previous nor the new version (or an error instead of either)."""


class Hang(Exception):
    pass


# -- children -------------------------------------------------------------------------------------------


def run_child(roots: list[Path], kill_at: Optional[int], operation: Callable[[], None],
              trace_file: Optional[Path] = None, kill_note: Optional[Path] = None) -> str:
    """Fork; the child runs ``operation`` under crash points; 'killed', 'completed', or 'failed: ...'/'hang'."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller
        code = 0
        try:
            points = CrashPoints(roots, kill_at, kill_note).install()
            points.wrap_swap_writes()
            operation()
            points.uninstall()
            if trace_file is not None:
                trace_file.write_text(json.dumps(points.trace))
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hang"
        time.sleep(0.005)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return "completed"
    return f"failed: status {status}"


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise Hang in this process if the block runs longer than ``seconds``."""
    def alarm(signum, frame):
        raise Hang(f"still running after {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def hidden_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) if directory.is_dir() else []


def _shape(point: tuple) -> tuple:
    """A point without what differs between runs of one operation (pids, random folder names)."""
    kind, path = point
    return kind, re.sub(r"[0-9a-f]{8}|\d+", "#", path)


def enumerate_points(result: Result, roots: list[Path], prepare: Callable[[], None], operation: Callable[[], None],
                     check: Callable[[int, str], None], workdir: Path) -> None:
    """Record the operation's trace, then kill it at every point and check what is left."""
    started = time.perf_counter()
    prepare()
    trace_file = workdir / "trace.json"
    outcome = run_child(roots, None, operation, trace_file)
    if outcome != "completed":
        raise RuntimeError(f"{result.scenario}: the operation itself does not complete ({outcome})")
    trace = [tuple(t) for t in json.loads(trace_file.read_text())]
    result.durability_gaps = durability_gaps(trace)
    result.points = len(trace)
    for kind, _ in trace:
        result.kinds[kind] = result.kinds.get(kind, 0) + 1
    note = workdir / "killed-at.json"
    for n in range(len(trace)):
        prepare()
        note.unlink(missing_ok=True)
        outcome = run_child(roots, n, operation, kill_note=note)
        where = f"point {n} ({trace[n][0]} {trace[n][1]})"
        if outcome == "hang":
            result.hangs += 1
            result.failures.append(f"{where}: the operation hangs")
            continue
        killed_at = tuple(json.loads(note.read_text())) if outcome == "killed" and note.exists() else None
        if killed_at is None or _shape(killed_at) != _shape(trace[n]):
            result.failures.append(f"{where}: the child was not killed there ({outcome}, at {killed_at}): the "
                                   f"operation does not repeat its mutations")
            continue
        try:
            with time_limit(CHILD_TIMEOUT_S):
                check(n, where)
            result.recovered += 1
        except Hang as e:
            result.hangs += 1
            result.failures.append(f"{where}: {e}")
        except Lost as e:
            result.data_lost += 1
            result.failures.append(f"{where}: {e}")
        except Exception as e:  # a check that failed otherwise (a leftover, a failing next save)
            result.failures.append(f"{where}: {type(e).__name__}: {e}")
    result.seconds = round(time.perf_counter() - started, 1)


# -- checkpoints ----------------------------------------------------------------------------------------


def hizoo_config(**zo2: Any) -> dict:
    from conftest import ds_config
    config = ds_config("cpu", method="hizoo", micro_batch=4, lr=1e-2, weight_decay=0.01, hessian_smooth=0.1,
                       prefetch_blocks=0, **zo2)
    config["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": 1e-2,
                                                                "warmup_num_steps": 2, "total_num_steps": 20}}
    return config


def hybrid_config() -> dict:
    """hizoo_config with a first-order tail (the last block and the head, AdamW under a warm-up): its masters,
    optimizer state and scheduler are saved in a file of their own."""
    config = hizoo_config()
    config["zo2"]["first_order"] = {
        "blocks": 1, "head": True, "max_fraction": 0.9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3, "warmup_min_lr": 1e-4,
                                                     "warmup_max_lr": 1e-3}}}  # every step moves the tail
    return config


def new_engine(seed: int, config: Optional[dict] = None, **model_kw: Any):
    import zo2_deepspeed
    from tiny_models import make_model
    engine, *_ = zo2_deepspeed.initialize(model=make_model(seed=seed, **{"layers": 1, "hidden": 16, **model_kw}),
                                          config=config or hizoo_config())
    return engine


def step(engine, batch: dict) -> None:
    engine.backward(engine(**batch))
    engine.step()
    engine.flush()


def snapshot(engine) -> dict:
    """Everything a checkpoint restores: partitions and method state, counters, optimizer and scheduler."""
    engine.flush()
    out = {}
    for slot in engine.pipeline.slots:
        out[f"param/{slot.name}"] = engine.tier.read_partition(slot).clone()
        for name in slot.stored_state:
            out[f"state/{name}/{slot.name}"] = engine.tier.read_state_partition(slot, name).clone()
    out["counters"] = (engine.global_steps, engine.global_samples, engine.micro_steps, engine.skipped_steps)
    out["optimizer"] = json.dumps(engine.optimizer.state_dict(), sort_keys=True, default=str)
    out["scheduler"] = json.dumps(engine.lr_scheduler.state_dict() if engine.lr_scheduler else None, sort_keys=True,
                                  default=str)
    tail = engine.first_order
    if tail is not None:  # the first-order tail: fp32 masters, optimizer tensors and scalars, its scheduler
        for slot, master in zip(tail.selection.first_order, tail.residency.masters):
            out[f"first_order/master/{slot.name}"] = master.detach().clone()
        for key, value in tail.checkpoint_tensors().items():
            out[f"first_order/{key}"] = value.detach().clone()
        out["first_order/state"] = json.dumps(tail.checkpoint_state(), sort_keys=True, default=str)
    return out


def differences(got: dict, want: dict) -> list[str]:
    if got.keys() != want.keys():
        return ["keys"]
    return [k for k in want if not (torch.equal(got[k], want[k]) if isinstance(want[k], torch.Tensor)
                                    else got[k] == want[k])]


class CheckpointScenarios:
    """A writer engine at step 2 saves; a checker engine loads what a crash left. ``hybrid``: the engines train
    a first-order tail (two blocks, the last one first-order), whose state is a file of the checkpoint too."""

    def __init__(self, work: Path, hybrid: bool = False) -> None:
        from tiny_models import batches
        self.work = work
        self.hybrid = hybrid
        work.mkdir(parents=True)
        self.data = batches(3, seed=11)
        self.writer = self.engine(seed=0)
        step(self.writer, self.data[0])
        self.templates = {}
        first = work / "tpl-first"
        self.templates["first"] = first
        nxt = work / "tpl-next"
        self.writer.save_checkpoint(str(nxt), client_state={"step": 1})
        over = work / "tpl-overwrite"
        self.writer.save_checkpoint(str(over), tag="final", client_state={"step": 1})
        self.templates["next"], self.templates["overwrite"] = nxt, over
        self.states = {1: snapshot(self.writer)}
        step(self.writer, self.data[1])
        self.states[2] = snapshot(self.writer)
        changed = [k for k in differences(self.states[1], self.states[2]) if k.startswith("param/")]
        if len(changed) < len([k for k in self.states[1] if k.startswith("param/")]):
            raise RuntimeError("a step left parameters unchanged: a mix of two checkpoints could go unnoticed")
        # the uninterrupted run's step after each: what a resumed run must reproduce
        self.after = {2: self.states[2]}
        probe = self.engine(seed=0)
        for batch in self.data:
            step(probe, batch)
        self.after[3] = snapshot(probe)
        probe.close()
        self.checker = self.engine(seed=5)

    def engine(self, seed: int):
        return new_engine(seed, hybrid_config(), layers=2) if self.hybrid else new_engine(seed)

    def save(self, kind: str, save_dir: Path) -> Callable[[], None]:
        tag = "final" if kind == "overwrite" else None
        return lambda: self.writer.save_checkpoint(str(save_dir), tag=tag, client_state={"step": 2})

    def run(self, kind: str) -> Result:
        save_dir = self.work / f"ckpt-{kind}"
        from zo2_deepspeed.checkpoint import durable
        renames = "" if durable.exchange_enabled else " (two renames)"
        hybrid = "-hybrid" if self.hybrid else ""
        result = Result(f"checkpoint{hybrid}-{kind}{renames}",
                        {"first": "checkpoint save, first into a directory", "next": "checkpoint save, a new tag",
                         "overwrite": "checkpoint save, replacing a tag"}[kind]
                        + (" (first-order tail)" if self.hybrid else "")
                        + (", without RENAME_EXCHANGE" if renames else ""))
        template = self.templates[kind]

        def prepare() -> None:
            shutil.rmtree(save_dir, ignore_errors=True)
            if template.exists():
                shutil.copytree(template, save_dir, symlinks=True)

        previous = None if kind == "first" else 1
        enumerate_points(result, [save_dir], prepare, self.save(kind, save_dir),
                         lambda n, where: self.check(save_dir, previous, kind), self.work)
        return result

    def check(self, save_dir: Path, previous: Optional[int], kind: str) -> None:
        checker = self.checker
        before = snapshot(checker)
        with deepspeed_warnings() as warnings:
            try:
                path, client = checker.load_checkpoint(str(save_dir))
            except Exception as e:
                raise Lost(f"load_checkpoint raised {type(e).__name__}: {e}") from None
        if path is None:
            if previous is not None:
                raise Lost(f"load_checkpoint started fresh, but checkpoint step {previous} was complete before")
            if differences(snapshot(checker), before):
                raise Lost("a fresh start changed the engine")
            if not any("nothing to resume" in w for w in warnings):
                raise AssertionError(f"a fresh start without its warning: {warnings}")
        else:
            got = snapshot(checker)
            loaded = [s for s in (previous, 2) if s is not None and not differences(got, self.states[s])]
            if not loaded:
                wrong = differences(got, self.states[2])
                raise Lost(f"load_checkpoint gave neither the previous nor the new checkpoint (differs from the new "
                           f"in {wrong[:4]})")
            if client != {"step": loaded[0]}:
                raise Lost(f"client_state {client} with the state of step {loaded[0]}")
            step(checker, self.data[loaded[0]])
            if differences(snapshot(checker), self.after[loaded[0] + 1]):
                raise Lost(f"resumed from step {loaded[0]}, the next step differs from the uninterrupted run")
        # the next save into the directory succeeds, tidies up, and is what a load then finds
        self.save(kind, save_dir)()
        leftovers = hidden_entries(save_dir)
        if leftovers:
            raise AssertionError(f"the next save left {leftovers}")
        path, _ = checker.load_checkpoint(str(save_dir))
        if path is None or differences(snapshot(checker), self.states[2]):
            raise AssertionError("after the next save, load_checkpoint does not give it")


# -- exports ----------------------------------------------------------------------------------------------


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


SHARD_BYTES = 10_000
"""Bytes per safetensors file of the new exports (the tiny GPT-2 has about 40 kB of tensors)."""


class ExportScenarios:
    """zo2-export of a step-2 checkpoint over nothing, over the step-1 export, and into a symlinked directory;
    engine.save_pretrained over an earlier one with a tokenizer file beside it.

    The new version is written in shards (three safetensors files and an index), the previous one as a
    single file: a directory that mixed them (some files moved in, others not) is told apart from both.
    """

    def __init__(self, work: Path) -> None:
        from tiny_models import batches
        from zo2_deepspeed.export import export
        self.work = work
        work.mkdir(parents=True)
        self.export = export
        data = batches(2, seed=11)
        writer = new_engine(seed=0, config=hizoo_config(), arch="gpt2")
        step(writer, data[0])
        self.ckpt1 = work / "ckpt1"
        writer.save_checkpoint(str(self.ckpt1))
        self.pretrained1 = work / "pretrained1"
        writer.save_pretrained(str(self.pretrained1))
        step(writer, data[1])
        self.ckpt2 = work / "ckpt2"
        writer.save_checkpoint(str(self.ckpt2))
        self.writer = writer
        self.export1, self.export2 = work / "export1", work / "export2"
        export(str(self.ckpt1), str(self.export1))
        export(str(self.ckpt2), str(self.export2), max_shard_bytes=SHARD_BYTES)
        self.pretrained2 = work / "pretrained2"
        writer.save_pretrained(str(self.pretrained2), max_shard_size=SHARD_BYTES)
        if len(list(self.export2.glob("*.safetensors"))) < 3 or len(list(self.pretrained2.glob("*.safetensors"))) < 3:
            raise RuntimeError("the new exports are not sharded")
        for d in (self.pretrained1, self.pretrained2):
            (d / "tokenizer.json").write_text('{"kept": true}')  # a file save_pretrained must keep
        if digests(self.export1) == digests(self.export2) or digests(self.pretrained1) == digests(self.pretrained2):
            raise RuntimeError("the two exports are equal: the harness could not tell them apart")

    def run(self, kind: str, exchange: bool) -> Result:
        base = self.work / f"{kind}{'' if exchange else '-renames'}"
        out = base / "hf"
        real = base / "real" / "hf" if kind == "export-symlink" else out
        previous = {"export-first": None, "export-replace": self.export1, "export-symlink": self.export1,
                    "save-pretrained": self.pretrained1}[kind]
        new = self.pretrained2 if kind == "save-pretrained" else self.export2
        operations = {"export-first": "zo2-export, new directory", "export-replace": "zo2-export, replacing an export",
                      "export-symlink": "zo2-export, symlinked directory",
                      "save-pretrained": "engine.save_pretrained, replacing one (tokenizer kept)"}
        result = Result(f"{kind}{'' if exchange else ' (two renames)'}", operations[kind] + ("" if exchange else
                        ", without RENAME_EXCHANGE"))

        def prepare() -> None:
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir(parents=True)
            if kind == "export-symlink":
                real.parent.mkdir(parents=True)
                os.symlink(real, out)
            if previous is not None:
                shutil.copytree(previous, real)

        if kind == "save-pretrained":
            operation = lambda: self.writer.save_pretrained(str(out), max_shard_size=SHARD_BYTES)  # noqa: E731
        else:
            operation = lambda: self.export(str(self.ckpt2), str(out), max_shard_bytes=SHARD_BYTES)  # noqa: E731

        def check(n: int, where: str) -> None:
            self.check(out, real, previous, new, kind, exchange)
            operation()  # the next export succeeds, and it is the new one
            if digests(out) != digests(new):
                raise AssertionError("after the next export the directory does not hold it")
            leftovers = hidden_entries(real.parent)
            if leftovers:
                raise AssertionError(f"the next export left {leftovers}")

        enumerate_points(result, [base], prepare, operation, check, self.work)
        return result

    def check(self, out: Path, real: Path, previous: Optional[Path], new: Path, kind: str, exchange: bool) -> None:
        if kind == "export-symlink" and not out.is_symlink():
            raise Lost(f"{out} is no longer a symlink")
        versions = [digests(new)] + ([digests(previous)] if previous is not None else [])
        if not out.exists():
            aside = real.with_name(f".trash-{real.name}")
            if previous is None:
                return  # nothing there yet: the first export did not finish
            if not exchange and aside.is_dir() and digests(aside) == versions[1]:
                return  # the instant between the two renames: complete aside, put back by the next export
            raise Lost(f"{out} is missing, and the previous export is gone")
        if digests(out) not in versions:
            have = set(digests(out))
            raise Lost(f"{out} holds neither the previous nor the new export (files {sorted(have)[:6]})")


# -- the NVMe run -----------------------------------------------------------------------------------------


NVME_HIDDEN = 512  # shards of the larger matrices reach DeepSpeed's swap threshold (1 MiB): they live on NVMe


def nvme_config(path: Path) -> dict:
    from conftest import ds_config
    config = ds_config("cpu", lr=1e-2, prefetch_blocks=0)
    config["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": str(path)}
    config["aio"] = {"block_size": 1 << 20, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
                     "overlap_events": True}
    return config


class NVMeScenario:
    """An NVMe-tier run: claim a run folder, resume from ``latest``, train a step, save, close and free it.

    Everything NVMe happens in forked children (this process never opens an aio handle or a process group).
    Beside the run on ``nvme_path``: the folder of a run on another host (its lock free, as NFS with local
    locks shows it) and the folder of a live run on this host (this process, its lock held): neither may go.
    """

    def __init__(self, work: Path) -> None:
        from tiny_models import batches
        from zo2_deepspeed.tiers import run_folder
        from zo2_deepspeed.tiers.nvme import nvme_unavailable_reason
        reason = nvme_unavailable_reason()
        if reason:
            raise SystemExit(f"the NVMe scenario needs DeepSpeed's AsyncIO op: {reason}")
        self.work = work
        self.data = batches(3, seed=11)
        self.nvme = work / "nvme"
        self.nvme.mkdir(parents=True)
        self.template = work / "nvme-ckpt-template"
        self.ckpt = work / "nvme-ckpt"
        self.report = work / "nvme-report.json"
        other = self.nvme / "zo2-run-otherhost-4242-0123abcd"
        (other / "zero_stage_3").mkdir(parents=True)
        (self.nvme / f"{other.name}.lock").write_text(json.dumps({"host": "otherhost", "pid": 4242}))
        self.live = run_folder.RunFolder(self.nvme)  # held by this process for the whole scenario
        self.neighbours = sorted(os.listdir(self.nvme))
        if run_child([], None, lambda: self.window(self.template, steps=1, resume=False)) != "completed":
            raise RuntimeError("the NVMe run that writes the first checkpoint failed")

    def window(self, ckpt: Path, steps: int, resume: bool = True) -> None:
        """The run (in a child): resume, train, save, close, free; its final parameters' digest to the report."""
        import gc

        import zo2_deepspeed
        from tiny_models import make_model
        model = make_model("qwen2", seed=0, layers=1, hidden=NVME_HIDDEN)
        engine = zo2_deepspeed.initialize(model=model, config=nvme_config(self.nvme))[0]
        if resume:
            path, client = engine.load_checkpoint(str(ckpt))
            assert path is not None, "no checkpoint to resume"
        for _ in range(steps):
            step(engine, self.data[engine.global_steps])
        engine.save_checkpoint(str(ckpt), client_state={"step": engine.global_steps})
        params = engine.parameter_snapshot()
        digest = hashlib.sha256(b"".join(params[k].numpy().tobytes() for k in sorted(params))).hexdigest()
        report = {"steps": engine.global_steps, "digest": digest}
        engine.close()
        del engine, model, params
        gc.collect()  # frees the swapper: its run folder goes
        report["left"] = sorted(os.listdir(self.nvme))
        self.report.write_text(json.dumps(report))

    def run(self) -> Result:
        result = Result("nvme-run", "NVMe run: claim a folder, resume, a step, save, close")

        def prepare() -> None:
            for name in os.listdir(self.nvme):
                if name not in self.neighbours:
                    path = self.nvme / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            shutil.rmtree(self.ckpt, ignore_errors=True)
            shutil.copytree(self.template, self.ckpt)

        prepare()  # the references: resumed from step 1, and from step 2
        self.references = {}
        for start in (1, 2):
            if run_child([], None, lambda: self.window(self.ckpt, steps=1)) != "completed":
                raise RuntimeError("the uninterrupted NVMe run failed")
            report = json.loads(self.report.read_text())
            self.references[report["steps"]] = report["digest"]
        if sorted(self.references) != [2, 3]:
            raise RuntimeError(f"unexpected reference runs {self.references}")

        def check(n: int, where: str) -> None:
            self.report.unlink(missing_ok=True)
            outcome = run_child([], None, lambda: self.window(self.ckpt, steps=1))
            if outcome == "hang":
                raise Hang("the next run hangs")
            if outcome != "completed":
                raise Lost(f"the next run failed ({outcome})")
            report = json.loads(self.report.read_text())
            if self.references.get(report["steps"]) != report["digest"]:
                raise Lost(f"the next run, at step {report['steps']}, differs from the uninterrupted run")
            if report["left"] != self.neighbours:
                raise AssertionError(f"nvme_path holds {report['left']} after the next run, not {self.neighbours}")

        roots = [self.nvme]
        enumerate_points(result, roots, prepare, lambda: self.window(self.ckpt, steps=1), check, self.work)
        return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="+")
    parser.add_argument("--json", default=None, help="write the results here (a list of objects)")
    parser.add_argument("--no-exchange", action="store_true", help="replace directories by two renames")
    args = parser.parse_args(argv)
    if args.no_exchange:
        from zo2_deepspeed.checkpoint import durable
        durable.exchange_enabled = False
    results = []
    with tempfile.TemporaryDirectory(prefix="zo2-crash-") as tmp:
        work = Path(tmp)
        checkpoints = hybrids = exports = None
        for scenario in args.scenarios:
            if scenario.startswith("checkpoint-hybrid-"):
                hybrids = hybrids or CheckpointScenarios(work / "h", hybrid=True)
                result = hybrids.run(scenario[len("checkpoint-hybrid-"):])
            elif scenario.startswith("checkpoint-"):
                checkpoints = checkpoints or CheckpointScenarios(work / "c")
                result = checkpoints.run(scenario[len("checkpoint-"):])
            elif scenario.startswith("export-") or scenario == "save-pretrained":
                exports = exports or ExportScenarios(work / "e")
                result = exports.run(scenario, exchange=not args.no_exchange)
            elif scenario == "nvme-run":
                result = NVMeScenario(work / "n").run()
            else:
                raise SystemExit(f"unknown scenario {scenario!r}")
            print(json.dumps(asdict(result)), flush=True)
            results.append(asdict(result))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

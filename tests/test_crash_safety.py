"""Crash safety, piece by piece (the harness that kills at every point is tests/test_crash_points.py):

- window 1: ``latest`` naming a tag whose replacing save was cut short loads the set-aside copy; a first
  save cut short before ``latest`` loads the checkpoint it completed; directories are swapped atomically;
- window 2: an interrupt (``SystemExit``, ``KeyboardInterrupt``) on one rank reaches the others in
  ``together``, and a second signal inside the ranks' exchange is held for the next step;
- window 3: every file a save or an export renames into place was fsynced, and its directory after;
  a symlinked output directory stays a symlink;
- window 4: NVMe run folders record their owner; only this host's dead runs' folders are removed.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zo2_deepspeed
from conftest import ds_config
from crash_points import CrashPoints, durability_gaps
from tiny_models import batches, make_model
from zo2_deepspeed import CheckpointError, checkpoint
from zo2_deepspeed.checkpoint import durable, ranks
from zo2_deepspeed.stopping import StopOnSignal


def new_engine(seed: int = 0, arch: str = "llama"):
    engine, *_ = zo2_deepspeed.initialize(model=make_model(arch, seed=seed, layers=1, hidden=16),
                                          config=ds_config("cpu", method="hizoo", lr=1e-2, hessian_smooth=0.1))
    return engine


def train(engine, n: int = 1, seed: int = 100) -> None:
    for batch in batches(n, seed=seed):
        engine.backward(engine(**batch))
        engine.step()


def state(engine) -> dict[str, torch.Tensor]:
    engine.flush()
    out = {}
    for slot in engine.pipeline.slots:
        out[slot.name] = engine.tier.read_partition(slot).clone()
        for name in slot.stored_state:
            out[f"{name}/{slot.name}"] = engine.tier.read_state_partition(slot, name).clone()
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def ds_warnings():
    from deepspeed.utils import logger
    handler = Warnings()
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


@pytest.fixture
def two_renames(monkeypatch):
    """Directories replaced as on a file system without RENAME_EXCHANGE."""
    monkeypatch.setattr(durable, "exchange_enabled", False)


# -- window 1 -------------------------------------------------------------------------------------------


def test_a_tag_whose_replacing_save_was_cut_short_loads_its_set_aside_version(tmp_path, ds_warnings, two_renames):
    """Killed between the two renames of a replaced tag: ``latest`` names a missing tag, whose complete
    previous version is ``.trash-<tag>``. It loads (with a warning), and the next save puts it back."""
    engine = new_engine()
    train(engine)
    engine.save_checkpoint(str(tmp_path), tag="final", client_state={"step": 1})
    first = state(engine)
    train(engine, seed=7)
    os.rename(tmp_path / "final", tmp_path / ".trash-final")  # what the kill left: first rename done
    shutil.copytree(tmp_path / ".trash-final", tmp_path / ".partial-final")
    other = new_engine(seed=3)
    path, client = other.load_checkpoint(str(tmp_path))
    assert path == str(tmp_path / ".trash-final") and client == {"step": 1} and other.global_steps == 1
    assert same(state(other), first)
    assert any(f"{tmp_path / 'final'} is missing: a save that was replacing it was interrupted" in m
               for m in ds_warnings)
    assert other.load_checkpoint(str(tmp_path), tag="final")[0] == str(tmp_path / ".trash-final")
    engine.save_checkpoint(str(tmp_path), tag="other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "latest", "other"]
    assert other.load_checkpoint(str(tmp_path), tag="final")[0] == str(tmp_path / "final")
    assert same(state(other), first)
    engine.close()
    other.close()


def test_a_first_save_cut_short_before_latest_loads_the_checkpoint_it_completed(tmp_path, ds_warnings):
    engine = new_engine()
    train(engine)
    engine.save_checkpoint(str(tmp_path), client_state={"step": 1})
    saved = state(engine)
    engine.close()
    os.rename(tmp_path / "latest", tmp_path / ".latest.tmp")  # the checkpoint is in place, 'latest' not yet
    other = new_engine(seed=3)
    path, client = other.load_checkpoint(str(tmp_path))
    assert path == str(tmp_path / "global_step1") and client == {"step": 1} and same(state(other), saved)
    assert any("has no 'latest' file: the save of global_step1 was interrupted just before it wrote one" in m
               for m in ds_warnings)
    (tmp_path / ".latest.tmp").write_text("global_step9")  # names nothing complete: as before, an error
    with pytest.raises(CheckpointError, match="has no 'latest' file, but holds checkpoints"):
        other.load_checkpoint(str(tmp_path))
    other.close()


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two renames"])
def test_replace_dir_swaps_a_directory_and_removes_the_old_one(tmp_path, monkeypatch, exchange):
    if exchange and not durable.exchange_enabled:
        pytest.skip("no renameat2 in this C library")
    monkeypatch.setattr(durable, "exchange_enabled", exchange)
    renames = []
    rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((Path(a).name, Path(b).name)), rename(a, b))[1])
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "x").write_text("new")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "x").write_text("old")
    durable.replace_dir(tmp_path / "new", tmp_path / "target")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    assert (tmp_path / "target" / "x").read_text() == "new"
    # with the exchange the target's name is never free; without it, for the instant between two renames
    assert renames == ([] if exchange else [("target", ".trash-target"), ("new", "target")])


def test_the_exchange_is_atomic_on_this_file_system(tmp_path):
    """renameat2(RENAME_EXCHANGE) swaps two directories here (ext4/XFS/Btrfs/tmpfs); elsewhere exchange() says no."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "from_a").touch()
    if not durable.exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this file system has no RENAME_EXCHANGE")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from_a"] and not any((tmp_path / "a").iterdir())


# -- window 2 -------------------------------------------------------------------------------------------


class FakeRanks:
    """``ranks._gather`` for this rank and one more: what this rank sent, the other rank's answer."""

    def __init__(self, other=(None, None), during=None) -> None:
        self.sent, self.other, self.during = [], other, during

    def __call__(self, world_size, what, value):
        self.sent.append(value)
        if self.during is not None:
            self.during()
        return [value, self.other]


def test_an_interrupt_on_this_rank_reaches_the_others_before_it_is_raised(monkeypatch):
    fake = FakeRanks()
    monkeypatch.setattr(ranks, "_gather", fake)

    def interrupted():
        raise SystemExit(130)

    with pytest.raises(SystemExit) as info:
        checkpoint.together(2, "writing the checkpoint files", interrupted)
    assert info.value.code == 130
    assert fake.sent == [("SystemExit 130 (interrupted: a signal, or the program exiting)", None)]
    with pytest.raises(KeyboardInterrupt):
        checkpoint.together(2, "writing", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert fake.sent[-1][0] == "KeyboardInterrupt (interrupted: a signal, or the program exiting)"


def test_an_interrupt_on_another_rank_stops_this_one(monkeypatch):
    monkeypatch.setattr(ranks, "_gather", FakeRanks(other=("SystemExit 130 (interrupted: a signal, or the program "
                                                            "exiting)", None)))
    with pytest.raises(CheckpointError, match=r"^writing the checkpoint files failed on rank 1: SystemExit 130 "):
        checkpoint.together(2, "writing the checkpoint files", lambda: None)


def test_a_second_signal_inside_the_exchange_is_held_for_the_next_step(monkeypatch):
    """Raised inside the collective, it would leave the other ranks waiting in it: it fails the next step on
    every rank instead (this rank reports it without running that step), or follows the last one."""
    with StopOnSignal(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the first: a stop at the next step boundary
        assert stop.requested()
        fake = FakeRanks(during=lambda: os.kill(os.getpid(), signal.SIGINT))  # the second, mid-exchange
        monkeypatch.setattr(ranks, "_gather", fake)
        assert checkpoint.together(2, "creating the checkpoint directory", lambda: "made")[0] == "made"
        fake.during = None
        ran = []
        with pytest.raises(SystemExit) as info:
            checkpoint.together(2, "writing the checkpoint files", lambda: ran.append(1))
        assert info.value.code == 128 + signal.SIGINT and ran == []
        assert fake.sent[-1][0].startswith("SystemExit 130 (interrupted")
        fake.during = lambda: os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(SystemExit):  # after the last step of an operation: every rank has finished it
            checkpoint.together(2, "publishing the checkpoint", lambda: None, last=True)
        fake.during = None
        checkpoint.together(2, "the next save", lambda: None)  # nothing is left held


def test_a_plain_ctrl_c_inside_the_exchange_is_held_too(monkeypatch):
    """Without StopOnSignal, Python's own SIGINT handler raises KeyboardInterrupt: not inside the exchange."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    fake = FakeRanks(during=lambda: os.kill(os.getpid(), signal.SIGINT))
    monkeypatch.setattr(ranks, "_gather", fake)
    checkpoint.together(2, "creating the checkpoint directory", lambda: None)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    fake.during = None
    with pytest.raises(KeyboardInterrupt):
        checkpoint.together(2, "writing the checkpoint files", lambda: None)
    assert fake.sent[-1][0].startswith("KeyboardInterrupt (interrupted")


# -- window 3 -------------------------------------------------------------------------------------------


def traced(roots, operation) -> list[tuple[str, str]]:
    points = CrashPoints(roots).install()
    try:
        operation()
    finally:
        points.uninstall()
    return points.trace


def test_saves_and_exports_fsync_every_file_and_directory_they_rename_into_place(tmp_path):
    """A power loss after a rename keeps what was fsynced before it: each file renamed into place (or inside a
    directory renamed into place) is fsynced after its last write, the directory too, and the parent after."""
    from zo2_deepspeed.export import export
    engine = new_engine(arch="gpt2")
    train(engine)
    ckpt, out, hf = tmp_path / "ckpt", tmp_path / "export", tmp_path / "hf"
    for operation, root in [(lambda: engine.save_checkpoint(str(ckpt)), ckpt),
                            (lambda: engine.save_checkpoint(str(ckpt), tag="global_step1"), ckpt),
                            (lambda: export(str(ckpt), str(out)), tmp_path),
                            (lambda: export(str(ckpt), str(out)), tmp_path),
                            (lambda: engine.save_pretrained(str(hf)), tmp_path),
                            (lambda: engine.save_pretrained(str(hf)), tmp_path),
                            (lambda: engine.save_16bit_model(str(tmp_path / "w" / "new")), tmp_path),
                            (lambda: engine.save_16bit_model(str(tmp_path / "w" / "new"), "m.safetensors"), tmp_path)]:
        trace = traced([root], operation)
        assert durability_gaps(trace) == []
        assert any(kind in ("rename", "exchange") for kind, _ in trace)
    written_by_transformers = [p for k, p in traced([tmp_path], lambda: engine.save_pretrained(str(hf)))
                               if k == "fsync" and p.endswith("config.json")]
    assert written_by_transformers, "config.json (written by transformers without fsync) is not fsynced"
    engine.close()


def test_the_durability_check_finds_a_file_renamed_without_fsync(tmp_path):
    def careless():
        (tmp_path / "d.tmp").mkdir()
        (tmp_path / "d.tmp" / "f").write_text("x")
        os.rename(tmp_path / "d.tmp", tmp_path / "d")
    gaps = durability_gaps(traced([tmp_path], careless))
    assert gaps == [f"{tmp_path / 'd.tmp' / 'f'} is renamed into place ({tmp_path / 'd'}) without an fsync after its "
                    f"last write",
                    f"{tmp_path / 'd.tmp'} is renamed to {tmp_path / 'd'} without an fsync of the directory after its "
                    f"files were created",
                    f"the rename to {tmp_path / 'd'} is not made durable (no fsync of {tmp_path} after it)"]


def test_a_symlinked_output_directory_stays_a_symlink(tmp_path):
    from zo2_deepspeed.export import export
    engine = new_engine(arch="gpt2")
    train(engine)
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    for name, save in [("export", lambda out: export(str(tmp_path / "ckpt"), out)),
                       ("pretrained", lambda out: engine.save_pretrained(out))]:
        real = tmp_path / "disk" / name
        real.mkdir(parents=True)
        link = tmp_path / name
        link.symlink_to(real)
        for _ in range(2):  # into the empty directory, then over the first
            save(str(link))
            assert link.is_symlink() and os.readlink(link) == str(real)
            assert (real / "config.json").is_file() and (real / "model.safetensors").is_file()
        assert not [p for p in (tmp_path / "disk").iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "disk", "export", "pretrained"]
    engine.close()


# -- window 4 -------------------------------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def lock_of(root: Path, host: str, pid: int, suffix: str = "0123abcd", **record) -> Path:
    folder = root / f"zo2-run-{host}-{pid}-{suffix}"
    (folder / "zero_stage_3").mkdir(parents=True)
    lock = root / f"{folder.name}.lock"
    lock.write_text(json.dumps({"host": host, "pid": pid, **record}))
    return lock


def test_run_folders_record_their_owner_and_only_this_hosts_dead_ones_are_removed(tmp_path):
    """On NFS with local_lock or Lustre with localflock, another host's live run shows a free lock: such a
    folder is kept. This host's folder is removed when its process is gone (or the pid is another process's
    now) and its lock is free; never while its lock is held."""
    from zo2_deepspeed.tiers import run_folder
    host, gone = socket.gethostname(), dead_pid()
    other_host = lock_of(tmp_path, "another-node", gone)
    dead = lock_of(tmp_path, host, gone)
    reused = lock_of(tmp_path, host, os.getpid(), start_time=1)  # this pid, started at another time
    rebooted = lock_of(tmp_path, host, os.getpid(), "4567cdef", boot_id="an-earlier-boot")
    lookalike = lock_of(tmp_path, f"{host}-x", 1)  # a host whose name only begins like ours
    live = run_folder.RunFolder(tmp_path)
    record = json.loads(live.lock_path.read_text())
    assert record["host"] == host and record["pid"] == os.getpid() and record["start_time"] > 1
    held = lock_of(tmp_path, host, dead_pid())  # its process is gone, but the lock is held (here): kept
    import fcntl
    holder = open(held, "r+")
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    pending = tmp_path / f".pending-zo2-run-{host}-{gone}-89abcdef.lock"  # killed before its rename
    pending.touch()
    removed = run_folder.remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted(
        [dead.name[:-5], reused.name[:-5], rebooted.name[:-5], pending.name[9:-5]])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([n for lock in (other_host, lookalike, held) for n in (lock.name, lock.name[:-5])]
                          + [live.path.name, live.lock_path.name])
    holder.close()
    live.remove()
    assert not live.path.exists() and not live.lock_path.exists()


def test_a_lock_file_is_never_seen_before_it_is_locked_and_recorded(tmp_path, monkeypatch):
    """Created under a hidden temporary name, locked, recorded, then renamed: another run's cleanup that lists
    the folder at any moment sees no lock of this run, or a held one with its owner."""
    from zo2_deepspeed.tiers import run_folder
    seen = []
    rename = os.rename

    def look_then_rename(a, b):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        fd = os.open(a, os.O_RDWR)
        import fcntl
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        assert json.loads(Path(a).read_text())["pid"] == os.getpid()
        return rename(a, b)

    monkeypatch.setattr(run_folder.os, "rename", look_then_rename)
    folder = run_folder.RunFolder(tmp_path)
    assert seen == [[f".pending-{folder.lock_path.name}"]]
    assert run_folder.remove_stale(tmp_path) == []
    folder.remove()

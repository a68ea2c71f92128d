"""Checkpoint integrity: damaged files are refused by name before the engine changes, a save that
does not fit fails before writing, a failed save leaves nothing behind on any rank, and the
previous checkpoint still loads bitwise."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import xxhash

import zo2_deepspeed
from conftest import ds_config
from tiny_models import batches, make_model
from zo2_deepspeed import CheckpointError, checkpoint, export
from zo2_deepspeed.distributed import free_port, without_launch_vars

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "ckpt_worker.py")
RANK0 = "rank00000.safetensors"


def train(engine, data) -> None:
    for batch in data:
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()


def tier_state(engine) -> dict[str, torch.Tensor]:
    """Every partition and method-state partition the engine holds, as the checkpoint sees them."""
    engine.flush()
    out = {}
    for slot in engine.pipeline.slots:
        out[f"param/{slot.name}"] = engine.tier.read_partition(slot)
        for name in slot.stored_state:
            out[f"state/{name}/{slot.name}"] = engine.tier.read_state_partition(slot, name)
    return out


def assert_equal_states(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def hizoo_config(tier: str = "cpu", **kw) -> dict:
    return ds_config(tier, method="hizoo", lr=1e-2, weight_decay=0.01, hessian_smooth=0.1, **kw)


def new_engine(hidden: int = 32, seed: int = 7, config: dict | None = None):
    engine, *_ = zo2_deepspeed.initialize(model=make_model(hidden=hidden, seed=seed), config=config or hizoo_config())
    return engine


def save_two_tags(save_dir: Path, hidden: int = 32) -> dict[str, torch.Tensor]:
    """global_step1 and global_step2 (latest) of a HiZOO run; the state saved at step 1."""
    engine = new_engine(hidden, seed=0)
    data = batches(2)
    train(engine, data[:1])
    engine.save_checkpoint(str(save_dir), client_state={"step": 1})
    step1 = tier_state(engine)
    train(engine, data[1:])
    engine.save_checkpoint(str(save_dir), client_state={"step": 2})
    engine.close()
    return step1


def data_start(file: Path) -> int:
    """Offset of the first tensor byte of a safetensors file."""
    with open(file, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def tensor_span(file: Path, key: str) -> tuple[int, int]:
    """File offsets [begin, end) of one tensor's bytes."""
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        begin, end = json.loads(f.read(n))[key]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def overwrite(file: Path, offset: int, data: bytes) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


def zero_4k_of_tensor_data(file: Path) -> None:
    start = data_start(file)
    middle = start + (file.stat().st_size - start) // 2
    assert file.stat().st_size - start > 3 * 4096
    overwrite(file, middle, bytes(4096))


def truncate(file: Path) -> None:
    os.truncate(file, file.stat().st_size // 2)


def damage_header(file: Path) -> None:
    overwrite(file, 8, b"\xff" * 16)


def damage_json(ckpt: Path) -> None:
    meta = ckpt / checkpoint.META
    overwrite(meta, meta.stat().st_size // 2, bytes(64))


def change_a_manifest_value(ckpt: Path) -> None:
    """One digit of the step counter: the JSON still parses and every other file is intact."""
    meta = ckpt / checkpoint.META
    text = meta.read_text()
    assert text.count('"global_steps": 2,') == 1
    meta.write_text(text.replace('"global_steps": 2,', '"global_steps": 3,'))


# -- what a save records ------------------------------------------------------------------------


def test_manifest_records_size_and_checksum_of_every_file(tmp_path):
    engine = new_engine(seed=0)
    train(engine, batches(1))
    engine.save_checkpoint(str(tmp_path), client_state={"note": "x"})
    saved = tier_state(engine)
    engine.close()
    ckpt = tmp_path / "global_step1"
    meta = json.loads((ckpt / checkpoint.META).read_text())
    assert sorted(meta["checksums"]) == ["client_state.pt", RANK0]
    for name, entry in meta["checksums"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"algorithm": "xxh3_128", "digest": xxhash.xxh3_128(data).hexdigest(), "bytes": len(data)}
    content = {k: v for k, v in meta.items() if k != "manifest_checksum"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    assert meta["manifest_checksum"] == {"algorithm": "xxh3_128", "digest": xxhash.xxh3_128(canonical).hexdigest()}
    from safetensors.torch import load_file  # the files are plain safetensors
    assert_equal_states(load_file(str(ckpt / RANK0)), saved)


# -- damaged files at load ----------------------------------------------------------------------

FAULTS = {
    "zeroed": (lambda ckpt: zero_4k_of_tensor_data(ckpt / RANK0), RANK0,
               {True: "is damaged: its xxh3_128 checksum"}),
    "truncated": (lambda ckpt: truncate(ckpt / RANK0), RANK0,
                  {True: "(truncated or overwritten)", False: "cannot be read: SafetensorError"}),
    "header": (lambda ckpt: damage_header(ckpt / RANK0), RANK0,
               {True: "is damaged: its xxh3_128 checksum", False: "cannot be read: SafetensorError"}),
    "json": (damage_json, checkpoint.META,
             {True: "cannot be read: JSONDecodeError", False: "cannot be read: JSONDecodeError"}),
    "manifest_value": (change_a_manifest_value, checkpoint.META,
                       {True: "is damaged: the xxh3_128 checksum of its content"}),
    "client_state": (lambda ckpt: overwrite(ckpt / "client_state.pt", 40, bytes(8)), "client_state.pt",
                     {True: "is damaged: its xxh3_128 checksum"}),
}
CASES = [(fault, verify) for fault, (_, _, messages) in FAULTS.items() for verify in messages]


@pytest.mark.parametrize("fault, verify", CASES)
def test_a_damaged_file_is_refused_by_name_and_the_previous_tag_loads_bitwise(tmp_path, fault, verify):
    step1 = save_two_tags(tmp_path)
    damage, name, messages = FAULTS[fault]
    damage(tmp_path / "global_step2")
    engine = new_engine()
    before = tier_state(engine)
    with pytest.raises(CheckpointError) as info:
        engine.load_checkpoint(str(tmp_path), verify=verify)
    message = str(info.value)
    assert f"{tmp_path / 'global_step2' / name} (checkpoint global_step2)" in message
    assert messages[verify] in message
    assert message.endswith(f"other checkpoints in {tmp_path}, newest first: global_step1")
    assert engine.global_steps == 0
    assert_equal_states(tier_state(engine), before)  # refused before anything was written into the engine
    path, client = engine.load_checkpoint(str(tmp_path), tag="global_step1", verify=verify)
    assert client == {"step": 1} and engine.global_steps == 1
    assert_equal_states(tier_state(engine), step1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    engine.close()


def test_a_damaged_latest_file_is_refused_by_name(tmp_path):
    save_two_tags(tmp_path)
    (tmp_path / "latest").write_bytes(bytes(12))
    engine = new_engine()
    with pytest.raises(CheckpointError) as info:
        engine.load_checkpoint(str(tmp_path))
    assert str(info.value) == (f"{tmp_path / 'latest'} is damaged: it holds {bytes(12).decode()!r}, not a tag; "
                               f"pass tag= to load one; use an earlier tag instead; other checkpoints in {tmp_path}, "
                               f"newest first: global_step2, global_step1")
    engine.close()


def test_without_verify_zeroed_tensor_bytes_go_unnoticed(tmp_path):
    """What ``verify=False`` gives up: damage that keeps the file's structure loads silently."""
    save_two_tags(tmp_path)
    engine = new_engine()
    engine.load_checkpoint(str(tmp_path))
    intact = tier_state(engine)
    engine.close()
    zero_4k_of_tensor_data(tmp_path / "global_step2" / RANK0)
    engine = new_engine()
    engine.load_checkpoint(str(tmp_path), verify=False)
    damaged = tier_state(engine)
    engine.close()
    assert [k for k in intact if not torch.equal(intact[k], damaged[k])]


@contextlib.contextmanager
def info_logs():
    """The info messages of DeepSpeed's logger while the block runs."""
    from deepspeed.utils import logger
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_checkpoint_without_checksums_loads_and_says_it_cannot_be_verified(tmp_path):
    step1 = save_two_tags(tmp_path)
    meta_file = tmp_path / "global_step1" / checkpoint.META
    meta = json.loads(meta_file.read_text())
    del meta["checksums"], meta["manifest_checksum"]  # as written before checksums were recorded
    meta_file.write_text(json.dumps(meta))
    engine = new_engine()
    with info_logs() as logs:
        engine.load_checkpoint(str(tmp_path), tag="global_step1")
    assert_equal_states(tier_state(engine), step1)
    engine.close()
    assert any(f"checkpoint {tmp_path / 'global_step1'} has no checksums" in m and "cannot be verified" in m
               for m in logs), logs
    assert any(f"checkpoint {tmp_path / 'global_step1'}: its manifest has no checksum of its own" in m
               for m in logs), logs


def test_export_cli_refuses_a_damaged_checkpoint_unless_told_not_to_verify(tmp_path, capsys):
    save_two_tags(tmp_path)
    zero_4k_of_tensor_data(tmp_path / "global_step2" / RANK0)
    assert export.main([str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'global_step2' / RANK0} (checkpoint global_step2) is damaged" in err
    assert not (tmp_path / "out").exists()
    assert export.main([str(tmp_path / "global_step1"), str(tmp_path / "out1")]) == 0
    assert export.main([str(tmp_path), str(tmp_path / "out2"), "--no-verify"]) == 0  # the user's call
    truncate(tmp_path / "global_step2" / RANK0)
    assert export.main([str(tmp_path), str(tmp_path / "out3"), "--no-verify"]) == 2
    assert f"error: {tmp_path / 'global_step2' / RANK0} (checkpoint global_step2) cannot be read" in \
        capsys.readouterr().err


def test_a_tag_set_aside_by_a_killed_overwrite_is_restored_by_the_next_save(tmp_path):
    """A save killed while replacing an existing tag leaves the tag missing, its old version set aside and
    the new one partial: the next save puts the complete old version back and removes the partial one."""
    step1 = save_two_tags(tmp_path)
    os.rename(tmp_path / "global_step1", tmp_path / ".trash-global_step1")
    shutil.copytree(tmp_path / "global_step2", tmp_path / ".partial-global_step1")
    engine = new_engine()
    engine.save_checkpoint(str(tmp_path), tag="other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step1", "global_step2", "latest", "other"]
    engine.load_checkpoint(str(tmp_path), tag="global_step1")
    assert_equal_states(tier_state(engine), step1)
    engine.close()


# -- saving to a full filesystem ----------------------------------------------------------------

FS_BYTES = 3 << 20
FS_HIDDEN = 160  # one checkpoint of this model takes about 1.9 MB: one fits in 3 MiB, two do not
FS_CONFIG = ds_config("cpu", micro_batch=2, lr=1e-2)


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "fs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def used(path: Path) -> int:
    return shutil.disk_usage(path).used


def first_save_on_small_fs(fs: Path):
    engine = new_engine(FS_HIDDEN, seed=0, config=FS_CONFIG)
    data = batches(2, rows=2)
    train(engine, data[:1])
    engine.save_checkpoint(str(fs / "ckpt"))
    assert used(fs) > FS_BYTES // 2, "the checkpoint is too small for the test to mean anything"
    step1 = tier_state(engine)
    train(engine, data[1:])
    return engine, step1


def assert_previous_checkpoint_intact(fs: Path, step1: dict) -> None:
    save_dir = fs / "ckpt"
    assert sorted(p.name for p in save_dir.iterdir()) == ["global_step1", "latest"]
    assert (save_dir / "latest").read_text() == "global_step1"
    engine = new_engine(FS_HIDDEN, config=FS_CONFIG)
    assert engine.load_checkpoint(str(save_dir))[0] == str(save_dir / "global_step1")
    assert_equal_states(tier_state(engine), step1)
    engine.close()


def test_a_save_that_does_not_fit_is_refused_before_writing(small_fs):
    engine, step1 = first_save_on_small_fs(small_fs)
    before = used(small_fs)
    with pytest.raises(CheckpointError) as info:
        engine.save_checkpoint(str(small_fs / "ckpt"))
    engine.close()
    message = str(info.value)
    found = re.fullmatch(r"not enough space to save checkpoint global_step2: the checkpoint needs ([\d,]+) bytes "
                         r"in (.+) and ([\d,]+) bytes were free there; .*", message)
    assert found, message
    needed, free = int(found[1].replace(",", "")), int(found[3].replace(",", ""))
    assert found[2] == str(small_fs / "ckpt") and needed > free == shutil.disk_usage(small_fs).free
    assert message.endswith("'latest' still names global_step1; nothing was written: free space or save to "
                            "another directory")
    assert used(small_fs) == before
    assert_previous_checkpoint_intact(small_fs, step1)


def test_a_write_that_runs_out_of_space_removes_the_partial_directory(small_fs, monkeypatch):
    """When the space check passes but the disk fills anyway (another writer), nothing partial stays."""
    engine, step1 = first_save_on_small_fs(small_fs)
    before = used(small_fs)
    monkeypatch.setattr(checkpoint.plan, "_free_bytes", lambda root: 1 << 40)
    with pytest.raises(CheckpointError) as info:
        engine.save_checkpoint(str(small_fs / "ckpt"))
    engine.close()
    message = str(info.value)
    partial = small_fs / "ckpt" / ".partial-global_step2"
    assert message.startswith(f"cannot write {partial / RANK0}: No space left on device; the checkpoint needs ")
    assert f"bytes in {small_fs / 'ckpt'} and 1,099,511,627,776 bytes were free there" in message
    assert message.endswith("'latest' still names global_step1; the partial checkpoint is removed: free space "
                            "or save to another directory")
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert used(small_fs) == before  # the space the next save needs is free again
    assert_previous_checkpoint_intact(small_fs, step1)


def test_leftovers_of_an_interrupted_save_are_counted_free_and_removed(small_fs):
    """A SIGKILLed save leaves .partial-<tag>: its space must not make the next save fail."""
    save_dir = small_fs / "ckpt"
    (save_dir / ".partial-global_step9").mkdir(parents=True)
    (save_dir / ".partial-global_step9" / RANK0).write_bytes(os.urandom(int(FS_BYTES * 0.6)))
    engine, _ = first_save_on_small_fs(small_fs)
    engine.close()
    assert sorted(p.name for p in save_dir.iterdir()) == ["global_step1", "latest"]


# -- several ranks ------------------------------------------------------------------------------


COMM_TIMEOUT_S = 300
"""zo2.comm_timeout_s of the ranks: a rank waiting for a dead peer fails after it. The tests that check nobody
waits finish a 2-rank run with saves (~30 s idle, a few times that on a loaded machine) well inside it."""


def start_ranks(*args: str, world: int = 2, timeout_s: float = COMM_TIMEOUT_S) -> list[subprocess.Popen]:
    """``world`` ranks of tests/ckpt_worker.py with ``args``, zo2.comm_timeout_s ``timeout_s``; output piped."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = without_launch_vars(os.environ)
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, WORKER, "--timeout", str(timeout_s), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = COMM_TIMEOUT_S + 300) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each rank; every rank is ended if one overruns (past the comm timeout, so
    that a rank failing on a dead peer reports it)."""
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def run_ranks(*args: str) -> list[tuple[str, str]]:
    results = finish(start_ranks(*args))
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err[-3000:]}"
    return [(out, err) for _, out, err in results]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """A 2-rank run saved at steps 1 and 2, and an uninterrupted 2-rank run of 4 steps."""
    root = tmp_path_factory.mktemp("two_ranks")
    run_ranks("--save_dir", str(root / "saved"), "--steps", "2")
    run_ranks("--save_dir", str(root / "straight"), "--steps", "4", "--out", str(root / "straight.pt"))
    return root


def copy_saved(two_rank_run: Path, tmp_path: Path) -> Path:
    save_dir = tmp_path / "ckpt"
    shutil.copytree(two_rank_run / "saved", save_dir)
    return save_dir


@pytest.mark.multirank
@pytest.mark.slow
def test_two_ranks_resume_bitwise_each_reading_only_its_own_file(two_rank_run, tmp_path):
    save_dir = copy_saved(two_rank_run, tmp_path)
    outputs = run_ranks("--save_dir", str(save_dir), "--steps", "4", "--resume", "--print_opened",
                        "--out", str(tmp_path / "resumed.pt"))
    for rank, (out, _) in enumerate(outputs):
        opened = [line for line in out.splitlines() if line.startswith("opened")]
        assert opened == [f"opened rank{rank:05d}.safetensors"]
    straight = torch.load(two_rank_run / "straight.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.multirank
@pytest.mark.slow
def test_a_damaged_file_of_one_rank_is_refused_on_every_rank(two_rank_run, tmp_path):
    save_dir = copy_saved(two_rank_run, tmp_path)
    damaged = save_dir / "global_step2" / "rank00001.safetensors"
    zero_4k_of_tensor_data(damaged)
    results = finish(start_ranks("--save_dir", str(save_dir), "--steps", "3", "--resume"))
    assert [code for code, _, _ in results] == [1, 1], [err[-1500:] for _, _, err in results]
    assert f"CheckpointError: {damaged} (checkpoint global_step2) is damaged" in results[1][2], results[1][2][-3000:]
    assert (f"CheckpointError: reading checkpoint {save_dir / 'global_step2'} failed on rank 1: CheckpointError: "
            f"{damaged} (checkpoint global_step2) is damaged") in results[0][2], results[0][2][-3000:]
    # another world size reads every rank's file: one process finds it too
    engine = zo2_deepspeed.initialize(model=make_model(), config=ds_config(
        "cpu", micro_batch=4, lr=1e-2, weight_decay=0.01, num_perturbations=3, hessian_smooth=0.1))[0]
    with pytest.raises(CheckpointError, match=f"{damaged} \\(checkpoint global_step2\\) is damaged"):
        engine.load_checkpoint(str(save_dir), load_optimizer_states=False, load_lr_scheduler_states=False)
    path, client = engine.load_checkpoint(str(save_dir), tag="global_step1", load_lr_scheduler_states=False)
    assert client == {"step": 1}
    engine.close()


@pytest.mark.multirank
@pytest.mark.slow
def test_a_save_failing_on_one_rank_fails_on_every_rank_and_leaves_nothing(two_rank_run, tmp_path):
    save_dir = copy_saved(two_rank_run, tmp_path)
    started = time.monotonic()
    results = finish(start_ranks("--save_dir", str(save_dir), "--steps", "3", "--resume",
                                 "--fail_write_rank", "1", "--fail_save_step", "3"))
    assert time.monotonic() - started < COMM_TIMEOUT_S  # nobody waited for a dead peer
    assert [code for code, _, _ in results] == [1, 1], [err[-1500:] for _, _, err in results]
    partial = save_dir / ".partial-global_step3"
    assert f"CheckpointError: cannot write {partial / 'rank00001.safetensors'}: No space left on device" \
           in results[1][2], results[1][2][-3000:]
    assert (f"CheckpointError: writing the checkpoint files failed on rank 1: CheckpointError: cannot write "
            f"{partial / 'rank00001.safetensors'}") in results[0][2], results[0][2][-3000:]
    assert sorted(p.name for p in save_dir.iterdir()) == ["global_step1", "global_step2", "latest"]
    assert (save_dir / "latest").read_text() == "global_step2"
    run_ranks("--save_dir", str(save_dir), "--steps", "4", "--resume", "--out", str(tmp_path / "resumed.pt"))
    straight = torch.load(two_rank_run / "straight.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.multirank
@pytest.mark.slow
def test_save_pretrained_failing_on_rank0_fails_on_every_rank(tmp_path):
    started = time.monotonic()
    results = finish(start_ranks("--save_dir", str(tmp_path / "ckpt"), "--steps", "1",
                                 "--save_pretrained", str(tmp_path / "hf"), "--fail_pretrained"))
    assert time.monotonic() - started < COMM_TIMEOUT_S  # nobody waited for a dead peer
    assert [code for code, _, _ in results] == [1, 1], [err[-1500:] for _, _, err in results]
    hf = tmp_path / "hf"
    assert f"ExportError: cannot export to {hf}: OSError: No space left on device; the export needs about " in \
        results[0][2], results[0][2][-3000:]
    assert (f"CheckpointError: save_pretrained to {hf} failed on rank 0: ExportError: cannot export to {hf}: "
            f"OSError: No space left on device") in results[1][2], results[1][2][-3000:]
    assert not hf.exists() and not any(p.name.startswith(".zo2-export-") for p in tmp_path.iterdir())


# -- the NVMe tier ------------------------------------------------------------------------------


@pytest.mark.nvme
@pytest.mark.slow
def test_nvme_state_files_round_trip_and_damage_is_refused(tmp_path):
    """HiZOO's Hessian of NVMe-resident partitions lives in the tier's state files: it is saved with its
    checksum, restored bitwise into those files, and a damaged copy never reaches them."""
    from test_nvme import ARCH, HIDDEN, nvme_config
    from zo2_deepspeed.tiers.nvme import StateFile, nvme_unavailable_reason
    if nvme_unavailable_reason():
        pytest.skip(nvme_unavailable_reason())
    config = nvme_config(tmp_path / "swap", method="hizoo", lr=1e-2, hessian_smooth=0.1)
    engine, *_ = zo2_deepspeed.initialize(model=make_model(ARCH, hidden=HIDDEN), config=config)
    on_files = [s for s in engine.pipeline.slots if isinstance(s.stored_state.get("hessian"), StateFile)]
    assert on_files, "no Hessian lives in NVMe state files: the test would not exercise them"
    data = batches(2)
    train(engine, data[:1])
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    step1 = tier_state(engine)
    train(engine, data[1:])
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    step2 = tier_state(engine)
    engine.close()

    begin, _ = tensor_span(tmp_path / "ckpt" / "global_step2" / RANK0, f"state/hessian/{on_files[0].name}")
    overwrite(tmp_path / "ckpt" / "global_step2" / RANK0, begin, bytes(4096))
    engine, *_ = zo2_deepspeed.initialize(model=make_model(ARCH, hidden=HIDDEN, seed=5),
                                          config=nvme_config(tmp_path / "swap2", method="hizoo", lr=1e-2,
                                                             hessian_smooth=0.1))
    before = tier_state(engine)
    with pytest.raises(CheckpointError, match="rank00000.safetensors \\(checkpoint global_step2\\) is damaged"):
        engine.load_checkpoint(str(tmp_path / "ckpt"))
    assert_equal_states(tier_state(engine), before)
    engine.load_checkpoint(str(tmp_path / "ckpt"), tag="global_step1")
    assert_equal_states(tier_state(engine), step1)
    assert any(not torch.equal(step1[k], step2[k]) for k in step1 if k.startswith("state/"))
    engine.close()

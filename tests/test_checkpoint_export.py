"""Exports on a full disk or a failing write: nothing half-written, the previous export intact, a one-line error.

A real full filesystem is a 1-block-granular tmpfs mounted in the test's directory (root only; skipped
elsewhere); the other cases patch the free-space reading or make a write raise part-way.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import subprocess
from pathlib import Path

import pytest
import torch

import zo2_deepspeed
from conftest import ds_config
from tiny_models import batches, make_model
from zo2_deepspeed import ExportError, export_dir
from zo2_deepspeed import export as export_module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a tiny trained GPT-2 (about 110 kB of fp32 tensors)."""
    root = tmp_path_factory.mktemp("ckpt")
    engine, *_ = zo2_deepspeed.initialize(model=make_model("gpt2"), config=ds_config("cpu", lr=1e-2))
    for batch in batches(2):
        engine.backward(engine(**batch))
        engine.step()
    engine.save_checkpoint(str(root))
    engine.close()
    return root


def digests(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones included) by its relative path, with a hash of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = export_module.main([*map(str, args)])
    return code, capsys.readouterr().err


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A tmpfs of ``size`` bytes at ``path``: a filesystem that really fills up."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_export_on_a_really_full_disk_leaves_the_previous_export(tmp_path, checkpoint, capsys, monkeypatch):
    with tmpfs(tmp_path / "disk", 256 << 10) as disk:  # room for one export (137 kB), not for a second
        out = disk / "hf"
        assert run_cli(capsys, checkpoint, out) == (0, "")
        before = digests(disk)
        assert sorted(before) == ["hf/config.json", "hf/generation_config.json", "hf/model.safetensors"]

        code, err = run_cli(capsys, checkpoint, out)  # refused by the space check: nothing written
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: not enough space to export to {out}: it needs about ")
        assert err.endswith("free there; nothing was written: free space or export to another directory\n")
        assert digests(disk) == before

        monkeypatch.setattr(export_dir, "free_space", lambda path: 1 << 40)  # the check passes: the write fails
        code, err = run_cli(capsys, checkpoint, out)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: cannot export to {out}: OSError: No space left on device; the export needs "
                              f"about ")
        assert err.endswith("; the previous export in it is unchanged\n")
        assert digests(disk) == before  # no half-written staging directory either


def test_export_whose_write_fails_midway_leaves_no_partial_files(tmp_path, checkpoint, capsys, monkeypatch):
    out = tmp_path / "hf"
    assert run_cli(capsys, checkpoint, out)[0] == 0
    before = digests(tmp_path)
    original, written = export_module._write_file, []

    def second_shard_fails(path, group, progress):
        if written:
            with open(path, "wb") as f:
                f.write(b"half")
            raise OSError(errno.EIO, "Input/output error")
        written.append(path)
        original(path, group, progress)

    monkeypatch.setattr(export_module, "_write_file", second_shard_fails)
    code, err = run_cli(capsys, checkpoint, out, "--max-shard-bytes", 20_000)
    assert code == 2 and err.startswith(f"error: cannot export to {out}: OSError: Input/output error; the export "
                                        f"needs about ") and err.count("\n") == 1, err
    assert len(written) == 1 and digests(tmp_path) == before


def test_reexport_replaces_the_directory_whole_and_refuses_other_directories(tmp_path, checkpoint, capsys):
    out = tmp_path / "hf"
    assert run_cli(capsys, checkpoint, out, "--max-shard-bytes", 20_000)[0] == 0
    sharded = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in sharded and len(sharded) > 4
    assert run_cli(capsys, checkpoint, out)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing set aside or staged is left

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    code, err = run_cli(capsys, checkpoint, notes)
    assert code == 2 and err == (f"error: {notes} is not empty and not a Hugging Face model directory (no "
                                 f"config.json): an export replaces its directory whole, so it is not written there; "
                                 f"give a new or empty directory\n")
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]


def test_save_pretrained_on_a_full_disk_or_failing_write_keeps_the_previous_save(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    engine, *_ = zo2_deepspeed.initialize(model=make_model("gpt2"), config=ds_config("cpu", lr=1e-2))
    out = tmp_path / "hf"
    engine.save_pretrained(str(out), max_shard_size="40KB")
    (out / "tokenizer.json").write_text("{}")  # saved beside the model: kept by later saves
    before = digests(tmp_path)
    assert "hf/model.safetensors.index.json" in before

    with monkeypatch.context() as patch:
        patch.setattr(export_dir, "free_space", lambda path: 4096)
        with pytest.raises(ExportError, match=f"^not enough space to export to {out}: it needs about [0-9,]+ bytes "
                                              f"and 4,096 are free there; nothing was written"):
            engine.save_pretrained(str(out))
    assert digests(tmp_path) == before

    def full_disk(directory, **kwargs):  # what a full disk gave: config.json written, then safetensors' error
        (Path(directory) / "config.json").write_text("{}")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    with monkeypatch.context() as patch:
        patch.setattr(engine.module, "save_pretrained", full_disk)
        with pytest.raises(ExportError, match=f"^cannot export to {out}: SafetensorError: Error while serializing: "
                                              f"IoError.*; the previous export in it is unchanged$"):
            engine.save_pretrained(str(out))
    assert digests(tmp_path) == before

    for batch in batches(1):
        engine.backward(engine(**batch))
        engine.step()
    engine.save_pretrained(str(out))  # one file now: the shards and index of the first save go, the tokenizer stays
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    expected = engine.consolidated_state_dict()
    engine.close()
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in expected.items() if name in loaded)

"""Checkpoints: exact resume (also after SIGKILL), atomic saves, export round-trip, bad numbers, mismatches."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zo2_deepspeed
from conftest import deepspeed_warnings, ds_config
from tiny_models import batches, make_model
from zo2_deepspeed import CheckpointError, TrainingDivergedError
from zo2_deepspeed.distributed import without_launch_vars

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "ckpt_worker.py")


def train(engine, data):
    for batch in data:
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()


@pytest.mark.parametrize("tier, method", [("none", "mezo"), ("cpu", "mezo"), ("cpu", "fzoo"), ("cpu", "hizoo"),
                                          ("device", "hizoo"), ("cpu", "lozo")])
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, tier, method):
    data = batches(5)
    config = ds_config(tier, method=method, num_perturbations=3, hessian_smooth=0.1, lr=1e-2, weight_decay=0.01,
                       lazy_steps=2)  # LOZO: the resumed steps cross a V window
    config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 3, "warmup_type": "linear"}}
    straight, *_ = zo2_deepspeed.initialize(model=make_model(), config=config)
    train(straight, data)
    expected = straight.parameter_snapshot()
    straight.close()

    first, *_ = zo2_deepspeed.initialize(model=make_model(), config=config)
    train(first, data[:2])
    first.save_checkpoint(str(tmp_path), client_state={"note": "two steps"})
    first.close()
    resumed, _, _, scheduler = zo2_deepspeed.initialize(model=make_model(seed=9), config=config)
    path, client = resumed.load_checkpoint(str(tmp_path))
    assert path == str(tmp_path / "global_step2") and client == {"note": "two steps"}
    assert resumed.global_steps == 2 and scheduler.last_batch_iteration == 1
    train(resumed, data[2:])
    got = resumed.parameter_snapshot()
    resumed.close()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_layout_is_deepspeeds(tmp_path):
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("cpu"))
    train(engine, batches(3))
    engine.save_checkpoint(str(tmp_path))
    engine.save_checkpoint(str(tmp_path), tag="best")
    assert (tmp_path / "latest").read_text() == "best"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "global_step3", "latest"]
    files = sorted(p.name for p in (tmp_path / "global_step3").iterdir())
    assert files == ["rank00000.safetensors", "zo2_checkpoint.json"]
    meta = json.loads((tmp_path / "global_step3" / "zo2_checkpoint.json").read_text())
    assert meta["global_steps"] == 3 and meta["sharded"] and meta["tier"] == "cpu"
    assert engine.load_checkpoint(str(tmp_path / "nowhere")) == (None, None)
    engine.close()


def test_load_checkpoint_on_a_wrong_path_says_why(tmp_path):
    """Nothing to resume (missing or empty dir) is a warning and (None, None), as in DeepSpeed; a path that exists
    but holds no checkpoint is refused by name; a tag directory given directly is loaded."""
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none"))
    train(engine, batches(2))
    save = tmp_path / "ckpt"
    engine.save_checkpoint(str(save))
    engine.save_checkpoint(str(save), tag="best")
    train(engine, batches(1))

    for fresh, state in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "holds no checkpoint yet")):
        if state != "does not exist":
            fresh.mkdir()
            (fresh / ".partial-global_step1").mkdir()  # an interrupted first save leaves nothing to resume
        with deepspeed_warnings() as logged:
            assert engine.load_checkpoint(str(fresh)) == (None, None)
        assert logged == [f"[Rank 0] load_checkpoint: {fresh} {state}: nothing to resume, training starts from the "
                          f"model as given (step 0)"]
    assert engine.global_steps == 3

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'notes.txt'} is a file, not a checkpoint directory"):
        engine.load_checkpoint(str(tmp_path / "notes.txt"))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "run.log").write_text("x")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'logs'} holds no zo2 checkpoint"):
        engine.load_checkpoint(str(tmp_path / "logs"))
    with pytest.raises(CheckpointError, match=f"^checkpoint {save / 'global_step9'} does not exist; checkpoints in "
                                              f"{save}, newest first: best, global_step2$"):
        engine.load_checkpoint(str(save), tag="global_step9")

    path, _ = engine.load_checkpoint(str(save / "global_step2"))  # the tag directory itself
    assert path == str(save / "global_step2") and engine.global_steps == 2

    (save / "latest").unlink()
    with pytest.raises(CheckpointError, match=f"^{save} has no 'latest' file, but holds checkpoints \\(newest first: "
                                              f"best, global_step2\\): pass tag="):
        engine.load_checkpoint(str(save))
    engine.close()


def test_client_state_must_be_plain_data(tmp_path):
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none"))
    train(engine, batches(1))
    with pytest.raises(CheckpointError, match="client_state holds objects a safe loader cannot read back"):
        engine.save_checkpoint(str(tmp_path), client_state={"fn": lambda x: x})
    assert not (tmp_path / "latest").exists()
    engine.close()


@pytest.mark.parametrize("change, message", [
    (dict(hidden=64), "shape mismatch"),
    (dict(eps=2e-3), "zo2 fields differ from the checkpoint's: eps 0.001 -> 0.002"),
    (dict(method="hizoo"), "zo2.method: checkpoint 'mezo' vs config 'hizoo'"),
    (dict(micro_batch=2), "batch settings differ"),
])
def test_mismatched_model_or_config_is_refused(tmp_path, change, message):
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("cpu"))
    train(engine, batches(1))
    engine.save_checkpoint(str(tmp_path))
    engine.close()
    hidden = change.pop("hidden", 32)
    other, *_ = zo2_deepspeed.initialize(model=make_model(hidden=hidden), config=ds_config("cpu", **change))
    with pytest.raises(CheckpointError, match="does not match this engine") as info:
        other.load_checkpoint(str(tmp_path))
    assert message in str(info.value)
    other.close()


def test_load_module_only_takes_parameters_across_tiers_and_configs(tmp_path):
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("cpu"))
    train(engine, batches(2))
    engine.save_checkpoint(str(tmp_path))
    saved = engine.parameter_snapshot()
    engine.close()
    other, *_ = zo2_deepspeed.initialize(model=make_model(seed=3), config=ds_config("none", eps=5e-3))
    other.load_checkpoint(str(tmp_path), load_module_only=True)
    assert other.global_steps == 0
    loaded = other.parameter_snapshot()
    assert all(torch.equal(loaded[n], saved[n]) for n in saved)
    other.close()


@pytest.mark.parametrize("tier", ["none", "cpu"])
def test_export_round_trip(tmp_path, tier):
    from transformers import AutoModelForCausalLM
    engine, *_ = zo2_deepspeed.initialize(model=make_model("gpt2"), config=ds_config(tier, lr=1e-2))
    data = batches(3)
    train(engine, data[:2])
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    engine.save_pretrained(str(tmp_path / "hf"))
    engine.eval()
    expected = engine(**data[2]).logits
    engine.close()
    direct = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    result = subprocess.run([sys.executable, "-m", "zo2_deepspeed.export", str(tmp_path / "ckpt"),
                             str(tmp_path / "cli")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "cli").eval()
    with torch.no_grad():
        for model in (direct, exported):
            logits = model(**{k: v for k, v in data[2].items() if k != "labels"}, use_cache=False).logits
            assert torch.equal(logits, expected)


def test_save_pretrained_that_would_not_fit_in_memory_is_refused_before_gathering(tmp_path, monkeypatch):
    """A model trained beyond RAM must not end in the OOM killer at its final save: the gather is refused
    with the size, what is free and the path that works, nothing is written, and the engine trains on."""
    from zo2_deepspeed import model_saving
    engine, *_ = zo2_deepspeed.initialize(model=make_model("gpt2"), config=ds_config("cpu", lr=1e-2))
    data = batches(2)
    train(engine, data[:1])
    # fp32 work tensors of every parameter (a tied one once), at their full ZeRO-3 size
    needed = sum(p.ds_numel * 4 for p in engine.module.parameters())
    assert needed > 100_000
    gathered = []
    with monkeypatch.context() as patch:
        patch.setattr(model_saving, "available_host_bytes", lambda: needed - 1)
        patch.setattr(engine, "consolidated_state_dict", lambda **kw: gathered.append(kw))
        with pytest.raises(MemoryError) as info:
            engine.save_pretrained(str(tmp_path / "hf"))
    assert str(info.value) == (
        f"save_pretrained gathers the whole model in rank 0's memory ({needed / 2**30:.1f} GiB of parameters), but "
        f"only {(needed - 1) / 2**30:.1f} GiB is available: save a checkpoint with engine.save_checkpoint(dir) and "
        f"export it tensor by tensor with `python -m zo2_deepspeed.export dir out_dir` (the memory of its largest "
        f"tensor)")
    assert not gathered and not (tmp_path / "hf").exists()
    train(engine, data[1:])
    monkeypatch.setattr(model_saving, "available_host_bytes", lambda: needed)  # exactly enough
    engine.save_pretrained(str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "model.safetensors").exists()
    engine.close()


def test_export_cli_names_a_bad_directory(tmp_path):
    result = subprocess.run([sys.executable, "-m", "zo2_deepspeed.export", str(tmp_path), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "neither a zo2 checkpoint directory nor a save_dir" in result.stderr


def test_nan_loss_skips_the_step_and_training_continues():
    poison = {"on": False}

    def loss_fn(outputs, batch):
        logits = outputs.logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none")
        return loss.mean(-1) * (float("nan") if poison["on"] else 1.0)

    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("cpu", lr=1e-2, max_skipped_steps=3),
                                          loss_fn=loss_fn)
    data = batches(6)
    train(engine, data[:1])
    before = engine.parameter_snapshot()  # flushes step 0's update
    poison["on"] = True
    train(engine, data[1:2])
    assert engine.skipped_steps == 1 and engine.last_step["skipped"] and engine.global_steps == 2
    during = engine.parameter_snapshot()
    assert all(torch.equal(during[n], before[n]) for n in before)
    poison["on"] = False
    train(engine, data[2:3])
    after = engine.parameter_snapshot()
    assert any(not torch.equal(after[n], before[n]) for n in before)
    poison["on"] = True
    train(engine, data[3:5])
    with pytest.raises(TrainingDivergedError, match="3 consecutive steps were skipped"):
        train(engine, data[5:6])
    engine.close()


def worker_env() -> dict:
    """This process's environment without the rendezvous variables its own process group exported."""
    return without_launch_vars(os.environ)


def run_worker(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, timeout=timeout,
                          env=worker_env())


@pytest.mark.slow
@pytest.mark.parametrize("tier, method", [("none", "mezo"), ("cpu", "mezo"), ("cpu", "fzoo"), ("cpu", "hizoo"),
                                          ("cpu", "lozo")])
def test_sigkill_then_resume_is_bitwise_equal(tmp_path, tier, method):
    common = ("--tier", tier, "--method", method, "--steps", "7")
    straight = run_worker("--save_dir", str(tmp_path / "a"), *common, "--out", str(tmp_path / "a.pt"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run_worker("--save_dir", str(tmp_path / "b"), *common, "--die_after", "4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "b" / "latest").read_text() == "global_step4"
    resumed = run_worker("--save_dir", str(tmp_path / "b"), *common, "--resume", "--out", str(tmp_path / "b.pt"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(a[n], b[n]) for n in a)  # includes the data order (10 batches/epoch, crosses one)


@pytest.mark.slow
def test_a_save_killed_at_any_moment_leaves_a_loadable_latest(tmp_path):
    """SIGKILL lands at a random moment inside a save (timed from the previous save's duration)."""
    rng = random.Random(0)
    save_dir = tmp_path / "ckpt"
    interrupted_saves = 0
    for trial in range(8):
        proc = subprocess.Popen([sys.executable, WORKER, "--save_dir", str(save_dir), "--hidden", "512",
                                 "--steps", "1000", *(["--resume"] if trial else [])],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=worker_env())
        duration = None
        for line in proc.stdout:
            if line.startswith("saved"):
                duration = float(line.split(" in ")[1].rstrip("s\n"))
            elif line.startswith("saving") and duration is not None:
                break
        time.sleep(rng.uniform(0.0, duration or 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        interrupted_saves += any(p.name.startswith(".partial-") for p in save_dir.iterdir())
        engine, *_ = zo2_deepspeed.initialize(model=make_model(hidden=512), config=ds_config(
            "cpu", micro_batch=4, lr=1e-2, weight_decay=0.01, num_perturbations=3, hessian_smooth=0.1))
        path, client = engine.load_checkpoint(str(save_dir), load_optimizer_states=False,
                                              load_lr_scheduler_states=False)
        assert path is not None and client["step"] == engine.global_steps
        assert Path(path).name == (save_dir / "latest").read_text()
        engine.close()
    assert interrupted_saves >= 2, "kills did not land inside saves: the test did not exercise atomicity"

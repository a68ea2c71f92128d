"""launch/train.py end to end on a tiny model and dataset, for every config in ds_configs/, and its CLI errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_assets import write_model_dir, write_sentiment_csv, write_text_file
from zo2_deepspeed.distributed import free_port, without_launch_vars

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
CONFIGS = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"model": write_model_dir(root / "model"), "csv": write_sentiment_csv(root / "sentiment.csv"),
            "text": write_text_file(root / "lines.txt"), "root": root}


def clean_env() -> dict:
    env = without_launch_vars(os.environ)
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return env


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    return result


def train_args(assets, config: str, out: Path, steps: int = 3, extra: tuple = ()) -> list[str]:
    return ["--deepspeed_config", str(ROOT / "ds_configs" / config), "--model", str(assets["model"]),
            "--dataset", str(assets["csv"]), "--steps", str(steps), "--eval_samples", "16",
            "--output_dir", str(out), *extra]


def check_run(result: subprocess.CompletedProcess, out: Path, steps: int) -> dict:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert {"accuracy", "loss"} <= summary["before"].keys() and {"accuracy", "loss"} <= summary["after"].keys()
    assert len(json.loads((out / "history.json").read_text())) == steps
    return summary


@pytest.mark.parametrize("config", [c for c in CONFIGS if "nvme" not in c])
def test_train_script_runs_every_config(assets, tmp_path, config):
    out = tmp_path / "run"
    summary = check_run(run([sys.executable, TRAIN, *train_args(assets, config, out)]), out, 3)
    zo = "zo2" in json.loads((ROOT / "ds_configs" / config).read_text())
    assert summary["engine"] == ("ZO2Engine" if zo else "DeepSpeedEngine")
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(out / "model")
    original = AutoModelForCausalLM.from_pretrained(assets["model"])
    assert summary["trainable_parameters"] == sum(p.numel() for p in original.parameters())
    moved = any(not torch.equal(a, b) for a, b in zip(exported.state_dict().values(),
                                                       original.state_dict().values()))
    assert moved, "the exported model must hold the trained weights"


def test_language_modelling_task(assets, tmp_path):
    out = tmp_path / "lm"
    result = run([sys.executable, TRAIN, "--deepspeed_config", str(ROOT / "ds_configs" / "zo2_mezo_none.json"),
                  "--model", str(assets["model"]), "--dataset", str(assets["text"]), "--steps", "2",
                  "--eval_samples", "16", "--output_dir", str(out), "--no_export"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "lm" and summary["after"]["perplexity"] > 1
    assert not (out / "model").exists()


@pytest.mark.parametrize("extra, message", [
    (("--model", "/nonexistent/model"), "--model /nonexistent/model: no such directory"),
    (("--text_column", "review"), "the dataset has no column 'review' (columns: text, label); pass --text_column"),
    (("--dataset", "/nonexistent/data.csv"), "not a data file nor a directory saved with save_to_disk"),
    (("--trainable", "no_such_layer"), "--trainable 'no_such_layer' matches no parameter name"),
    (("--lora", "--lora_targets", "q_proj,nope"), "--lora_targets 'q_proj,nope': no module named ['nope']"),
    (("--lora", "--trainable", "q_proj"), "--trainable and --lora exclude each other"),
])
def test_bad_cli_input_is_named(assets, tmp_path, extra, message):
    args = train_args(assets, "zo2_mezo_none.json", tmp_path / "bad")
    args += list(extra)
    result = run([sys.executable, TRAIN, *args], timeout=300)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]


def test_lora_trains_and_exports_only_the_adapter(assets, tmp_path):
    """--lora: the export is a PEFT adapter that loads on top of --model, and only it was trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out = tmp_path / "lora"
    args = train_args(assets, "zo2_mezo_none.json", out, extra=("--lora", "--lora_r", "4", "--lora_alpha", "8"))
    summary = check_run(run([sys.executable, TRAIN, *args]), out, 3)
    assert summary["lora"] and summary["engine"] == "ZO2Engine"
    files = {p.name for p in (out / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), out / "model")
    adapter = {n: p for n, p in tuned.named_parameters() if "lora_" in n}
    assert summary["trainable_parameters"] == sum(p.numel() for p in adapter.values())
    trained_b = [n for n, p in adapter.items() if "lora_B" in n and bool(p.abs().sum() > 0)]
    assert trained_b, "lora_B starts at zero: a trained adapter has moved it"


def test_directory_without_config_is_not_a_model(assets, tmp_path):
    result = run([sys.executable, TRAIN, *train_args(assets, "zo2_mezo_none.json", tmp_path / "x",
                                                     extra=("--model", str(tmp_path)))], timeout=300)
    assert result.returncode != 0 and "not a Hugging Face model directory (no config.json)" in result.stderr


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_train_script_runs_on_two_ranks(assets, tmp_path, launcher):
    out = tmp_path / launcher
    args = train_args(assets, "zo2_mezo_cpu.json", out, steps=2)
    if launcher == "deepspeed":
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), TRAIN, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), TRAIN, *args]
    summary = check_run(run(cmd, timeout=900), out, 2)
    assert summary["world_size"] == 2


@pytest.mark.multirank
@pytest.mark.slow
def test_train_script_counts_data_per_replica_with_perturbation_ranks(assets, small, tmp_path):
    """Two perturbation ranks are one replica: 8 training rows fill a micro-batch of 8 (two data-parallel
    ranks would have 4 each), and the tokens seen are one replica's, as many as one process sees."""
    config = json.loads((ROOT / "ds_configs" / "zo2_mezo_cpu.json").read_text())
    config["zo2"]["parallel"] = {"perturbation": 2}
    path = tmp_path / "p2.json"
    path.write_text(json.dumps(config))
    extra = ("--dataset", str(small["csv"]), "--micro_batch_size", "8", "--no_export")
    one = check_run(run([sys.executable, TRAIN, *train_args(assets, "zo2_mezo_cpu.json", tmp_path / "one", 2, extra)]),
                    tmp_path / "one", 2)
    args = train_args(assets, "zo2_mezo_cpu.json", tmp_path / "p2", 2, extra)
    args[args.index("--deepspeed_config") + 1] = str(path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), TRAIN, *args]
    two = check_run(run(cmd, timeout=900), tmp_path / "p2", 2)
    assert (two["world_size"], two["data_parallel_size"], one["data_parallel_size"]) == (2, 1, 1)
    assert two["tokens_seen"] == one["tokens_seen"] > 0
    assert two["final_train_loss"] == one["final_train_loss"]


@pytest.mark.nvme
@pytest.mark.slow
def test_train_script_runs_the_nvme_config(assets, tmp_path):
    from zo2_deepspeed.tiers.nvme import nvme_unavailable_reason
    reason = nvme_unavailable_reason()
    if reason:
        pytest.skip(reason)
    for name in (c for c in CONFIGS if "nvme" in c):
        config = json.loads((ROOT / "ds_configs" / name).read_text())
        config["zero_optimization"]["offload_param"]["nvme_path"] = str(tmp_path / "swap")
        path = tmp_path / name
        path.write_text(json.dumps(config))
        out = tmp_path / f"run-{name}"
        args = train_args(assets, name, out)
        args[args.index("--deepspeed_config") + 1] = str(path)
        summary = check_run(run([sys.executable, TRAIN, *args]), out, 3)
        assert summary["engine"] == "ZO2Engine"


@pytest.fixture(scope="module")
def small(assets):
    """A 10-row CSV (8 training rows after the validation split) and a model directory without weights."""
    root = assets["root"]
    weightless = root / "weightless"
    weightless.mkdir()
    for f in assets["model"].iterdir():
        if not f.name.endswith(".safetensors"):
            (weightless / f.name).write_bytes(f.read_bytes())
    return {"csv": write_sentiment_csv(root / "ten.csv", n=10), "weightless": weightless}


@pytest.mark.parametrize("extra, message", [
    ((), "--dataset {csv}: the training data gives no micro-batch (8 examples, train_micro_batch_size_per_gpu 16, "
         "world size 1, drop_last=True: 8 examples per rank, fewer than one micro-batch, so a training loop would "
         "never get a batch): give it at least 16 examples (micro-batch × world size) or set "
         "train_micro_batch_size_per_gpu to at most 8 (--micro_batch_size overrides the config's micro-batch)"),
    (("--text_column", "review"), "the dataset has no column 'review' (columns: text, label); pass --text_column"),
])
def test_data_is_checked_before_the_model_loads(assets, small, tmp_path, extra, message):
    """A split smaller than one micro-batch used to hang at 'train: 0%'; both data errors now come before
    the model is read (its directory here has no weights, which would fail the load)."""
    args = train_args(assets, "zo2_mezo_cpu.json", tmp_path / "x", extra=("--model", str(small["weightless"]),
                                                                          "--dataset", str(small["csv"]), *extra))
    result = run([sys.executable, TRAIN, *args], timeout=300)
    assert result.returncode != 0
    assert message.format(csv=small["csv"]) in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "x").exists()


def test_command_line_overrides_the_config_and_logs_it(assets, small, tmp_path):
    """--micro_batch_size (the fix the message above names), --lr, --eps and --method replace the JSON's values."""
    out = tmp_path / "run"
    args = train_args(assets, "zo2_mezo_cpu.json", out, steps=2,
                      extra=("--dataset", str(small["csv"]), "--no_export", "--micro_batch_size", "4",
                             "--lr", "0.001", "--eps", "0.01", "--method", "fzoo"))
    result = run([sys.executable, TRAIN, *args])
    assert result.returncode == 0, result.stderr[-3000:]
    changes = ["train_micro_batch_size_per_gpu: 16 -> 4 (--micro_batch_size)",
               "optimizer.params.lr: 1e-06 -> 0.001 (--lr)", "zo2.eps: 0.001 -> 0.01 (--eps)",
               "zo2.method: mezo -> fzoo (--method)"]
    logged = [line for line in result.stdout.splitlines() if line.startswith("[train] override ")]
    assert logged == [f"[train] override {c}" for c in changes]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overrides"] == changes and summary["steps"] == 2
    assert (summary["micro_batch_size"], summary["method"], summary["eps"]) == (4, "fzoo", 0.01)
    assert [h["lr"] for h in json.loads((out / "history.json").read_text())] == [1e-3, 1e-3]


@pytest.mark.parametrize("config, extra, message", [
    ("zero3_adam_cpu.json", ("--eps", "0.01"), "--eps applies to the zo2 engine, but {path} has no 'zo2' section"),
    ("zo2_mezo_none.json", ("--micro_batch_size", "0"), "--micro_batch_size must be >= 1, got 0"),
    ("zo2_mezo_none.json", ("--eps", "-1"), "--eps must be > 0, got -1.0"),
])
def test_bad_override_is_named(assets, tmp_path, config, extra, message):
    args = train_args(assets, config, tmp_path / "x", extra=extra)
    result = run([sys.executable, TRAIN, *args], timeout=300)
    assert result.returncode != 0
    assert message.format(path=ROOT / "ds_configs" / config) in result.stderr, result.stderr[-2000:]

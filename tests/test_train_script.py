"""launch/train.py end to end on a tiny model and dataset, for every config in ds_configs/, and its CLI errors."""
from __future__ import annotations

import json
import os
import subprocess
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from cluster import python_bin
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


def run(cmd: list[str], timeout: int = 600, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ROOT, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    return result


def for_tiny_model(config: str, directory: Path) -> str:
    """A shipped config as the tiny model can run it: its first-order tail (2 layers: the last one and the head) is
    most of the model, above the 25 % cap sized for real ones."""
    raw = json.loads((ROOT / "ds_configs" / config).read_text())
    if "first_order" not in raw.get("zo2", {}):
        return config
    raw["zo2"]["first_order"]["max_fraction"] = 0.9
    path = directory / f"tiny_{config}"
    path.write_text(json.dumps(raw))
    return str(path)


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
    summary = check_run(run([sys.executable, TRAIN, *train_args(assets, for_tiny_model(config, tmp_path), out)]), out,
                        3)
    zo = "zo2" in json.loads((ROOT / "ds_configs" / config).read_text())
    assert summary["engine"] == ("ZO2Engine" if zo else "DeepSpeedEngine")
    if "hybrid" in config:
        assert summary["first_order"]["blocks"][-1] == "lm_head" and summary["first_order"]["parameters"] > 0
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
        cmd = [python_bin("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), TRAIN, *args]
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
    return {"csv": write_sentiment_csv(root / "ten.csv", n=10), "three": write_sentiment_csv(root / "three.csv", n=3),
            "weightless": weightless}


@pytest.mark.parametrize("extra, message", [
    ((), "train_micro_batch_size_per_gpu 16 of {config} does not fit --dataset {csv}: the training data gives no "
         "micro-batch (8 examples, train_micro_batch_size_per_gpu 16, "
         "world size 1, drop_last=True: 8 examples per rank, fewer than one micro-batch, so a training loop would "
         "never get a batch): give it at least 16 examples (micro-batch × world size) or set "
         "train_micro_batch_size_per_gpu to at most 8 (--micro_batch_size overrides the config's micro-batch)"),
    (("--micro_batch_size", "12"), "--micro_batch_size 12 does not fit --dataset {csv}: the training data gives no "
                                   "micro-batch (8 examples, train_micro_batch_size_per_gpu 12"),
    (("--dataset", "{three}"), "train_micro_batch_size_per_gpu 16 of {config} does not fit --dataset {three}: the "
                               "training data gives no micro-batch (2 examples"),
    (("--text_column", "review"), "the dataset has no column 'review' (columns: text, label); pass --text_column"),
])
def test_data_is_checked_before_the_model_loads(assets, small, tmp_path, extra, message):
    """A split smaller than one micro-batch used to hang at 'train: 0%'; both data errors now come before
    the model is read (its directory here has no weights, which would fail the load)."""
    names = {"csv": small["csv"], "three": small["three"], "config": ROOT / "ds_configs" / "zo2_mezo_cpu.json"}
    extra = tuple(e.format(**names) for e in extra)
    args = train_args(assets, "zo2_mezo_cpu.json", tmp_path / "x", extra=("--model", str(small["weightless"]),
                                                                          "--dataset", str(small["csv"]), *extra))
    result = run([sys.executable, TRAIN, *args], timeout=300)
    assert result.returncode != 0
    assert message.format(**names) in result.stderr, result.stderr[-3000:]
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


# ------------------------------------------------------------------------------------ data files
@pytest.mark.parametrize("name, content, message", [
    ("empty.csv", "", "the file is empty"),
    ("empty.txt", "", "the file is empty"),
    ("header.csv", "text,label\n", "the file holds no rows (only a header line)"),
    ("one.csv", "text,label\ngood,positive\n", "1 row, but a validation row is split off it: give it at least 2 rows"),
    ("broken.csv", 'text,label\n"never closed,positive\n', "cannot be read as csv (ParserError: "),
])
def test_unusable_data_file_is_named(tmp_path, name, content, message):
    """datasets/pandas raised DatasetGenerationError, 'Instruction "train" corresponds to no data' or a
    train_test_split ValueError, none naming the file."""
    from zo2_deepspeed.tasks import TaskError, load_splits
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TaskError) as info:
        load_splits(str(path))
    assert str(info.value).startswith(f"--dataset {path}: {message}")


def test_tiny_data_file_holds_out_one_validation_row(tmp_path):
    """3 rows used to fail in train_test_split (a fifth of 3 is 0); one row is held out instead."""
    from zo2_deepspeed.tasks import load_splits
    splits = load_splits(str(write_sentiment_csv(tmp_path / "three.csv", n=3)))
    assert (len(splits["train"]), len(splits["validation"])) == (2, 1)
    splits = load_splits(str(write_sentiment_csv(tmp_path / "ten.csv", n=10)))
    assert (len(splits["train"]), len(splits["validation"])) == (8, 2)  # unchanged from a fifth


# ------------------------------------------------------------------------------------ config errors
def config_file(tmp_path: Path, change: dict, base: str = "zo2_mezo_cpu.json") -> Path:
    config = json.loads((ROOT / "ds_configs" / base).read_text())
    config.update(change)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "train.py: error: --deepspeed_config: DeepSpeed config file {path} does not exist"),
    ("zo", "train.py: error: --deepspeed_config: DeepSpeed config {path} has a top-level key 'zo': did you mean "
           "\"zo2\"?"),
    ("auto", "train.py: error: --deepspeed_config {path}: optimizer.params.lr is 'auto', a placeholder only the HF "
             "Trainer fills: give it a value (or pass --lr)"),
    ("bad_field", "train.py: error: --deepspeed_config {path}: zo2.eps must be > 0, got -1"),
])
def test_config_errors_are_one_line_before_the_model_loads(assets, small, tmp_path, case, message):
    """Each used to be a traceback (the lr one after the model had loaded); now one line, exit status 2.
    (Invalid JSON and the other near misses of "zo2" are checked in-process in test_config.py.)"""
    path = tmp_path / "config.json"
    if case == "zo":
        config = json.loads((ROOT / "ds_configs" / "zo2_mezo_cpu.json").read_text())
        config["zo"] = config.pop("zo2")
        path.write_text(json.dumps(config))
    elif case == "auto":
        path = config_file(tmp_path, {"optimizer": {"type": "SGD", "params": {"lr": "auto"}}})
    elif case == "bad_field":
        path = config_file(tmp_path, {"zo2": {"eps": -1}})
    args = train_args(assets, "zo2_mezo_cpu.json", tmp_path / "x", extra=("--model", str(small["weightless"])))
    args[args.index("--deepspeed_config") + 1] = str(path)
    result = run([sys.executable, TRAIN, *args], timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message.format(path=path)), result.stderr[-3000:]
    assert not (tmp_path / "x").exists()


def test_a_first_order_tail_too_big_for_the_model_is_one_line(assets, tmp_path):
    """Known only once the model is built (the tiny model's last layer and head are 68 % of it), still one line."""
    result = run([sys.executable, TRAIN, *train_args(assets, "zo2_hybrid_cpu.json", tmp_path / "x")], timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"train.py: error: --deepspeed_config {ROOT / 'ds_configs' / 'zo2_hybrid_cpu.json'}: "
        f"zo2.first_order.max_fraction is 0.25, but the first-order tail"), result.stderr[-3000:]


def test_results_come_before_the_optional_plot_and_lr_0_is_warned(assets, small, tmp_path):
    """Without matplotlib the run used to die at its last line and lose summary.json, history.json and the
    "after" metrics; now the plot is skipped with a warning. --lr 0 trains nothing, which is said."""
    blocker = tmp_path / "no_matplotlib" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib is blocked by the test')\n")
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), str(ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / "run"
    args = train_args(assets, "zo2_mezo_cpu.json", out, steps=2,
                      extra=("--dataset", str(small["csv"]), "--micro_batch_size", "4", "--lr", "0"))
    result = run([sys.executable, TRAIN, *args], env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "loss_curve.png not written: matplotlib is not available (matplotlib is blocked by the test)" in output
    assert "--lr 0: the parameters will not change" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and {"accuracy", "loss"} <= summary["after"].keys()
    assert len(json.loads((out / "history.json").read_text())) == 2
    assert (out / "model" / "model.safetensors").exists() and not (out / "loss_curve.png").exists()
    from safetensors.torch import load_file
    exported, original = load_file(out / "model" / "model.safetensors"), load_file(assets["model"] /
                                                                                   "model.safetensors")
    assert all(torch.equal(exported[k], original[k]) for k in original), "lr 0 leaves every parameter as it was"


# ------------------------------------------------------------------------------------ checkpoints and resume
RESUME_STEPS, SAVE_EVERY = 120, 50


def resume_args(assets, small, out: Path, steps: int = RESUME_STEPS, extra: tuple = ()) -> list[str]:
    return train_args(assets, "zo2_mezo_cpu.json", out, steps=steps,
                      extra=("--micro_batch_size", "4", "--eval_samples", "4", *extra))


def exported_state(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(out / "model" / "model.safetensors")


def losses(out: Path) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in json.loads((out / "history.json").read_text())]


@pytest.fixture(scope="module")
def uninterrupted(assets, small, tmp_path_factory):
    """One run of RESUME_STEPS steps with --save_every SAVE_EVERY: the reference every resumed run must equal."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run([sys.executable, TRAIN, *resume_args(assets, small, out, extra=("--save_every", str(SAVE_EVERY)))])
    check_run(result, out, RESUME_STEPS)
    return out


def test_save_every_writes_checkpoints_and_resume_continues_bitwise(assets, small, uninterrupted, tmp_path):
    """Checkpoints at every multiple of --save_every and at the last step; a run resumed from the first one
    (its directory given directly) ends with the same losses, step by step, and the same parameters."""
    root = uninterrupted / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["global_step100", "global_step120", "global_step50", "latest"]
    assert (root / "latest").read_text() == "global_step120"
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["checkpoint"] == str(root / "global_step120") and summary["resumed_from"] is None
    out = tmp_path / "resumed"
    result = run([sys.executable, TRAIN, *resume_args(assets, small, out,
                                                      extra=("--resume", str(root / "global_step50")))])
    resumed = check_run(result, out, RESUME_STEPS)
    assert f"[train] resumed from {root / 'global_step50'} at step 50" in result.stdout
    assert resumed["resumed_from"] == str(root / "global_step50")
    assert losses(out) == losses(uninterrupted)
    expected, got = exported_state(uninterrupted), exported_state(out)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert resumed["before"] == summary["before"] and resumed["after"] == summary["after"]
    assert resumed["tokens_seen"] == summary["tokens_seen"]


def interrupt_after_first_step(cmd: list[str], signum: int, timeout: float = 300) -> tuple[int, str, str]:
    """Start train.py, send ``signum`` once its progress bar reports a step, and collect its output."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, deadline = b"", time.monotonic() + timeout
    try:
        while b"loss=" not in seen:  # tqdm redraws with \r: read bytes, not lines
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk and time.monotonic() < deadline, seen.decode(errors="replace")[-3000:]
            seen += chunk
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout.decode(), (seen + stderr).decode(errors="replace")


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["SIGINT", "SIGTERM"])  # ~30 s each on an idle 2-core machine (two runs)
def test_signal_saves_and_resume_latest_ends_like_the_uninterrupted_run(assets, small, uninterrupted, tmp_path,
                                                                       signum):
    """Ctrl-C used to print a KeyboardInterrupt traceback (from a buffer lock in the step) and lose every step.
    Now the step finishes, a checkpoint and summary.json are written, one line says how to go on, and
    --resume latest reaches the uninterrupted run's losses and parameters bit for bit."""
    out = tmp_path / "run"
    code, stdout, stderr = interrupt_after_first_step([sys.executable, TRAIN, *resume_args(assets, small, out,
                                                                                           steps=100000)], signum)
    name = signal.Signals(signum).name
    assert code == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert 1 <= stopped_at < RESUME_STEPS, "the signal must stop the run before the reference's last step"
    assert summary["stopped_by"] == name and summary["after"] is None
    checkpoint = out / "checkpoints" / f"global_step{stopped_at}"
    assert summary["checkpoint"] == str(checkpoint) and (out / "checkpoints" / "latest").read_text() == checkpoint.name
    assert stderr.strip().splitlines()[-1] == (f"[train] stopped by {name} after step {stopped_at}: checkpoint "
                                               f"{checkpoint}; continue with --resume latest --output_dir {out}")
    assert losses(out) == losses(uninterrupted)[:stopped_at]
    result = run([sys.executable, TRAIN, *resume_args(assets, small, out, extra=("--resume", "latest"))])
    check_run(result, out, RESUME_STEPS)
    assert losses(out) == losses(uninterrupted)
    expected, got = exported_state(uninterrupted), exported_state(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("resume, message", [
    ("latest", "--resume latest: no checkpoint to resume in {out}/checkpoints (no such directory); run without "
               "--resume to start afresh, or pass --resume <dir> of another run"),
    ("{empty}", "--resume {empty}: holds no checkpoint (no 'latest' file, no checkpoints/ directory, and not a "
                "global_stepN checkpoint directory)"),
    ("{missing}", "--resume {missing}: no such directory"),
])
def test_resume_without_a_checkpoint_says_so(assets, small, tmp_path, resume, message):
    names = {"out": tmp_path / "run", "empty": tmp_path / "empty", "missing": tmp_path / "missing"}
    names["empty"].mkdir()
    args = resume_args(assets, small, names["out"], extra=("--model", str(small["weightless"]),
                                                          "--resume", resume.format(**names)))
    result = run([sys.executable, TRAIN, *args], timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == "train.py: error: " + message.format(**names)
    assert not names["out"].exists()


@pytest.mark.multirank
@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_every_rank_after_the_same_step(assets, small, tmp_path):
    """Ctrl-C reaches torchrun and both workers (one process group): the ranks agree on the step, save one
    collective checkpoint, and --resume latest on two ranks goes on from it. (~1.5 min; torchrun prints its
    own SignalException traceback, which is not the script's.)"""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           TRAIN, *resume_args(assets, small, out, steps=100000, extra=("--no_export",))]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    seen = b""
    try:
        while b"loss=" not in seen:
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, seen.decode(errors="replace")[-3000:]
            seen += chunk
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = (seen + stderr).decode(errors="replace")
    assert 'File "' + TRAIN not in text, text[-3000:]  # no traceback through train.py on any rank
    summary = json.loads((out / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert summary["stopped_by"] == "SIGINT" and f"[train] stopped by SIGINT after step {stopped_at}" in text
    assert (out / "checkpoints" / "latest").read_text() == f"global_step{stopped_at}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           TRAIN, *resume_args(assets, small, out, steps=stopped_at + 2, extra=("--no_export", "--resume", "latest"))]
    result = run(cmd, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, stopped_at + 3))

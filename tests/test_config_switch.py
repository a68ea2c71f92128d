"""The config switch: unmodified DeepSpeed, Trainer and Accelerate scripts train with ZO when the JSON has "zo2".

The scripts (tests/switch_scripts.py) never import zo2_deepspeed. Subprocesses get the switch the way
an installation gives it, from ``zo2_deepspeed_autopatch.pth`` read at interpreter start: the tests put
that file in a private site directory that a ``sitecustomize`` on ``PYTHONPATH`` adds with ``site.addsitedir``
(so its .pth files are read as site-packages' are, inside a venv too, which ignores the user site); every
launcher's workers inherit ``PYTHONPATH``, so they run from a checkout as well as after ``pip install``. One test checks the installed
environment itself. The default tests take about 40 s together (three plain-python runs, two wheel builds); the launcher tests, marked slow,
about 3-6 min together on a 2-core machine.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import zo2_deepspeed
import zo2_deepspeed_autopatch as switch
from reference import reference_mezo
from switch_scripts import ACCELERATE_LOOP, DEEPSPEED_TUTORIAL, TRAINER_EXAMPLE
from test_cluster_launch import slurm_jobs  # noqa: F401  (a private SLURM cluster with free derived ports)
from tiny_models import make_model
from zo2_deepspeed.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
FIRST_ORDER = ROOT / "ds_configs" / "zero3_adam_cpu.json"
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT = 600
LR, EPS, SEED = 1e-3, 1e-2, 1  # ε = 1e-2 keeps the engine within 1e-6 of the reference (test_mezo_equivalence)
ZO_MESSAGE = 'zo2_deepspeed: the DeepSpeed config has a "zo2" section (method mezo): ZO2Engine, zeroth-order training'
FIRST_ORDER_MESSAGE = 'zo2_deepspeed: the DeepSpeed config has no "zo2" section: plain DeepSpeed (first-order)'


def zo2_config(**overrides) -> dict:
    """ZeRO-3 with parameters offloaded to the CPU, as the README's first example."""
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 100,
              "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
              "optimizer": {"type": "SGD", "params": {"lr": LR, "weight_decay": 0.0}},
              "zo2": {"method": "mezo", "eps": EPS, "seed": SEED}}
    config.update(overrides)
    return config


# ------------------------------------------------------------------------------------- running scripts
@pytest.fixture(scope="session")
def switch_site(tmp_path_factory) -> Path:
    """A folder for ``PYTHONPATH`` whose ``sitecustomize`` adds ``site/`` (holding the switch's .pth, as ``pip
    install`` puts it in site-packages) as a site directory at interpreter start.

    Not ``PYTHONUSERBASE``: a virtual environment ignores the user site, so there the private .pth files were
    never read. ``site.addsitedir`` reads them in any interpreter, after the environment's own site-packages.
    """
    root = tmp_path_factory.mktemp("switch_site")
    (root / "site").mkdir()
    shutil.copy(ROOT / "zo2_deepspeed_autopatch.pth", root / "site")
    (root / "sitecustomize.py").write_text(
        "import os, site\nsite.addsitedir(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'site'))\n")
    return root


def script_env(switch_site: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_ENV and not k.startswith(("ACCELERATE_", "ZO2_DEEPSPEED_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(switch_site), str(ROOT), str(ROOT / "tests")]),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)
    return env


def single_process_env() -> dict:
    """What plain DeepSpeed needs under plain python (it looks for MPI otherwise)."""
    return dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def run(cmd: list, env: dict, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def json_config(tmp_path: Path, config: dict, name: str = "ds_config.json") -> Path:
    return write(tmp_path, name, json.dumps(config))


def load_ranks(out: Path, ranks: int) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(ranks)]


def output_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def relative_error(a: dict, b: dict) -> float:
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b) ** 0.5
    return diff / sum(float(b[k].double().pow(2).sum()) for k in b) ** 0.5


def assert_zo_as_reference(saved: dict, result: subprocess.CompletedProcess, steps: int = 3) -> None:
    """A ZO2Engine trained, and its parameters are where the reference MeZO loop puts them on the same batches."""
    assert (saved["engine"], saved["optimizer"]) == ("ZO2Engine", "ZOSGD")
    assert output_of(result).count(ZO_MESSAGE) == 1, output_of(result)[-3000:]  # once, rank 0 only
    assert len(saved["batches"]) >= steps  # the Trainer's loader draws one batch ahead
    reference = make_model("llama")
    reference_mezo(reference, saved["batches"][:steps], lr=LR, eps=EPS, seed=SEED)
    expected = {n: p.detach() for n, p in reference.named_parameters()}
    start = {n: p.detach() for n, p in make_model("llama").named_parameters()}
    assert relative_error(saved["params"], expected) <= 1e-6
    assert relative_error(start, expected) > 1e-5, "training must move the parameters"


def assert_first_order(saved: dict, result: subprocess.CompletedProcess) -> None:
    """Plain DeepSpeed ZeRO-3 with its CPU Adam: every weight matrix moved."""
    assert (saved["engine"], saved["optimizer"]) == ("DeepSpeedEngine", "DeepSpeedZeroOptimizer_Stage3")
    assert output_of(result).count(FIRST_ORDER_MESSAGE) == 1, output_of(result)[-3000:]
    start = dict(make_model("llama").named_parameters())
    assert all(not torch.equal(saved["params"][n], p.detach()) for n, p in start.items() if p.dim() >= 2)


# ------------------------------------------------------------------------------------- plain python
def test_plain_python_tutorial_script_trains_with_zo_as_the_reference_says(switch_site, tmp_path):
    """``python train.py --deepspeed --deepspeed_config zo2.json``: no launcher variables, no zo2 import. ~12 s."""
    script = write(tmp_path, "train.py", DEEPSPEED_TUTORIAL)
    config = json_config(tmp_path, zo2_config())
    result = run([sys.executable, script, "--deepspeed", "--deepspeed_config", config, "--out", tmp_path],
                 script_env(switch_site), tmp_path)
    assert_zo_as_reference(load_ranks(tmp_path, 1)[0], result)


def test_opt_out_refuses_a_zo2_config_instead_of_training_first_order(switch_site, tmp_path):
    """ZO2_DEEPSPEED_AUTOPATCH=0: deepspeed.initialize is DeepSpeed's own, and a "zo2" section stops the run. ~10 s."""
    state = run([sys.executable, "-m", "zo2_deepspeed_autopatch"],
                script_env(switch_site, ZO2_DEEPSPEED_AUTOPATCH="0"), tmp_path, check=False)
    assert state.returncode == 1 and "zo2_deepspeed config switch: off" in state.stdout, output_of(state)[-3000:]
    script = write(tmp_path, "train.py", DEEPSPEED_TUTORIAL)
    config = json_config(tmp_path, zo2_config())
    result = run([sys.executable, script, "--deepspeed", "--deepspeed_config", config, "--out", tmp_path],
                 script_env(switch_site, ZO2_DEEPSPEED_AUTOPATCH="0", **single_process_env()), tmp_path,
                 check=False)
    assert result.returncode != 0 and not (tmp_path / "rank0.pt").exists()
    assert ('zo2_deepspeed_autopatch.SwitchError: the DeepSpeed config has a "zo2" section, but '
            'ZO2_DEEPSPEED_AUTOPATCH=0 turns the config switch off, and plain DeepSpeed would train it first-order. '
            'Fix: unset ZO2_DEEPSPEED_AUTOPATCH (or call zo2_deepspeed.patch_deepspeed()), or remove the "zo2" '
            'section to train first-order') in result.stderr, result.stderr[-3000:]


def test_package_not_importable_where_the_hook_is_names_cause_and_fix(switch_site, tmp_path):
    """The .pth loaded, zo2_deepspeed unimportable in the worker: a clear error, not a first-order run. ~8 s."""
    broken = tmp_path / "broken"
    shutil.copytree(switch_site, broken)
    # read after the switch's own .pth (alphabetical, and after the environment's site-packages, whose installed
    # .pth may have loaded the switch already): the package cannot be imported in this interpreter
    (broken / "site" / "zz_block.pth").write_text(
        "import sys; sys.modules['zo2_deepspeed'] = None\n")
    script = write(tmp_path, "train.py", DEEPSPEED_TUTORIAL)
    config = json_config(tmp_path, zo2_config())
    result = run([sys.executable, script, "--deepspeed", "--deepspeed_config", config, "--out", tmp_path],
                 script_env(broken, **single_process_env()), tmp_path, check=False)
    assert result.returncode != 0 and not (tmp_path / "rank0.pt").exists()
    assert ('zo2_deepspeed_autopatch.SwitchError: the DeepSpeed config has a "zo2" section, but zo2_deepspeed cannot '
            'be imported in this process (ModuleNotFoundError: import of zo2_deepspeed halted; None in sys.modules), '
            'and plain DeepSpeed would train it first-order. Fix: install zo2_deepspeed into the interpreter the '
            f'ranks run ({sys.executable}: pip install zo2_deepspeed') in result.stderr, result.stderr[-3000:]


def test_the_installed_environment_loads_the_switch_at_start_up(tmp_path):
    """After ``pip install [-e] .`` (launch/install.sh) every interpreter of that environment has the switch. ~5 s."""
    try:
        dist = importlib.metadata.distribution("zo2_deepspeed")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("zo2_deepspeed is not installed (launch/install.sh installs it)")
    origin = json.loads(dist.read_text("direct_url.json") or "{}")
    if origin.get("dir_info", {}).get("editable") and origin.get("url") != ROOT.as_uri():
        pytest.skip(f"the installed zo2_deepspeed is an editable install of {origin.get('url')}, not this checkout")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUSERBASE", "ZO2_DEEPSPEED_AUTOPATCH")}
    result = run([sys.executable, "-m", "zo2_deepspeed_autopatch"], env, tmp_path, check=False)
    assert result.returncode == 0 and f"zo2_deepspeed config switch: active in {sys.executable}" in result.stdout, \
        output_of(result)[-3000:]


# ------------------------------------------------------------------------------------- in process
class Recorder:
    """Stands for DeepSpeed's initialize: records exactly what it was given."""

    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
                 lr_scheduler=None, distributed_port=29500, mpu=None, dist_init_required=None, collate_fn=None,
                 config=None, mesh_param=None, config_params=None):
        self.calls.append(dict(args=args, model=model, model_parameters=model_parameters, config=config,
                               config_params=config_params))
        return "first-order"


class FakeEngine:
    def __init__(self, args=None, model=None, config=None, config_class=None) -> None:
        self.config = config


def fake_deepspeed(initialize) -> types.ModuleType:
    """A module shaped like deepspeed where the switch looks (initialize, runtime.engine.DeepSpeedEngine)."""
    module = types.ModuleType("deepspeed")
    engine_class = type("DeepSpeedEngine", (FakeEngine,), {})
    module.runtime = types.SimpleNamespace(engine=types.SimpleNamespace(DeepSpeedEngine=engine_class))
    module.initialize = initialize
    module.__version__ = "9.9"
    return module


def test_configs_without_zo2_reach_deepspeed_untouched(tmp_path, monkeypatch):
    """The caller's very objects, args.deepspeed_config included; nothing of zo2_deepspeed runs for them."""
    monkeypatch.setattr(switch, "_guard_reason", switch._guard_reason)
    deepspeed = fake_deepspeed(Recorder())
    switch.install_deepspeed(deepspeed)
    switch.install_deepspeed(deepspeed)  # idempotent
    original = deepspeed.initialize.__wrapped__
    assert isinstance(original, Recorder) and switch.original_initialize(deepspeed) is original
    monkeypatch.setattr(zo2_deepspeed, "initialize", lambda **kw: pytest.fail("zo2 initialize called"))
    first_order = json_config(tmp_path, {"train_micro_batch_size_per_gpu": 4, "zo2_note": 1}, "plain.json")
    args = types.SimpleNamespace(deepspeed_config=str(first_order), local_rank=0)
    model, params, plain = object(), object(), {"train_micro_batch_size_per_gpu": 4}
    assert deepspeed.initialize(args=args, model=model, model_parameters=params) == "first-order"
    assert deepspeed.initialize(None, model, config=plain) == "first-order"
    assert deepspeed.initialize(model=model, config_params=plain) == "first-order"
    calls = original.calls
    assert calls[0]["args"] is args and args.deepspeed_config == str(first_order)
    assert calls[0]["model"] is model and calls[0]["model_parameters"] is params and calls[0]["config"] is None
    assert calls[1]["config"] is plain and calls[2]["config_params"] is plain


@pytest.mark.parametrize("where", ["dict", "args", "config_params", "base64"])
def test_a_zo2_section_anywhere_deepspeed_reads_it_goes_to_zo2_initialize(tmp_path, monkeypatch, where):
    import base64
    monkeypatch.setattr(switch, "_guard_reason", switch._guard_reason)
    deepspeed = fake_deepspeed(Recorder())
    switch.install_deepspeed(deepspeed)
    seen = []
    monkeypatch.setattr(zo2_deepspeed, "initialize", lambda **kw: seen.append(kw) or "zo")
    config, model = zo2_config(), object()
    path = json_config(tmp_path, config)
    kwargs = {"dict": dict(config=config), "args": dict(args=types.SimpleNamespace(deepspeed_config=str(path))),
              "config_params": dict(config_params=config),
              "base64": dict(config=base64.urlsafe_b64encode(json.dumps(config).encode()).decode())}[where]
    assert deepspeed.initialize(model=model, **kwargs) == "zo"
    assert seen == [dict(model=model, **kwargs)] and not deepspeed.initialize.__wrapped__.calls


def test_an_entry_point_that_moved_leaves_zo2_configs_refused(monkeypatch):
    """A DeepSpeed whose initialize lost the arguments the switch reads: the import survives, a zo2 run does not."""
    monkeypatch.setattr(switch, "_guard_reason", switch._guard_reason)

    def moved(model=None, config=None):
        return "first-order"

    deepspeed = fake_deepspeed(moved)

    class Loader:
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            module.__dict__.update(runtime=deepspeed.runtime, initialize=moved, __version__="9.9")

    module = types.ModuleType("deepspeed")
    module.__spec__ = types.SimpleNamespace(loader=None)
    switch._HookedLoader(Loader(), switch._on_deepspeed).exec_module(module)  # what `import deepspeed` runs
    assert module.initialize is moved  # not wrapped: it cannot be dispatched
    engine_class = module.runtime.engine.DeepSpeedEngine
    assert engine_class(config={"train_micro_batch_size_per_gpu": 1}).config == {"train_micro_batch_size_per_gpu": 1}
    with pytest.raises(switch.SwitchError, match=r'has a "zo2" section, but deepspeed 9.9 has no deepspeed.initialize\('
                                                 r'args, model, config, config_params\) \(missing: args, config_params\)'
                                                 r', so the config switch could not be installed. Fix: install a '
                                                 r'DeepSpeed release zo2_deepspeed supports'):
        engine_class(config=zo2_config())


def test_patch_deepspeed_is_idempotent_with_the_hook_and_unpatch_keeps_the_guard():
    import deepspeed
    import transformers.integrations.deepspeed as integration
    import transformers.trainer

    from zo2_deepspeed.distributed import ensure_distributed
    was_installed = getattr(deepspeed.initialize, "_zo2_dispatch", False)  # the hook at start-up, where installed
    zo2_deepspeed.patch_deepspeed()
    dispatch = deepspeed.initialize
    zo2_deepspeed.patch_deepspeed()
    try:
        assert deepspeed.initialize is dispatch and dispatch.__wrapped__.__module__ == "deepspeed"
        assert transformers.trainer.deepspeed_init is integration.deepspeed_init is switch.trainer_deepspeed_init
    finally:
        zo2_deepspeed.unpatch_deepspeed()
    try:
        assert deepspeed.initialize is dispatch.__wrapped__
        assert integration.deepspeed_init is not switch.trainer_deepspeed_init
        ensure_distributed()
        with pytest.raises(switch.SwitchError, match=r"zo2_deepspeed.unpatch_deepspeed\(\) took the config switch out"):
            deepspeed.initialize(model=make_model(), config=zo2_config(zero_optimization={"stage": 0}))
    finally:
        if was_installed:
            zo2_deepspeed.patch_deepspeed()


# ------------------------------------------------------------------------------------- launchers (slow)
def launcher(name: str) -> str:
    from cluster import python_bin
    return python_bin(name)


@pytest.mark.slow
@pytest.mark.multirank
def test_deepspeed_launcher_tutorial_script_zo2_and_first_order(switch_site, tmp_path):
    """``deepspeed --num_gpus 2 train.py --deepspeed --deepspeed_config X``: ZO as the reference says on both ranks
    with a zo2 config; with zero3_adam_cpu.json the run equals the one with the switch off, bit for bit. 130-200 s (three 2-rank launches)."""
    script = write(tmp_path, "train.py", DEEPSPEED_TUTORIAL)

    def launch(config: Path, name: str, **env: str) -> tuple[list[dict], subprocess.CompletedProcess]:
        out = tmp_path / name
        out.mkdir()
        result = run([launcher("deepspeed"), "--num_gpus", "2", "--master_port", free_port(), script,
                      "--deepspeed", "--deepspeed_config", config, "--out", out], script_env(switch_site, **env),
                     tmp_path)
        return load_ranks(out, 2), result

    (zo_rank0, zo_rank1), result = launch(json_config(tmp_path, zo2_config()), "zo2")
    assert_zo_as_reference(zo_rank0, result)  # both ranks feed the same batches: the 1-rank trajectory
    assert zo_rank1["engine"] == "ZO2Engine" and zo_rank1["params"] == {}  # gathered on rank 0
    (first_order, _), result = launch(FIRST_ORDER, "first_order")
    assert_first_order(first_order, result)
    (plain, _), result = launch(FIRST_ORDER, "switch_off", ZO2_DEEPSPEED_AUTOPATCH="0")
    assert "zo2_deepspeed" not in output_of(result)
    assert plain["engine"] == "DeepSpeedEngine"
    assert all(torch.equal(plain["params"][n], first_order["params"][n]) for n in plain["params"])


@pytest.mark.slow
def test_torchrun_trainer_example_zo2_and_first_order(switch_site, tmp_path):
    """A run_clm.py-shaped Trainer script with ``--deepspeed``: ZO as the reference says on the batches the Trainer
    drew; with zero3_adam_cpu.json (its batch size and lr on the command line, as the Trainer requires) plain
    DeepSpeed. 35-80 s."""
    script = write(tmp_path, "run_clm.py", TRAINER_EXAMPLE)
    trainer_zo2 = zo2_config(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto")
    del trainer_zo2["optimizer"]  # the Trainer's optimizer supplies the lr, as in HF's DeepSpeed docs

    def launch(config: Path, name: str, batch: int, lr: float) -> tuple[dict, subprocess.CompletedProcess]:
        result = run([launcher("torchrun"), "--nproc_per_node", "1", "--master_port", free_port(), script,
                      "--deepspeed", config, "--output_dir", tmp_path / name, "--max_steps", "3",
                      "--per_device_train_batch_size", batch, "--learning_rate", lr, "--weight_decay", "0.0",
                      "--lr_scheduler_type", "constant", "--save_strategy", "no", "--report_to", "none",
                      "--disable_tqdm", "true", "--seed", "0"], script_env(switch_site), tmp_path)
        return load_ranks(tmp_path / name, 1)[0], result

    saved, result = launch(json_config(tmp_path, trainer_zo2), "zo2", 4, LR)
    assert_zo_as_reference(saved, result)
    saved, result = launch(FIRST_ORDER, "first_order", 16, 1e-5)
    assert_first_order(saved, result)


@pytest.mark.slow
def test_torchrun_trainer_example_with_a_first_order_tail(switch_site, tmp_path):
    """The same unmodified Trainer script with a zo2 config that has a first-order tail: the last layer and the
    head train first-order (SGD), the rest ZO with the Trainer's lr, as the plain PyTorch hybrid loop says on the
    batches the Trainer drew. 30-70 s."""
    from reference_hybrid import reference_hybrid
    script = write(tmp_path, "run_clm.py", TRAINER_EXAMPLE)
    config = zo2_config(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto")
    del config["optimizer"]
    config["zo2"]["first_order"] = {"blocks": 1, "head": True, "max_fraction": 0.9,
                                    "optimizer": {"type": "SGD", "params": {"lr": 1e-2}}}
    result = run([launcher("torchrun"), "--nproc_per_node", "1", "--master_port", free_port(), script,
                  "--deepspeed", json_config(tmp_path, config), "--output_dir", tmp_path / "out", "--max_steps", "3",
                  "--per_device_train_batch_size", "4", "--learning_rate", LR, "--weight_decay", "0.0",
                  "--lr_scheduler_type", "constant", "--save_strategy", "no", "--report_to", "none",
                  "--disable_tqdm", "true", "--seed", "0"], script_env(switch_site), tmp_path)
    saved = load_ranks(tmp_path / "out", 1)[0]
    assert saved["engine"] == "ZO2Engine" and output_of(result).count(ZO_MESSAGE) == 1
    assert "first-order tail: blocks [model.layers.1, model.norm, lm_head]" in output_of(result)
    reference = make_model("llama")
    tail = {n for n, _ in reference.named_parameters() if n.startswith(("model.layers.1.", "model.norm"))}
    reference_hybrid(reference, saved["batches"][:3], tail | {"model.embed_tokens.weight"}, lr=LR, eps=EPS,
                     seed=SEED, tail_optimizer="sgd", tail_lr=1e-2)
    expected = {n: p.detach() for n, p in reference.named_parameters()}
    start = {n: p.detach() for n, p in make_model("llama").named_parameters()}
    moved = {n: saved["params"][n] - start[n] for n in expected}
    assert relative_error(moved, {n: expected[n] - start[n] for n in expected}) <= 1e-4


@pytest.mark.slow
def test_accelerate_launch_loop_zo2_and_first_order(switch_site, tmp_path):
    """``accelerate launch --use_deepspeed --deepspeed_config_file X loop.py``: ZO as the reference says, with the
    engine's step line every step from ``zo2.steps_per_print`` (Accelerate sets the top-level one to infinity); with
    zero3_adam_cpu.json plain DeepSpeed. 20-60 s."""
    script = write(tmp_path, "loop.py", ACCELERATE_LOOP)

    def launch(config: Path, name: str) -> tuple[dict, subprocess.CompletedProcess]:
        out = tmp_path / name
        out.mkdir()
        result = run([sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
                      config, "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no", "--main_process_port", free_port(), script, out],
                     script_env(switch_site), tmp_path)
        return load_ranks(out, 1)[0], result

    logged = zo2_config(log_level="info")
    logged["zo2"]["steps_per_print"] = 1
    saved, result = launch(json_config(tmp_path, logged), "zo2")
    assert_zo_as_reference(saved, result)
    steps = [line[line.index("step="):].split()[0] for line in output_of(result).splitlines() if "] step=" in line]
    assert steps == ["step=1", "step=2", "step=3"], output_of(result)[-3000:]
    saved, result = launch(FIRST_ORDER, "first_order")
    assert_first_order(saved, result)


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.cluster
def test_srun_tutorial_script_trains_with_zo(switch_site, slurm_jobs, tmp_path):
    """``srun -n 2 python train.py --deepspeed --deepspeed_config zo2.json`` in a private SLURM cluster: no launcher
    variables at all, ZO as the reference says. 10-50 s (daemons included)."""
    script = write(tmp_path, "train.py", DEEPSPEED_TUTORIAL)
    config = json_config(tmp_path, zo2_config())
    env = {k: v for k, v in script_env(switch_site).items() if k == "PYTHONPATH"}
    result = slurm_jobs.srun(["-n2", sys.executable, str(script), "--deepspeed", "--deepspeed_config", str(config),
                              "--out", str(tmp_path)], timeout=TIMEOUT, env=env, cwd=tmp_path, check=False)
    assert result.returncode == 0, output_of(result)[-5000:]
    rank0, rank1 = load_ranks(tmp_path, 2)
    assert_zo_as_reference(rank0, result)
    assert rank1["engine"] == "ZO2Engine"


def test_wheel_and_editable_wheel_both_ship_the_pth(tmp_path):
    """What ``pip install .`` and ``pip install -e .`` install: the .pth at the top of site-packages, next to the hook
    module (the wheel) or to the editable finder (the editable wheel). Builds from a copy of the tree. ~5 s."""
    import zipfile
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "runs",
                                                              "outputs", "benchmarks", "tests"))
    names = []
    for hook in ("build_wheel", "build_editable"):  # one process each, as pip runs them
        build = f"import sys; from setuptools import build_meta as b; print('BUILT', b.{hook}(sys.argv[1]))"
        result = run([sys.executable, "-c", build, tmp_path / hook], {**os.environ, "PYTHONPATH": ""}, tree)
        built = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("BUILT "))
        names.append(Path(hook) / built)
    wheel, editable = (zipfile.ZipFile(tmp_path / name).namelist() for name in names)
    assert "zo2_deepspeed_autopatch.pth" in wheel and "zo2_deepspeed_autopatch.py" in wheel
    assert "zo2_deepspeed_autopatch.pth" in editable
    with zipfile.ZipFile(tmp_path / names[0]) as archive:
        assert archive.read("zo2_deepspeed_autopatch.pth") == (ROOT / "zo2_deepspeed_autopatch.pth").read_bytes()

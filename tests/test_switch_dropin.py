"""The config switch as a drop-in: the first-order half of every shipped config, and no silent or misleading path.

* Every config in ds_configs/ minus its "zo2" section trains first-order with plain DeepSpeed at its own ZeRO
  stage (and so does the README's first example), through an unmodified DeepSpeed-tutorial loop.
* A misspelled section ("zo") is refused at the switch; an invalid zo2 section fails before the banner.
* ``python -m zo2_deepspeed_autopatch`` exits 0 only where the switch is active.
* DeepSpeed's own errors in first-order runs: no frame of the switch in DeepSpeedEngine's, and a note on
  the frames that must stay (``deepspeed.initialize``, the Trainer's ``deepspeed_init``) saying they only
  passed the call on.
* ``deepspeed.zero.Init`` with a zo2 config builds the partitions the engine stores (storage dtype, zo2's
  NVMe swapper), announcing a first AsyncIO build; a Trainer script gets 16-bit NVMe storage from the JSON alone.
* The import hook: a ``find_spec`` racing on another thread, and deepspeed imported before the hook.

Subprocesses run the test's own interpreter (``sys.executable``) and get the switch the way
tests/test_config_switch.py gives it (``switch_site``, ``script_env``). The default tests take about 50 s
together on a 2-core machine (the first-order sweep 20-40 s of it); the Trainer NVMe test, marked slow, 50-120 s.
"""
from __future__ import annotations

import copy
import json
import logging
import re
import site
import sys
import traceback
import types
from pathlib import Path

import pytest
import torch

import zo2_deepspeed
import zo2_deepspeed_autopatch as switch
from switch_scripts import FIRST_ORDER_SWEEP
from test_config_switch import (FIRST_ORDER_MESSAGE, Recorder, fake_deepspeed, output_of, run, script_env,  # noqa: F401
                                single_process_env, switch_site, write, zo2_config)
from tiny_models import make_model
from zo2_deepspeed import ConfigError
from zo2_deepspeed.distributed import ensure_distributed

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "ds_configs").glob("*.json"))


def readme_first_example() -> dict:
    """The JSON of the README's "Minimal example", as printed there."""
    text = (ROOT / "README.md").read_text()
    return json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))


def without_zo2(config: dict, tmp_path: Path) -> dict:
    """The config minus its "zo2" section; a fixed nvme_path is moved under tmp_path (runs share the machine)."""
    config = copy.deepcopy(config)
    config.pop("zo2", None)
    offload = config.get("zero_optimization", {}).get("offload_param") or {}
    if offload.get("device") == "nvme":
        offload["nvme_path"] = str(tmp_path / "nvme")
    return config


def step_and_gradient(saved: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(parameters before the step, after it, the gradient at the start) over every parameter, flat, in float64."""
    model = make_model("llama")
    model.train()
    loss = model(**saved["batch"]).loss
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    grad = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    before, after = (torch.cat([saved[key][n].double().flatten() for n in names]) for key in ("before", "after"))
    return before, after, grad


def assert_fp32_step(before: torch.Tensor, after: torch.Tensor, step: torch.Tensor, name: str) -> None:
    """``after`` is ``before + step`` rounded to fp32: every element within one fp32 spacing of it (the gradient
    here and DeepSpeed's differ in summation order), and the check is not vacuous (many steps exceed 2 spacings)."""
    spacing = before.abs().clamp_min(2.0 ** -126) * 2.0 ** -23
    assert float((step.abs() > 2 * spacing).double().mean()) > 0.05, name
    error = (after - (before + step)).abs()
    assert bool((error <= 1.01 * spacing).all()), (name, float((error / spacing).max()))


# ------------------------------------------------------------------------------------- item 2: first-order half
def test_every_shipped_config_minus_its_zo2_section_trains_first_order_at_its_own_stage(switch_site, tmp_path):
    """Each config in ds_configs/ (and the README's first example), its "zo2" section removed, through a DeepSpeed
    tutorial loop in one process: plain DeepSpeed at the config's own stage (0 or 3, CPU or NVMe offload), and the
    step is the config's optimizer on the true gradient, clipped as DeepSpeed clips by default (SGD: -lr·∇L; Adam's
    first step: -lr·∇L/(|∇L| + eps)), to one fp32 spacing in every element. 25-45 s."""
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT
    configs = {p.stem: json.loads(p.read_text()) for p in SHIPPED}
    configs["readme_first_example"] = readme_first_example()
    assert {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}.items() <= \
        configs["readme_first_example"].items() and "zo2" in configs["readme_first_example"]
    paths = []
    for name, config in configs.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(without_zo2(config, tmp_path)))
        paths.append(path)
    out = tmp_path / "out"
    out.mkdir()
    script = write(tmp_path, "sweep.py", FIRST_ORDER_SWEEP)
    result = run([sys.executable, script, "--out", out, *paths], script_env(switch_site, **single_process_env()),
                 tmp_path)
    assert output_of(result).count(FIRST_ORDER_MESSAGE) == 1  # said once per process
    stages = set()
    for name, config in configs.items():
        saved = torch.load(out / f"{name}.pt", weights_only=True)
        stage = config.get("zero_optimization", {}).get("stage", 0)
        stages.add(stage)
        assert saved["engine"] == "DeepSpeedEngine" and saved["stage"] == stage, (name, saved["engine"])
        assert saved["optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "SGD"), name
        before, after, grad = step_and_gradient(saved)
        optimizer = config["optimizer"]
        lr = optimizer["params"]["lr"]
        clip = config.get("gradient_clipping", GRADIENT_CLIPPING_DEFAULT)  # DeepSpeed clips by default (1.0)
        grad = grad * min(1.0, clip / float(grad.norm()))
        if optimizer["type"] == "SGD":
            assert saved["basic_optimizer"] == "SGD", name
            assert_fp32_step(before, after, -lr * grad, name)
        else:  # zero3_adam_cpu.json: DeepSpeed's CPU Adam, whose first step is lr·g/(|g| + eps) per element
            assert saved["basic_optimizer"] == "DeepSpeedCPUAdam", name
            eps = optimizer["params"].get("eps", 1e-8)
            assert_fp32_step(before, after, -lr * grad / (grad.abs() + eps), name)
    assert stages == {0, 3}


def test_shipped_zo2_configs_name_the_optimizer_they_train_with_in_both_modes():
    """The optimizer section means the same with and without "zo2": SGD with its lr and weight_decay (ZO-SGD on the
    projected gradient, or SGD on the gradient); ZeRO stages that check optimizers are told SGD is intended."""
    from zo2_deepspeed.config import parse_config
    for path in SHIPPED:
        config = json.loads(path.read_text())
        if "zo2" not in config:
            continue
        settings = parse_config(config)
        assert config["optimizer"]["type"] == "SGD" and settings.lr == config["optimizer"]["params"]["lr"], path.name
        if settings.zero_stage > 0:
            assert config.get("zero_allow_untested_optimizer") is True, path.name


# ------------------------------------------------------------------------------------- items 3, 4: switch checks
@pytest.fixture
def switched(monkeypatch):
    """A DeepSpeed stand-in with the switch installed; DeepSpeed's initialize records its calls."""
    monkeypatch.setattr(switch, "_guard_reason", switch._guard_reason)
    monkeypatch.setattr(switch, "_announced", set())
    deepspeed = fake_deepspeed(Recorder())
    switch.install_deepspeed(deepspeed)
    return deepspeed


@pytest.fixture
def banners(monkeypatch):
    """What the switch announces (DeepSpeed's logger at WARNING)."""
    from deepspeed.utils import logger
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.mark.parametrize("key", ["zo", "Zo2", "zo_2", "z02"])
def test_a_misspelled_section_at_the_switch_is_refused_not_trained_first_order(switched, banners, tmp_path, key):
    """A stage-0 config with "zo" would train first-order under plain DeepSpeed: refused before DeepSpeed sees it."""
    config = zo2_config(zero_optimization={"stage": 0})
    config[key] = config.pop("zo2")
    message = f"has a top-level key {key!r}: did you mean \"zo2\"?".replace("?", r"\?")
    with pytest.raises(ConfigError, match="^the DeepSpeed config " + message):
        switched.initialize(model=object(), config=config)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"^DeepSpeed config {path} " + message):
        switched.initialize(args=types.SimpleNamespace(deepspeed_config=str(path)), model=object())
    assert switched.initialize.__wrapped__.calls == [] and banners == []


def test_an_invalid_zo2_section_fails_before_the_banner_names_it(switched, banners, monkeypatch):
    """``"method": "mezoo"``: the ConfigError comes first, and no banner says "(method mezoo): ZO2Engine"."""
    monkeypatch.setattr(zo2_deepspeed, "initialize", lambda **kw: pytest.fail("zo2 initialize called"))
    config = zo2_config()
    config["zo2"]["method"] = "mezoo"
    with pytest.raises(ConfigError, match=r"^zo2.method must be one of 'mezo', 'fzoo', 'hizoo' or 'lozo', got 'mezoo'"):
        switched.initialize(model=object(), config=config)
    config["zo2"] = {"method": "mezo", "eps": -1}
    with pytest.raises(ConfigError, match=r"^zo2.eps must be > 0, got -1"):
        switched.initialize(model=object(), config=config)
    assert banners == []
    config["zo2"]["eps"] = 1e-3
    monkeypatch.setattr(zo2_deepspeed, "initialize", lambda **kw: "zo")
    assert switched.initialize(model=object(), config=config) == "zo"
    assert [b.split(": ZO2Engine")[0] for b in banners] == [
        'zo2_deepspeed: the DeepSpeed config has a "zo2" section (method mezo)']


# ------------------------------------------------------------------------------------- item 5: exit status
def site_packages_path() -> str:
    """sys.path for an interpreter started with -S (no site, so no .pth files): this checkout, tests and packages."""
    return ":".join([str(ROOT), str(ROOT / "tests"), *site.getsitepackages()])


def test_python_m_autopatch_exits_0_only_where_the_switch_is_active(switch_site, tmp_path):
    """Active: 0. Turned off by ZO2_DEEPSPEED_AUTOPATCH=0: 1. Not loaded at start-up (-S skips .pth files): 1. ~15 s."""
    active = run([sys.executable, "-m", "zo2_deepspeed_autopatch"], script_env(switch_site), tmp_path, check=False)
    assert active.returncode == 0 and "zo2_deepspeed config switch: active in" in active.stdout, output_of(active)
    off = run([sys.executable, "-m", "zo2_deepspeed_autopatch"], script_env(switch_site, ZO2_DEEPSPEED_AUTOPATCH="0"),
              tmp_path, check=False)
    assert off.returncode == 1 and "zo2_deepspeed config switch: off in" in off.stdout, output_of(off)
    absent = run([sys.executable, "-S", "-m", "zo2_deepspeed_autopatch"],
                 {**script_env(switch_site), "PYTHONPATH": site_packages_path()}, tmp_path, check=False)
    assert absent.returncode == 1 and "not loaded at start-up" in absent.stdout, output_of(absent)


# ------------------------------------------------------------------------------------- item 7: tracebacks
@pytest.fixture
def switch_on():
    """The switch installed in this process, as the .pth installs it (an earlier test may have taken it out)."""
    import deepspeed
    zo2_deepspeed.patch_deepspeed()
    return deepspeed



def frames_in_switch(error: BaseException) -> list[traceback.FrameSummary]:
    return [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).name == "zo2_deepspeed_autopatch.py"]


PASSED_ON = ('zo2_deepspeed: the config has no "zo2" section, so the config switch only passed this call on to '
             "DeepSpeed's own deepspeed.initialize, unchanged; the error above is raised there, not by zo2_deepspeed")


def test_deepspeeds_own_errors_show_no_switch_frame_or_say_it_only_dispatched(switch_on):
    """A first-order config DeepSpeed rejects inside its engine (an optimizer type it does not know)."""
    import deepspeed
    ensure_distributed()
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "NoSuchOptimizer", "params": {"lr": 1e-3}}}
    model = make_model()
    with pytest.raises(AssertionError, match="NoSuchOptimizer is not a supported DeepSpeed Optimizer") as direct:  # DeepSpeedEngine built by hand
        deepspeed.runtime.engine.DeepSpeedEngine(args=None, model=model, model_parameters=model.parameters(),
                                                 config=config, config_class=deepspeed.DeepSpeedConfig(config))
    assert frames_in_switch(direct.value) == []  # the guard acts in __new__, before DeepSpeed's __init__
    assert getattr(deepspeed.initialize, "_zo2_dispatch", False)
    with pytest.raises(AssertionError, match="NoSuchOptimizer is not a supported DeepSpeed Optimizer") as dispatched:
        deepspeed.initialize(model=make_model(), model_parameters=model.parameters(), config=config)
    frames = frames_in_switch(dispatched.value)
    assert [f.name for f in frames] == ["initialize"], frames  # the dispatcher itself, and nothing under DeepSpeed's
    assert "DeepSpeed's own initialize, arguments unchanged" in frames[0].line
    assert dispatched.value.__notes__ == [PASSED_ON]
    assert PASSED_ON in "".join(traceback.format_exception(dispatched.value))


def test_transformers_errors_under_the_trainer_wrapper_say_it_only_passed_the_call_on(monkeypatch):
    def deepspeed_init(trainer, num_training_steps, inference=False):
        raise ValueError("transformers' own complaint")

    monkeypatch.setattr(switch, "_original_deepspeed_init", deepspeed_init)
    plugin = types.SimpleNamespace(hf_ds_config=types.SimpleNamespace(config={"train_micro_batch_size_per_gpu": 1}))
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(state=types.SimpleNamespace(
        deepspeed_plugin=plugin)))
    with pytest.raises(ValueError, match="transformers' own complaint") as raised:
        switch.trainer_deepspeed_init(trainer, 10)
    (frame,) = frames_in_switch(raised.value)
    assert frame.name == "trainer_deepspeed_init" and frame.line.endswith("# only passed on")
    assert raised.value.__notes__ == [PASSED_ON.replace("DeepSpeed's own deepspeed.initialize",
                                                        "transformers' own deepspeed_init")]


def test_a_zo2_config_built_by_hand_into_deepspeeds_engine_is_still_refused(switch_on):
    import deepspeed
    ensure_distributed()
    config = zo2_config(zero_optimization={"stage": 0})
    with pytest.raises(switch.SwitchError, match="reached DeepSpeed's first-order DeepSpeedEngine without passing"):
        deepspeed.runtime.engine.DeepSpeedEngine(args=None, model=make_model(), config=config)


# ------------------------------------------------------------------------------------- items 8, 9: zero.Init
def train_three_steps(model, config) -> tuple[list, dict]:
    import deepspeed

    from tiny_models import batches
    engine, *_ = deepspeed.initialize(model=model, config=config)  # the switch dispatches
    try:
        assert type(engine).__name__ == "ZO2Engine"
        losses = []
        for batch in batches(3):
            engine.backward(engine(**batch))
            engine.step()
            losses.append(engine.last_step["group_losses"])
        return losses, engine.parameter_snapshot()
    finally:
        engine.close()


def test_zero_init_with_a_zo2_config_builds_partitions_in_the_storage_dtype(switch_on):
    """``with deepspeed.zero.Init(config_dict_or_path=zo2 config)`` (what transformers opens under ZeRO-3) gives bf16
    partitions for ``zo2.storage_dtype: bf16`` alone, and they train as those of ``zo2_deepspeed.zero_init``; a
    config without "zo2" gets DeepSpeed's own Init (fp32 here). ~10 s."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import Init
    ensure_distributed()
    config = zo2_config(zero_optimization={"stage": 3, "offload_param": {"device": "cpu"}})
    config["zo2"]["storage_dtype"] = "bf16"
    context = deepspeed.zero.Init(config_dict_or_path=config)
    assert isinstance(context, Init) and type(context) is not Init and not context.mem_efficient_linear
    with context:
        switched = make_model("gpt2")
    with zo2_deepspeed.zero_init(config):
        reference = make_model("gpt2")
    for model in (switched, reference):
        assert {p.ds_tensor.dtype for p in model.parameters()} == {torch.bfloat16}
    (losses, params), (want_losses, want_params) = train_three_steps(switched, config), train_three_steps(reference,
                                                                                                        config)
    assert losses == want_losses and params.keys() == want_params.keys()
    assert all(torch.equal(params[n], want_params[n]) for n in want_params)
    plain = without_zo2(config, Path("/unused"))
    context = deepspeed.zero.Init(config_dict_or_path=plain)
    assert type(context) is Init
    zo2_deepspeed.unpatch_deepspeed()  # the switch out: DeepSpeed's own Init for zo2 configs too, and back in
    try:
        assert type(deepspeed.zero.Init(config_dict_or_path=config, enabled=False)) is Init
    finally:
        zo2_deepspeed.patch_deepspeed()
    assert type(deepspeed.zero.Init(config_dict_or_path=config, enabled=False)) is not Init
    with context:
        model = make_model("gpt2")
    assert {p.ds_tensor.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.nvme
def test_zero_init_with_a_zo2_nvme_config_uses_zo2s_swapper_and_announces_a_first_aio_build(tmp_path, monkeypatch,
                                                                                            banners, switch_on):
    """NVMe: zo2's swapper (its own run folder, buffers pinned as needed) in the storage dtype; where DeepSpeed's
    AsyncIO op was never built, rank 0 says so before the minutes-long silent build. ~10 s."""
    import deepspeed
    from deepspeed.ops.op_builder.builder import OpBuilder

    from zo2_deepspeed.tiers import nvme_aio
    from zo2_deepspeed.tiers.nvme import nvme_unavailable_reason
    reason = nvme_unavailable_reason()
    if reason:
        pytest.skip(reason)
    ensure_distributed()
    monkeypatch.delitem(OpBuilder._loaded_ops, "async_io", raising=False)
    monkeypatch.setattr(nvme_aio, "_aio_built", lambda builder: False)  # as on a machine that never built it
    config = zo2_config(zero_optimization={"stage": 3, "offload_param": {
        "device": "nvme", "nvme_path": str(tmp_path), "buffer_count": 16, "buffer_size": 2048 * 512}})
    config["zo2"]["storage_dtype"] = "fp16"
    with deepspeed.zero.Init(config_dict_or_path=config) as _:
        model = make_model("gpt2", hidden=512)
    assert [b for b in banners if "compiling DeepSpeed's AsyncIO op" in b], banners
    swappers = {id(p.nvme_swapper): p.nvme_swapper for p in model.parameters() if p.nvme_swapper is not None}
    (swapper,) = swappers.values()
    assert type(swapper).__name__ == "SizedSwapper" and swapper.dtype == torch.float16
    assert Path(swapper.swap_folder).is_relative_to(tmp_path) and "zo2-run-" in swapper.swap_folder
    assert {p.ds_tensor.dtype for p in model.parameters()} == {torch.float16}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.close()


def test_a_model_partitioned_in_another_dtype_names_a_json_only_fix(switch_on):
    """Partitions built by a zero.Init that did not see the zo2 section (here: an explicit dtype)."""
    import deepspeed
    ensure_distributed()
    config = zo2_config()
    config["zo2"]["storage_dtype"] = "bf16"
    with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.float32):  # the caller's explicit choice
        model = make_model("gpt2")
    with pytest.raises(ConfigError, match=r"^zo2.storage_dtype is 'bf16' but transformer.wte.weight is stored as "
                                          r"torch.float32: .* Fix: set zo2.storage_dtype to 'fp32' in the config"):
        deepspeed.initialize(model=model, config=config)


# ------------------------------------------------------------------------------------- item 12: the import hook
RACE = '''
import sys, threading
import zo2_deepspeed_autopatch as switch

finder = next(f for f in sys.meta_path if isinstance(f, switch._Finder))
inside, release = threading.Event(), threading.Event()


class SlowFinder:
    """A finder that takes its time on another thread (a network file system, an import shim)."""

    def find_spec(self, name, path=None, target=None):
        if name == "deepspeed" and threading.current_thread() is not threading.main_thread():
            inside.set()
            release.wait(120)
        return None


def probe():
    # A finder that resolves names through sys.meta_path itself (as the switch's does) calls find_spec directly,
    # without the import lock that importlib.util.find_spec holds.
    finder.find_spec("deepspeed", None)


sys.meta_path.insert(1, SlowFinder())
thread = threading.Thread(target=probe)
thread.start()
assert inside.wait(120)
import deepspeed  # while the other thread is inside the switch's find_spec for the same name
release.set()
thread.join()
print("DISPATCH", getattr(deepspeed.initialize, "_zo2_dispatch", False),
      getattr(deepspeed.runtime.engine.DeepSpeedEngine.__dict__.get("__new__"), "__func__", None) is not None)
'''

IMPORTED_FIRST = '''
import sys
import deepspeed, transformers.integrations.deepspeed as integration, transformers.trainer
assert "zo2_deepspeed_autopatch" not in sys.modules
import zo2_deepspeed_autopatch as switch  # what the .pth does, here after deepspeed
import torch
from tiny_models import batches, make_model
import deepspeed as again
assert again.initialize is deepspeed.initialize
assert transformers.trainer.deepspeed_init is integration.deepspeed_init is switch.trainer_deepspeed_init
config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "SGD", "params": {"lr": 1e-3}},
          "zo2": {"method": "mezo"}}
engine, *_ = deepspeed.initialize(model=make_model(), config=config)
engine.backward(engine(**batches(1)[0]))
engine.step()
print("ENGINE", type(engine).__name__, engine.global_steps)
'''


def test_a_find_spec_racing_on_another_thread_does_not_make_the_import_skip_the_hook(switch_site, tmp_path):
    """Thread A is inside the switch's find_spec("deepspeed") (held there by a slow finder) while the main thread
    imports deepspeed: the import is still hooked (the finder's bookkeeping is per thread). ~10 s."""
    result = run([sys.executable, write(tmp_path, "race.py", RACE)], script_env(switch_site), tmp_path)
    assert "DISPATCH True True" in result.stdout, output_of(result)[-3000:]


def test_deepspeed_imported_before_the_hook_is_switched_when_the_hook_installs(tmp_path):
    """``python -S`` reads no .pth: deepspeed and the Trainer's integration are imported first, then the switch's
    module; deepspeed.initialize and the Trainer's deepspeed_init dispatch, and a zo2 config trains with ZO. ~15 s."""
    result = run([sys.executable, "-S", write(tmp_path, "first.py", IMPORTED_FIRST)],
                 {**script_env(Path("/nonexistent")), "PYTHONPATH": site_packages_path(), **single_process_env()},
                 tmp_path)
    assert "ENGINE ZO2Engine 1" in result.stdout, output_of(result)[-3000:]


# ------------------------------------------------------------------------------------- item 8: Trainer, NVMe, bf16
TRAINER_NVME = '''
import os
from dataclasses import dataclass, field
import torch
from transformers import AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments, default_data_collator
from tiny_models import VOCAB


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "a Hugging Face model directory"})
    code_change: bool = field(default=False, metadata={"help": "build under zo2_deepspeed.zero_init (the old way)"})


parser = HfArgumentParser((ModelArguments, TrainingArguments))
model_args, training_args = parser.parse_args_into_dataclasses()
gen = torch.Generator().manual_seed(3)
rows = []
for _ in range(24):
    ids = torch.randint(3, VOCAB, (16,), generator=gen)
    rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
if model_args.code_change:
    import zo2_deepspeed
    with zo2_deepspeed.zero_init(training_args.deepspeed):
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
else:  # run_clm.py: from_pretrained after TrainingArguments, under transformers' own deepspeed.zero.Init
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
on_nvme = [p for p in model.parameters() if getattr(p.ds_tensor, "final_location", None) is not None]
swapped = {id(p) for p in on_nvme}
stored = sorted({str(p.nvme_swapper.dtype if id(p) in swapped else p.ds_tensor.dtype)  # swapped out: a placeholder
                 for p in model.parameters()})
swappers = sorted({type(p.nvme_swapper).__name__ for p in on_nvme})
trainer = Trainer(model=model, args=training_args, train_dataset=rows, data_collator=default_data_collator)
trainer.train()
engine = trainer.model_wrapped
params = engine._zero3_consolidated_16bit_state_dict()
torch.save({"engine": type(engine).__name__, "stored": stored, "swappers": swappers, "on_nvme": len(on_nvme),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "params": params},
           os.path.join(training_args.output_dir, "rank0.pt"))
'''


@pytest.mark.slow
@pytest.mark.nvme
def test_trainer_script_gets_16_bit_nvme_storage_from_the_json_alone(switch_site, tmp_path):
    """A run_clm.py-shaped Trainer script, unmodified: ``offload_param: nvme`` and ``"zo2": {"storage_dtype": "bf16"}``
    in the JSON are enough (transformers' zero.Init builds bf16 partitions on zo2's swapper), and the run equals, bit
    for bit, the same script built under ``zo2_deepspeed.zero_init`` (the code change this used to need). 60-120 s
    (two Trainer runs)."""
    from zo2_deepspeed.tiers.nvme import nvme_unavailable_reason
    reason = nvme_unavailable_reason()
    if reason:
        pytest.skip(reason)
    make_model("gpt2", hidden=512).save_pretrained(tmp_path / "model")
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "steps_per_print": 1,
              "zero_optimization": {"stage": 3, "offload_param": {
                  "device": "nvme", "nvme_path": str(tmp_path / "nvme"), "buffer_count": 16,
                  "buffer_size": 2048 * 512}},
              "zo2": {"method": "mezo", "eps": 1e-3, "seed": 1, "storage_dtype": "bf16"}}
    config_path = tmp_path / "ds_nvme_bf16.json"
    config_path.write_text(json.dumps(config))
    script = write(tmp_path, "run_clm.py", TRAINER_NVME)

    def launch(name: str, *extra: str) -> dict:
        out = tmp_path / name
        run([sys.executable, script, "--model_name_or_path", tmp_path / "model", "--deepspeed", config_path,
             "--output_dir", out, "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
             "--lr_scheduler_type", "constant", "--weight_decay", "0.0", "--save_strategy", "no", "--report_to",
             "none", "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "0", *extra],
            script_env(switch_site, **single_process_env()), tmp_path)
        return torch.load(out / "rank0.pt", weights_only=True)

    from_json = launch("json")
    assert from_json["engine"] == "ZO2Engine" and from_json["stored"] == ["torch.bfloat16"]
    assert from_json["swappers"] == ["SizedSwapper"] and from_json["on_nvme"] == 6  # per layer the 3 shards >= 1 MiB
    assert len(from_json["losses"]) == 3
    code_change = launch("code_change", "--code_change", "true")
    assert from_json["losses"] == code_change["losses"]
    assert all(torch.equal(from_json["params"][n], code_change["params"][n]) for n in code_change["params"])
    start = make_model("gpt2", hidden=512).state_dict()
    assert any(not torch.equal(from_json["params"][n].float(), start[n].to(torch.bfloat16).float())
               for n in from_json["params"] if n in start)

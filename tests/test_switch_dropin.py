"""The config switch as a drop-in: the first-order half of every shipped config.

* Every config in ds_configs/ minus its "zo2" section trains first-order with plain DeepSpeed at its own ZeRO
  stage (and so does the README's first example), through an unmodified DeepSpeed-tutorial loop.

Subprocesses run the test's own interpreter (``sys.executable``) and get the switch the way
tests/test_config_switch.py gives it (``switch_site``, ``script_env``).
"""
from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from switch_scripts import FIRST_ORDER_SWEEP
from test_config_switch import (FIRST_ORDER_MESSAGE, output_of, run, script_env, single_process_env,  # noqa: F401
                                switch_site, write)
from tiny_models import make_model

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

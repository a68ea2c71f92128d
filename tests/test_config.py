"""Every bad field fails at initialize with a message naming it; good configs parse as documented."""
from __future__ import annotations

import json

import pytest
import torch

import zo2_deepspeed
from zo2_deepspeed import ConfigError, parse_config
from tiny_models import make_model


def base(**zo2):
    return {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 1e-3}},
            "zo2": dict(zo2)}


@pytest.mark.parametrize("zo2, message", [
    ({"eps": -1}, "zo2.eps must be > 0, got -1"),
    ({"eps": 0}, "zo2.eps must be > 0, got 0"),
    ({"eps": "0.001"}, "zo2.eps must be a number, got '0.001' (str)"),
    ({"method": "adam"}, "zo2.method must be one of 'mezo', 'fzoo', 'hizoo' or 'lozo', got 'adam'"),
    ({"epsilon": 1e-3}, "zo2.epsilon is not a known field"),
    ({"seed": -3}, "zo2.seed must be >= 0, got -3"),
    ({"seed": 1.5}, "zo2.seed must be an integer, got 1.5 (float)"),
    ({"num_perturbations": 0}, "zo2.num_perturbations must be >= 1, got 0"),
    ({"hessian_smooth": 1.0}, "zo2.hessian_smooth must be < 1, got 1.0"),
    ({"prefetch_blocks": -1}, "zo2.prefetch_blocks must be >= 0, got -1"),
    ({"storage_dtype": "int8"}, "zo2.storage_dtype must be one of 'fp32', 'bf16' or 'fp16', got 'int8'"),
    ({"exact_restore": "yes"}, "zo2.exact_restore must be true or false, got 'yes' (str)"),
    ({"max_skipped_steps": 0}, "zo2.max_skipped_steps must be >= 1, got 0"),
    ({"rank": 0}, "zo2.rank must be >= 1, got 0"),
    ({"lazy_steps": 0}, "zo2.lazy_steps must be >= 1, got 0"),
])
def test_bad_zo2_field_is_named(zo2, message):
    with pytest.raises(ConfigError) as info:
        parse_config(base(**zo2))
    assert message in str(info.value)


def test_zo2_must_be_an_object():
    with pytest.raises(ConfigError, match="zo2 must be an object, got list"):
        parse_config({"train_micro_batch_size_per_gpu": 1, "zo2": [1]})


@pytest.mark.parametrize("change, message", [
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
     "zero_optimization.offload_param.device='cpu' needs zero_optimization.stage 3 (parameter partitions), got stage 2"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}},
     "zero_optimization.offload_param.device must be 'none', 'cpu' or 'nvme', got 'gpu'"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
     "zero_optimization.offload_param.nvme_path is required"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage must be 0, 1, 2 or 3, got 4"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}, "optimizer.type must be 'SGD' with a zo2 section"),
    ({"optimizer": {"type": "SGD", "params": {"lr": -1}}}, "optimizer.params.lr must be >= 0, got -1"),
    ({"optimizer": {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.9}}},
     "optimizer.params.momentum is not supported by zo2"),
    ({"optimizer": {"type": "SGD", "params": {"lr": 1e-3, "betas": [0.9, 0.99]}}}, "optimizer.params.betas is not used"),
    ({"train_micro_batch_size_per_gpu": "auto"}, "train_micro_batch_size_per_gpu is still 'auto'"),
    ({"optimizer": {"type": "SGD", "params": {"lr": "auto"}}}, "optimizer.params.lr is still 'auto'"),
    ({"bf16": {"enabled": True}, "zo2": {"compute_dtype": "fp32"}},
     "bf16.enabled is true but zo2.compute_dtype is 'fp32'"),
    ({"zo2": {"storage_dtype": "bf16"}}, "zo2.storage_dtype='bf16' applies to offloaded partitions"),
])
def test_bad_deepspeed_field_is_named(change, message):
    config = base()
    config.update(change)
    with pytest.raises(ConfigError) as info:
        parse_config(config)
    assert message in str(info.value)


def test_defaults_and_derived_settings():
    settings = parse_config(base())
    assert settings.zo2.method == "mezo" and settings.zo2.eps == 1e-3 and settings.zo2.seed == 42
    assert settings.tier == "resident" and settings.compute_dtype == torch.float32 and settings.lr == 1e-3
    config = base()
    config.update(zero_optimization={"stage": 3, "offload_param": {"device": "cpu"}}, bf16={"enabled": True})
    settings = parse_config(config)
    assert settings.tier == "cpu" and settings.compute_dtype == torch.bfloat16
    config.update(zero_optimization={"stage": 2}, gradient_clipping=1.0)
    warnings = " ".join(parse_config(config).warnings)
    assert "stage 2" in warnings and "gradient_clipping=1.0 is ignored" in warnings


def test_initialize_reports_config_errors_before_building(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(base(eps=-1)))
    with pytest.raises(ConfigError, match="zo2.eps must be > 0, got -1"):
        zo2_deepspeed.initialize(model=make_model(), config=str(path))


def test_missing_lr_is_named():
    """Without an lr the engine only evaluates (DeepSpeed's engine without an optimizer); training is refused."""
    from tiny_models import batches
    config = base()
    del config["optimizer"]
    required = r'optimizer.params.lr is required with zo2 to train \(add "optimizer": \{"type": "SGD", "params"'
    batch = batches(1, rows=2)[0]
    data = [{k: v[i] for k, v in batch.items()} for i in range(2)]
    with pytest.raises(ConfigError, match=required + r".*: training_data was given"):
        zo2_deepspeed.initialize(model=make_model(), config=config, training_data=data)
    with pytest.raises(ConfigError, match=required):
        zo2_deepspeed.initialize(model=make_model(), config={**config, "scheduler": {"type": "WarmupLR"}})
    engine, optimizer, _, _ = zo2_deepspeed.initialize(model=make_model(), config=config)
    assert optimizer is None
    engine.eval()
    expected = float(make_model().eval()(**batch, use_cache=False).loss)
    assert float(engine(**batch).loss) == expected  # eval is the model's own forward and loss: the same bits
    engine.train()
    with pytest.raises(ConfigError, match=required + r".*: this engine was built without an optimizer and only "
                                                     r"evaluates \(engine.eval\(\)\)"):
        engine(**batch)
    engine.close()


def test_config_path_must_exist():
    with pytest.raises(ConfigError, match="DeepSpeed config file /nonexistent/ds.json does not exist"):
        zo2_deepspeed.initialize(model=make_model(), config="/nonexistent/ds.json")
    with pytest.raises(ConfigError, match="neither an existing file nor a JSON string"):
        zo2_deepspeed.initialize(model=make_model(), config="/nonexistent/ds")


@pytest.mark.parametrize("change, message", [
    ({"train_micro_batch_size_per_gpu": "4"},
     "train_micro_batch_size_per_gpu must be a positive integer, got '4' (str)"),
    ({"train_micro_batch_size_per_gpu": 2.5},
     "train_micro_batch_size_per_gpu must be a positive integer, got 2.5 (float)"),
    ({"train_micro_batch_size_per_gpu": 0},
     "train_micro_batch_size_per_gpu must be a positive integer, got 0 (int)"),
    ({"train_micro_batch_size_per_gpu": True},
     "train_micro_batch_size_per_gpu must be a positive integer, got True (bool)"),
    ({"gradient_accumulation_steps": "2"}, "gradient_accumulation_steps must be a positive integer, got '2' (str)"),
    ({"gradient_accumulation_steps": -1}, "gradient_accumulation_steps must be a positive integer, got -1 (int)"),
    ({"train_batch_size": 8.0}, "train_batch_size must be a positive integer, got 8.0 (float)"),
    ({"train_micro_batch_size_per_gpu": None}, "train_micro_batch_size_per_gpu is required (or train_batch_size"),
    ({"train_batch_size": 7}, "train_batch_size 7 is not a multiple of train_micro_batch_size_per_gpu 2: DeepSpeed "
                              "needs train_batch_size = micro-batch × accumulation steps × world size"),
    ({"train_batch_size": 12, "gradient_accumulation_steps": 4},
     "train_batch_size 12 is not a multiple of train_micro_batch_size_per_gpu 2 × gradient_accumulation_steps 4"),
    ({"train_micro_batch_size_per_gpu": None, "train_batch_size": 9, "gradient_accumulation_steps": 2},
     "train_batch_size 9 is not a multiple of gradient_accumulation_steps 2"),
])
def test_bad_batch_field_is_named(change, message):
    """DeepSpeed would end in a bare TypeError for a string, and accept 2.5 to fail on every batch."""
    config = base()
    config.update(change)
    with pytest.raises(ConfigError) as info:
        parse_config(config)
    assert message in str(info.value)


@pytest.mark.parametrize("change", [
    {"train_batch_size": 8, "gradient_accumulation_steps": 4},   # 2 × 4 × world 1
    {"train_batch_size": 6},                                     # accumulation 3 is derived
    {"train_micro_batch_size_per_gpu": None, "train_batch_size": 6, "gradient_accumulation_steps": 3},
])
def test_consistent_batch_fields_parse(change):
    config = base()
    config.update(change)
    parse_config(config)


def test_batch_fields_are_checked_against_the_world_size():
    """The consistency rule needs the world size: the engine checks it before DeepSpeedConfig asserts."""
    from zo2_deepspeed.config import batch_sizes_for_world
    config = {**base(), "train_batch_size": 16, "gradient_accumulation_steps": 4}
    with pytest.raises(ConfigError) as info:
        zo2_deepspeed.initialize(model=make_model(), config=config)
    assert ("train_batch_size 16 != train_micro_batch_size_per_gpu 2 × gradient_accumulation_steps 4 × world size 1 "
            "= 8: correct one of them, or drop train_batch_size to have it derived") in str(info.value)
    config = {**base(), "train_batch_size": 12}  # micro 2: accumulation 3 at world size 2, none at 4
    batch_sizes_for_world(config, 2)
    with pytest.raises(ConfigError, match=r"train_batch_size 12 is not a multiple of train_micro_batch_size_per_gpu 2 "
                                          r"× world size 4 = 8, so gradient_accumulation_steps cannot be derived"):
        batch_sizes_for_world(config, 4)
    only_total = {**base(), "train_batch_size": 6}
    del only_total["train_micro_batch_size_per_gpu"]
    batch_sizes_for_world(only_total, 3)
    with pytest.raises(ConfigError, match=r"train_batch_size 6 is not a multiple of world size 4 = 4, so "
                                          r"train_micro_batch_size_per_gpu cannot be derived"):
        batch_sizes_for_world(only_total, 4)


def test_auto_noise_generator_is_a_value_not_a_placeholder(make_config):
    """"auto" is the Trainer's placeholder everywhere else, but zo2.noise_generator's own default choice."""
    config = make_config("cpu", noise_generator="auto")
    assert parse_config(config).zo2.noise_generator == "auto"
    config["zo2"]["eps"] = "auto"
    with pytest.raises(ConfigError, match="zo2.eps is still 'auto': give it a value"):
        parse_config(config)


@pytest.mark.parametrize("key", ["zo", "Zo2", "ZO2", "zo_2", "z02", "zo2_"])
def test_a_near_miss_of_the_zo2_section_is_refused(tmp_path, key):
    """DeepSpeed ignores unknown top-level keys: a misspelled section used to select plain DeepSpeed, which
    failed 14 s later on its "untested ZeRO Optimizer" assertion (or trained first-order)."""
    from zo2_deepspeed.config import load_config
    config = base()
    config[key] = config.pop("zo2")
    message = f"has a top-level key {key!r}: did you mean \"zo2\"?"
    with pytest.raises(ConfigError, match="the DeepSpeed config " + message.replace("?", r"\?")):
        load_config(config)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"DeepSpeed config {path} " + message.replace("?", r"\?")):
        load_config(str(path))


def test_every_shipped_config_and_plain_deepspeed_keys_load():
    """No DeepSpeed key is close enough to "zo2" to be taken for it."""
    from pathlib import Path

    from zo2_deepspeed.config import load_config
    shipped = sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json"))
    assert shipped and all(isinstance(load_config(str(p)), dict) for p in shipped)
    keys = ["zero_optimization", "fp16", "bf16", "amp", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
            "wall_clock_breakdown", "steps_per_print", "gradient_clipping", "prescale_gradients", "comms_logger",
            "tensorboard", "wandb", "csv_monitor", "flops_profiler", "activation_checkpointing", "aio", "compile",
            "data_efficiency", "dataloader_drop_last", "checkpoint", "elasticity", "pipeline", "sparse_attention"]
    load_config({key: {} for key in keys})


@pytest.mark.parametrize("write, message", [
    (None, "DeepSpeed config file {path} does not exist"),
    ('{"train_micro_batch_size_per_gpu": 4,}', "DeepSpeed config {path} is not valid JSON: Expecting"),
    ("[1, 2]", "DeepSpeed config {path} must hold a JSON object, got list"),
])
def test_config_file_errors_name_the_file(tmp_path, write, message):
    from zo2_deepspeed.config import load_config
    path = tmp_path / "config.json"
    if write is not None:
        path.write_text(write)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(message.format(path=path))

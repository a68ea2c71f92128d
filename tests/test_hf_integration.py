"""The ZO2 engine under the HF Trainer, Accelerate and PEFT, and DeepSpeed's monitor sections.

The Trainer tests run unmodified Trainer code in-process after ``patch_deepspeed()``; Accelerate is
started for real with ``accelerate launch --use_deepspeed``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zo2_deepspeed
from conftest import ds_config
from tiny_models import VOCAB, batches, make_model
from zo2_deepspeed import ConfigError
from zo2_deepspeed.blocks import find_blocks
from zo2_deepspeed.hf import trainer_config
from zo2_deepspeed.optimizer import ZOSGD

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------------------------- helpers
@pytest.fixture
def hf_session():
    """patch_deepspeed() for one test, and no Accelerate/Trainer global state leaking to the next."""
    from accelerate.state import AcceleratorState, GradientState
    from deepspeed.utils import logger as ds_logger
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    saved_env, saved_level = dict(os.environ), ds_logger.level  # the Trainer sets DeepSpeed's log level
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    zo2_deepspeed.patch_deepspeed()
    try:
        yield
    finally:
        zo2_deepspeed.unpatch_deepspeed()
        unset_hf_deepspeed_config()
        ds_logger.setLevel(saved_level)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        for key in set(os.environ) - set(saved_env):
            if key.startswith("ACCELERATE_"):
                del os.environ[key]
        os.environ.update({k: v for k, v in saved_env.items() if k.startswith("ACCELERATE_")})


def lm_rows(n: int = 32, seq: int = 16, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (seq,), generator=gen)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def zo2_section(**extra) -> dict:
    return {"method": "mezo", "eps": 1e-3, "seed": 1, **extra}


def trainer_ds_config(**sections) -> dict:
    """A config as one writes it for the Trainer: batch fields "auto", an explicit ZeRO stage."""
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "zero_optimization": {"stage": 0}, "zo2": zo2_section(), **sections}


def make_trainer(out: Path, deepspeed, model=None, train_rows: int = 32, model_init=None, **overrides):
    from transformers import Trainer, TrainingArguments
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
                    learning_rate=1e-2, weight_decay=0.1, warmup_steps=1, logging_steps=1, save_steps=2,
                    eval_strategy="steps", eval_steps=2, eval_on_start=True, per_device_eval_batch_size=8,
                    report_to=[], disable_tqdm=True, deepspeed=deepspeed, seed=0)
    settings.update(overrides)
    if model_init is None and model is None:
        model = make_model("llama")
    return Trainer(model=model, model_init=model_init, args=TrainingArguments(**settings),
                   train_dataset=lm_rows(train_rows), eval_dataset=lm_rows(8, seed=1))


def run_trainer(out: Path, deepspeed, model=None, resume=None, train_rows: int = 32, **overrides):
    trainer = make_trainer(out, deepspeed, model=model, train_rows=train_rows, **overrides)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer


def logged(trainer, key: str) -> dict[int, float]:
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}


def current_state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# ------------------------------------------------------------------------------------- Trainer
def test_trainer_trains_evaluates_checkpoints_and_resumes_exactly(hf_session, tmp_path):
    """No optimizer/scheduler section: the Trainer's AdamW groups and its own LambdaLR drive ZO-SGD."""
    from accelerate.utils import extract_model_from_parallel
    from deepspeed import DeepSpeedEngine
    from safetensors.torch import load_file

    config = trainer_ds_config(csv_monitor={"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "run"})
    full = run_trainer(tmp_path / "full", config)
    engine = full.model_wrapped
    assert isinstance(engine, DeepSpeedEngine) and type(engine).__name__ == "ZO2Engine"
    assert extract_model_from_parallel(engine) is full.model and engine.module is full.model
    assert isinstance(full.optimizer.optimizer, ZOSGD) and type(full.lr_scheduler).__name__ == "LambdaLR"
    assert full.state.global_step == engine.global_steps == 4

    losses, lrs, evals = logged(full, "loss"), logged(full, "learning_rate"), logged(full, "eval_loss")
    assert sorted(losses) == [1, 2, 3, 4] and all(3 < v < 8 for v in losses.values())  # per-token scale, not ×GA
    # the Trainer's warmup + decay; its float64 schedule arithmetic rounds in another order than these literals
    # (a few float64 ulps), which approx's relative 1e-6 covers
    assert lrs == pytest.approx({1: 0.0, 2: 1e-2, 3: 1e-2 * 2 / 3, 4: 1e-2 / 3})
    assert sorted(evals) == [0, 2, 4] and evals[4] != evals[0]  # before and after, on the raw module
    assert all(math.isfinite(g) for g in logged(full, "grad_norm").values())

    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "latest").read_text() == "global_step2" and (ckpt / "global_step2").is_dir()
    saved = load_file(ckpt / "model.safetensors")
    zo2 = load_file(ckpt / "global_step2" / "rank00000.safetensors")
    assert not any(k.startswith("module.") for k in saved)
    assert all(torch.equal(saved[k].flatten(), zo2[f"param/{k}"]) for k in saved if f"param/{k}" in zo2)

    with (tmp_path / "csv" / "run" / "Train_Samples_train_loss.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [8, 16, 24, 32]

    expected = current_state(full)
    resumed = run_trainer(tmp_path / "resumed", config, resume=ckpt)
    assert resumed.state.global_step == resumed.model_wrapped.global_steps == 4
    assert logged(resumed, "loss")[3] == losses[3] and logged(resumed, "loss")[4] == losses[4]
    assert logged(resumed, "eval_loss")[4] == evals[4]
    got = current_state(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed run differs from the uninterrupted one"


@pytest.mark.parametrize("sections", [
    {"optimizer": {"type": "SGD", "params": {"lr": "auto", "weight_decay": "auto"}}},
    {"optimizer": {"type": "SGD", "params": {"lr": "auto", "weight_decay": "auto"}},
     "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                        "warmup_num_steps": "auto", "total_num_steps": "auto"}}},
], ids=["optimizer-section", "optimizer-and-scheduler-sections"])
def test_trainer_with_config_optimizer_resumes_engine_owned_schedule(hf_session, tmp_path, sections):
    """With an optimizer section the engine owns the schedule (the Trainer's callable, or the config's)."""
    config = trainer_ds_config(**sections)
    full = run_trainer(tmp_path / "full", config, eval_strategy="no", eval_on_start=False)
    engine = full.model_wrapped
    assert engine.lr_scheduler is not None and full.lr_scheduler.scheduler is engine.lr_scheduler
    assert not (tmp_path / "full" / "checkpoint-2" / "scheduler.pt").exists()  # the engine's checkpoint holds it
    lrs = list(logged(full, "learning_rate").values())
    assert len(set(lrs)) > 1 and max(lrs) <= 1e-2 + 1e-12  # the peak lr, up to float64 schedule rounding (1e-18)
    resumed = run_trainer(tmp_path / "resumed", config, eval_strategy="no", eval_on_start=False,
                          resume=tmp_path / "full" / "checkpoint-2")
    assert resumed.model_wrapped.get_lr() == engine.get_lr()
    expected, got = current_state(full), current_state(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_trainer_refuses_perturbation_ranks_at_once(hf_session, tmp_path):
    """It used to say train_batch_size != micro × accumulation × data-parallel size, whose advice (drop
    train_batch_size) led to a BatchError: the Trainer shards by process and cannot drive perturbation ranks."""
    config = trainer_ds_config(zo2=zo2_section(parallel={"perturbation": 2}))
    with pytest.raises(ConfigError) as info:
        run_trainer(tmp_path / "run", config)
    assert str(info.value).startswith("zo2.parallel.perturbation is 2, but the HF Trainer and Accelerate cannot "
                                      "drive perturbation ranks: they shard the data by process")
    assert "Set zo2.parallel.perturbation to 1" in str(info.value)


def test_trainer_config_helper_makes_a_shipped_config_usable(hf_session, tmp_path):
    """ds_configs/zo2_mezo_none.json has no zero_optimization, which Accelerate's plugin requires."""
    shipped = ROOT / "ds_configs" / "zo2_mezo_none.json"
    config = trainer_config(shipped)
    assert config["zero_optimization"] == {"stage": 0} and config["train_micro_batch_size_per_gpu"] == "auto"
    assert config["optimizer"] == json.loads(shipped.read_text())["optimizer"]
    with pytest.raises(ConfigError, match="no 'zo2' section"):
        trainer_config({"train_micro_batch_size_per_gpu": 4})
    # 30 rows, batch 4, drop_last: 7 micro-batches an epoch, GA 2 -> 3 full steps and one short one per epoch
    trainer = run_trainer(tmp_path / "run", config, learning_rate=1e-6, weight_decay=0.0, warmup_steps=0,
                          max_steps=-1, num_train_epochs=2, save_strategy="no", eval_strategy="no",
                          eval_on_start=False, dataloader_drop_last=True, train_rows=30)
    assert trainer.state.global_step == trainer.model_wrapped.global_steps == 8


def test_trainer_stage3_offload_trains_only_the_lora_adapter(hf_session, tmp_path):
    """A PEFT model under ZeRO-3 CPU offload: base weights bitwise unchanged, adapter trained, adapter saved."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(make_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           task_type="CAUSAL_LM"))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = trainer_ds_config(zero_optimization={"stage": 3, "offload_param": {"device": "cpu"}})
    trainer = run_trainer(tmp_path / "run", config, model=model, eval_strategy="no", eval_on_start=False)
    engine = trainer.model_wrapped
    assert engine.zero_optimization_stage() == 3 and engine.global_steps == 4
    now = engine.parameter_snapshot()
    lora = [n for n in start if "lora_" in n]
    assert lora and all(not torch.equal(now[n], start[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(now[n], start[n]) for n in start if "lora_" not in n), "a base weight changed"
    ckpt = tmp_path / "run" / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    resumed = run_trainer(tmp_path / "resumed", config, model=get_peft_model(
        make_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
        eval_strategy="no", eval_on_start=False, resume=tmp_path / "run" / "checkpoint-2")
    again = resumed.model_wrapped.parameter_snapshot()
    assert all(torch.equal(now[n], again[n]) for n in now)


# ------------------------------------------------------------------------------------- Trainer lifecycle
QUIET = dict(eval_strategy="no", eval_on_start=False, save_strategy="no")
ZERO_STAGES = {"stage0": {"stage": 0}, "stage1": {"stage": 1}, "stage2": {"stage": 2},
               "stage3-cpu": {"stage": 3, "offload_param": {"device": "cpu"}}}
CONFIG_SECTIONS = {
    "trainer-optimizer": {},
    "config-optimizer-and-scheduler": {
        "optimizer": {"type": "SGD", "params": {"lr": "auto", "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                           "warmup_num_steps": "auto", "total_num_steps": "auto"}}},
}


def eval_loss_of(model) -> float:
    """The Trainer's eval_loss computed by hand: one batch of the 8 evaluation rows."""
    rows = lm_rows(8, seed=1)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        return float(model.eval()(**batch, use_cache=False).loss)


@pytest.mark.parametrize("sections", list(CONFIG_SECTIONS.values()), ids=list(CONFIG_SECTIONS))
@pytest.mark.parametrize("zero", list(ZERO_STAGES.values()), ids=list(ZERO_STAGES))
def test_trainer_evaluates_before_training_at_every_stage(hf_session, tmp_path, zero, sections):
    """MeZO's zero-shot baseline first. For any DeepSpeed engine the Trainer refuses this below stage 3 and at
    stage 3 drops the optimizer section (and fills the schedule with 0 steps) for good; with zo2 it evaluates
    at every stage, and the training that follows is the one a Trainer that never evaluated runs."""
    config = trainer_ds_config(zero_optimization=zero, **sections)
    trainer = make_trainer(tmp_path / "first", config, **QUIET)
    baseline = trainer.evaluate()["eval_loss"]
    assert baseline == eval_loss_of(make_model("llama"))  # the model's own loss on the same batch: the same bits
    evaluator = trainer.model_wrapped
    assert type(evaluator).__name__ == "ZO2Engine" and evaluator.optimizer is None  # it only evaluates
    trainer.train()
    engine = trainer.model_wrapped
    assert engine is not evaluator and evaluator._closed and engine.global_steps == trainer.state.global_step == 4
    assert engine.zero_optimization_stage() == zero["stage"]
    reference = run_trainer(tmp_path / "reference", config, **QUIET)
    assert logged(trainer, "loss") == logged(reference, "loss")
    assert logged(trainer, "learning_rate") == logged(reference, "learning_rate")
    ours, theirs = engine.parameter_snapshot(), reference.model_wrapped.parameter_snapshot()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert trainer.evaluate()["eval_loss"] == reference.evaluate()["eval_loss"] != baseline


@pytest.mark.parametrize("zero", [ZERO_STAGES["stage0"], ZERO_STAGES["stage3-cpu"]], ids=["stage0", "stage3-cpu"])
def test_second_train_in_one_process_is_a_new_run_on_the_current_weights(hf_session, tmp_path, zero):
    """train, evaluate, train more. Accelerate's free_memory() at the start of train() drops the engine and the
    Trainer would not prepare again (for any DeepSpeed engine: 'NoneType' object has no attribute 'backward');
    with zo2 the second train() prepares a new engine on the trained weights, as a fresh Trainer would."""
    from transformers import set_seed
    config = trainer_ds_config(zero_optimization=zero)
    trainer = make_trainer(tmp_path / "twice", config, **QUIET)
    trainer.train()
    first = trainer.model_wrapped
    trained = first.parameter_snapshot()
    trainer.evaluate()
    set_seed(0)  # the data order of a fresh Trainer
    trainer.train()
    second = trainer.model_wrapped
    assert second is not first and first._closed
    assert second.global_steps == trainer.state.global_step == 4 and sorted(logged(trainer, "loss")) == [1, 2, 3, 4]
    model = make_model("llama")
    model.load_state_dict(trained, strict=False)
    fresh = run_trainer(tmp_path / "fresh", config, model=model, **QUIET)
    ours, theirs = second.parameter_snapshot(), fresh.model_wrapped.parameter_snapshot()
    assert any(not torch.equal(ours[n], trained[n]) for n in ours)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_model_init_trials_close_the_previous_engine_and_start_afresh(hf_session, tmp_path):
    """hyperparameter_search runs train() once per trial with a new model from model_init; the Trainer then
    holds the previous engine only as trainer.deepspeed. It is closed, and each trial is a fresh run."""
    config = trainer_ds_config(zero_optimization=ZERO_STAGES["stage3-cpu"])
    trainer = make_trainer(tmp_path / "trials", config, model_init=lambda *trial: make_model("llama"), **QUIET)
    trainer.train()
    first = trainer.model_wrapped
    first_result = first.parameter_snapshot()
    trainer.train()  # the next trial
    second = trainer.model_wrapped
    assert second is not first and first._closed and not second._closed
    assert trainer.deepspeed is second and second.global_steps == 4
    ours = second.parameter_snapshot()
    assert all(torch.equal(ours[n], first_result[n]) for n in ours)  # same seed, same data: the same trial again


def test_trainer_hook_passes_other_configs_through(hf_session, tmp_path):
    """The patched deepspeed_init is what the Trainer calls, and without a zo2 section it is transformers' own."""
    import transformers.integrations.deepspeed as integration
    import transformers.trainer
    from zo2_deepspeed.hf import trainer_deepspeed_init
    assert transformers.trainer.deepspeed_init is trainer_deepspeed_init is integration.deepspeed_init
    plain = {k: v for k, v in trainer_ds_config().items() if k != "zo2"}
    trainer = make_trainer(tmp_path / "plain", plain, **QUIET)
    with pytest.raises(ValueError, match="ZeRO inference only makes sense with ZeRO Stage 3"):
        trainer.evaluate()
    zo2_deepspeed.unpatch_deepspeed()
    assert transformers.trainer.deepspeed_init is integration.deepspeed_init is not trainer_deepspeed_init


# ------------------------------------------------------------------------------------- the engine's DS surface
def test_engine_surface_for_accelerate_and_trainer():
    from deepspeed import DeepSpeedEngine
    config = ds_config("none", micro_batch=4, gas=2)
    engine, optimizer, _, _ = zo2_deepspeed.initialize(model=make_model(), config=config)
    assert isinstance(engine, DeepSpeedEngine) and engine.get_global_grad_norm() is None
    assert engine.generate.__func__ is type(engine.module).generate  # attributes fall through to the module
    with engine.no_sync():
        pass
    with pytest.raises(ConfigError, match="torch.compile is not supported"):
        engine.compile()
    assert not engine.zero_gather_16bit_weights_on_model_save()
    batch = batches(1)[0]
    engine.set_gradient_accumulation_boundary(True)  # Accelerate decides: a step after one micro-batch
    loss = engine(**batch)
    assert engine.backward(loss, scale_wrt_gas=False) is loss
    engine.step()
    assert engine.global_steps == 1
    assert engine.get_global_grad_norm() == abs(engine.last_step["projected_grad"][0])  # IEEE: √(c²) = |c|
    stale = {n: p.detach().clone() for n, p in engine.module.named_parameters()}  # the update is deferred
    state = engine.module.state_dict()  # so this flushes it first, for Accelerate's and the Trainer's saves
    fresh = engine.parameter_snapshot()
    assert all(torch.equal(state[k], fresh[k]) for k in fresh)
    assert any(not torch.equal(stale[k], fresh[k]) for k in fresh)
    engine.destroy()  # Accelerate's free_memory(): the engine stays usable
    engine(**batch)
    engine.step()
    assert engine.global_steps == 2
    engine.close()


def test_num_items_in_batch_scales_only_the_returned_loss():
    """The Trainer's loss normalisation changes what it logs, never the ZO update."""
    batch = batches(1, pad_last=3)[0]
    plain, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none"))
    scaled, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none"))
    a = plain(**batch)
    b = scaled(**batch, num_items_in_batch=torch.tensor(100))
    tokens = int(batch["attention_mask"][:, 1:].sum())
    # both are the fp32 rounding of one float64 estimate (times tokens/100 for b): within 2 fp32 ulps (1.2e-7)
    assert float(b) == pytest.approx(float(a) * tokens / 100, rel=1e-6)
    assert torch.equal(a.group_losses, b.group_losses)
    plain.step(), scaled.step()
    pa, pb = plain.parameter_snapshot(), scaled.parameter_snapshot()
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    plain.close(), scaled.close()


def test_client_optimizer_groups_are_shared_so_its_scheduler_drives_the_lr():
    model = make_model()
    config = ds_config("none")
    del config["optimizer"]
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(adamw, lambda k: 0.5 ** k)
    engine, optimizer, _, _ = zo2_deepspeed.initialize(model=model, config=config, optimizer=adamw)
    assert isinstance(optimizer, ZOSGD) and optimizer.param_groups[0] is adamw.param_groups[0]
    for batch in batches(2):
        engine(**batch)
        engine.step()
        schedule.step()
    assert engine.get_lr() == [2.5e-3] and engine.last_step["lr"] == 5e-3
    engine.close()
    with pytest.raises(ConfigError, match="both a client optimizer"):
        zo2_deepspeed.initialize(model=make_model(), config=ds_config("none"), optimizer=adamw)
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    with pytest.raises(ConfigError, match="momentum"):
        zo2_deepspeed.initialize(model=model, config=config, optimizer=sgd)


# ------------------------------------------------------------------------------------- PEFT
def lora_model(arch: str = "llama"):
    from peft import LoraConfig, get_peft_model
    targets = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}[arch]
    return get_peft_model(make_model(arch), LoraConfig(r=4, lora_alpha=8, target_modules=targets))


def assert_only_the_adapter_trains(engine, start: dict, data: list) -> None:
    """Trains on ``data``; base weights must stay bitwise equal to ``start``, every lora_B must move."""
    for b in data:
        engine(**b)
        engine.step()
    now = engine.parameter_snapshot()
    engine.close()
    assert all(torch.equal(now[n], start[n]) for n in start if "lora_" not in n), "a base weight changed"
    assert all(not torch.equal(now[n], start[n]) for n in start if "lora_B" in n)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_wrapped_model_blocks_and_adapter_only_training(arch):
    model = lora_model(arch)
    plain_blocks = find_blocks(make_model(arch))
    blocks = find_blocks(model)
    assert len(blocks) == len(plain_blocks)
    layer_slots = [s.name for b in blocks for s in b.slots if ".h." in b.name or ".layers." in b.name]
    assert any("lora_A" in n for n in layer_slots)  # adapters are part of their decoder layer's block
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = batches(1)[0]
    with torch.no_grad():
        reference = float(model.get_base_model().eval()(**batch, use_cache=False).loss)
    seen = []
    model.get_base_model().register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("use_cache")),
                                                     with_kwargs=True)
    engine, *_ = zo2_deepspeed.initialize(model=model, config=ds_config("none", lr=1e-2))
    estimate = float(engine(**batch))
    assert seen == [False], "use_cache=False must reach the model through the PEFT wrapper"
    # (L(θ+εz) + L(θ−εz))/2 − L(θ) = ε²/2 · zᵀ∇²L z + O(ε⁴): ε = 1e-3 makes it ~1e-6 · curvature, far below 1e-3
    assert abs(estimate - reference) < 1e-3
    engine.step()
    assert_only_the_adapter_trains(engine, start, batches(2, seed=3))


# ------------------------------------------------------------------------------------- monitors
def test_monitor_sections_receive_loss_lr_and_bytes_moved(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    config = ds_config("cpu", lr=1e-2)
    config["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "zo"}
    config["tensorboard"] = {"enabled": True, "output_path": str(tmp_path / "tb"), "job_name": "zo"}
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=config)
    losses = []
    for batch in batches(3):
        engine(**batch)
        engine.step()
        losses.append(engine.last_step["loss"])
    steps = [4, 8, 12]  # global samples, as DeepSpeedEngine reports them
    series = {}
    for name in ("train_loss", "lr", "bytes_moved"):
        with (tmp_path / "csv" / "zo" / f"Train_Samples_{name}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [int(r["step"]) for r in rows] == steps
        series[name] = [float(r[name]) for r in rows]
    assert series["lr"] == [1e-2] * 3 and all(b > 0 for b in series["bytes_moved"])
    assert series["train_loss"] == losses  # written as the float the step reported
    events = EventAccumulator(str(tmp_path / "tb" / "zo"))
    events.Reload()
    wanted = {"Train/Samples/train_loss", "Train/Samples/lr", "Train/Samples/bytes_moved"}
    assert wanted <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("Train/Samples/train_loss")] == steps
    assert [e.value for e in events.Scalars("Train/Samples/bytes_moved")] == series["bytes_moved"]
    engine.close()


# ------------------------------------------------------------------------------------- Accelerate
ACCELERATE_SCRIPT = '''
"""A plain Accelerate training loop; the only zo2 line is patch_deepspeed()."""
import json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
import zo2_deepspeed
zo2_deepspeed.patch_deepspeed()
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from tiny_models import batches, make_model

out = sys.argv[2]
# on a machine without an accelerator, Accelerate counts every rank as one process unless given a backend
handlers = [InitProcessGroupKwargs(backend="gloo")] if sys.argv[3] == "gloo" else []
accelerator = Accelerator(kwargs_handlers=handlers)
model = make_model("llama")
start = {n: p.detach().clone() for n, p in model.named_parameters()}
rows = [{k: v[i] for k, v in b.items()} for b in batches(4, rows=8, seed=5) for i in range(8)]
loader = torch.utils.data.DataLoader(rows, batch_size=4, shuffle=False)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
lrs, seen = [], []
for batch in loader:
    seen += [row[:4].tolist() for row in batch["input_ids"]]
    with accelerator.accumulate(model):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    if accelerator.sync_gradients:
        lrs.append(model.last_step["lr"])
unwrapped = accelerator.unwrap_model(model)
state = accelerator.get_state_dict(model)
rank = torch.distributed.get_rank()
if rank == 0:
    accelerator.save_model(model, os.path.join(out, "model"))
result = {"engine": type(model).__name__, "unwrapped": type(unwrapped).__name__,
          "optimizer": type(optimizer.optimizer).__name__, "global_steps": model.global_steps,
          "world_size": model.world_size, "lrs": lrs, "seen": seen,
          "moved": sum(not torch.equal(state[n].cpu(), start[n]) for n in start),
          "checksum": float(sum(v.double().sum() for v in state.values()))}
with open(os.path.join(out, f"result{rank}.json"), "w") as f:
    json.dump(result, f)
accelerator.end_training()
'''


def accelerate_launch(tmp_path: Path, processes: int, backend: str = "gloo", check: bool = True):
    from zo2_deepspeed.distributed import free_port
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "train_accelerate.py"
    script.write_text(ACCELERATE_SCRIPT)
    config = tmp_path / "ds_zo2.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2,
                                  "zero_optimization": {"stage": 0}, "zo2": zo2_section(seed=3)}))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
           "--deepspeed_config_file", str(config), "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(script), str(ROOT / "tests"), str(tmp_path), backend]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if not check:
        return result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(processes)]


def check_accelerate_run(result: dict, tmp_path: Path, processes: int = 1) -> None:
    steps = 4 // processes  # 32 rows in micro-batches of 4, split between the processes, accumulation 2
    assert (result["engine"], result["unwrapped"], result["optimizer"]) == ("ZO2Engine", "LlamaForCausalLM", "ZOSGD")
    assert result["global_steps"] == steps and result["moved"] > 0
    # the lr of each step comes from the script's own LambdaLR on its AdamW (1 / (1 + k)), which Accelerate
    # steps once per process at every boundary
    # (float64 schedule arithmetic in another order than this expression: approx's relative 1e-6 covers it)
    assert result["lrs"] == pytest.approx([1e-2 / (1 + processes * k) for k in range(steps)])
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "model" / "model.safetensors")
    assert "model.embed_tokens.weight" in saved and not any(k.startswith("module.") for k in saved)


def test_accelerate_launch_deepspeed_plugin_trains_with_zo2(tmp_path):
    """One process, and a plain Accelerator() as in the README."""
    (result,) = accelerate_launch(tmp_path, 1, backend="default")
    check_accelerate_run(result, tmp_path)
    assert result["world_size"] == 1 and len(result["seen"]) == 32


@pytest.mark.slow
@pytest.mark.multirank
def test_accelerate_launch_two_processes_shard_the_data(tmp_path):
    """With a backend Accelerate counts both processes and gives them disjoint halves of the 32 rows; the ranks
    stay identical (the group losses are all-reduced). Without one it counts a single process on a CPU-only
    machine (both ranks would see every batch): initialize refuses that run and names the fix."""
    results = accelerate_launch(tmp_path, 2)
    for result in results:
        check_accelerate_run(result, tmp_path, processes=2)
        assert result["world_size"] == 2 and len(result["seen"]) == 16
    assert results[0]["checksum"] == results[1]["checksum"]
    first, second = ({tuple(row) for row in r["seen"]} for r in results)
    assert len(first) == len(second) == 16 and not first & second
    everything = {tuple(row[:4].tolist()) for b in batches(4, rows=8, seed=5) for row in b["input_ids"]}
    assert first | second == everything
    refused = accelerate_launch(tmp_path / "plain", 2, backend="default", check=False)
    assert refused.returncode != 0
    assert ("Accelerate counts 1 process(es) but 2 ranks run, so each rank would see the batches of the others: on a "
            "machine without an accelerator give Accelerate a process-group backend, Accelerator(kwargs_handlers="
            "[InitProcessGroupKwargs(backend=\"gloo\")])") in refused.stderr, refused.stderr[-3000:]


TRAINER_SCRIPT = '''
"""The HF Trainer on two CPU processes under torchrun; argv: tests dir, output dir, "configured" or "plain"."""
import json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
import zo2_deepspeed
zo2_deepspeed.patch_deepspeed()
from accelerate import PartialState
from transformers import Trainer, TrainingArguments
from test_hf_integration import lm_rows, trainer_ds_config
from tiny_models import make_model

out, configured = sys.argv[2], sys.argv[3] == "configured"
extra = {}
if configured:  # Accelerate's state with a backend, made before TrainingArguments and kept by it
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch --use_deepspeed` sets
    PartialState(backend="gloo")
    extra = {"accelerator_config": {"use_configured_state": True}}
seen = []

def collate(rows):
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    seen.extend(batch["input_ids"][:, :4].tolist())
    return batch

args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
                         learning_rate=1e-2, report_to=[], disable_tqdm=True, save_strategy="no", seed=0,
                         deepspeed=trainer_ds_config(), **extra)
trainer = Trainer(model=make_model("llama"), args=args, train_dataset=lm_rows(32), data_collator=collate)
trainer.train()
rank = torch.distributed.get_rank()
with open(os.path.join(out, f"result{rank}.json"), "w") as f:
    json.dump({"processes": trainer.accelerator.num_processes, "steps": trainer.model_wrapped.global_steps,
               "seen": seen, "checksum": float(sum(v.double().sum() for v in trainer.model.state_dict().values()))}, f)
'''


@pytest.mark.slow
@pytest.mark.multirank
def test_trainer_on_two_cpu_processes_shards_the_data(tmp_path):
    """The Trainer builds Accelerate's state itself and passes no backend under DeepSpeed (its ddp_backend is not
    used there): a state configured beforehand with one shards the data; without it initialize refuses the run."""
    from zo2_deepspeed.distributed import free_port
    script = tmp_path / "train_trainer.py"
    script.write_text(TRAINER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")

    def launch(mode: str) -> subprocess.CompletedProcess:
        (tmp_path / mode).mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(script), str(ROOT / "tests"), str(tmp_path / mode), mode]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    result = launch("configured")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [json.loads((tmp_path / "configured" / f"result{r}.json").read_text()) for r in range(2)]
    assert [(r["processes"], r["steps"]) for r in ranks] == [(2, 2), (2, 2)]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    first, second = ({tuple(row) for row in r["seen"]} for r in ranks)
    assert len(first) == len(second) == 16 and not first & second
    assert first | second == {tuple(r["input_ids"][:4].tolist()) for r in lm_rows(32)}
    refused = launch("plain")
    assert refused.returncode != 0
    assert "Accelerate counts 1 process(es) but 2 ranks run" in refused.stderr, refused.stderr[-3000:]


def test_lora_added_to_a_model_born_as_partitions_trains_only_the_adapter():
    """zero_init builds the base as partitions; adapters added afterwards are partitioned at initialize."""
    from peft import LoraConfig, get_peft_model
    config = ds_config("cpu", lr=1e-2)
    # GPT-2: no padding row, whose HF init would index an empty partition when built by the class constructor
    with zo2_deepspeed.zero_init(config):
        base = make_model("gpt2")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    loose = [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")]
    assert loose and all("lora_" in n for n in loose)
    engine, *_ = zo2_deepspeed.initialize(model=model, config=config)
    assert all(hasattr(p, "ds_id") for p in model.parameters())
    assert_only_the_adapter_trains(engine, engine.parameter_snapshot(), batches(3, seed=5))

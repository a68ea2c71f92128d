"""The DeepSpeedEngine surface users touch, input errors, and the one-key switch to first-order ZeRO."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

import deepspeed
import zo2_deepspeed
from conftest import ds_config
from zo2_deepspeed import BatchError, ConfigError
from zo2_deepspeed.optimizer import ZOSGD
from tiny_models import batches, make_model


def test_initialize_returns_the_deepspeed_four_tuple():
    config = ds_config("cpu", micro_batch=4, gas=2)
    config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 1e-3,
                                                           "warmup_num_steps": 4, "warmup_type": "linear"}}
    data = [{k: v[i] for k, v in batches(1, rows=32)[0].items()} for i in range(32)]
    engine, optimizer, loader, scheduler = zo2_deepspeed.initialize(model=make_model(), config=config,
                                                                    training_data=data)
    assert isinstance(optimizer, torch.optim.Optimizer) and isinstance(optimizer, ZOSGD)
    assert engine.optimizer is optimizer and engine.lr_scheduler is scheduler
    assert engine.train_micro_batch_size_per_gpu() == 4 and engine.gradient_accumulation_steps() == 2
    assert engine.train_batch_size() == 8
    assert engine.zero_optimization_stage() == 3 and engine.zero_optimization_partition_weights()
    assert isinstance(engine.module, torch.nn.Module) and engine.training
    assert len(loader) == 8
    lrs = []
    for batch in loader:
        assert not engine.is_gradient_accumulation_boundary() or engine.micro_steps % 2 == 1
        loss = engine(batch)
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert engine.backward(loss) is loss
        engine.step()
        lrs.append(engine.get_lr()[0])
    assert engine.micro_steps == 8 and engine.global_steps == 4 and engine.global_samples == 32
    # WarmupLR (linear): iteration k after the k+1-th boundary; the lr moves at boundaries only (DeepSpeed's
    # float64 schedule arithmetic rounds in another order than these literals; approx's relative 1e-6 covers it)
    assert lrs == pytest.approx([1e-4, 1e-4, 1e-4, 3.25e-4, 3.25e-4, 5.5e-4, 5.5e-4, 7.75e-4])
    engine.close()


def test_gradient_accumulation_averages_losses_of_one_seed():
    data = batches(2, rows=2, seed=7)
    joined = {k: torch.cat([data[0][k], data[1][k]]) for k in data[0]}
    a, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none", micro_batch=2, gas=2))
    for batch in data:
        a(**batch)
        a.backward(None)
        a.step()
    b, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none", micro_batch=4, gas=1))
    b(**joined)
    b.step()
    # exact: the group losses are float64 sums of the same fp32 token losses, rounded to fp32 once per step
    # (tests/test_determinism.py), so the split and the joined batch give the same step bit for bit
    assert a.last_step["group_losses"] == b.last_step["group_losses"]
    pa, pb = a.parameter_snapshot(), b.parameter_snapshot()
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    a.close(), b.close()


def test_returned_loss_is_the_unperturbed_estimate_and_eval_is_plain():
    batch = batches(1)[0]
    model = make_model()
    reference = make_model()
    engine, *_ = zo2_deepspeed.initialize(model=model, config=ds_config("cpu", lr=0.0))
    loss = float(engine(**batch))
    plus, minus = engine._loss_tally.means().tolist()
    assert loss == float(torch.tensor((plus + minus) / 2, dtype=torch.float32))  # the estimate, returned as fp32
    engine.step()
    engine.eval()
    out = engine(**batch)
    with torch.no_grad():
        expected = reference.eval()(**batch, use_cache=False)
    assert torch.equal(out.logits, expected.logits) and float(out.loss) == float(expected.loss)
    # (L(θ+εz) + L(θ−εz))/2 − L(θ) = ε²/2 · zᵀ∇²L z + O(ε⁴): with ε = 1e-3, 1e-3 allows zᵀ∇²L z up to 2000,
    # orders of magnitude above a tiny model's curvature along a Gaussian z
    assert abs(loss - float(expected.loss)) < 1e-3
    engine.close()


def test_dict_positional_and_tuple_inputs():
    batch = batches(1)[0]
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none", lr=0.0))
    a = engine(batch)
    b = engine(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    assert torch.equal(a, b)
    engine.close()


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b.pop("input_ids"), "the batch has no 'input_ids' tensor"),
    (lambda b: b.update({k: torch.cat([v, v[:1]]) for k, v in b.items()}),
     "the batch has 5 rows but train_micro_batch_size_per_gpu is 4: a training micro-batch holds 1 to 4 rows"),
    (lambda b: b.update(labels=b["labels"][:, :5]), "labels must have the shape of input_ids (4, 16), got (4, 5)"),
    (lambda b: b.pop("labels"), "the batch has no 'labels'"),
    (lambda b: b.update(input_ids=b["input_ids"][0]), "input_ids must be [batch, sequence], got shape (16,)"),
    (lambda b: b.update(labels=torch.full_like(b["labels"], -100)), "labels hold no position to predict"),
])
def test_bad_batches_are_named(mutate, message):
    batch = batches(1)[0]
    mutate(batch)
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none"))
    with pytest.raises(BatchError) as info:
        engine(**batch)
    assert message in str(info.value)
    engine.close()


def test_custom_loss_fn_sees_one_group_at_a_time():
    batch = batches(1)[0]
    seen = []

    def last_token_loss(outputs, batch):
        seen.append(outputs.logits.shape[0])
        logits = outputs.logits[:, -2, :].float()
        return torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, -1], reduction="none")

    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none"), loss_fn=last_token_loss)
    del batch["labels"]
    loss = engine(**batch)
    assert seen == [4, 4] and torch.isfinite(loss)
    engine.step()
    engine.close()


def test_step_without_forward_is_an_error():
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none"))
    with pytest.raises(RuntimeError, match="engine.step\\(\\) without a training forward"):
        engine.step()
    engine.close()


def test_config_from_args_and_path(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config("none")))
    args = argparse.Namespace(deepspeed_config=str(path), local_rank=0)
    engine, *_ = zo2_deepspeed.initialize(args=args, model=make_model())
    assert type(engine).__name__ == "ZO2Engine"
    engine.close()
    with pytest.raises(ConfigError, match="both as args.deepspeed_config and as config="):
        zo2_deepspeed.initialize(args=args, model=make_model(), config=ds_config("none"))


def test_without_zo2_section_it_is_plain_deepspeed():
    config = ds_config("cpu")
    del config["zo2"]
    config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}
    config["zero_optimization"]["offload_param"] = {"device": "none"}
    engine, optimizer, _, _ = zo2_deepspeed.initialize(model=make_model(), config=config)
    assert isinstance(engine, deepspeed.DeepSpeedEngine)
    batch = batches(1)[0]
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    assert engine.global_steps == 1


def test_patch_deepspeed_dispatches_deepspeed_initialize():
    """patch/unpatch, from whichever state the process is in (the installed switch patches at import), and back."""
    was_patched = getattr(deepspeed.initialize, "_zo2_dispatch", False)
    zo2_deepspeed.patch_deepspeed()
    try:
        engine, *_ = deepspeed.initialize(model=make_model(), config=ds_config("none"))
        assert type(engine).__name__ == "ZO2Engine"
        engine.close()
    finally:
        zo2_deepspeed.unpatch_deepspeed()
        unpatched = deepspeed.initialize
        if was_patched:
            zo2_deepspeed.patch_deepspeed()
    assert unpatched.__module__.startswith("deepspeed") and not getattr(unpatched, "_zo2_dispatch", False)
    assert getattr(deepspeed.initialize, "_zo2_dispatch", False) == was_patched


def test_model_called_directly_streams_too():
    """generate()/a user's own eval loop on engine.module work on a partitioned model."""
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("cpu", lr=1e-2))
    batch = batches(1)[0]
    engine(**batch)
    engine.step()
    snapshot = engine.parameter_snapshot()
    reference = make_model()
    reference.load_state_dict(snapshot, strict=False)
    prompt = batch["input_ids"][:1, :4]
    ours = engine.module.generate(prompt, max_new_tokens=5, do_sample=False)
    theirs = reference.eval().generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours, theirs)
    engine.close()


def test_loss_reads_as_tensor_and_as_model_output():
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none"))
    out = engine(**batches(1)[0])
    assert isinstance(out, torch.Tensor) and out.dim() == 0 and f"{out:.3f}" == f"{float(out):.3f}"
    assert type(out.loss) is torch.Tensor and torch.equal(out.loss, out["loss"]) and torch.equal(out[0], out.loss)
    assert type(out * 2) is torch.Tensor and out.group_losses.shape == (2,)
    engine.step()
    engine.close()


def rows(n: int) -> list[dict]:
    """n single examples (the form a training dataset holds)."""
    return [{k: v[i] for k, v in batches(1, rows=n)[0].items()} for i in range(n)] if n else []


@pytest.mark.parametrize("examples, drop_last, message", [
    (10, True, "the training data gives no micro-batch (10 examples, train_micro_batch_size_per_gpu 16, world size 1, "
               "drop_last=True: 10 examples per rank, fewer than one micro-batch, so a training loop would never get a "
               "batch): give it at least 16 examples (micro-batch × world size) or set "
               "train_micro_batch_size_per_gpu to at most 10"),
    (0, True, "the training data is empty (0 examples, train_micro_batch_size_per_gpu 16, world size 1, "
              "drop_last=True): give it at least 16 examples"),
    (0, False, "the training data is empty (0 examples, train_micro_batch_size_per_gpu 16, world size 1, "
               "drop_last=False)"),
])
def test_training_data_without_a_batch_fails_before_the_model_is_touched(examples, drop_last, message):
    """A loader of length 0 made a training loop spin forever; now initialize refuses it at once."""
    model = make_model()
    config = ds_config("cpu", micro_batch=16)
    config["dataloader_drop_last"] = drop_last
    with pytest.raises(BatchError) as info:
        zo2_deepspeed.initialize(model=model, config=config, training_data=rows(examples))
    assert message in str(info.value)
    assert not any(hasattr(p, "ds_id") for p in model.parameters()), "the model was partitioned before the check"
    # without drop_last a partial batch counts: 10 rows give one (short) micro-batch
    config["dataloader_drop_last"] = False
    engine, _, loader, _ = zo2_deepspeed.initialize(model=make_model(), config=config, training_data=rows(10))
    assert len(loader) == 1
    engine.close()


def test_no_batch_message_names_the_world_size():
    from zo2_deepspeed.data import batches_per_epoch, require_batches
    assert batches_per_epoch(24, 8, 2, drop_last=True) == 1 and batches_per_epoch(23, 8, 2, drop_last=True) == 1
    assert batches_per_epoch(15, 8, 2, drop_last=True) == 0 and batches_per_epoch(1, 8, 2, drop_last=False) == 1
    with pytest.raises(BatchError, match=r"\(15 examples, train_micro_batch_size_per_gpu 8, world size 2, "
                                         r"drop_last=True: 7 examples per rank, .*: give it at least 16 examples "
                                         r"\(micro-batch × world size\) or set train_micro_batch_size_per_gpu to at "
                                         r"most 7$"):
        require_batches(15, 8, 2, drop_last=True)
    with pytest.raises(BatchError, match=r"0 examples per rank, .*at least 4 examples \(micro-batch × world size\) "
                                         r"or run fewer ranks$"):
        require_batches(1, 1, 4, drop_last=True)


def test_one_signature_check_serves_the_engine_and_the_tasks():
    """use_cache (engine) and logits_to_keep (classification task) are read through the same function,
    which looks through a PEFT wrapper's **kwargs at the wrapped model's forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    from zo2_deepspeed.tasks import forward_accepts
    plain = make_model()
    wrapped = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    for model in (plain, wrapped, LlamaForCausalLM):
        assert forward_accepts(model, "use_cache") and forward_accepts(model, "logits_to_keep")
        assert not forward_accepts(model, "no_such_input")
    assert not forward_accepts(torch.nn.Linear(2, 2), "use_cache")
    engine, *_ = zo2_deepspeed.initialize(model=wrapped, config=ds_config("none"))
    assert engine._call_kwargs == {"use_cache": False}
    engine.close()
    engine, *_ = zo2_deepspeed.initialize(model=torch.nn.Sequential(torch.nn.Embedding(8, 4)), config=ds_config("none"))
    assert engine._call_kwargs == {}
    engine.close()

"""The first-order tail (zo2.first_order): its update, the body's, tiers, accumulation, checkpoints, errors.

In-process on tiny models: each test builds one to four engines and trains a few steps (about 1-4 s each on
an idle 2-core machine). The multi-rank and SIGKILL tests are in test_first_order_ranks.py (slow).
"""
from __future__ import annotations

import logging

import pytest
import torch

import zo2_deepspeed
from conftest import ds_config
from reference_hybrid import reference_hybrid
from tiny_models import batches, make_model
from zo2_deepspeed import ConfigError, ModelStructureError
from zo2_deepspeed.first_order.tail import pieces

TAIL = {"model.layers.1", "model.norm", "lm_head"}
"""The tail of a 2-layer tiny LLaMA with blocks 1 and the head."""


def hybrid_config(tier: str = "none", method: str = "mezo", first_order: dict | None = None, **kwargs) -> dict:
    """ZO at lr 1e-2 with a tail of blocks 1 and the head (or ``modules``), SGD at lr 1e-2 unless ``first_order`` says."""
    config = ds_config(tier, method=method, lr=1e-2, eps=1e-2, num_perturbations=3, hessian_smooth=0.1, **kwargs)
    section = {"blocks": 1, "head": True, "max_fraction": 0.9, "optimizer": {"type": "SGD", "params": {"lr": 1e-2}}}
    if "modules" in (first_order or {}):
        del section["blocks"], section["head"]
    config["zo2"]["first_order"] = {**section, **(first_order or {})}
    return config


def train(engine, data) -> None:
    for batch in data:
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()


def run(config: dict, data, model=None, close: bool = True):
    engine, *_ = zo2_deepspeed.initialize(model=model or make_model(), config=config)
    train(engine, data)
    snapshot = engine.parameter_snapshot()
    records = engine.last_step
    if close:
        engine.close()
    return snapshot, records, engine


def tail_names(model) -> set[str]:
    """First names of the tail's parameters in a tiny LLaMA (the tied embedding is named model.embed_tokens)."""
    names = {n for n, _ in model.named_parameters() if n.startswith(("model.layers.1.", "model.norm", "lm_head"))}
    if model.get_input_embeddings().weight is model.get_output_embeddings().weight:
        names.add("model.embed_tokens.weight")
    return names


def relative_error(got: dict, expected: dict, names) -> float:
    diff = sum(float((got[n].double() - expected[n].double()).pow(2).sum()) for n in names) ** 0.5
    return diff / sum(float(expected[n].double().pow(2).sum()) for n in names) ** 0.5


def assert_close(got: dict, expected: dict, tail: set[str], start: dict) -> None:
    """The updates of the body and of the tail each within 1e-4 (relative) of the reference's. A wrong group weight,
    a perturbed tail or a gradient through the body would be off by order 1; rounding is not: the engine runs the
    groups batched, and a one-ulp loss difference reaches the ZO step as ulp/2ε."""
    moved = {n: got[n] - start[n] for n in got}
    reference = {n: expected[n] - start[n] for n in expected}
    for part in (tail, set(expected) - tail):
        assert relative_error(moved, reference, part) <= 1e-4, (sorted(part)[:2], relative_error(moved, reference, part))


@pytest.fixture
def ds_messages():
    """Messages DeepSpeed's logger emits during the test (INFO and above)."""
    from deepspeed.utils import logger
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)


# ------------------------------------------------------------------------------------- against the reference loop
@pytest.mark.parametrize("method, optimizer", [("mezo", "sgd"), ("mezo", "adamw"), ("fzoo", "sgd"),
                                               ("hizoo", "sgd")])
def test_tail_and_body_updates_equal_the_reference_loop(method, optimizer):
    """The tail's update is an optimizer step on the autograd gradient, weighted over the perturbed forwards as the
    method says; the body's is the method's ZO update from the same losses (tied LLaMA: the tied embedding is
    first-order, from the head's gradient only)."""
    data = batches(3)
    config = hybrid_config(method=method, first_order={"optimizer": {
        "type": "SGD" if optimizer == "sgd" else "AdamW", "params": {"lr": 1e-2}}})
    got, _, engine = run(config, data)
    start = make_model()
    reference = make_model()
    history = reference_hybrid(reference, data, tail_names(reference), method=method, lr=1e-2, eps=1e-2, seed=1,
                               tail_optimizer=optimizer, tail_lr=1e-2, n=3, alpha=0.1)
    expected = {n: p.detach() for n, p in reference.named_parameters()}
    assert_close(got, expected, tail_names(reference), {n: p.detach() for n, p in start.named_parameters()})
    moved = {n for n, p in start.named_parameters() if not torch.equal(got[n], p.detach())}
    assert moved == {n for n, _ in start.named_parameters()}, "every parameter trains, body and tail"
    assert engine.last_step["group_losses"] == pytest.approx(history[-1], abs=1e-6)


def test_one_step_of_sgd_moves_the_tail_by_lr_times_the_mean_gradient():
    """After one step with SGD (no body training: ZO lr 0), tail delta = −lr · ½(∇L(θ+εz) + ∇L(θ−εz))."""
    batch = batches(1)
    config = hybrid_config(first_order={"optimizer": {"type": "SGD", "params": {"lr": 1.0}}})
    config["optimizer"]["params"]["lr"] = 0.0
    got, _, _ = run(config, batch)
    reference = make_model()
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    reference_hybrid(reference, batch, tail_names(reference), lr=0.0, tail_lr=1.0)
    for name in tail_names(reference):
        expected_delta = dict(reference.named_parameters())[name].detach() - before[name]
        assert expected_delta.abs().max() > 1e-4, name
        assert torch.allclose(got[name] - before[name], expected_delta, rtol=1e-4, atol=1e-6), name
    for name in set(before) - tail_names(reference):
        assert torch.equal(got[name], before[name]), name  # lr 0: the body stays


# ------------------------------------------------------------------------------------- tiers, dtypes, accumulation
def test_every_tier_gives_the_same_bits():
    data = batches(3)
    runs = {tier: run(hybrid_config(tier, first_order={"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}),
                      data)[0] for tier in ("none", "device", "cpu")}
    for tier in ("device", "cpu"):
        assert all(torch.equal(runs[tier][n], runs["none"][n]) for n in runs["none"]), tier


def test_bf16_storage_keeps_fp32_masters_and_equal_tiers():
    """16-bit storage: the tail trains on fp32 masters (its updates are not rounded away), and the tiers agree."""
    data = batches(4)
    config = hybrid_config("cpu", storage_dtype="bf16", first_order={"optimizer": {"type": "SGD",
                                                                                   "params": {"lr": 1e-4}}})
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=config)
    train(engine, data)
    part = engine.first_order
    assert all(m.dtype == torch.float32 for m in part.residency.masters)
    master = dict(zip([s.name for s in part.selection.first_order], part.residency.masters))
    norm = master["model.norm.weight"]
    assert not torch.equal(norm, norm.to(torch.bfloat16).float()), "an lr 1e-4 update is below a bf16 ulp"
    cpu = engine.parameter_snapshot()
    engine.close()
    device = run(hybrid_config("device", storage_dtype="bf16", first_order={
        "optimizer": {"type": "SGD", "params": {"lr": 1e-4}}}), data)[0]
    assert all(torch.equal(cpu[n], device[n]) for n in cpu)


@pytest.mark.parametrize("method", ["mezo", "fzoo"])
def test_accumulation_over_chunks_equals_one_micro_batch_bit_for_bit(method):
    """8 rows in one micro-batch (chunk_rows 4: two chunks) = 2 accumulated micro-batches of 4 rows."""
    data = batches(3, rows=8)
    first_order = {"chunk_rows": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    whole, records, _ = run(hybrid_config(method=method, micro_batch=8, first_order=first_order), data)
    halves = [{k: v[r:r + 4] for k, v in b.items()} for b in data for r in (0, 4)]
    accumulated, records_gas, _ = run(hybrid_config(method=method, micro_batch=4, gas=2, first_order=first_order),
                                      halves)
    assert all(torch.equal(whole[n], accumulated[n]) for n in whole)
    assert records["first_order"]["grad_norm"] == records_gas["first_order"]["grad_norm"]


def test_pieces_cut_graded_groups_into_chunks_and_join_the_rest():
    assert [(p.start, p.stop, p.group, p.chunk) for p in pieces([0.5, 0.5], 4, 2)] == [
        (0, 2, 0, 0), (2, 4, 0, 1), (4, 6, 1, 0), (6, 8, 1, 1)]
    assert [(p.start, p.stop, p.group) for p in pieces([1.0, 0.0, 0.0, 0.0], 4, None)] == [(0, 4, 0), (4, 16, None)]


# ------------------------------------------------------------------------------------- checkpoints and export
def test_resume_mid_accumulation_with_16_bit_storage_is_bitwise(tmp_path):
    """The save lands between the two micro-batches of a step: the accumulated tail gradient, the fp32 masters
    (bf16 storage), AdamW's moments and the scheduler come back, and the run continues bit for bit."""
    data = batches(3, rows=8)
    halves = [{k: v[r:r + 4] for k, v in b.items()} for b in data for r in (0, 4)]
    first_order = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                   "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3, "warmup_max_lr": 1e-3}}}
    config = hybrid_config("cpu", micro_batch=4, gas=2, storage_dtype="bf16", first_order=first_order)
    straight, *_ = zo2_deepspeed.initialize(model=make_model(), config=config)
    train(straight, halves)
    expected = straight.parameter_snapshot()
    straight.close()
    first, *_ = zo2_deepspeed.initialize(model=make_model(), config=config)
    train(first, halves[:3])  # a step and a half
    assert not first.first_order.gradient.empty
    first.save_checkpoint(str(tmp_path))
    first.close()
    resumed, *_ = zo2_deepspeed.initialize(model=make_model(seed=5), config=config)
    resumed.load_checkpoint(str(tmp_path))
    assert resumed.first_order.lr_scheduler.last_batch_iteration == 0
    train(resumed, halves[3:])
    got = resumed.parameter_snapshot()
    resumed.close()
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    saved = sorted(p.name for p in (tmp_path / "global_step1").iterdir())
    assert "first_order.safetensors" in saved


def test_export_and_checkpoint_hold_the_tail_as_trained(tmp_path):
    """save_pretrained and zo2-export (from a checkpoint) both hold the first-order parameters' current values."""
    from transformers import AutoModelForCausalLM
    from zo2_deepspeed.export import export
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=hybrid_config("cpu"))
    train(engine, batches(2))
    live = engine.parameter_snapshot()
    engine.save_pretrained(str(tmp_path / "hf"))
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    engine.close()
    export(str(tmp_path / "ckpt"), str(tmp_path / "exported"))
    for directory in ("hf", "exported"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / directory)
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), live[name]), (directory, name)
    start = dict(make_model().named_parameters())
    assert not torch.equal(live["model.norm.weight"], start["model.norm.weight"].detach())


def test_close_puts_the_tail_back_in_its_tier():
    """After close() the model is as after a ZO run: partitions at rest, holding the trained values."""
    from zo2_deepspeed.tiers.partitioned import is_partitioned
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=hybrid_config("cpu"))
    train(engine, batches(2))
    trained = engine.parameter_snapshot()
    model = engine.module
    engine.close()
    norm = model.model.norm.weight
    assert is_partitioned(norm) and norm.numel() == 0
    assert torch.equal(norm.ds_tensor[:norm.ds_numel].view(norm.ds_shape), trained["model.norm.weight"])


# ------------------------------------------------------------------------------------- tied weights, PEFT, choices
def test_tied_embedding_is_first_order_and_logged_once(ds_messages):
    """The tied matrix leaves ZO (not perturbed, no ZO update), trains first-order, and the choice is logged."""
    engine, *_ = zo2_deepspeed.initialize(model=make_model(tied=True), config=hybrid_config())
    slot = next(s for s in engine.pipeline.slots if s.name == "model.embed_tokens.weight")
    assert slot.first_order and not slot.trainable and slot.pinned
    assert sum("model.embed_tokens.weight is tied" in m for m in ds_messages) == 1
    seen = []
    engine.module.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    train(engine, batches(1))
    plus, minus = seen[0].chunk(2)  # the embedding block's output for both groups, joined
    assert torch.equal(plus, minus), "both groups see the same (unperturbed) embedding"
    engine.close()


def test_untied_embedding_stays_zo():
    engine, *_ = zo2_deepspeed.initialize(model=make_model(tied=False), config=hybrid_config())
    by_name = {s.name: s for s in engine.pipeline.slots}
    assert by_name["model.embed_tokens.weight"].trainable and not by_name["lm_head.weight"].trainable
    assert engine.first_order.selection.tied == []
    engine.close()


def test_peft_adapters_in_the_tail_are_first_order_and_the_body_adapters_zo():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(make_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                    lora_dropout=0.0, bias="none", init_lora_weights=False))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    engine, *_ = zo2_deepspeed.initialize(model=model, config=hybrid_config())
    first_order = {s.name for s in engine.first_order.selection.first_order}
    assert first_order and all(".layers.1." in n and "lora_" in n for n in first_order)
    zo = {s.name for s in engine.pipeline.slots if s.trainable}
    assert zo and all(".layers.0." in n and "lora_" in n for n in zo)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(engine, batches(2))
    after = engine.parameter_snapshot()
    engine.close()
    assert all(not torch.equal(after[n], before[n]) for n in before), "both kinds of adapters train"
    assert all(torch.equal(after[n], base[n]) for n in base), "the frozen base weights stay bitwise"


def test_modules_select_the_tail_by_parameter_name():
    engine, *_ = zo2_deepspeed.initialize(model=make_model(tied=False), config=hybrid_config(
        first_order={"modules": [r"^lm_head\."]}))
    assert [b.name for b in engine.first_order.selection.blocks] == ["lm_head"]
    assert [s.name for s in engine.first_order.selection.first_order] == ["lm_head.weight"]
    before = engine.parameter_snapshot()
    train(engine, batches(2))
    after = engine.parameter_snapshot()
    engine.close()
    assert all(not torch.equal(after[n], before[n]) for n in before), "head first-order, the rest ZO"


def test_start_up_logs_the_memory_line(ds_messages):
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=hybrid_config(
        first_order={"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}))
    train(engine, batches(1))
    lines = [m for m in ds_messages if "first-order tail: blocks" in m]
    assert len(lines) == 1
    line = lines[0]
    for part in ("model.layers.1", "lm_head", "parameters", "gradients (float64 sums)", "optimizer state AdamW",
                 "activations measured at the first step", "on cpu"):
        assert part in line, part
    numel = engine.first_order.selection.first_order_numel
    assert engine.first_order.memory["optimizer_state"][0] == 8 * numel
    assert engine.first_order.memory["activations"][0] > 0
    engine.close()


# ------------------------------------------------------------------------------------- errors
def test_oversize_tail_is_refused_naming_the_cap():
    config = hybrid_config(first_order={"max_fraction": 0.25})
    with pytest.raises(ConfigError, match=r"zo2\.first_order\.max_fraction is 0\.25, but the first-order tail"):
        zo2_deepspeed.initialize(model=make_model(), config=config)


@pytest.mark.parametrize("section, message", [
    ({"blocks": 0, "head": False}, r"zo2\.first_order selects nothing"),
    ({"blocks": 1, "head": False}, r"zo2\.first_order\.head is false but blocks is 1"),
    ({"modules": ["lm_head"], "blocks": 1}, r"zo2\.first_order\.modules selects the tail .* drop zo2\.first_order\.blocks"),
    ({"modules": ["("]}, r"zo2\.first_order\.modules\[0\] '\(' is not a regular expression"),
    ({"optimizer": {"type": "Lamb", "params": {"lr": 1}}}, r"zo2\.first_order\.optimizer\.type must be one of"),
    ({"optimizer": {"type": "AdamW", "params": {}}}, r"zo2\.first_order\.optimizer\.params\.lr is required"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "momentum": 0.9}}},
     r"zo2\.first_order\.optimizer\.params\.momentum is not used by AdamW"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 1.0]}}},
     r"zo2\.first_order\.optimizer\.params\.betas\[1\] must be in \[0, 1\)"),
    ({"offload_optimizer": {"device": "nvme"}}, r"zo2\.first_order\.offload_optimizer\.device must be one of"),
    ({"scheduler": {"params": {}}}, r"zo2\.first_order\.scheduler must be an object with a \"type\""),
    ({"chunk_rows": 0}, r"zo2\.first_order\.chunk_rows must be >= 1"),
    ({"max_fraction": 0}, r"zo2\.first_order\.max_fraction must be > 0"),
    ({"blocks": 1, "head": True, "depth": 2}, r"zo2\.first_order\.depth is not a known field \(known fields: blocks"),
])
def test_bad_sections_are_named(section, message):
    config = ds_config()
    config["zo2"]["first_order"] = {"optimizer": {"type": "SGD", "params": {"lr": 1e-3}}, **section}
    with pytest.raises(ConfigError, match=message):
        zo2_deepspeed.parse_config(config)


@pytest.mark.parametrize("section, message", [
    ({"blocks": 3}, r"zo2\.first_order\.blocks is 3, but the model has 2 layers"),
    ({"blocks": 1, "chunk_rows": 3}, r"zo2\.first_order\.chunk_rows 3 does not divide train_micro_batch_size_per_gpu 4"),
    ({"modules": ["nothing_like_this"]}, r"zo2\.first_order\.modules \['nothing_like_this'\] matches no parameter"),
    ({"scheduler": {"type": "NoSuchLR"}}, r"zo2\.first_order\.scheduler\.type 'NoSuchLR' is neither"),
])
def test_bad_selections_are_named_at_initialize(section, message):
    config = hybrid_config()
    config["zo2"]["first_order"] = {"max_fraction": 0.9, "optimizer": {"type": "SGD", "params": {"lr": 1e-3}},
                                    **section}
    with pytest.raises(ConfigError, match=message):
        zo2_deepspeed.initialize(model=make_model(), config=config)


def test_frozen_tail_is_refused():
    model = make_model()
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith(("model.layers.1", "model.norm", "lm_head", "model.embed_tokens"))
    config = hybrid_config()
    with pytest.raises(ConfigError, match=r"hold no trainable parameter"):
        zo2_deepspeed.initialize(model=model, config=config)


def test_a_tail_that_does_not_run_last_is_refused_at_the_first_forward():
    config = hybrid_config(first_order={"modules": [r"embed_tokens"]})
    engine, *_ = zo2_deepspeed.initialize(model=make_model(tied=False), config=config)
    with pytest.raises(ModelStructureError, match=r"block 'model\.layers\.0' runs after 'model\.embed_tokens', a "
                                                  r"block of the first-order tail"):
        engine(**batches(1)[0])
    engine.close()


def test_without_first_order_nothing_changes():
    """No first_order: no tail, no pinned slot, the body forward under no_grad as before."""
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config())
    assert engine.first_order is None and engine.pipeline.tail is None
    assert not any(s.pinned or s.first_order for s in engine.pipeline.slots)
    engine.close()

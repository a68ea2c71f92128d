"""Streaming invariants: one fetch per parameter per step, z never kept, lr=0 is a no-op, tied weights once."""
from __future__ import annotations

import pytest
import torch

import zo2_deepspeed
from conftest import ds_config
from tiny_models import batches, make_model


def train(engine, data):
    for batch in data:
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()


@pytest.mark.parametrize("tier", ["none", "cpu"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_each_parameter_fetched_once_per_step(tier, prefetch):
    engine, *_ = zo2_deepspeed.initialize(model=make_model("llama", layers=3),
                                          config=ds_config(tier, prefetch_blocks=prefetch))
    train(engine, batches(4))
    fetches = {s.name: s.fetches for s in engine.pipeline.slots}
    assert set(fetches.values()) == {4}, fetches
    assert engine.pipeline.trace == [b.index for b in engine.blocks]  # embed, 3 layers, norm, head: call order
    per_step = engine.last_step["block_fetches"]
    # the head's only parameter is the tied embedding, already resident: nothing to fetch for it
    assert per_step == len(engine.blocks) - 1
    engine.close()


def test_tied_weight_is_one_slot_perturbed_and_updated_once():
    model = make_model("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    engine, *_ = zo2_deepspeed.initialize(model=model, config=ds_config("none"))
    tied = [s for s in engine.pipeline.slots if s.shared]
    assert [s.name for s in tied] == ["model.embed_tokens.weight"]
    assert {b.name for b in tied[0].owners} == {"model.embed_tokens", "lm_head"}
    train(engine, batches(2))
    # one z per step for the perturbation and one for the deferred update: 2 x trainable elements
    trainable = sum(s.numel for s in engine.pipeline.slots if s.trainable)
    assert engine.last_step["noise_elements"] == 2 * trainable
    engine.close()


def test_noise_is_not_kept_between_steps():
    engine, *_ = zo2_deepspeed.initialize(model=make_model("gpt2"), config=ds_config("cpu"))
    train(engine, batches(2))
    assert all(not s.noise and not s.resident for s in engine.pipeline.slots)
    assert engine.pool.bytes_in_use == 0
    largest_block = max(b.numel for b in engine.blocks) * 4
    model_bytes = sum(s.numel for s in engine.pipeline.slots) * 4
    # working copies + perturbed copies + z of at most a few blocks (and the tied embedding), never the model's z
    assert engine.pool.peak_bytes_in_use < model_bytes * 3
    assert engine.pool.peak_bytes_in_use >= 2 * largest_block
    engine.close()


@pytest.mark.parametrize("tier", ["none", "cpu"])
def test_lr_zero_leaves_parameters_bitwise_unchanged(tier):
    model = make_model("opt")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, *_ = zo2_deepspeed.initialize(model=model, config=ds_config(tier, lr=0.0, weight_decay=0.1))
    train(engine, batches(3))
    after = engine.parameter_snapshot()
    assert after.keys() == start.keys()
    assert all(torch.equal(after[n], start[n]) for n in start)
    engine.close()


def test_frozen_parameters_are_not_trained():
    model = make_model("llama")
    for name, p in model.named_parameters():
        p.requires_grad = "layers.1" in name
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, *_ = zo2_deepspeed.initialize(model=model, config=ds_config("cpu"))
    train(engine, batches(2))
    after = engine.parameter_snapshot()
    for name in start:
        changed = not torch.equal(after[name], start[name])
        assert changed == ("layers.1" in name), name
    engine.close()


def test_weight_decay_skips_biases_and_norms():
    engine, optimizer, _, _ = zo2_deepspeed.initialize(model=make_model("gpt2"), config=ds_config("none",
                                                                                                 weight_decay=0.1))
    decays = [g["weight_decay"] for g in optimizer.param_groups]
    assert decays == [0.1, 0.0]
    no_decay = {id(p) for p in optimizer.param_groups[1]["params"]}
    names = [n for n, p in engine.module.named_parameters() if id(p) in no_decay]
    assert names and all(n.endswith("bias") or ".ln_" in n for n in names)
    engine.close()


def test_pending_update_is_applied_before_eval_and_snapshot():
    """The deferred update is never lost: eval after step t sees θ_{t+1}."""
    data = batches(2)
    engine, *_ = zo2_deepspeed.initialize(model=make_model("llama"), config=ds_config("cpu", lr=1e-2))
    train(engine, data[:1])
    engine.eval()
    eval_loss = float(engine(**data[1]).loss)
    snapshot = engine.parameter_snapshot()
    reference = make_model("llama")
    reference.load_state_dict(snapshot, strict=False)
    reference.eval()
    with torch.no_grad():
        expected = float(reference(**data[1], use_cache=False).loss)
    assert eval_loss == expected
    engine.close()

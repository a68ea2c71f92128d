"""Storage: models born as partitions (zero_init / from_pretrained), 16-bit partitions with stochastic rounding."""
from __future__ import annotations

import pytest
import torch

import zo2_deepspeed
from conftest import ds_config
from tiny_models import batches, make_model
from zo2_deepspeed.rounding import stochastic_round, to_storage


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("tier", ["cpu", "device"])
def test_from_pretrained_under_zero_init_loads_into_partitions(tmp_path, arch, tier):
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    source = make_model(arch)  # llama's embedding has a padding row: init must not index an empty partition
    source.save_pretrained(tmp_path)
    config = ds_config(tier)
    with zo2_deepspeed.zero_init(config):
        model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not is_deepspeed_zero3_enabled(), "the ZeRO-3 switch for transformers is scoped to the context"
    assert all(p.numel() == 0 and hasattr(p, "ds_tensor") for p in model.parameters())
    engine, *_ = zo2_deepspeed.initialize(model=model, config=config)
    loaded = engine.parameter_snapshot()
    assert all(torch.equal(loaded[n], p.detach()) for n, p in source.named_parameters())
    engine(**batches(1)[0])
    engine.step()
    engine.close()


def test_nearest_rounding_loses_sub_half_ulp_updates_and_stochastic_keeps_them():
    for dtype, ulp in ((torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)):
        start = torch.ones(200_000)
        delta = 0.3 * ulp  # below half an ulp of 1.0
        updated = start + delta
        assert torch.equal(updated.to(dtype).float(), start), "round-to-nearest drops the update"
        rounded = stochastic_round(updated, dtype, seed=1).float()
        assert set(rounded.unique().tolist()) == {1.0, 1.0 + ulp}
        mean_change = float((rounded - start).mean())
        sd = ulp * (0.3 * 0.7) ** 0.5 / len(start) ** 0.5
        assert abs(mean_change - delta) < 5 * sd, (dtype, mean_change, delta)
        assert torch.equal(stochastic_round(updated, dtype, seed=1), stochastic_round(updated, dtype, seed=1))
        assert not torch.equal(stochastic_round(updated, dtype, seed=1), stochastic_round(updated, dtype, seed=2))


def test_stochastic_rounding_keeps_specials_and_exact_values():
    x = torch.tensor([float("inf"), -float("inf"), 0.0, 1.0, -2.5, 3.0e38])
    for dtype in (torch.bfloat16, torch.float16):
        out = stochastic_round(x, dtype, seed=0).float()
        assert torch.equal(out[:5], x[:5].to(dtype).float())
    assert torch.isnan(stochastic_round(torch.tensor([float("nan")]), torch.bfloat16, 0)).all()
    assert to_storage(x, torch.float32, True, 0) is x


def train_bf16(rounding: bool, lr: float, steps: int = 4):
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config(
        "cpu", storage_dtype="bf16", stochastic_rounding=rounding, lr=lr))
    start = engine.parameter_snapshot()
    for batch in batches(steps):
        engine(**batch)
        engine.step()
    moved = engine.last_step["bytes_read"] + engine.last_step["bytes_written"]
    params = sum(s.numel for s in engine.pipeline.slots) * 4
    end = engine.parameter_snapshot()
    engine.close()
    return start, end, moved / params


def test_bf16_storage_halves_the_bytes_and_keeps_tiny_updates_only_with_stochastic_rounding():
    lr = 1e-5  # |lr·g·z| ≲ 1e-4 per step: under half an ulp (≥ 2.4e-4) of every bf16 weight with |w| > 1/16
    start, nearest, ratio = train_bf16(False, lr)
    assert ratio == 1.0, "16-bit partitions: read + written = one fp32 copy per step"  # byte counts: exact
    flat = lambda d: torch.cat([d[n].flatten() for n in start])  # noqa: E731
    large = flat(start).abs() > 0.0625
    assert large.sum() > 10_000
    assert torch.equal(flat(nearest)[large], flat(start)[large]), "round-to-nearest loses those updates"
    _, stochastic, _ = train_bf16(True, lr)
    reference, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("cpu", lr=lr))
    ref_start = reference.parameter_snapshot()
    for batch in batches(4):
        reference(**batch)
        reference.step()
    exact = reference.parameter_snapshot()
    reference.close()
    kept = (flat(stochastic) - flat(start))[large]
    true = (flat(exact) - flat(ref_start))[large]
    # (seeded rounding, so these are the same on every run; the thresholds only separate "some" from "none"
    # and "aligned" from "unrelated", where unrelated changes would have a cosine of ~1/√10⁴ = 0.01)
    assert float((kept != 0).float().mean()) > 0.01, "stochastic rounding lets some of them through"
    # ... and unbiasedly: the rounded changes point along the true (fp32-storage) changes
    assert float(torch.nn.functional.cosine_similarity(kept, true, dim=0)) > 0.1


def test_bf16_compute_with_fp32_partitions_tracks_fp32():
    data = batches(2)
    runs = {}
    for compute in ("fp32", "bf16"):
        engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("cpu", compute_dtype=compute))
        engine(**data[0])
        engine.step()
        runs[compute] = engine.last_step["group_losses"]
        assert engine.pipeline.slots[1].param.dtype == torch.float32  # partitions at rest stay fp32
        engine.close()
    # bf16 compute keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3 per operation); through two layers'
    # matmuls, norms and the softmax the loss moves by up to ~10 such roundings: 2e-2
    assert runs["bf16"] == pytest.approx(runs["fp32"], rel=2e-2)
    assert runs["bf16"] != runs["fp32"]

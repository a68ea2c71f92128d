"""FZOO and HiZOO as perturbation plans in the same pipeline: equal to naive reference loops."""
from __future__ import annotations

import pytest
import torch

import zo2_deepspeed
from conftest import ds_config
from reference import reference_fzoo, reference_hizoo
from test_mezo_equivalence import relative_error
from tiny_models import batches, make_model

STEPS = 3


def run(arch, tier, method, data, **zo2):
    engine, *_ = zo2_deepspeed.initialize(model=make_model(arch), config=ds_config(
        tier, method=method, lr=1e-3, eps=1e-2, weight_decay=0.1, **zo2))
    records = []
    for batch in data:
        engine(**batch)
        engine.step()
        records.append(engine.last_step)
    fetches = {s.name: s.fetches for s in engine.pipeline.slots}
    params = engine.parameter_snapshot()  # flushes the pending update (also H's)
    hessian = read_state(engine, "hessian") if method == "hizoo" else {}
    engine.close()
    return params, records, fetches, hessian


def read_state(engine, name):
    """Full state tensors, streamed block by block through the tier like the parameters."""
    out = {}
    for slot in engine.pipeline.slots:
        if slot.trainable:
            tensor, = engine.tier.fetch_state([slot], name)
            out[slot.name] = tensor.detach().clone().cpu()
            engine.tier.store_state([slot], name, [tensor], [False])
    return out


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("tier", ["none", "cpu"])
def test_fzoo_matches_reference(arch, tier):
    data = batches(STEPS, pad_last=3)
    reference = make_model(arch)
    ref_coefficients = reference_fzoo(reference, data, lr=1e-3, eps=1e-2, seed=1, n=4, weight_decay=0.1)
    params, records, fetches, _ = run(arch, tier, "fzoo", data, num_perturbations=4)
    assert records[0]["projected_grad"] == ref_coefficients[0]  # same parameters, same forwards: to the bit
    for ours, theirs in zip(records, ref_coefficients):
        # later steps: 1-ulp loss differences (4.8e-7, from update rounding) divided by N·σ (σ of the N + 1
        # losses, ~1e-2 here): ~1e-5, relative 1e-3 of these O(1e-2) coefficients (measured ≤ 1.8e-5)
        assert ours["projected_grad"] == pytest.approx(theirs, rel=1e-3, abs=1e-5)
    ref_params = {n: p.detach() for n, p in reference.named_parameters()}
    # ≤ 1 update-rounding ulp per element (2^-23) plus lr·Δc·|u|: measured ≤ 1.7e-7, see test_mezo_equivalence
    assert relative_error(params, ref_params) <= 1e-6
    assert set(fetches.values()) == {STEPS}, "one fetch per parameter per step for all N+1 groups"
    assert len(records[0]["group_losses"]) == 5


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("tier", ["none", "cpu"])
def test_hizoo_matches_reference(arch, tier):
    data = batches(STEPS, pad_last=3)
    reference = make_model(arch)
    ref_grads, ref_hessian = reference_hizoo(reference, data, lr=1e-3, eps=1e-2, seed=1, alpha=0.5,
                                             weight_decay=0.1)
    params, records, fetches, hessian = run(arch, tier, "hizoo", data, hessian_smooth=0.5)
    assert records[0]["projected_grad"][0] == ref_grads[0]
    # a loss ulp / 2ε = 2.4e-5 per later step (measured: 0 or exactly that); 1e-4 allows four
    assert [r["projected_grad"][0] for r in records] == pytest.approx(ref_grads, rel=1e-4, abs=1e-4)
    ref_params = {n: p.detach() for n, p in reference.named_parameters()}
    # as MeZO's (test_mezo_equivalence): measured ≤ 0.9e-7
    assert relative_error(params, ref_params) <= 1e-6
    # H integrates |L+ + L− − 2L0|, a second difference of losses: ulp-level loss differences of later
    # steps move it by ~1e-3 relative; after the first step (identical losses) it must agree closely.
    # Bound: |L₊ + L₋ − 2L₀| carries up to 4 loss ulps (1.9e-6), × α/2ε² = 2500 → 4.8e-3·z² in H's factor
    # (1 − α) + gain·z² ≥ 0.5: 1e-2·z² relative per element and step at worst; typical is one ulp in one loss
    # at later steps only, averaged over elements by the norm (measured 4e-5 after 3 steps)
    assert relative_error(hessian, ref_hessian) <= 1e-2
    assert relative_error(hessian, {n: torch.ones_like(h) for n, h in hessian.items()}) > 1e-3, "H must move"
    _, first_hessian = reference_hizoo(make_model(arch), data[:1], lr=1e-3, eps=1e-2, seed=1, alpha=0.5,
                                       weight_decay=0.1)
    *_, hessian_one = run(arch, tier, "hizoo", data[:1], hessian_smooth=0.5)
    # one step from identical losses: H's factor is the same up to the order of its fp32 multiplications (≤ 2 ulps)
    assert relative_error(hessian_one, first_hessian) <= 1e-6
    assert set(fetches.values()) == {STEPS}
    assert len(records[0]["group_losses"]) == 3


def test_fzoo_skips_a_step_when_all_losses_are_equal():
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none", method="fzoo", lr=1e-2,
                                                                           num_perturbations=3))
    batch = batches(1)[0]
    before = engine.parameter_snapshot()
    for slot in engine.pipeline.slots:  # perturbations that change nothing: the losses are all equal
        slot.trainable = False
    engine(**batch)
    engine.step()
    assert engine.skipped_steps == 1 and engine.last_step["skipped"]
    after = engine.parameter_snapshot()
    assert all(torch.equal(before[n], after[n]) for n in before)
    engine.close()


def test_fzoo_noise_is_rademacher_and_one_direction_at_a_time():
    engine, *_ = zo2_deepspeed.initialize(model=make_model("llama", layers=3),
                                          config=ds_config("none", method="fzoo", num_perturbations=8))
    engine(**batches(1)[0])
    engine.step()
    largest_block = max(b.numel for b in engine.blocks if not any(s.shared for s in b.slots)) * 4
    embedding = next(s.numel for s in engine.pipeline.slots if s.shared) * 4
    # a block holds its working copy, a perturbed copy and one direction's z — not the 8 directions
    assert engine.pool.peak_bytes_in_use <= 3 * (2 * largest_block + 3 * embedding)
    z = engine.noise.draw((1000,), 7, "rademacher")
    # seeded; the mean of 1000 fair signs has standard error 1/√1000 ≈ 0.032: 0.1 is 3 of them
    assert set(z.unique().tolist()) == {-1.0, 1.0} and abs(float(z.mean())) < 0.1
    engine.close()

"""FZOO, HiZOO and LOZO as perturbation plans in the same pipeline: equal to naive reference loops."""
from __future__ import annotations

import pytest
import torch

import zo2_deepspeed
from conftest import ds_config
from reference import reference_fzoo, reference_hizoo, reference_lozo
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


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("tier", ["none", "cpu"])
def test_lozo_matches_reference(arch, tier):
    """The pipeline's LOZO (z = U·Vᵀ/√r, MeZO's plan) = the paper's loop (±ε'·U·Vᵀ, c'·U·Vᵀ/r, ε' = ε/√r)."""
    data = batches(STEPS, pad_last=3)
    reference = make_model(arch)
    ref_grads, _ = reference_lozo(reference, data, lr=1e-3, eps=1e-2, seed=1, rank=2, lazy_steps=2, weight_decay=0.1)
    params, records, fetches, _ = run(arch, tier, "lozo", data, rank=2, lazy_steps=2)
    # c' = √r·c; the two loops perturb with ε·(UVᵀ/√r) and ε'·UVᵀ, equal up to one rounding
    assert [r["projected_grad"][0] * 2 ** 0.5 for r in records] == pytest.approx(ref_grads, rel=1e-4, abs=1e-4)
    ref_params = {n: p.detach() for n, p in reference.named_parameters()}
    assert relative_error(params, ref_params) <= 1e-6
    start = {n: p.detach() for n, p in make_model(arch).named_parameters()}
    assert relative_error(params, start) > 1e-5, "training must move the parameters"
    assert set(fetches.values()) == {STEPS}
    assert len(records[0]["group_losses"]) == 2


def test_lozo_keeps_v_for_lazy_steps_and_draws_u_every_step():
    """Each matrix's step-t update is rank r, its column space (V) shared within a window ⌊t/ν⌋ and new after."""
    rank, lazy = 2, 2
    engine, *_ = zo2_deepspeed.initialize(model=make_model("llama"), config=ds_config(
        "cpu", method="lozo", lr=1e-2, eps=1e-2, rank=rank, lazy_steps=lazy))
    name = next(s.name for s in engine.pipeline.slots if s.trainable and len(s.shape) == 2 and min(s.shape) > 2 * rank)
    vector = next(s.name for s in engine.pipeline.slots if s.trainable and len(s.shape) == 1)
    snapshots = [engine.parameter_snapshot()]
    for batch in batches(4):
        engine(**batch)
        engine.step()
        snapshots.append(engine.parameter_snapshot())
    engine.close()
    deltas = [(b[name] - a[name]).double() for a, b in zip(snapshots, snapshots[1:])]
    vector_delta = snapshots[1][vector] - snapshots[0][vector]

    def rank_of(m: torch.Tensor) -> int:
        return int(torch.linalg.matrix_rank(m, rtol=1e-6))

    assert all(rank_of(d) == rank for d in deltas), "each update is one U·Vᵀ of rank r"
    assert rank_of(torch.cat([deltas[0], deltas[1]])) == rank, "steps 0 and 1 share V (same row space)"
    assert rank_of(torch.cat([deltas[2], deltas[3]])) == rank, "steps 2 and 3 share the next V"
    assert rank_of(torch.cat([deltas[1], deltas[2]])) == 2 * rank, "a new window draws a new V"
    assert rank_of(torch.cat([deltas[0], deltas[1]], dim=1)) == 2 * rank, "U is new every step"
    assert int((vector_delta != 0).sum()) == vector_delta.numel(), "vectors get a full (MeZO) z"


def test_lozo_draws_r_times_m_plus_n_numbers_per_matrix():
    engine, *_ = zo2_deepspeed.initialize(model=make_model("llama"), config=ds_config("none", method="lozo", rank=3))
    engine(**batches(1)[0])
    engine.step()
    expected = sum(3 * (s.shape[0] + s.numel // s.shape[0]) if len(s.shape) >= 2 else s.numel
                   for s in engine.pipeline.slots if s.trainable)
    assert engine.last_step["noise_elements"] == expected
    engine.close()


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
def test_lozo_tiers_give_identical_trajectories(storage):
    """Resident, offloaded and sharded LOZO agree to the bit; with bf16 partitions (stochastic rounding) too."""
    data = batches(STEPS)
    runs = {}
    tiers = ["none", "cpu", "device"] if storage == "fp32" else ["cpu", "device"]
    for tier in tiers:
        engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config(
            tier, method="lozo", lr=1e-2, eps=1e-2, rank=2, lazy_steps=2, storage_dtype=storage))
        grads = []
        for batch in data:
            engine(**batch)
            engine.step()
            grads.append(engine.last_step["projected_grad"])
        runs[tier] = (grads, engine.parameter_snapshot())
        engine.close()
    first_grads, first = runs[tiers[0]]
    for tier in tiers[1:]:
        grads, params = runs[tier]
        assert grads == first_grads, tier
        assert all(torch.equal(params[n], first[n]) for n in first), tier
    start = {n: p.detach() for n, p in make_model().named_parameters()}
    assert relative_error(first, start) > 1e-5


def test_lozo_with_philox_forms_z_from_philox_factors():
    """With noise_generator philox, U and V come from the Philox stream (its kernels on a GPU), z = U·Vᵀ/√r."""
    from zo2_deepspeed import philox
    from zo2_deepspeed.lowrank import LowRankNoise, LowRankSeed
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config(
        "cpu", method="lozo", lr=1e-2, eps=1e-2, rank=2, noise_generator="philox"))
    assert isinstance(engine.noise, LowRankNoise) and engine.noise.base.name == "philox"
    assert not engine.pipeline.fused, "low-rank z is materialised per block, not fused"
    z = engine.noise.draw((6, 5), LowRankSeed(3, 4))
    u = philox.stream("gaussian", 3, 12).view(6, 2)
    v = philox.stream("gaussian", 4, 10).view(5, 2)
    assert torch.allclose(z, u @ v.T / 2 ** 0.5, rtol=1e-6, atol=1e-6)
    # vectors: the full Philox stream of U's seed (equal up to the reference combine's fp32 rounding)
    assert torch.allclose(engine.noise.draw((7,), LowRankSeed(3, 4)), philox.stream("gaussian", 3, 7), rtol=0,
                          atol=1e-6)
    before = engine.parameter_snapshot()
    for batch in batches(2):
        engine(**batch)
        engine.step()
    after = engine.parameter_snapshot()
    engine.close()
    assert relative_error(after, before) > 1e-5

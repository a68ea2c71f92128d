"""LOZO's window write-back: a matrix's stored copy changes once per lazy window (``zo2.write_back``).

Between window ends each matrix's updates are held as U_acc (m × r) beside its read-only stored copy
and applied after the upload (θ = a·W + U_acc·Vᵀ); vectors keep the per-step write-back. Checked here:
the trajectory against a step-by-step fp32 loop (to a derived rounding bound), ``"step"`` against the
same loop bit for bit, the bytes written per step, resume and export mid-window, 16-bit storage,
gradient accumulation, the Trainer, and the config and report fields.
"""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import zo2_deepspeed
from conftest import ds_config
from test_hf_integration import current_state, hf_session, logged, run_trainer, trainer_ds_config, zo2_section  # noqa: F401
from test_logging import deepspeed_log, step_lines
from tiny_models import batches, make_model
from zo2_deepspeed import ConfigError
from zo2_deepspeed.lowrank import LowRankNoise, matrix_view
from zo2_deepspeed.noise import TorchNoise

RANK, LAZY = 2, 3
UNIT = 2.0 ** -24
"""fp32's unit roundoff: every correctly rounded fp32 operation has relative error at most this."""


def config(tier="cpu", write_back=None, lazy=LAZY, **kw) -> dict:
    settings = dict(method="lozo", lr=1e-2, eps=1e-2, weight_decay=0.1, rank=RANK, lazy_steps=lazy)
    settings.update(kw)
    if write_back is not None:
        settings["write_back"] = write_back
    return ds_config(tier, **settings)


def train(engine, data) -> list:
    """Each step's committed update (lr and weight decay per group, coefficients), and the step records."""
    updates, records = [], []
    for batch in data:
        engine.backward(engine(**batch))
        engine.step()
        updates.append(engine.optimizer.last_update)
        records.append(engine.last_step)
    return updates, records


def step_by_step(start: dict, engine, updates) -> dict:
    """The engine's committed updates applied one step at a time in fp32, as the per-step write-back applies
    them (``ZOMethod.apply_update``: θ ← θ·(1 − lr·wd), then θ += −lr·c·z with z = (U/√r)·Vᵀ)."""
    noise = LowRankNoise(TorchNoise("cpu", threads=1), RANK)
    params = {n: t.clone() for n, t in start.items()}
    for update in updates:
        (direction, coefficient), = update.terms
        for slot in engine.pipeline.slots:
            if not slot.trainable:
                continue
            lr, wd = update.lrs[slot.group_index], update.weight_decays[slot.group_index]
            if lr == 0:
                continue
            x = params[slot.name]
            z = noise.draw(x.shape, engine.method.noise_seed(update.step_seed, update.step, direction, slot.name))
            if wd:
                x.mul_(1.0 - lr * wd)
            x.add_(z, alpha=-lr * coefficient)
    noise.close()
    return params


def update_magnitudes(engine, updates) -> dict:
    """Per matrix element, S = Σ_t |lr_t·c_t|·Σ_k |U_t,ik|·|V_jk|/√r (float64): the size of the updates summed."""
    base = TorchNoise("cpu", threads=1)
    out = {}
    for slot in engine.pipeline.slots:
        shape = matrix_view(slot.shape) if slot.trainable else None
        if shape is None:
            continue
        m, n = shape
        total = torch.zeros(m, n, dtype=torch.float64)
        for update in updates:
            (direction, coefficient), = update.terms
            seed = engine.method.noise_seed(update.step_seed, update.step, direction, slot.name)
            u = base.draw((m, RANK), seed.u).double().abs() / math.sqrt(RANK)
            v = base.draw((n, RANK), seed.v).double().abs()
            total += abs(update.lrs[slot.group_index] * coefficient) * (u @ v.T)
        out[slot.name] = total.view(slot.shape)
    base.close()
    return out


def start_params() -> dict:
    """The parameters every engine here starts from (``make_model()``), by their first qualified name."""
    return {n: p.detach().clone() for n, p in make_model().named_parameters()}


def rounding_bound(start: torch.Tensor, size: torch.Tensor, steps: int, windows: int) -> torch.Tensor:
    """The largest |θ_window − θ_loop| the two summation orders allow per element (derived in the first test)."""
    x = start.double().abs() + size
    return (2 * steps + 3 * windows) * UNIT * x + ((RANK + 2) * steps + (RANK + 1) * windows) * UNIT * size


# ------------------------------------------------------------------------------------- trajectory
def test_window_trajectory_equals_the_step_by_step_loop_within_the_rounding_of_its_summation_order():
    """7 steps of ν = 3 (two merges, a third window open), weight decay 0.1, against the per-step loop in fp32.

    The loop rounds θ twice per step (the decay's product, then the add of lr·c·z, z itself a rounded
    r-term dot product): after T steps its error is at most 2T·u·X + (r + 1)·T·u·S per element, with
    u = 2⁻²⁴, X = |θ₀| + S a bound on |θ| along the way (the decays are ≤ 1) and S = Σ_t |lr_t·c_t|·|U_t|·|V|ᵀ/√r
    the summed update sizes. The window form rounds U_acc once per step (≤ T·u·S all told), forms a·W
    (two roundings: a to fp32, the product) and U_acc·Vᵀ (r-term dot: r·u·S) and adds them (u·X), once
    per window: per window ≤ 3u·X + (r + 1)·u·S on top. Both together, over T steps and W windows:
        |θ_window − θ_loop| ≤ (2T + 3W)·u·X + ((r + 2)·T + (r + 1)·W)·u·S.
    Vectors take the per-step path in both: equal bit for bit. Measured: the largest error is 0.23 of its bound.
    """
    data = batches(7)
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=config())
    start = start_params()
    updates, _ = train(engine, data)
    got = engine.parameter_snapshot()  # merges the open window
    expected = step_by_step(start, engine, updates)
    sizes = update_magnitudes(engine, updates)
    steps, windows = len(data), math.ceil(len(data) / LAZY)
    worst = 0.0
    for slot in engine.pipeline.slots:
        name = slot.name
        if not slot.trainable:
            assert torch.equal(got[name], start[name])
            continue
        if name not in sizes:
            assert torch.equal(got[name], expected[name]), f"{name}: vectors keep the per-step path"
            continue
        bound = rounding_bound(start[name], sizes[name], steps, windows)
        error = (got[name].double() - expected[name].double()).abs()
        assert bool((error <= bound).all()), f"{name}: {float((error / bound).max()):.3g} of the bound"
        worst = max(worst, float((error / bound).max()))
    assert 0 < worst < 1  # the forms differ (other roundings), within the bound
    moved = {n: float((got[n] - start[n]).abs().max()) for n in sizes}
    assert min(moved.values()) > 0, "every matrix trained"
    engine.close()


def test_write_back_step_is_todays_per_step_lozo_bit_for_bit():
    """Two windows with "step": the stored copy takes every step's update, exactly as the per-step loop."""
    data = batches(2 * LAZY)
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=config(write_back="step"))
    assert engine.pipeline.perturbation.window is None
    start = start_params()
    updates, records = train(engine, data)
    got = engine.parameter_snapshot()
    expected = step_by_step(start, engine, updates)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    full = records[1]["bytes_written"]
    assert full > 0 and all(r["bytes_written"] == full and r["bytes_merged"] == 0 for r in records[1:])
    assert "window" not in records[-1]
    engine.close()


# ------------------------------------------------------------------------------------- bytes
def partition_bytes(engine) -> tuple[int, int]:
    """(matrices, everything else) of this rank's trainable partitions, in bytes."""
    matrices = other = 0
    for slot in engine.pipeline.slots:
        if slot.trainable:
            size = engine.tier.partition_size(slot) * engine.tier.storage_dtype(slot).itemsize
            if matrix_view(slot.shape) is not None:
                matrices += size
            else:
                other += size
    return matrices, other


def check_window_bytes(records, matrices: int, vectors: int, lazy: int) -> None:
    """Step 0 writes nothing (no update yet); a window's first step writes everything (the previous window's
    merge); its other steps write the vectors only."""
    assert records[0]["bytes_written"] == 0
    for r in records[1:]:
        merge = r["step"] % lazy == 0
        assert r["bytes_merged"] == (matrices if merge else 0), r
        assert r["bytes_written"] == (matrices if merge else 0) + vectors, r
        assert r["bytes_read"] == records[0]["bytes_read"], "every step reads the whole partition once"


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
def test_bytes_written_are_the_vectors_between_windows_and_everything_at_a_window_end(storage):
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=config(storage_dtype=storage))
    _, records = train(engine, batches(2 * LAZY + 1))
    matrices, vectors = partition_bytes(engine)
    assert matrices > 20 * vectors  # what the saving is about
    check_window_bytes(records, matrices, vectors, LAZY)
    assert [r["window"] for r in records[:4]] == [{"index": i // LAZY, "position": i % LAZY, "steps": LAZY}
                                                   for i in range(4)]
    # between merges the stored matrices do not change at all
    slot = next(s for s in engine.pipeline.slots if s.trainable and matrix_view(s.shape) and not s.shared)
    engine.flush()  # merges the open window
    before = engine.tier.read_partition(slot)
    data = batches(2, seed=5)
    train(engine, data[:1])  # step 7 (window 2): the flush applied step 6's update, nothing to fold
    train(engine, data[1:])  # step 8 folds step 7's update into U_acc and stores nothing of the matrix
    assert torch.equal(engine.tier.read_partition(slot), before)
    engine.close()


def test_the_step_line_names_the_window_and_the_merged_bytes():
    settings = config()
    settings["steps_per_print"] = 1
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=settings)
    with deepspeed_log(logging.INFO) as log:
        train(engine, batches(4))
    engine.close()
    lines = list(dict.fromkeys(step_lines(log.getvalue())))  # pytest's own capture handler may repeat them
    assert [line.split()[0] for line in lines] == ["step=1", "step=2", "step=3", "step=4"], log.getvalue()[-2000:]
    assert " window=0:0/3 merged=0.0MiB " in lines[0] and " window=1:0/3 merged=0.1MiB " in lines[3], lines


# ------------------------------------------------------------------------------------- resume, export
@pytest.mark.parametrize("storage", ["fp32", "bf16"])
def test_resume_from_a_mid_window_checkpoint_equals_the_uninterrupted_run(tmp_path, storage):
    """Saved after 5 steps of ν = 3 (window 1 half done): the save merges, so the checkpoint holds the true
    weights and no U_acc; the run that saved and went on and the run resumed from it agree bit for bit."""
    data = batches(8)
    settings = config(storage_dtype=storage)
    straight, *_ = zo2_deepspeed.initialize(model=make_model(), config=settings)
    train(straight, data[:5])
    assert straight.pipeline.perturbation.unmerged(straight.pipeline.slots), "mid-window: U_acc held"
    straight.save_checkpoint(str(tmp_path))
    assert not straight.pipeline.perturbation.unmerged(straight.pipeline.slots), "the save merged"
    saved = straight.parameter_snapshot()
    _, tail = train(straight, data[5:])
    expected = straight.parameter_snapshot()
    straight.close()

    from zo2_deepspeed.checkpoint import read_full_state
    stored, _ = read_full_state(str(tmp_path))
    assert all(torch.equal(stored[n].to(saved[n].dtype), saved[n]) for n in saved), "the checkpoint is merged"

    resumed, *_ = zo2_deepspeed.initialize(model=make_model(seed=9), config=settings)
    resumed.load_checkpoint(str(tmp_path))
    _, resumed_tail = train(resumed, data[5:])
    got = resumed.parameter_snapshot()
    resumed.close()
    assert [r["group_losses"] for r in resumed_tail] == [r["group_losses"] for r in tail]
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_load_discards_the_window_held_before_it(tmp_path):
    """A checkpoint loaded into an engine that has trained part of a window: its U_acc belongs to the
    overwritten copies and is dropped, so the engine continues exactly as one that only loaded."""
    data = batches(6)
    first, *_ = zo2_deepspeed.initialize(model=make_model(), config=config())
    train(first, data[:2])
    first.save_checkpoint(str(tmp_path))
    train(first, data[2:5])  # steps 2-4: window 0 merged at step 3, step 3's update held in U_acc
    assert first.pipeline.perturbation.unmerged(first.pipeline.slots)
    first.load_checkpoint(str(tmp_path))
    assert not first.pipeline.perturbation.unmerged(first.pipeline.slots)
    train(first, data[2:])
    got = first.parameter_snapshot()
    first.close()
    fresh, *_ = zo2_deepspeed.initialize(model=make_model(seed=9), config=config())
    fresh.load_checkpoint(str(tmp_path))
    train(fresh, data[2:])
    expected = fresh.parameter_snapshot()
    fresh.close()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


@pytest.mark.parametrize("tier", ["cpu", "none"])
def test_export_mid_window_equals_the_merged_weights(tmp_path, tier):
    """save_pretrained after 5 steps (window 1 open): it merges first, so the exported tensors are the stored
    copies the merge wrote, and those are the step-by-step loop's weights (within the derived bound)."""
    from safetensors.torch import load_file
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=config(tier))
    start = start_params()
    updates, _ = train(engine, batches(5))
    held = engine.pipeline.perturbation.unmerged(engine.pipeline.slots)
    assert held
    merged_before = engine.tier.stats.bytes_merged
    engine.save_pretrained(str(tmp_path / "export"))
    assert not engine.pipeline.perturbation.unmerged(engine.pipeline.slots)
    if tier == "cpu":
        assert engine.tier.stats.bytes_merged - merged_before == partition_bytes(engine)[0]
    exported = load_file(tmp_path / "export" / "model.safetensors")
    expected = step_by_step(start, engine, updates)
    sizes = update_magnitudes(engine, updates)
    for slot in engine.pipeline.slots:
        stored = engine.tier.read_partition(slot)[:slot.numel].view(slot.shape)
        assert torch.equal(exported[slot.name], stored), slot.name
        if slot.name in sizes:
            error = (exported[slot.name].double() - expected[slot.name].double()).abs()
            assert bool((error <= rounding_bound(start[slot.name], sizes[slot.name], 5, 2)).all()), slot.name
        else:
            assert torch.equal(exported[slot.name], expected[slot.name]), slot.name
    engine.close()


def test_module_state_dict_on_the_resident_tier_merges_first():
    """Accelerate and the Trainer save ``engine.module.state_dict()``: mid-window it holds the merged weights."""
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=config("none"))
    train(engine, batches(5))
    slot = next(s for s in engine.pipeline.perturbation.unmerged(engine.pipeline.slots) if not s.shared)
    base = slot.param.data.clone()
    state = engine.module.state_dict()
    assert not torch.equal(state[slot.name], base), "the merge moved the stored weight"
    assert torch.equal(state[slot.name], slot.param.data)
    assert not engine.pipeline.perturbation.unmerged(engine.pipeline.slots)
    engine.close()


# ------------------------------------------------------------------------------------- 16-bit, accumulation
def test_bf16_compute_and_storage_round_the_merge_stochastically_once_per_window():
    """With a bf16 working copy the sum a·W + U_acc·Vᵀ is formed in fp32 and rounded once at the merge,
    stochastically (seeded by window and name: two runs agree), so a window of updates below half a bf16 ulp
    still moves weights in proportion; rounded to nearest only the weights near zero (a tiny ulp) move.
    Measured here: 317 of 22,528 matrix elements move, 109 to nearest."""
    def run(stochastic: bool):
        engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=config(
            storage_dtype="bf16", compute_dtype="bf16", lr=1e-6, weight_decay=0.0, stochastic_rounding=stochastic))
        matrices = [s for s in engine.pipeline.slots if s.trainable and matrix_view(s.shape)]
        start = {s.name: engine.tier.read_partition(s).clone() for s in matrices}
        _, records = train(engine, batches(LAZY + 1))  # step 3 merges window 0
        assert records[LAZY]["bytes_merged"] == sum(t.numel() * 2 for t in start.values())
        after = {s.name: engine.tier.read_partition(s).clone() for s in matrices}
        engine.close()
        return sum(int((after[n] != start[n]).sum()) for n in after), after

    moved, after = run(True)
    again, repeated = run(True)
    assert all(torch.equal(after[n], repeated[n]) for n in after), "seeded: reproducible"
    assert moved > 0 and again == moved
    nearest, _ = run(False)
    assert moved > 2 * nearest, (moved, nearest)


def test_gradient_accumulation_folds_once_per_step():
    """Micro-batches 2 × 2 equal one of 4 across two merges; U_acc takes each step once, not each micro-step."""
    data = batches(10, rows=2, seed=7)
    split, *_ = zo2_deepspeed.initialize(model=make_model(), config=config(micro_batch=2, gas=2, lazy=2))
    joined, *_ = zo2_deepspeed.initialize(model=make_model(), config=config(micro_batch=4, lazy=2))
    split_records, joined_records = [], []
    for i in range(0, len(data), 2):
        for batch in data[i:i + 2]:
            split.backward(split(**batch))
            split.step()
        split_records.append(split.last_step)
        joined.backward(joined(**{k: torch.cat([data[i][k], data[i + 1][k]]) for k in data[i]}))
        joined.step()
        joined_records.append(joined.last_step)
    assert [r["group_losses"] for r in split_records] == [r["group_losses"] for r in joined_records]
    assert [r["bytes_merged"] for r in split_records] == [r["bytes_merged"] for r in joined_records]
    a, b = split.parameter_snapshot(), joined.parameter_snapshot()
    assert all(torch.equal(a[n], b[n]) for n in a)
    split.close(), joined.close()


# ------------------------------------------------------------------------------------- factored forward
@pytest.mark.parametrize("arch, factored", [("llama", 14), ("opt", 12), ("gpt2", 0)])
def test_factored_forward_agrees_with_the_materialised_one_to_rounding(arch, factored):
    """The same steps with the perturbed weights applied as x·Wᵀ + (x·V)·Bᵀ and as a formed W': the group
    losses agree to fp32 rounding (measured ≤ 1 ulp; the projected gradient then differs by an ulp of the loss
    over 2ε), the weights to 1e-5. Every nn.Linear inside a layer is factored (LLaMA 7 and OPT 6 per layer);
    embeddings, the head and GPT-2's Conv1D keep the formed matrix. Without perturbed copies of the factored
    layers the block holds fewer matrix-sized buffers."""
    runs = {}
    for form in ("materialised", "factored"):
        engine, *_ = zo2_deepspeed.initialize(model=make_model(arch), config=config(lowrank_forward=form, lazy=2))
        layers = engine.pipeline.perturbation.factored
        covered = sum(layers.covers(s) for s in engine.pipeline.slots) if layers is not None else 0
        _, records = train(engine, batches(5))
        runs[form] = (covered, [r["group_losses"] for r in records], engine.parameter_snapshot(),
                      engine.pool.peak_bytes_in_use)
        engine.close()
    (none, plain_losses, plain, plain_peak), (covered, losses, params, peak) = runs["materialised"], runs["factored"]
    assert (none, covered) == (0, factored)
    for ours, theirs in zip(losses, plain_losses):
        assert ours == pytest.approx(theirs, rel=1e-6, abs=0)
    assert all(torch.allclose(params[n], plain[n], rtol=0, atol=1e-5) for n in plain)
    if factored:
        assert peak < plain_peak


def test_lowrank_forward_auto_picks_the_measured_form_for_the_device():
    from zo2_deepspeed.factored import LOWRANK_FORWARD, resolve_lowrank_forward
    assert resolve_lowrank_forward("auto", torch.device("cpu")) == LOWRANK_FORWARD["cpu"] == "factored"
    assert resolve_lowrank_forward("materialised", torch.device("cpu")) == "materialised"
    assert resolve_lowrank_forward("auto", torch.device("meta")) == "materialised"  # not measured: the plain form
    with pytest.raises(ConfigError, match="zo2.lowrank_forward 'factored' applies to LOZO's window write-back, but "
                                          "zo2.method is 'lozo' with zo2.write_back 'step'"):
        zo2_deepspeed.initialize(model=make_model(), config=config(write_back="step", lowrank_forward="factored"))


def test_an_eval_forward_mid_window_sees_the_held_updates():
    """engine.eval() forwards mid-window use a·W + U_acc·Vᵀ (materialised for the plain forward), not the stale
    stored copy: the same loss as after an explicit merge. They merge nothing: the only write-back is the
    vectors' (the pending update reaches them at that residency, as without the window write-back)."""
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=config())
    train(engine, batches(5))
    held = engine.pipeline.perturbation.unmerged(engine.pipeline.slots)
    assert held
    batch = batches(1, seed=4)[0]
    engine.eval()
    before_stats = engine.tier.stats.snapshot()
    before = float(engine(**batch).loss)
    moved = engine.tier.stats.since(before_stats)
    assert moved.bytes_merged == 0 and moved.bytes_written == partition_bytes(engine)[1]
    assert engine.pipeline.perturbation.unmerged(engine.pipeline.slots) == held
    engine.flush()
    after = float(engine(**batch).loss)
    engine.close()
    assert before == pytest.approx(after, rel=1e-6)


# ------------------------------------------------------------------------------------- config
def test_write_back_defaults_to_window_for_lozo_and_window_is_refused_for_other_methods():
    from zo2_deepspeed.config import parse_zo2_section
    assert parse_zo2_section({"method": "lozo"}).write_back == "window"
    assert parse_zo2_section({"method": "mezo"}).write_back == "step"
    assert parse_zo2_section({"method": "lozo", "write_back": "step"}).write_back == "step"
    for method in ("mezo", "fzoo", "hizoo"):
        with pytest.raises(ConfigError, match=f"zo2.write_back 'window' needs zo2.method 'lozo'.*{method} changes"):
            zo2_deepspeed.initialize(model=make_model(), config=ds_config("cpu", method=method, write_back="window"))
    with pytest.raises(ConfigError, match="zo2.write_back must be one of 'window' or 'step', got 'end'"):
        parse_zo2_section({"method": "lozo", "write_back": "end"})


def test_the_checkpoint_records_write_back_and_a_switch_needs_module_only(tmp_path):
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=config())
    train(engine, batches(2))
    engine.save_checkpoint(str(tmp_path))
    engine.close()
    meta = json.loads((tmp_path / "global_step2" / "zo2_checkpoint.json").read_text())
    assert meta["zo2"]["write_back"] == "window"
    other, *_ = zo2_deepspeed.initialize(model=make_model(), config=config(write_back="step"))
    with pytest.raises(zo2_deepspeed.CheckpointError, match="write_back 'window' -> 'step'"):
        other.load_checkpoint(str(tmp_path))
    other.load_checkpoint(str(tmp_path), load_module_only=True)
    other.close()


# ------------------------------------------------------------------------------------- NVMe, Trainer
@pytest.mark.nvme
@pytest.mark.slow
def test_nvme_writes_the_ssd_once_per_window_and_follows_the_cpu_tier_bit_for_bit(tmp_path):
    """Hidden 512: the large matrices live in NVMe swap files. Between window ends the SSD gets no write at all
    (the vectors stay in CPU memory); a window's end writes every NVMe matrix once. Same numbers as cpu."""
    from test_nvme import HIDDEN, nvme_config, nvme_params
    from zo2_deepspeed.tiers.nvme import NVMeTier
    model = make_model("qwen2", hidden=HIDDEN)
    settings = dict(method="lozo", lr=1e-2, eps=1e-2, weight_decay=0.1, rank=RANK, lazy_steps=LAZY)
    engine, *_ = zo2_deepspeed.initialize(model=model, config=nvme_config(tmp_path, **settings))
    assert isinstance(engine.tier, NVMeTier)
    swapper = next(iter(nvme_params(model).values())).nvme_swapper
    on_disk = sum(swapper._io_aligned_numel(p.ds_tensor.ds_numel) * 4 for p in nvme_params(model).values())
    disk, records = [], []
    for batch in batches(2 * LAZY + 1):
        before = engine.tier.disk_stats.snapshot()
        engine.backward(engine(**batch))
        engine.step()
        disk.append(engine.tier.disk_stats.since(before).bytes_written)
        records.append(engine.last_step)
    matrices, vectors = partition_bytes(engine)
    check_window_bytes(records, matrices, vectors, LAZY)
    assert disk == [on_disk if step and step % LAZY == 0 else 0 for step in range(2 * LAZY + 1)]
    got = engine.parameter_snapshot()
    engine.close()
    cpu, *_ = zo2_deepspeed.initialize(model=make_model("qwen2", hidden=HIDDEN), config=config(**settings))
    _, cpu_records = train(cpu, batches(2 * LAZY + 1))
    expected = cpu.parameter_snapshot()
    cpu.close()
    assert [r["group_losses"] for r in records] == [r["group_losses"] for r in cpu_records]
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_trainer_saves_mid_window_and_resumes_exactly(hf_session, tmp_path):
    """The HF Trainer with LOZO (ν = 3, a checkpoint every 2 steps: mid-window): its saves merge, and a run
    resumed from checkpoint-2 ends with the uninterrupted run's weights, bit for bit."""
    settings = trainer_ds_config(zo2=zo2_section(method="lozo", rank=RANK, lazy_steps=LAZY))
    full = run_trainer(tmp_path / "full", settings)
    assert full.model_wrapped.zo2.write_back == "window"
    expected, losses = current_state(full), logged(full, "loss")
    resumed = run_trainer(tmp_path / "resumed", settings, resume=tmp_path / "full" / "checkpoint-2")
    assert logged(resumed, "loss")[4] == losses[4]
    got = current_state(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


# ------------------------------------------------------------------------------------- first-order tail
def tail_config(write_back=None, **kw) -> dict:
    """LOZO's body with a first-order tail (block 1 and the head, SGD): the tail is resident and written through
    by its own optimizer's path; only the body's matrices take the window write-back."""
    settings = config(write_back=write_back, **kw)
    settings["zo2"]["first_order"] = {"blocks": 1, "head": True, "max_fraction": 0.9,
                                      "optimizer": {"type": "SGD", "params": {"lr": 1e-2}}}
    return settings


def test_a_first_order_tail_composes_with_the_window_write_back():
    """The tail's parameters are out of ZO (never held in U_acc, never factored); the body's matrices are written
    once per window and its vectors every step, the resident tail not at all between flushes. Against
    ``write_back: "step"`` the two runs differ by rounding only: the body's updates and the tail's (whose gradient
    reads the body's outputs) agree to 1e-4 relative, as in test_first_order (a one-ulp loss difference, here
    from the factored forward and the window's summation order, reaches the ZO step as ulp/2ε). Measured:
    2e-5 (body) and 3e-5 (tail); a tail held in U_acc or perturbed would be off by order 1."""
    from test_first_order import relative_error
    data = batches(2 * LAZY + 1)
    start = start_params()
    runs = {}
    for write_back in ("window", "step"):
        engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=tail_config(write_back))
        tail = {s.name for s in engine.first_order.selection.first_order}
        _, records = train(engine, data[:5])  # window 1 open: steps 3 and 4 held
        if write_back == "window":
            window = engine.pipeline.perturbation.window
            assert tail and not any(window.covers(s) for s in engine.first_order.selection.first_order)
            held = {s.name for s in window.unmerged(engine.pipeline.slots)}
            assert held and not held & tail, "the body's matrices are held, the tail's never"
        records += train(engine, data[5:])[1]
        if write_back == "window":
            matrices, vectors = partition_bytes(engine)  # the body's: the tail's slots are not ZO-trainable
            check_window_bytes(records, matrices, vectors, LAZY)
        runs[write_back] = engine.parameter_snapshot()
        engine.close()
    window, step = runs["window"], runs["step"]
    moved = {n: window[n] - start[n] for n in window}
    reference = {n: step[n] - start[n] for n in step}
    body = {n for n in step if not torch.equal(step[n], start[n])} - tail
    assert tail and body
    for part in (tail, body):
        assert relative_error(moved, reference, part) <= 1e-4, (sorted(part)[:2], relative_error(moved, reference, part))


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
def test_a_first_order_tail_resumes_mid_window_bit_for_bit(tmp_path, storage):
    """Saved after 5 steps of ν = 3 (steps 3 and 4 held in U_acc): the save merges the body's U_acc and writes the tail through (its fp32
    masters saved beside it with bf16 storage); the resumed run ends with the uninterrupted run's bits."""
    data = batches(8)
    settings = tail_config(storage_dtype=storage)
    straight, *_ = zo2_deepspeed.initialize(model=make_model(), config=settings)
    train(straight, data[:5])
    assert straight.pipeline.perturbation.unmerged(straight.pipeline.slots)
    straight.save_checkpoint(str(tmp_path))
    _, tail = train(straight, data[5:])
    expected = straight.parameter_snapshot()
    straight.close()
    resumed, *_ = zo2_deepspeed.initialize(model=make_model(seed=9), config=settings)
    resumed.load_checkpoint(str(tmp_path))
    _, resumed_tail = train(resumed, data[5:])
    got = resumed.parameter_snapshot()
    resumed.close()
    assert [r["group_losses"] for r in resumed_tail] == [r["group_losses"] for r in tail]
    assert all(torch.equal(got[n], expected[n]) for n in expected)

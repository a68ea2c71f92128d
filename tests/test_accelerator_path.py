"""The accelerator path on the CPU: counter-based noise through the engine, and the stream schedule.

Streams cannot run concurrently here, but the schedule can be checked: a stand-in accelerator whose
streams and events check their protocol (an event is recorded before anyone waits on it, all of it
from the thread that computes) drives the same code a GPU runs, and the results must equal the
CPU's. Counter-based noise ("philox") runs as the Triton kernels under TRITON_INTERPRET=1 (set by
conftest.py) and as their torch reference.
"""
from __future__ import annotations

import contextlib
import threading

import pytest
import torch

import zo2_deepspeed
import zo2_deepspeed.streams as streams_module
from conftest import deepspeed_warnings, ds_config
from reference import reference_mezo
from test_mezo_equivalence import relative_error
from tiny_models import batches, make_model
from zo2_deepspeed import kernels
from zo2_deepspeed.kernels import unavailable_reason
from zo2_deepspeed.noise import PhiloxNoise

original_stream_accelerator = streams_module.stream_accelerator
needs_triton = pytest.mark.skipif(unavailable_reason(torch.device("cpu")) is not None,
                                  reason=f"Triton kernels cannot run here: {unavailable_reason(torch.device('cpu'))}")


class FakeEvent:
    def __init__(self, accel: "FakeAccelerator", enable_timing: bool = False) -> None:
        self.accel, self.timing, self.stream = accel, enable_timing, None

    def record(self, stream=None) -> None:
        self.accel.check_thread()
        assert stream is not None, "an event recorded on the current device's stream, which may not be the engine's"
        self.stream = stream
        self.accel.recorded += 1

    def _check(self) -> None:
        assert self.stream is not None, "waiting on an event that was never recorded"

    def wait(self, stream=None) -> None:
        self.accel.check_thread()
        self._check()
        self.accel.waits += 1

    def query(self) -> bool:
        self._check()
        return True

    def synchronize(self) -> None:
        self._check()
        self.accel.host_syncs += 1

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert self.timing and end.timing, "timing needs events made with enable_timing=True"
        self._check()
        end._check()
        self.accel.phase_streams.add(self.stream.name)
        return 1.0


class FakeStream:
    def __init__(self, accel: "FakeAccelerator", name: str) -> None:
        self.accel, self.name = accel, name

    def wait_event(self, event: FakeEvent) -> None:
        self.accel.check_thread()
        event._check()
        self.accel.waits += 1

    def synchronize(self) -> None:
        self.accel.host_syncs += 1


class FakeAccelerator:
    """Streams and events with DeepSpeed's accelerator surface, checking how the pipeline uses them."""

    def __init__(self) -> None:
        self.default = FakeStream(self, "compute")
        self._local = threading.local()
        self.created = 0
        self.recorded = self.waits = self.host_syncs = self.events = 0
        self.phase_streams: set[str] = set()
        self.devices: set[torch.device] = set()

    def check_thread(self) -> None:
        assert threading.current_thread() is threading.main_thread(), "device work issued from a second thread"

    def Stream(self, device=None) -> FakeStream:  # noqa: N802 (DeepSpeed's name)
        self.created += 1
        return FakeStream(self, ["fetch", "store"][self.created - 1] if self.created <= 2 else f"s{self.created}")

    def Event(self, enable_timing: bool = False) -> FakeEvent:  # noqa: N802
        self.events += 1
        return FakeEvent(self, enable_timing)

    def counts(self) -> dict[str, int]:
        """Events made and recorded, stream waits and host waits so far."""
        return {"events": self.events, "recorded": self.recorded, "stream_waits": self.waits,
                "host_waits": self.host_syncs}

    def current_stream(self, device=None) -> FakeStream:
        assert device is not None, "current_stream() without a device: the current device may not be the engine's"
        self.devices.add(torch.device(device))
        return getattr(self._local, "stream", None) or self.default

    @contextlib.contextmanager
    def stream(self, stream: FakeStream):
        previous = getattr(self._local, "stream", None)
        self._local.stream = stream
        try:
            yield
        finally:
            self._local.stream = previous


def train(tier: str, steps: int = 3, accelerator=None, monkeypatch=None, timing: bool = False, **zo2):
    if accelerator is not None:
        monkeypatch.setattr(streams_module, "stream_accelerator", lambda device: accelerator)
    config = ds_config(tier, lr=1e-2, weight_decay=0.1, **zo2)
    config["wall_clock_breakdown"] = timing  # DeepSpeed's switch for timers: phase times on device streams
    engine, *_ = zo2_deepspeed.initialize(model=make_model("llama"), config=config)
    records = []
    for batch in batches(steps):
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()
        records.append(engine.last_step)
    params = engine.parameter_snapshot()
    pipeline = engine.pipeline
    engine.close()
    if accelerator is not None:
        monkeypatch.setattr(streams_module, "stream_accelerator", original_stream_accelerator)
    return params, records, pipeline


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("zo2", [{}, {"storage_dtype": "bf16"}, {"noise_generator": "philox"}],
                         ids=["fp32", "bf16-storage", "philox"])
def test_stream_schedule_gives_the_cpu_results_and_issues_everything_from_one_thread(monkeypatch, prefetch, zo2):
    if zo2.get("noise_generator") == "philox":
        torch_reference_noise(monkeypatch)
    expected, expected_records, _ = train("cpu", prefetch_blocks=prefetch, **zo2)
    fake = FakeAccelerator()
    with deepspeed_warnings() as warnings:
        params, records, pipeline = train("cpu", accelerator=fake, monkeypatch=monkeypatch, prefetch_blocks=prefetch,
                                          timing=True, **zo2)
    assert pipeline.asynchronous and pipeline._worker is None
    # partitions in pageable memory make every copy block the host: the user is told which field fixes it
    assert any("are not in pinned memory" in w and "offload_param.pin_memory to true" in w for w in warnings)
    assert [r["group_losses"] for r in records] == [r["group_losses"] for r in expected_records]
    for name in expected:
        assert torch.equal(params[name], expected[name]), name
    assert fake.recorded > 0 and fake.waits > 0 and fake.host_syncs > 0
    assert fake.devices == {pipeline.pool.device}  # every stream named with the engine's device
    # phases are device time on their own streams: fetch and store beside compute
    assert {"fetch", "store", "compute"} <= fake.phase_streams
    assert records[-1]["phase_s"]["compute"] > 0 and records[-1]["phase_s"]["store"] > 0
    assert all(s.written is None or s.written.stream.name == "store" for s in pipeline.slots)


def torch_reference_noise(monkeypatch) -> None:
    """Counter-based noise from the torch reference instead of the (interpreted, slow) Triton kernels."""
    monkeypatch.setattr(kernels, "unavailable_reason", lambda device: "the torch reference is under test")


@pytest.mark.parametrize("method", ["mezo", "fzoo", "hizoo"])
@pytest.mark.parametrize("exact_restore", [True, False])
def test_counter_noise_gives_identical_trajectories_on_every_tier(monkeypatch, method, exact_restore):
    """Fused perturbations and updates (torch reference backend): the tiers agree bit for bit."""
    torch_reference_noise(monkeypatch)
    common = dict(method=method, noise_generator="philox", exact_restore=exact_restore)
    resident, r1, _ = train("none", **common)
    offloaded, r2, pipeline = train("cpu", prefetch_blocks=1, **common)
    sharded, r3, _ = train("device", **common)
    assert pipeline.fused
    assert [r["group_losses"] for r in r1] == [r["group_losses"] for r in r2] == [r["group_losses"] for r in r3]
    for name in resident:
        assert torch.equal(resident[name], offloaded[name]), name
        assert torch.equal(resident[name], sharded[name]), name
    start = {n: p.detach() for n, p in make_model("llama").named_parameters()}
    assert relative_error(resident, start) > 1e-5


@needs_triton
def test_triton_kernels_in_the_engine_match_a_reference_mezo_loop():
    data = batches(2, pad_last=3)
    reference = make_model("llama")
    ref_grads = reference_mezo(reference, data, lr=1e-3, eps=1e-2, seed=1, weight_decay=0.1,
                               noise=PhiloxNoise("cpu", use_triton=False))
    ref_params = {n: p.detach().clone() for n, p in reference.named_parameters()}
    engine, *_ = zo2_deepspeed.initialize(model=make_model("llama"), config=ds_config(
        "cpu", lr=1e-3, eps=1e-2, weight_decay=0.1, noise_generator="philox"))
    assert engine.noise.triton is not None and engine.pipeline.fused
    grads = []
    for batch in data:
        engine(**batch)
        engine.step()
        grads.append(engine.last_step["projected_grad"][0])
    params = engine.parameter_snapshot()
    engine.close()
    # kernel and reference z agree to a few ulps, so the perturbed losses differ by a few loss ulps (4.8e-7 each);
    # ZO divides that by 2ε = 2e-2: ~1e-4 per step; 1e-3 allows forty loss ulps (the Triton interpreter's
    # transcendental functions are not those of torch)
    assert grads == pytest.approx(ref_grads, rel=1e-3, abs=1e-3)
    # per element: a few ulps of z times lr·g, plus lr·Δg·|z| ≈ 1e-7 of the parameters' rms (0.21) per 1e-4 of Δg
    assert relative_error(params, ref_params) <= 1e-6


@needs_triton
def test_triton_kernels_give_identical_tiers_with_16_bit_storage():
    common = dict(noise_generator="philox", steps=2)
    offloaded, r1, _ = train("cpu", storage_dtype="bf16", **common)
    again, r2, _ = train("cpu", storage_dtype="bf16", prefetch_blocks=0, **common)
    assert [r["group_losses"] for r in r1] == [r["group_losses"] for r in r2]
    assert all(torch.equal(offloaded[n], again[n]) for n in offloaded)
    # what was written back went through the device's stochastic rounding into bf16 partitions
    assert all(torch.equal(v, v.bfloat16().float()) for v in offloaded.values())
    start = {n: p.detach() for n, p in make_model("llama").named_parameters()}
    assert relative_error(offloaded, start) > 1e-5


def per_step_counts(monkeypatch, tier: str, steps: int = 4, timing: bool = False, layers: int = 4,
                    **zo2) -> tuple[list[dict[str, int]], object]:
    """The stand-in accelerator's counts for each training step (forward, backward, step).

    The model has an untied embedding and LM head twice a layer's size, which made the buffer pool
    trade buffer sizes (and wait on the host for each evicted buffer) every step.
    """
    fake = FakeAccelerator()
    monkeypatch.setattr(streams_module, "stream_accelerator", lambda device: fake)
    config = ds_config(tier, lr=1e-2, **zo2)
    config["wall_clock_breakdown"] = timing
    engine, *_ = zo2_deepspeed.initialize(model=make_model("llama", vocab=576, tied=False, layers=layers),
                                          config=config)
    counts = []
    for batch in batches(steps):
        before, own = fake.counts(), streams_module.DEVICE_WORK.snapshot()
        launches = getattr(engine.noise, "triton", None)
        launched = launches.launches if launches is not None else 0
        fetched = engine.tier.stats.param_fetches
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()
        counts.append({**{k: v - before[k] for k, v in fake.counts().items()},
                       **{f"counted_{k}": v for k, v in streams_module.DEVICE_WORK.since(own).items()},
                       "launches": (launches.launches if launches is not None else 0) - launched,
                       "copies_up": engine.tier.stats.param_fetches - fetched})
    pipeline = engine.pipeline
    engine.close()
    return counts, pipeline


@pytest.mark.parametrize("tier,zo2", [("none", {}), ("cpu", {"storage_dtype": "bf16"}), ("device", {}),
                                      ("cpu", {"storage_dtype": "bf16", "noise_generator": "philox"})],
                         ids=["resident", "cpu-bf16", "zero3-device", "cpu-bf16-philox"])
def test_steady_steps_never_make_the_host_wait(monkeypatch, tier, zo2):
    """Buffers the pool drops are ordered by stream waits on the stream that allocated them, not host waits
    (before: 25 host waits a resident step, 48 a cpu-tier step with bf16 storage on this model)."""
    if zo2.get("noise_generator") == "philox":
        torch_reference_noise(monkeypatch)
    counts, pipeline = per_step_counts(monkeypatch, tier, **zo2)
    assert pipeline.asynchronous
    assert [c["host_waits"] for c in counts[1:]] == [0] * (len(counts) - 1), counts
    assert all(c["stream_waits"] > 0 for c in counts)


def test_hizoo_hessian_partitions_are_pinned_like_the_parameters_and_the_warning_names_them(monkeypatch):
    """Non-blocking copies from pageable memory are synchronous: HiZOO's per-step Hessian round trip
    must come from pinned memory too, and the unpinned warning counts it."""
    fake = FakeAccelerator()
    with deepspeed_warnings() as warnings:
        _, _, pipeline = train("cpu", steps=1, accelerator=fake, monkeypatch=monkeypatch, method="hizoo")
    unpinned = [w for w in warnings if "are not in pinned memory" in w]
    state_names = [f"{s.name} ({n})" for s in pipeline.slots for n in s.stored_state]
    assert state_names and len(unpinned) == 1
    assert unpinned[0].startswith(f"{len(pipeline.slots) + len(state_names)} CPU partitions")

    pinned: list[int] = []

    def pin_memory(self, *args, **kwargs):  # the CPU build of torch cannot pin: record the call instead
        pinned.append(self.numel())
        return self.clone()
    # partitions that DeepSpeed pinned (offload_param.pin_memory true)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *args: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    engine, *_ = zo2_deepspeed.initialize(model=make_model("llama"), config=ds_config("cpu", method="hizoo"))
    states = [t for s in engine.pipeline.slots for t in s.stored_state.values()]
    engine.close()
    assert states and sorted(pinned) == sorted(t.numel() for t in states)


def test_the_engine_makes_its_device_current_also_when_distributed_is_already_initialised(monkeypatch):
    """A script that ran deepspeed.init_distributed() itself on LOCAL_RANK 3 left device 0 current."""
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator

    from zo2_deepspeed import distributed
    accel = get_accelerator()
    chosen: list[int] = []
    monkeypatch.setattr(accel, "device_name", lambda index=None: "cuda" if index is None else f"cuda:{index}")
    monkeypatch.setattr(accel, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    env = distributed.ensure_distributed()
    assert env.local_rank == 3 and chosen == [3]
    assert distributed.compute_device(env.local_rank) == torch.device("cuda:3")


@pytest.mark.parametrize("noise", ["torch", "philox"])
def test_a_steady_step_costs_a_few_events_and_stream_waits_per_block_not_per_parameter(monkeypatch, noise):
    """Per block, whatever its number of parameters: its release's event is waited for once per stream, its
    buffers come back under one event, and phase-timing events only with wall_clock_breakdown. The
    counts the engine keeps (streams.DEVICE_WORK, which benchmarks/gpu.py reports) are the stand-in's."""
    if noise == "philox":
        torch_reference_noise(monkeypatch)
    counts, pipeline = per_step_counts(monkeypatch, "cpu", steps=3, storage_dtype="bf16", noise_generator=noise)
    timed, _ = per_step_counts(monkeypatch, "cpu", steps=3, timing=True, storage_dtype="bf16",
                               noise_generator=noise)
    blocks, slots = len(pipeline.blocks), len(pipeline.slots)
    assert slots >= 5 * blocks  # several parameters a block: per-parameter costs would show
    for c in counts + timed:
        assert (c["counted_events"], c["counted_stream_waits"], c["counted_host_waits"]) == \
            (c["recorded"], c["stream_waits"], c["host_waits"]), c
    steady = counts[-1]
    assert steady["host_waits"] == 0 and steady["copies_up"] == slots
    assert steady["events"] <= (3 if noise == "philox" else 5) * blocks, steady
    assert steady["stream_waits"] <= 14 * blocks, steady
    # timing adds two events per phase entered (per block and group), nothing else
    assert timed[-1]["stream_waits"] == steady["stream_waits"] and timed[-1]["events"] > 4 * steady["events"]


@pytest.mark.slow
@needs_triton
def test_the_triton_kernels_launch_a_few_times_per_block_not_per_parameter(monkeypatch):
    """Perturbed copies and updates are one launch per block already; the write-back's stochastic rounding
    to bf16 partitions is one launch per block too (it was one per parameter). About 20 s of CPU time:
    two steps of interpreted kernels."""
    counts, pipeline = per_step_counts(monkeypatch, "cpu", steps=2, layers=2, storage_dtype="bf16",
                                       noise_generator="philox")
    blocks, slots = len(pipeline.blocks), len(pipeline.slots)
    steady = counts[-1]
    assert steady["host_waits"] == 0
    # per block: a perturbed copy per group (2), the restore needs none, the update, the rounding
    assert 0 < steady["launches"] <= 4 * blocks < slots, steady

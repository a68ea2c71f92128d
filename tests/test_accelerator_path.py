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
from conftest import ds_config
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
        self.stream = stream or self.accel.current_stream()
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
        self.recorded = self.waits = self.host_syncs = 0
        self.phase_streams: set[str] = set()

    def check_thread(self) -> None:
        assert threading.current_thread() is threading.main_thread(), "device work issued from a second thread"

    def Stream(self, device=None) -> FakeStream:  # noqa: N802 (DeepSpeed's name)
        self.created += 1
        return FakeStream(self, ["fetch", "store"][self.created - 1] if self.created <= 2 else f"s{self.created}")

    def Event(self, enable_timing: bool = False) -> FakeEvent:  # noqa: N802
        return FakeEvent(self, enable_timing)

    def current_stream(self) -> FakeStream:
        return getattr(self._local, "stream", None) or self.default

    @contextlib.contextmanager
    def stream(self, stream: FakeStream):
        previous = getattr(self._local, "stream", None)
        self._local.stream = stream
        try:
            yield
        finally:
            self._local.stream = previous


@contextlib.contextmanager
def deepspeed_warnings():
    """The warnings DeepSpeed's logger emits inside the block."""
    import logging

    from deepspeed.utils import logger
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def train(tier: str, steps: int = 3, accelerator=None, monkeypatch=None, **zo2):
    if accelerator is not None:
        monkeypatch.setattr(streams_module, "stream_accelerator", lambda device: accelerator)
    engine, *_ = zo2_deepspeed.initialize(model=make_model("llama"),
                                          config=ds_config(tier, lr=1e-2, weight_decay=0.1, **zo2))
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
                                          **zo2)
    assert pipeline.asynchronous and pipeline._worker is None
    # partitions in pageable memory make every copy block the host: the user is told which field fixes it
    assert any("are not in pinned memory" in w and "offload_param.pin_memory to true" in w for w in warnings)
    assert [r["group_losses"] for r in records] == [r["group_losses"] for r in expected_records]
    for name in expected:
        assert torch.equal(params[name], expected[name]), name
    assert fake.recorded > 0 and fake.waits > 0 and fake.host_syncs > 0
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

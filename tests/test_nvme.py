"""The nvme tier (ZeRO-Infinity): DeepSpeed's swapper under the block pipeline, bit-identical to none / cpu.

Hidden size 512 puts the large matrices (>= 1 MiB per shard, DeepSpeed's swap threshold) on NVMe,
while norms, the k/v projections and the 128-word embedding stay in CPU memory, so both kinds of
shard are exercised.
"""
from __future__ import annotations

import functools
import os
import re

import pytest
import torch

import zo2_deepspeed
from conftest import ds_config
from tiny_models import batches, make_model

pytestmark = [pytest.mark.nvme, pytest.mark.slow]

HIDDEN = 512
STEPS = 3
ARCH = "qwen2"  # untied embedding; the tied case has its own test
# HF's weight init indexes the padding row of an embedding, which fails on a partition (size 0) under
# zero_init; GPT-2's embeddings have no padding index, so it can be built there.
ZERO_INIT_ARCH = "gpt2"
ZERO_INIT_BUFFER = 2048 * 512  # the largest GPT-2 matrix at hidden 512 (mlp.c_fc / mlp.c_proj)
AIO = {"block_size": 1 << 20, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
       "overlap_events": True}


@pytest.fixture(autouse=True)
def _needs_aio():
    """Checked per test, not at import: importing DeepSpeed would slow the default run's collection."""
    from zo2_deepspeed.tiers.nvme import nvme_unavailable_reason
    reason = nvme_unavailable_reason()
    if reason:
        pytest.skip(reason)


def nvme_config(path, **kw) -> dict:
    config = ds_config("cpu", **kw)
    config["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": str(path)}
    config["aio"] = dict(AIO)
    return config


def config_for(tier: str, path=None, **kw) -> dict:
    return nvme_config(path, **kw) if tier == "nvme" else ds_config(tier, **kw)


def nvme_params(model) -> dict:
    from zo2_deepspeed.tiers.nvme import on_nvme
    return {n: p for n, p in model.named_parameters() if on_nvme(p)}


def train(engine, data) -> tuple[list, list]:
    """Per-step group losses and projected gradients: equal values mean equal parameters at every step."""
    losses, grads = [], []
    for batch in data:
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()
        losses.append(engine.last_step["group_losses"])
        grads.append(engine.last_step["projected_grad"])
    return losses, grads


def run(tier: str, path=None, model=None, **kw) -> dict:
    """Train STEPS steps (a fresh default model unless one is given); the trajectory and final parameters."""
    model = make_model(ARCH, hidden=HIDDEN) if model is None else model
    engine, *_ = zo2_deepspeed.initialize(model=model, config=config_for(tier, path, **kw))
    try:
        losses, grads = train(engine, batches(STEPS))
        return {"losses": losses, "grads": grads, "params": engine.parameter_snapshot()}
    finally:
        engine.close()


@functools.lru_cache(maxsize=None)
def reference(tier: str, arch: str = ARCH, **model_kw) -> dict:
    """Runs of the none / cpu tiers, shared by the tests that compare against them."""
    return run(tier, model=make_model(arch, hidden=HIDDEN, **model_kw))


def assert_same_trajectory(got: dict, want: dict) -> None:
    assert got["losses"] == want["losses"]
    assert got["grads"] == want["grads"]
    assert got["params"].keys() == want["params"].keys()
    for name, value in want["params"].items():
        assert torch.equal(got["params"][name], value), name


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_none_cpu_nvme_give_identical_trajectories(prefetch, tmp_path):
    resident, offloaded = reference("none"), reference("cpu")
    on_nvme = run("nvme", tmp_path, prefetch_blocks=prefetch)
    assert_same_trajectory(offloaded, resident)
    assert_same_trajectory(on_nvme, resident)
    start = make_model(ARCH, hidden=HIDDEN)
    assert not torch.equal(on_nvme["params"]["model.layers.0.mlp.up_proj.weight"],
                           start.get_parameter("model.layers.0.mlp.up_proj.weight")), "training must move it"


def test_large_shards_live_on_nvme_and_small_ones_in_cpu(tmp_path):
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus
    model = make_model(ARCH, hidden=HIDDEN)
    engine, *_ = zo2_deepspeed.initialize(model=model, config=nvme_config(tmp_path))
    try:
        on_disk = nvme_params(model)
        assert set(on_disk) == {f"model.layers.{i}.{m}" for i in range(2) for m in (
            "self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "mlp.down_proj.weight")}
        swapper = next(iter(on_disk.values())).nvme_swapper
        assert swapper.dtype == torch.float32
        for p in on_disk.values():
            assert p.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE
            assert os.path.getsize(swapper.get_path(p)) == p.ds_tensor.ds_numel * 4
        for name, p in model.named_parameters():
            if name not in on_disk:
                assert p.ds_tensor.status == PartitionedParamStatus.AVAILABLE and p.ds_tensor.numel() == p.ds_numel
        # sized for the pipeline: 2 resident blocks (prefetch 1) of 5 NVMe matrices; the largest is 512x1024
        assert swapper.param_buffer_count == 10 and swapper.elements_per_buffer == 512 * 1024
        train(engine, batches(1))
        assert all(p.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE for p in on_disk.values())
        assert swapper.available_swap_in_buffers() == swapper.param_buffer_count
    finally:
        engine.close()


def test_tied_embedding_on_nvme(tmp_path):
    """A 512x512 tied embedding is one NVMe shard resident for the whole forward, updated once."""
    tied = dict(tied=True, vocab=512)
    resident = reference("none", "llama", **tied)
    model = make_model("llama", hidden=HIDDEN, **tied)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    on_nvme = run("nvme", tmp_path, model=model)
    assert "model.embed_tokens.weight" in nvme_params(model)
    assert_same_trajectory(on_nvme, resident)
    assert_same_trajectory(reference("cpu", "llama", **tied), resident)


def test_bytes_moved_per_step_are_counted(tmp_path):
    model = make_model(ARCH, hidden=HIDDEN)
    engine, *_ = zo2_deepspeed.initialize(model=model, config=nvme_config(tmp_path))
    try:
        swapper = next(iter(nvme_params(model).values())).nvme_swapper
        shard_bytes = sum(p.ds_tensor.ds_numel * 4 for p in model.parameters())
        disk_bytes = sum(swapper._io_aligned_numel(p.ds_tensor.ds_numel) * 4 for p in nvme_params(model).values())
        assert disk_bytes > shard_bytes / 2
        for step, batch in enumerate(batches(STEPS)):
            before = engine.tier.disk_stats.snapshot()
            engine.backward(engine(**batch))
            engine.step()
            disk = engine.tier.disk_stats.since(before)
            moved = engine.last_step
            # every block is fetched once; from step 1 on it carries the previous step's update back
            assert moved["block_fetches"] == len(engine.blocks)
            assert moved["bytes_read"] == shard_bytes and disk.bytes_read == disk_bytes
            assert moved["bytes_written"] == (shard_bytes if step else 0)
            assert disk.bytes_written == (disk_bytes if step else 0)
    finally:
        engine.close()


def test_too_small_buffer_count_is_a_config_error(tmp_path):
    config = nvme_config(tmp_path)
    config["zero_optimization"]["offload_param"].update(buffer_count=4, buffer_size=ZERO_INIT_BUFFER)
    with zo2_deepspeed.zero_init(config):
        model = make_model(ZERO_INIT_ARCH, hidden=HIDDEN)
    with pytest.raises(zo2_deepspeed.ConfigError, match=r"zero_optimization\.offload_param\.buffer_count is 4.*"
                                                         r"at least 8"):
        zo2_deepspeed.initialize(model=model, config=config)


def test_too_small_buffer_size_is_a_config_error(tmp_path):
    config = nvme_config(tmp_path)
    config["zero_optimization"]["offload_param"].update(buffer_count=8, buffer_size=1000)
    with pytest.raises(zo2_deepspeed.ConfigError, match=r"zero_optimization\.offload_param\.buffer_size is 1000"):
        with zo2_deepspeed.zero_init(config):
            make_model(ZERO_INIT_ARCH, hidden=HIDDEN)


def test_in_place_partitioning_raises_small_buffers_and_fetch_checks_capacity(tmp_path):
    config = nvme_config(tmp_path, prefetch_blocks=0)
    config["zero_optimization"]["offload_param"].update(buffer_count=1, buffer_size=1000)
    model = make_model(ARCH, hidden=HIDDEN)
    engine, *_ = zo2_deepspeed.initialize(model=model, config=config)
    try:
        swapper = next(iter(nvme_params(model).values())).nvme_swapper
        assert (swapper.param_buffer_count, swapper.elements_per_buffer) == (5, 512 * 1024)
        layers = [b for b in engine.blocks if b.name.startswith("model.layers.")]
        works = engine.tier.fetch(layers[0].slots)
        with pytest.raises(zo2_deepspeed.ConfigError, match=r"offload_param\.buffer_count is 5.*at least 10"):
            engine.tier.fetch(layers[1].slots)
        engine.tier.store(layers[0].slots, works, [False] * len(works))
        assert swapper.available_swap_in_buffers() == 5
        train(engine, batches(1))
    finally:
        engine.close()


def test_method_state_round_trips_through_nvme_files(tmp_path):
    from zo2_deepspeed.tiers.nvme import StateFile
    model = make_model(ARCH, hidden=HIDDEN)
    engine, *_ = zo2_deepspeed.initialize(model=model, config=nvme_config(tmp_path))
    tier = engine.tier
    try:
        block = next(b for b in engine.blocks if b.name == "model.layers.1")
        slots = block.slots
        on_disk = [s for s in slots if s.name in nvme_params(model)]
        assert on_disk and len(on_disk) < len(slots)
        written = tier.disk_stats.bytes_written
        for slot in slots:
            tier.create_state(slot, "hessian", 1.0)
        run = next(iter(nvme_params(model).values())).nvme_swapper.run_folder.path
        assert run.parent == tmp_path and run.name.startswith("zo2-run-")
        folder = run / "zo2_state" / "rank0"
        files = sorted(os.listdir(folder))
        assert len(files) == len(on_disk)
        assert tier.disk_stats.bytes_written - written == sum(s.numel * 4 for s in on_disk)
        for slot in on_disk:  # the state rests on NVMe, and so does the parameter
            assert os.path.getsize(folder / f"{slot.param.ds_id}_hessian.swp") == slot.numel * 4
            assert isinstance(slot.stored_state["hessian"], StateFile)
        assert all(isinstance(s.stored_state["hessian"], torch.Tensor) for s in slots if s not in on_disk)

        first = tier.fetch_state(slots, "hessian")
        assert all(t.shape == s.shape and torch.equal(t, torch.ones(s.shape)) for s, t in zip(slots, first))
        changed = [t * 3 + torch.arange(t.numel()).view(t.shape) for t in first]
        for t, new in zip(first, changed):
            t.copy_(new)
        read = tier.stats.bytes_read
        tier.store_state(slots, "hessian", first, [True] * len(slots))
        second = tier.fetch_state(slots, "hessian")
        assert tier.stats.bytes_read - read == sum(s.numel * 4 for s in slots)
        assert all(torch.equal(t, new) for t, new in zip(second, changed))
        for t in second:
            t.zero_()
        tier.store_state(slots, "hessian", second, [False] * len(slots))  # clean: nothing written
        assert all(torch.equal(t, new) for t, new in zip(tier.fetch_state(slots, "hessian"), changed))
    finally:
        engine.close()
    assert os.listdir(folder) == []  # closing removes the state files


def test_zero_init_model_on_nvme_trains(tmp_path):
    """Born as partitions (DeepSpeed partitions each module as soon as it is constructed), then trained."""
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus
    config = nvme_config(tmp_path)
    config["zero_optimization"]["offload_param"].update(buffer_count=8, buffer_size=ZERO_INIT_BUFFER)
    with zo2_deepspeed.zero_init(config):
        model = make_model(ZERO_INIT_ARCH, hidden=HIDDEN)
    on_disk = nvme_params(model)
    assert len(on_disk) == 8  # c_attn, c_proj, c_fc, mlp.c_proj of each layer
    assert all(p.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE for p in on_disk.values())
    assert all(p.numel() == 0 for p in model.parameters())

    engine, *_ = zo2_deepspeed.initialize(model=model, config=config)
    try:
        start = engine.parameter_snapshot()
        losses, grads = train(engine, batches(STEPS))
        got = {"losses": losses, "grads": grads, "params": engine.parameter_snapshot()}
    finally:
        engine.close()
    assert not hasattr(next(iter(on_disk.values())).nvme_swapper, "aio_read_handle")  # exit stays clean

    plain = make_model(ZERO_INIT_ARCH, hidden=HIDDEN)
    with torch.no_grad():
        for name, value in start.items():
            plain.get_parameter(name).copy_(value)
    assert_same_trajectory(got, run("none", model=plain))
    assert not torch.equal(got["params"]["transformer.h.0.mlp.c_fc.weight"],
                           start["transformer.h.0.mlp.c_fc.weight"])


def test_closed_model_trains_again_under_a_new_engine(tmp_path):
    model = make_model(ARCH, hidden=HIDDEN)
    first = run("nvme", tmp_path, model=model)
    assert_same_trajectory(first, reference("none"))
    engine, *_ = zo2_deepspeed.initialize(model=model, config=nvme_config(tmp_path))
    try:
        assert engine.parameter_snapshot().keys() == first["params"].keys()
        assert all(torch.equal(v, first["params"][k]) for k, v in engine.parameter_snapshot().items())
        train(engine, batches(1))
    finally:
        engine.close()


def test_bf16_storage_on_nvme_matches_cpu(tmp_path):
    """16-bit shards: 512x1024 matrices cross the threshold, 512x512 ones stay in CPU; stochastic rounding agrees."""
    on_cpu = run("cpu", storage_dtype="bf16")  # not cached: reference() runs fp32 storage
    model = make_model(ARCH, hidden=HIDDEN)
    on_nvme = run("nvme", tmp_path, model=model, storage_dtype="bf16")
    assert next(iter(nvme_params(model).values())).nvme_swapper.dtype == torch.bfloat16
    assert len(nvme_params(model)) == 6
    assert_same_trajectory(on_nvme, on_cpu)


def test_state_files_pad_odd_sizes(tmp_path):
    """O_DIRECT drops an unaligned tail without an error: a size that is no multiple of 4 KiB still round-trips."""
    from deepspeed.runtime.swap_tensor import constants as c
    from zo2_deepspeed.tiers.nvme import StateFiles
    aio = {c.AIO_BLOCK_SIZE: 1 << 20, c.AIO_QUEUE_DEPTH: 8, c.AIO_SINGLE_SUBMIT: False, c.AIO_OVERLAP_EVENTS: True,
           c.AIO_INTRA_OP_PARALLELISM: 1}
    files = StateFiles(str(tmp_path / "state"), aio)
    try:
        ref, written = files.create("odd", 300_001, 0.5)
        assert written == os.path.getsize(ref.path) == files.padded(300_001) * 4 and written % 4096 == 0
        value = torch.rand(300_001)
        buffer = files.staging(ref.numel)
        buffer[:ref.numel].copy_(value)
        files.write([ref], [buffer])
        buffer.zero_()
        files.release([buffer])
        (back,), _ = files.read([ref])
        assert torch.equal(back[:ref.numel], value)
        files.release([back])
        os.truncate(ref.path, 4096)  # a short read would complete without an error and leave stale values
        with pytest.raises(OSError, match=f"NVMe state file {re.escape(ref.path)} is 4,096 bytes, not the "
                                          f"{files.padded(300_001) * 4:,} it was written with"):
            files.read([ref])
        os.remove(ref.path)
        with pytest.raises(OSError, match=f"NVMe state file {re.escape(ref.path)} cannot be read: No such file"):
            files.read([ref])
    finally:
        files.close()
    assert not os.path.exists(ref.path)


WORKER = '''
import sys
sys.path.insert(0, {tests!r})
import torch, zo2_deepspeed
from conftest import ds_config
from tiny_models import batches, make_model
from zo2_deepspeed.tiers.nvme import StateFile, on_nvme

def run(config):
    model = make_model("qwen2", hidden=512)
    engine, *_ = zo2_deepspeed.initialize(model=model, config=config)
    try:
        grads = []
        for batch in batches(2):
            engine.backward(engine(**batch))
            engine.step()
            grads.append(engine.last_step["projected_grad"])
        if any(on_nvme(p) for p in model.parameters()):
            block = next(b for b in engine.blocks if b.name == "model.layers.0")
            for slot in block.slots:
                engine.tier.create_state(slot, "h", 2.0)
            assert sum(isinstance(s.stored_state["h"], StateFile) for s in block.slots) == 3
            state = engine.tier.fetch_state(block.slots, "h")
            new = [torch.arange(t.numel(), dtype=torch.float32).view(t.shape) for t in state]
            for t, v in zip(state, new):
                t.copy_(v)
            engine.tier.store_state(block.slots, "h", state, [True] * len(state))
            assert all(torch.equal(a, b) for a, b in zip(engine.tier.fetch_state(block.slots, "h"), new))
        return grads, engine.parameter_snapshot()
    finally:
        engine.close()

nvme = ds_config("cpu")
nvme["zero_optimization"]["offload_param"] = {{"device": "nvme", "nvme_path": {path!r}}}
g0, p0 = run(ds_config("none"))
g1, p1 = run(nvme)
assert g0 == g1 and all(torch.equal(p0[k], p1[k]) for k in p0)
print("RANK OK")
'''


@pytest.mark.multirank
def test_two_ranks_gather_nvme_shards(tmp_path):
    """World size 2: each rank swaps in its half (2 MiB matrices give 1 MiB NVMe shards) and gathers."""
    import subprocess
    import sys
    from pathlib import Path

    from zo2_deepspeed.distributed import free_port
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), path=str(tmp_path / "nvme")))
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0 and "RANK OK" in out, out[-3000:]


def test_from_config_under_zero_init_pins_one_set_of_swap_buffers(tmp_path, monkeypatch):
    """transformers opens its own zero.Init inside ours: it must reuse our swapper, not pin a second set."""
    from deepspeed.runtime.swap_tensor import partitioned_param_swapper
    from transformers import AutoModelForCausalLM, LlamaConfig
    built = []
    original_init = partitioned_param_swapper.AsyncPartitionedParameterSwapper.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(partitioned_param_swapper.AsyncPartitionedParameterSwapper, "__init__", counting_init)
    config = nvme_config(tmp_path)
    config["zero_optimization"]["offload_param"].update(buffer_count=10, buffer_size=HIDDEN * 2 * HIDDEN)
    llama = LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=2)
    with zo2_deepspeed.zero_init(config):
        model = AutoModelForCausalLM.from_config(llama)
    swappers = {id(p.nvme_swapper) for p in nvme_params(model).values()}
    assert len(built) == 1 and swappers == {id(built[0])}
    from deepspeed.runtime.zero import partition_parameters
    assert partition_parameters.AsyncPartitionedParameterSwapper is partitioned_param_swapper.AsyncPartitionedParameterSwapper
    engine, *_ = zo2_deepspeed.initialize(model=model, config=config)
    try:
        engine(**batches(1)[0])
        engine.step()
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------- run folders


def run_folders(path) -> list[str]:
    return sorted(p for p in os.listdir(path) if not p.endswith(".lock"))


def test_two_engines_on_one_nvme_path_train_side_by_side_and_clean_up(tmp_path):
    """Each swapper has its own locked folder: a second model on the same path deletes nothing of the first."""
    import gc
    want = reference("none")
    models = [make_model(ARCH, hidden=HIDDEN) for _ in range(2)]
    engines = [zo2_deepspeed.initialize(model=m, config=nvme_config(tmp_path))[0] for m in models]
    folders = run_folders(tmp_path)
    assert len(folders) == 2 and all(f.startswith("zo2-run-") for f in folders)
    assert sorted(os.listdir(tmp_path)) == sorted([*folders, *(f + ".lock" for f in folders)])
    trajectories = [([], []) for _ in engines]
    for batch in batches(STEPS):  # interleaved: both read and write their swap files at once
        for engine, (losses, grads) in zip(engines, trajectories):
            engine.backward(engine(**batch))
            engine.step()
            losses.append(engine.last_step["group_losses"])
            grads.append(engine.last_step["projected_grad"])
    for engine, (losses, grads) in zip(engines, trajectories):
        assert_same_trajectory({"losses": losses, "grads": grads, "params": engine.parameter_snapshot()}, want)
        engine.close()
    assert run_folders(tmp_path) == folders  # the closed models' parameters still live there
    del engines, engine, models
    gc.collect()
    assert os.listdir(tmp_path) == []  # freed with their models (and at exit, see the next test)


PROCESS = r'''
import json, sys
sys.path.insert(0, {tests!r})
import zo2_deepspeed
from test_nvme import nvme_config, train, HIDDEN, ARCH, STEPS
from tiny_models import batches, make_model
model = make_model(ARCH, hidden=HIDDEN)
engine, *_ = zo2_deepspeed.initialize(model=model, config=nvme_config({path!r}))
losses, grads = train(engine, batches(STEPS))
print("TRAJECTORY " + json.dumps([losses, grads]))
# no close(): a clean exit removes the run folder too
'''


def test_two_processes_on_one_nvme_path_and_a_dead_runs_folder(tmp_path):
    """Two runs at once with one nvme_path both train correctly and leave nothing; the folder of a run of this
    host that died without cleaning up (its process gone, its lock free) is removed by the next run; one whose
    lock is held, and one of another host (whose lock shows free here on NFS with local locks), are kept."""
    import fcntl
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"zo2-run-{socket.gethostname()}-{gone.pid}-0123abcd"
    (dead / "zero_stage_3").mkdir(parents=True)
    (tmp_path / f"{dead.name}.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
    other = tmp_path / "zo2-run-another-node-4242-0123abcd"
    other.mkdir()
    (tmp_path / f"{other.name}.lock").write_text(json.dumps({"host": "another-node", "pid": 4242}))
    live = tmp_path / f"zo2-run-{socket.gethostname()}-{os.getpid()}-89abcdef"
    live.mkdir()
    lock = open(tmp_path / f"{live.name}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        script = tmp_path.parent / f"{tmp_path.name}-run.py"
        script.write_text(PROCESS.format(tests=str(Path(__file__).parent), path=str(tmp_path)))
        from zo2_deepspeed.distributed import without_launch_vars
        # without this process's rendezvous variables (an earlier test set them): each run picks its own port
        # and with this process's thread count: the reference trajectory was computed with it, and a matmul's
        # rounding can depend on the number of threads that split it
        env = dict(without_launch_vars(os.environ), OMP_NUM_THREADS=str(torch.get_num_threads()))
        procs = [subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
        for proc, out in zip(procs, outputs):
            assert proc.returncode == 0 and "TRAJECTORY " in out, out[-3000:]
        want = reference("none")
        for out in outputs:
            losses, grads = json.loads(out.split("TRAJECTORY ", 1)[1].splitlines()[0])
            assert losses == want["losses"] and grads == want["grads"]
        assert sorted(os.listdir(tmp_path)) == sorted([live.name, f"{live.name}.lock", other.name,
                                                       f"{other.name}.lock"])
    finally:
        lock.close()


def test_bad_nvme_path_names_the_field(tmp_path, monkeypatch):
    from zo2_deepspeed import ConfigError
    from zo2_deepspeed.tiers import run_folder
    field = "zero_optimization.offload_param.nvme_path"
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "file", f"^{field} '{tmp_path / 'file'}' is a file, not a directory$"),
             (tmp_path / "typo" / "swap", f"^{field} '{tmp_path / 'typo' / 'swap'}' does not exist, nor does its parent "
                                          f"{tmp_path / 'typo'}: create it, or give a folder on a fast local disk$")]
    for path, message in cases:
        with pytest.raises(ConfigError, match=message):
            zo2_deepspeed.initialize(model=make_model(ARCH, hidden=HIDDEN), config=nvme_config(path))
    with monkeypatch.context() as patch:
        patch.setattr(run_folder.os, "access", lambda path, mode: False)  # root may write anywhere: simulated
        with pytest.raises(ConfigError, match=f"^{field} '{tmp_path}' is not writable by this process"):
            zo2_deepspeed.initialize(model=make_model(ARCH, hidden=HIDDEN), config=nvme_config(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["file"]
    # a missing folder whose parent exists is created
    assert_same_trajectory(run("nvme", tmp_path / "new"), reference("none"))
    assert (tmp_path / "new").is_dir()


def test_first_build_of_the_aio_op_is_announced(monkeypatch):
    """Compiling the op takes minutes without output: rank 0 says so first; a built op loads without a word."""
    import logging

    from deepspeed.ops.op_builder import AsyncIOBuilder
    from deepspeed.ops.op_builder.builder import OpBuilder
    from deepspeed.utils import logger

    from zo2_deepspeed.tiers import nvme_aio
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    try:
        monkeypatch.delitem(OpBuilder._loaded_ops, "async_io", raising=False)
        assert nvme_aio._aio_built(AsyncIOBuilder())
        assert hasattr(nvme_aio.aio_op(), "aio_handle") and records == []  # built on this machine: loads silently
        monkeypatch.delitem(OpBuilder._loaded_ops, "async_io")
        monkeypatch.setattr(nvme_aio, "_aio_built", lambda builder: False)  # as on a machine that never built it
        assert hasattr(nvme_aio.aio_op(), "aio_handle")
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1 and records[0].split("] ", 1)[1].startswith(  # [Rank 0], or -1 without a group
        "zo2 nvme: compiling DeepSpeed's AsyncIO op (async_io) for the NVMe tier; the first build on a "
        "machine takes several minutes without output, later runs load it from ")

"""Training a model larger than memory through the NVMe tier: nothing may scale with the whole model.

Each test here would have failed before the fix it guards: DeepSpeed's swapper pinned buffer_count
buffers as large as the largest shard; the buffer pool kept free buffers of every size it had met;
stochastic rounding made temporaries several times a tensor's size; a checkpoint save held every
partition at once; a load kept the checkpoint's files mapped (their pages counted in the resident
set); the export built the whole model. The last tests run benchmarks/beyond_ram.py's flow at half a
billion parameters.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

import zo2_deepspeed
from conftest import ds_config
from tiny_models import batches

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "beyond_ram.py"
AIO = {"block_size": 1 << 20, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
       "overlap_events": True}
HIDDEN, INTER, VOCAB = 512, 1024, 8192
"""An embedding (4 M elements) eight times a layer's largest matrix (0.5 M), like a 32k vocabulary beside a
3k-wide layer."""


@pytest.fixture(autouse=True)
def _needs_aio(request):
    if request.node.get_closest_marker("nvme") is None:
        return
    from zo2_deepspeed.tiers.nvme import nvme_unavailable_reason
    reason = nvme_unavailable_reason()
    if reason:
        pytest.skip(reason)


def nvme_config(path, prefetch: int = 1, storage: str = "fp32", **kw) -> dict:
    config = ds_config("cpu", micro_batch=2, prefetch_blocks=prefetch, storage_dtype=storage, **kw)
    config["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": str(path),
                                                    "buffer_count": 5 * (1 + prefetch),
                                                    "buffer_size": VOCAB * HIDDEN}
    config["aio"] = dict(AIO)
    return config


def build(config: dict, layers: int = 3):
    """A LLaMA with a large vocabulary, born as NVMe partitions."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    shape = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    with zo2_deepspeed.zero_init(config):
        return AutoModelForCausalLM.from_config(shape)


def token_batches(n: int) -> list[dict]:
    return batches(n, rows=2)


def locked_bytes() -> int:
    """Page-locked memory of this process (VmLck), as the kernel counts it."""
    for line in open("/proc/self/status"):
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    return 0


def train(engine, data) -> list:
    out = []
    for batch in data:
        engine.backward(engine(**batch))
        engine.step()
        out.append(engine.last_step["group_losses"])
    return out


# ---------------------------------------------------------------------------------------------- swap buffers

@pytest.mark.nvme
def test_swap_buffers_are_pinned_for_the_shards_in_memory_not_count_times_the_largest(tmp_path):
    from zo2_deepspeed.tiers.nvme import on_nvme
    config = nvme_config(tmp_path)
    before = locked_bytes()
    model = build(config)
    swapper = next(p for p in model.parameters() if on_nvme(p)).nvme_swapper
    upfront = swapper.param_buffer_count * swapper.aligned_elements_per_buffer * 4  # what DeepSpeed pins at once
    engine, *_ = zo2_deepspeed.initialize(model=model, config=config)
    try:
        train(engine, token_batches(2))
        blocks = [[s.param for s in b.slots if on_nvme(s.param)] for b in engine.blocks]
        numel = [sum(swapper._io_aligned_numel(p.ds_tensor.ds_numel) for p in b) for b in blocks]
        window = max(a + b for a, b in zip(numel, numel[1:])) * 4  # two consecutive blocks (prefetch 1)
        by_size: dict[int, int] = {}  # the most shards of one aligned size held in two consecutive blocks
        for first, second in zip(blocks, blocks[1:]):
            counts: dict[int, int] = {}
            for p in first + second:
                size = swapper._io_aligned_numel(p.ds_tensor.ds_numel)
                counts[size] = counts.get(size, 0) + 1
            for size, count in counts.items():
                by_size[size] = max(by_size.get(size, 0), count)
        per_size = sum(size * count for size, count in by_size.items()) * 4
        assert window <= swapper.peak_pinned_bytes <= per_size < upfront / 4
        assert locked_bytes() - before <= per_size  # the kernel's count: nothing else is locked
        assert swapper.available_swap_in_buffers() == swapper.param_buffer_count
    finally:
        engine.close()
    assert swapper.pinned_bytes == 0 and locked_bytes() <= before  # closing unpins the idle buffers


@pytest.mark.nvme
def test_idle_swap_buffers_of_other_sizes_are_unpinned_before_the_limit_is_passed(tmp_path):
    """buffer_count x buffer_size bounds the pinned total, as DeepSpeed's up-front pool did."""
    from zo2_deepspeed.tiers.nvme import on_nvme
    config = nvme_config(tmp_path)
    config["zero_optimization"]["offload_param"]["buffer_count"] = 3  # what building needs
    model = build(config, layers=1)
    swapper = next(p for p in model.parameters() if on_nvme(p)).nvme_swapper
    swapper.param_buffer_count, swapper.available_buffer_ids = 2, swapper.available_buffer_ids[:2]  # a tight limit
    swapper.unpin_idle()
    assert swapper.pinned_bytes == 0
    limit = swapper.param_buffer_count * swapper.aligned_elements_per_buffer * 4
    big = [model.model.embed_tokens.weight, model.lm_head.weight]
    small = [p for n, p in model.named_parameters() if "mlp" in n]
    assert all(on_nvme(p) for p in big + small) and all(p.ds_tensor.ds_numel * 8 == VOCAB * HIDDEN for p in small)
    swapper.swap_in(big, async_op=False)
    assert swapper.pinned_bytes == limit  # two embedding-sized buffers: all the limit allows
    swapper.remove_partition_and_release_buffers(big)
    assert swapper.pinned_bytes == limit  # idle, kept for reuse
    swapper.swap_in(small[:2], async_op=False)
    assert swapper.pinned_bytes == sum(swapper._io_aligned_numel(p.ds_tensor.ds_numel) for p in small[:2]) * 4
    swapper.remove_partition_and_release_buffers(small[:2])
    swapper.elements_per_buffer = 1000
    with pytest.raises(zo2_deepspeed.ConfigError, match=r"offload_param\.buffer_size is 1000 elements"):
        swapper.swap_in(small[:1], async_op=False)


# ---------------------------------------------------------------------------------------------- host buffers

def test_buffer_pool_holds_no_more_than_it_ever_used_at_once():
    """Free buffers of sizes no longer asked for make way for new ones (embeddings, then layers, then a head)."""
    from zo2_deepspeed.buffers import BufferPool
    pool = BufferPool(torch.device("cpu"))
    embedding = [pool.get((1000, 64), torch.float32) for _ in range(3)]
    pool.put_many(embedding)
    most = pool.peak_bytes_in_use
    for _ in range(4):  # a layer's three buffers twice over, three layers in a row
        layer = [pool.get((50, 64), torch.float32) for _ in range(6)]
        assert pool.bytes_in_use + pool.free_bytes <= most
        pool.put_many(layer)
    assert pool.free_bytes <= most
    kept = {(t.numel(), t.dtype) for free in pool._free.values() for t, _ in free}
    assert (50 * 64, torch.float32) in kept  # the recently used size is what stays
    head = [pool.get((1000, 64), torch.float32) for _ in range(3)]
    assert pool.bytes_in_use + pool.free_bytes <= most
    pool.put_many(head)


# ---------------------------------------------------------------------------------------------- rounding

def test_chunked_stochastic_rounding_draws_what_one_call_over_the_tensor_draws(monkeypatch):
    """The same bits as the whole-tensor formula (special values too), from temporaries of a bounded size."""
    from zo2_deepspeed import rounding
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3 * rounding.BF16_CHUNK + 12345, generator=gen) * 0.02
    x[5], x[7], x[9] = float("nan"), float("inf"), -float("inf")
    x[rounding.BF16_CHUNK + 3] = 3.3e38  # rounds up to infinity: keeps its nearest rounding
    x[2 * rounding.BF16_CHUNK] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)  # NaN that carries

    def whole(values: torch.Tensor, seed: int) -> torch.Tensor:
        noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, generator=rounding._generator(
            values.device, seed))
        rounded = ((values.view(torch.int32) + noise) & ~0xFFFF).view(torch.float32)
        return torch.where(torch.isfinite(values) & torch.isfinite(rounded), rounded, values).to(torch.bfloat16)

    expected = whole(x, 11)
    sizes = []
    randint = torch.randint

    def recording(*args, **kwargs):
        out = randint(*args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "randint", recording)
    got = rounding.stochastic_round(x, torch.bfloat16, 11)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    assert len(sizes) == 4 and max(sizes) == rounding.BF16_CHUNK


# ---------------------------------------------------------------------------------------------- checkpoints, export

def mapped_bytes(path: Path) -> int:
    """Resident bytes of this process's memory maps of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


class Interleaving:
    """Records, at each read of a tensor, how many bytes were already written: a streaming writer has written
    all but the last tensor it read; one that reads everything first has written nothing."""

    def __init__(self, written: Callable[[], int]) -> None:
        self.written = written
        self.reads: list[tuple[int, int]] = []  # (bytes written before this read, bytes this read returned)

    def wrap(self, fn: Callable) -> Callable:
        def recorded(*args, **kwargs):
            before = self.written()
            tensor = fn(*args, **kwargs)
            self.reads.append((before, tensor.numel() * tensor.element_size()))
            return tensor
        return recorded

    def assert_streamed(self) -> None:
        assert len(self.reads) > 10
        read_so_far = 0
        for before, size in self.reads:
            assert before >= read_so_far - max(s for _, s in self.reads), (before, read_so_far)
            read_so_far += size


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


@pytest.mark.nvme
def test_checkpoint_save_load_and_export_hold_one_tensor_at_a_time(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from zo2_deepspeed import checkpoint
    from zo2_deepspeed.export import export
    config = nvme_config(tmp_path / "swap", storage="bf16")
    model = build(config, layers=4)
    engine, *_ = zo2_deepspeed.initialize(model=model, config=config)
    try:
        data = token_batches(3)
        train(engine, data[:2])
        save = Interleaving(lambda: folder_bytes(tmp_path / "ckpt"))
        monkeypatch.setattr(engine.tier, "read_partition", save.wrap(engine.tier.read_partition))
        engine.save_checkpoint(str(tmp_path / "ckpt"))
        assert len(save.reads) == len(engine.pipeline.slots)
        save.assert_streamed()
        expected = engine.parameter_snapshot()

        rank_file = tmp_path / "ckpt" / "global_step2" / checkpoint.rank_file(0)
        mapped = []
        write = engine.tier.write_partition

        def writing(slot, values):
            mapped.append(mapped_bytes(rank_file))
            return write(slot, values)

        monkeypatch.setattr(engine.tier, "write_partition", writing)
        train(engine, data[2:])
        engine.load_checkpoint(str(tmp_path / "ckpt"))
        assert len(mapped) == len(engine.pipeline.slots) and max(mapped) == 0  # read, never mapped
        assert all(torch.equal(v, expected[k]) for k, v in engine.parameter_snapshot().items())
    finally:
        engine.close()

    from zo2_deepspeed.export_dir import STAGING  # the export is written there, then renamed to hf
    exported = Interleaving(lambda: folder_bytes(tmp_path / "hf") + folder_bytes(tmp_path / f"{STAGING}hf"))
    monkeypatch.setattr(checkpoint._Shards, "full", exported.wrap(checkpoint._Shards.full))
    export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), max_shard_bytes=VOCAB * HIDDEN * 2)
    assert len(exported.reads) == len(expected)
    exported.assert_streamed()
    files = sorted(os.listdir(tmp_path / "hf"))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) >= 3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # plain transformers, no zo2_deepspeed
    params = dict(loaded.named_parameters())
    assert params.keys() == expected.keys()
    assert all(params[k].dtype == torch.bfloat16 or loaded.dtype != torch.bfloat16 for k in params)
    assert all(torch.equal(params[k].detach().float(), v.float()) for k, v in expected.items())


# ---------------------------------------------------------------------------------------------- the benchmark's flow

SMALL = ["--layers", "64", "--hidden", "1024", "--inter", "2816", "--heads", "16", "--kv_heads", "8",
         "--min_params", "0", "--probe_gb", "0.5", "--no_results"]
"""0.84 B parameters (3.4 GB in fp32, 1.7 GB stored in bf16), the LLaMA-2 vocabulary."""


def run_script(args: list[str], **kw) -> subprocess.CompletedProcess:
    from zo2_deepspeed.distributed import without_launch_vars
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=without_launch_vars(os.environ), **kw)


def test_free_space_is_checked_first_and_names_what_is_needed(tmp_path):
    work = tmp_path / "work"
    result = run_script(["--layers", "100000", "--workdir", str(work), "--no_results"], timeout=120)
    assert result.returncode != 0
    assert "this run needs" in result.stderr and "GB free in" in result.stderr
    assert "swap files" in result.stderr and "--workdir on a larger disk" in result.stderr
    assert not work.exists()  # refused before anything was written


@pytest.mark.slow
@pytest.mark.nvme
def test_a_deep_model_trains_resumes_and_exports_within_a_memory_bound(tmp_path):
    report, work = tmp_path / "run.json", tmp_path / "work"
    result = run_script([*SMALL, "--workdir", str(work), "--json", str(report)], timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not work.exists()  # swap files, checkpoint and export are removed
    data = json.loads(report.read_text())
    out, verdict = data["out"], data["verdict"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from beyond_ram import Shape, disk_need
    shape = Shape(**data["plan"]["shape"])
    model = out["model"]
    assert model["params"] == shape.params >= 0.5e9
    assert model["swap_bytes"] == disk_need(shape).swap  # the free-space check counts what is really written
    assert out["checkpoint_bytes"] <= disk_need(shape).checkpoint
    checks = out["checks"]
    assert checks["probe_changed"] and checks["resume_bitwise"] and checks["losses_finite"]
    assert checks["export_tensors_checked"] == len(shape.matrices()) and checks["export_probe_matches"]
    assert len(out["steps"]) == 5 and all(s["disk_bytes_read"] >= model["swap_bytes"] for s in out["steps"])
    # Nothing proportional to the model: the run's peak resident set stays below the model's stored (bf16)
    # bytes, and beyond its imports within a few blocks' working set, whatever the depth.
    layer_bytes = shape.per_layer() * 4
    embedding_bytes = shape.vocab * shape.hidden * 4
    assert out["rss"]["peak"] < model["fp32_bytes"] / 2, out["rss"]
    assert out["rss"]["peak"] - out["rss"]["imports"] < 8 * embedding_bytes + 12 * layer_bytes, out["rss"]
    assert verdict["checks_ok"]


def _child_of(parent: int) -> int:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                return int(pid)
    return 0


@pytest.mark.slow
@pytest.mark.nvme
@pytest.mark.parametrize("how", ["ctrl-c", "child crashes"])
def test_swap_files_are_removed_after_ctrl_c_or_a_crash(tmp_path, how):
    from zo2_deepspeed.distributed import without_launch_vars
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *SMALL, "--workdir", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=without_launch_vars(os.environ))
    seen = []
    try:
        # Signal only once the run proves it is mid-training: step 1 has begun, with step 2, the checkpoint and
        # the export still to come (minutes at this size), so the signal cannot arrive after the run ended.
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[beyond_ram] step 1 ..."):
                break
        else:
            pytest.fail("the run ended before its second step:\n" + "".join(seen)[-3000:])
        assert list((work / "swap").rglob("*.swp")), "mid-training, yet no swap files"
        if how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        else:
            os.kill(_child_of(proc.pid), signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
        output = "".join(seen) + output
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (130 if how == "ctrl-c" else 1), output[-3000:]
    assert not work.exists(), output[-3000:]

"""Perturbation parallelism (zo2.parallel.perturbation): the ranks of a data-parallel replica split one
micro-batch's perturbation groups and end bit-identical to one rank running them all."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zo2_deepspeed
from test_data_parallel import assert_bitwise, launch, start_ranks
from tiny_models import batches, make_model
from zo2_deepspeed.comm import DIGEST_BITS, batch_digest
from zo2_deepspeed.config import batch_sizes_for_world, parse_config
from zo2_deepspeed.data import ZO2DataLoader, require_batches
from zo2_deepspeed.distributed import ParallelGrid, without_launch_vars
from zo2_deepspeed.errors import BatchError, ConfigError

ROOT = Path(__file__).resolve().parents[1]

def config_with(perturbation: object, method: str = "mezo", **zo2: object) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 1e-3}},
            "zo2": {"method": method, "parallel": {"perturbation": perturbation}, **zo2}}


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("parallel, message", [
    ({"perturbation": 0}, "zo2.parallel.perturbation must be >= 1, got 0"),
    ({"perturbation": 2.0}, "zo2.parallel.perturbation must be an integer, got 2.0 (float)"),
    ({"perturbation": "2"}, "zo2.parallel.perturbation must be an integer, got '2' (str)"),
    ({"data": 2}, "zo2.parallel.data is not a known field (known fields: perturbation)"),
    (2, "zo2.parallel must be an object, got 2 (int)"),
])
def test_bad_parallel_section_is_named(parallel, message):
    config = config_with(1)
    config["zo2"]["parallel"] = parallel
    with pytest.raises(ConfigError) as info:
        parse_config(config)
    assert str(info.value) == message


@pytest.mark.parametrize("method, extra, groups", [("mezo", {}, 2), ("hizoo", {}, 3), ("lozo", {}, 2),
                                                   ("fzoo", {"num_perturbations": 3}, 4)])
def test_more_perturbation_ranks_than_groups_is_refused(method, extra, groups):
    parse_config(config_with(groups, method, **extra))
    with pytest.raises(ConfigError) as info:
        parse_config(config_with(groups + 1, method, **extra))
    message = (f"zo2.parallel.perturbation is {groups + 1}, more than the {groups} perturbation groups of a {method} "
               f"step: every perturbation rank needs at least one group; set it to at most {groups}")
    if method == "fzoo":
        message += " or raise zo2.num_perturbations (FZOO runs num_perturbations + 1 groups)"
    assert str(info.value) == message


def test_perturbation_ranks_must_divide_the_world_at_initialize():
    with pytest.raises(ConfigError) as info:
        zo2_deepspeed.initialize(model=make_model(), config=config_with(2))
    assert str(info.value) == ("zo2.parallel.perturbation 2 does not divide the world size 1: the world is world/P "
                               "data-parallel replicas × P perturbation ranks; set it to one of [1]")
    with pytest.raises(ConfigError, match=r"does not divide the world size 6: .* set it to one of \[1, 2, 3, 6\]"):
        ParallelGrid(0, 6, 4)


def test_train_batch_size_counts_data_parallel_replicas():
    """As under DeepSpeed's model parallelism: micro × accumulation × world/P distinct samples per step."""
    config = {**config_with(2), "gradient_accumulation_steps": 2}
    assert batch_sizes_for_world(config, 4) == (2, 2, 8)
    assert batch_sizes_for_world({**config, "train_batch_size": 8}, 4) == (2, 2, 8)
    with pytest.raises(ConfigError) as info:
        batch_sizes_for_world({**config, "train_batch_size": 16}, 4)
    assert str(info.value) == ("train_batch_size 16 != train_micro_batch_size_per_gpu 2 × gradient_accumulation_steps "
                               "2 × data-parallel size 2 (world size 4 / zo2.parallel.perturbation 2) = 8: correct "
                               "one of them, or drop train_batch_size to have it derived")
    only_total = {k: v for k, v in config.items() if k != "train_micro_batch_size_per_gpu"}
    assert batch_sizes_for_world({**only_total, "train_batch_size": 8}, 4) == (2, 2, 8)
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        batch_sizes_for_world(config, 3)


def test_training_data_is_counted_per_replica():
    require_batches(4, 2, 4, drop_last=True, perturbation=2)  # 2 replicas × micro-batch 2
    with pytest.raises(BatchError) as info:
        require_batches(3, 2, 4, drop_last=True, perturbation=2)
    assert str(info.value) == (
        "the training data gives no micro-batch (3 examples, train_micro_batch_size_per_gpu 2, data-parallel size 2 "
        "(world size 4 / zo2.parallel.perturbation 2), drop_last=True: 1 examples per replica, fewer than one "
        "micro-batch, so a training loop would never get a batch): give it at least 4 examples (micro-batch × "
        "data-parallel size) or set train_micro_batch_size_per_gpu to at most 1")


# ---------------------------------------------------------------------------------------------- grid
def test_grid_places_consecutive_ranks_in_one_replica():
    grids = [ParallelGrid(r, 6, 3) for r in range(6)]
    assert [(g.replica, g.slot) for g in grids] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert grids[4].replicas == 2 and grids[4].replica_ranks() == [3, 4, 5] and grids[4].replica_ranks(0) == [0, 1, 2]
    plain = ParallelGrid(1, 2)
    assert (plain.replicas, plain.replica, plain.slot, list(plain.share(9))) == (2, 1, 0, list(range(9)))


@pytest.mark.parametrize("groups, ranks, sizes", [(2, 2, [1, 1]), (3, 2, [2, 1]), (9, 2, [5, 4]), (9, 4, [3, 2, 2, 2]),
                                                  (4, 4, [1, 1, 1, 1]), (9, 9, [1] * 9)])
def test_shares_are_contiguous_balanced_and_cover_every_group(groups, ranks, sizes):
    grid = ParallelGrid(0, ranks, ranks)
    shares = [grid.share(groups, slot) for slot in range(ranks)]
    assert [len(s) for s in shares] == sizes
    assert [g for s in shares for g in s] == list(range(groups))


def test_ranks_of_a_replica_read_the_same_shard():
    data = list(range(16))
    shards = []
    for rank in range(4):
        grid = ParallelGrid(rank, 4, 2)
        loader = ZO2DataLoader(data, 2, grid.replicas, grid.replica, seed=3, collate_fn=list)
        shards.append([x for batch in loader for x in batch])
    assert shards[0] == shards[1] and shards[2] == shards[3]
    assert sorted(shards[0] + shards[2]) == data


def test_batch_digest_tells_micro_batches_apart():
    a, b = batches(2, rows=2)
    assert batch_digest(a) == batch_digest(copy.deepcopy(a)) < 2 ** DIGEST_BITS
    assert batch_digest(a) != batch_digest(b)
    swapped = {"input_ids": a["input_ids"].flip(0), "attention_mask": a["attention_mask"], "labels": a["labels"]}
    assert batch_digest(swapped) != batch_digest(a)
    assert batch_digest({**a, "labels": a["labels"][:, :8]}) != batch_digest(a)
    assert batch_digest({"input_ids": torch.tensor(5)}) != batch_digest({"input_ids": torch.tensor(6)})


# ---------------------------------------------------------------------------------------------- multi-rank
def assert_same_run(a: dict, b: dict) -> None:
    """Bit-identical parameters, group losses, projected gradients and returned losses."""
    assert_bitwise(a["params"], b["params"])
    for key in ("group_losses", "projected_grad", "loss"):
        assert [r[key] for r in a["records"]] == [r[key] for r in b["records"]], key
    assert a["returned"] == b["returned"]


def trained(run: dict, hidden: int = 32) -> bool:
    start = make_model("llama", hidden=hidden)
    return max(float((run["params"][n] - p.detach()).abs().max()) for n, p in start.named_parameters()) > 1e-4


@pytest.mark.parametrize("tier, method, extra, forwards", [
    ("cpu", "mezo", (), [1, 1]),
    ("cpu", "fzoo", (), [5, 4]),
    ("cpu", "hizoo", (), [2, 1]),
    ("cpu", "lozo", ("--lazy_steps", "2"), [1, 1]),  # the 3 steps cross a window end (a merge)
    ("none", "fzoo", ("--directions", "3", "--gas", "2"), [2, 2]),
    ("device", "hizoo", ("--gas", "2"), [2, 1]),
    pytest.param("nvme", "hizoo", ("--hidden", "512"), [2, 1], marks=pytest.mark.nvme),
])
@pytest.mark.multirank
@pytest.mark.slow
def test_two_perturbation_ranks_equal_one_rank_bitwise(tmp_path, tier, method, extra, forwards):
    if tier == "nvme":
        from zo2_deepspeed.tiers.nvme import nvme_unavailable_reason
        if nvme_unavailable_reason():
            pytest.skip(nvme_unavailable_reason())
    common = ("--tier", tier, "--method", method, *extra)
    two = launch("torchrun", tmp_path / "two", *common, "--perturbation", "2")
    one = launch("single", tmp_path / "one", *common)
    options = dict(zip(extra[::2], extra[1::2]))
    for rank in two:
        assert_same_run(rank, one[0])
    assert trained(one[0], int(options.get("--hidden", 32)))
    steps, gas = len(one[0]["records"]), int(options.get("--gas", 1))
    # each rank ran only its share of the groups: a block's forward ran once per group it owns
    assert [r["group_forwards"] for r in two] == [f * steps * gas for f in forwards]
    assert one[0]["group_forwards"] == sum(forwards) * steps * gas
    if tier == "nvme":
        assert min(r["on_nvme"] for r in two + one) > 0


@pytest.mark.multirank
@pytest.mark.slow
def test_a_2x2_grid_equals_data_parallel_and_one_rank(tmp_path):
    """2 replicas × 2 perturbation ranks: bitwise as 2 data-parallel ranks on the same micro-batches, and as one
    rank on the whole data-parallel batch (float64 loss sums: the batch's split does not round)."""
    common = ("--tier", "cpu", "--method", "fzoo", "--directions", "3")
    grid = launch("torchrun", tmp_path / "grid", *common, "--perturbation", "2", nproc=4)
    dp = launch("torchrun", tmp_path / "dp", *common, nproc=2)
    one = launch("single", tmp_path / "one", *common)
    for rank in range(4):
        replica = dp[rank // 2]
        assert_bitwise(grid[rank]["params"], replica["params"])
        assert [r["group_losses"] for r in grid[rank]["records"]] == [r["group_losses"] for r in replica["records"]]
        assert grid[rank]["returned"] == replica["returned"]  # the replica's own micro-batch estimate
    assert grid[0]["returned"] != grid[2]["returned"]  # replicas ran different micro-batches
    # DeepSpeed's getters answer per replica (DeepSpeedEngine's would give the global rank), and so does the
    # data shard of engine.deepspeed_io: the ranks of a replica read what the data-parallel rank reads
    for rank in range(4):
        assert grid[rank]["surface"]["dp_rank"] == rank // 2 and grid[rank]["surface"]["dp_world_size"] == 2
        assert grid[rank]["surface"]["mpu"] == [rank // 2, 2, 0, 1]
        assert grid[rank]["surface"]["shard"] == dp[rank // 2]["surface"]["shard"]
    assert dp[0]["surface"]["shard"] != dp[1]["surface"]["shard"]
    assert [r["surface"]["dp_rank"] for r in dp] == [0, 1]
    assert [r["group_forwards"] for r in grid] == [2 * 3, 2 * 3, 2 * 3, 2 * 3]
    assert_bitwise(grid[0]["params"], one[0]["params"])
    assert trained(one[0])


@pytest.mark.multirank
@pytest.mark.slow
def test_deepspeed_launcher_runs_perturbation_ranks(tmp_path):
    ds = launch("deepspeed", tmp_path / "ds", "--method", "hizoo", "--perturbation", "2", "--steps", "2")
    one = launch("single", tmp_path / "one", "--method", "hizoo", "--steps", "2")
    for rank in ds:
        assert_same_run(rank, one[0])


@pytest.mark.parametrize("first, then", [("p2", "single"), ("single", "p2")])
@pytest.mark.multirank
@pytest.mark.slow
def test_checkpoint_resumes_across_perturbation_sizes(tmp_path, first, then):
    """Saved with 2 perturbation ranks, resumed on one rank (and the reverse): the same run, bitwise, data order
    included (the engine's loader shards by replica, and its position is in the checkpoint)."""
    common = ("--tier", "cpu", "--method", "hizoo", "--loader")
    launcher = {"p2": ("torchrun", ("--perturbation", "2")), "single": ("single", ())}
    ckpt = tmp_path / "ckpt"
    uninterrupted = launch("single", tmp_path / "ref", *common, "--steps", "4")[0]
    name, extra = launcher[first]
    launch(name, tmp_path / "first", *common, *extra, "--steps", "2", "--save_dir", str(ckpt))
    name, extra = launcher[then]
    resumed = launch(name, tmp_path / "then", *common, *extra, "--steps", "4", "--load_dir", str(ckpt))
    for rank in resumed:
        assert_bitwise(rank["params"], uninterrupted["params"])
        assert [r["group_losses"] for r in rank["records"]] == [r["group_losses"] for r in uninterrupted["records"][2:]]
        assert rank["returned"] == uninterrupted["returned"][2:]


@pytest.mark.multirank
@pytest.mark.slow
def test_ranks_of_a_perturbation_group_must_run_the_same_micro_batch(tmp_path):
    procs = start_ranks(tmp_path, "--tier", "none", "--perturbation", "2", "--fail", "other_batch", "--fail_step", "1")
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode != 0
        assert ("BatchError: ranks [0, 1] form one perturbation group (zo2.parallel.perturbation 2) and must run the "
                "same micro-batch, but at step 1 rank(s) [1] ran a different one than rank 0: shard the data by "
                "data-parallel replica") in err, err[-3000:]


@pytest.mark.multirank
@pytest.mark.slow
def test_benchmark_writes_its_section(tmp_path):
    """benchmarks/parallel.py on a tiny shape: both variants run, end bit-identical, and the section is written."""
    results = tmp_path / "RESULTS.md"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "parallel.py"), "--seq", "32", "--layers", "1",
                          "--hidden", "32", "--inter", "64", "--heads", "4", "--kv", "2", "--vocab", "128",
                          "--rounds", "1", "--steps", "1", "--results", str(results)],
                         env=without_launch_vars(os.environ), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    text = results.read_text()
    assert "<!-- parallel:start -->" in text and "| parameters after the run bit-identical | yes | yes |" in text
    assert "| 2 perturbation ranks | " in text and "| 5 and 4 | 88 |" in text

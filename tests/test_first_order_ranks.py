"""The first-order tail across processes: 2 ranks = 1 rank bit for bit (data and perturbation parallel), the NVMe
tier = the CPU tier, and SIGKILL then resume = an uninterrupted run. Slow: each test starts 2-4 processes."""
from __future__ import annotations

import signal

import pytest
import torch

from test_checkpoint import run_worker
from test_data_parallel import assert_bitwise, launch

pytestmark = [pytest.mark.slow]
HYBRID = ("--first_order", "1", "--chunk_rows", "4")
"""The last layer and the head first-order; gradients in chunks of 4 rows, the micro-batch of the 2-rank runs."""


@pytest.mark.multirank
@pytest.mark.parametrize("tier, method", [("cpu", "mezo"), ("none", "hizoo")])
def test_two_ranks_equal_one_rank_and_accumulation(tmp_path, tier, method):
    """8 rows per step: 2 ranks × 4, 1 rank × 8 (two chunks), 1 rank × 2 accumulated micro-batches of 4. About
    40-90 s."""
    common = ("--tier", tier, "--method", method, *HYBRID)
    two = launch("torchrun", tmp_path / "two", *common)
    one = launch("single", tmp_path / "one", *common)
    accumulated = launch("single", tmp_path / "gas", *common, "--gas", "2")
    assert_bitwise(two[0]["params"], two[1]["params"])
    assert_bitwise(two[0]["params"], one[0]["params"])
    assert_bitwise(accumulated[0]["params"], one[0]["params"])
    for run in (two[0], two[1], accumulated[0]):
        assert [r["first_order"] for r in run["records"]] == [r["first_order"] for r in one[0]["records"]]
    assert all(r["first_order"]["grad_norm"] > 0 for r in one[0]["records"])


@pytest.mark.multirank
def test_perturbation_ranks_reduce_the_tail_gradients_of_each_others_groups(tmp_path):
    """MeZO's +εz and −εz groups on two ranks (zo2.parallel.perturbation 2): each rank's tail gradient is half of
    the mean, the all-reduce completes it; = one rank running both groups. About 30-60 s."""
    two = launch("torchrun", tmp_path / "two", "--perturbation", "2", *HYBRID)
    one = launch("single", tmp_path / "one", *HYBRID)
    assert_bitwise(two[0]["params"], one[0]["params"])
    assert_bitwise(two[1]["params"], one[0]["params"])
    assert two[0]["group_forwards"] * 2 == one[0]["group_forwards"]


@pytest.mark.nvme
def test_nvme_tier_equals_the_cpu_tier(tmp_path):
    """Partitions of at least 1 MiB on NVMe (hidden 512): the tail is read once and written through at the end.
    About 30-60 s."""
    common = ("--hidden", "512", "--steps", "2", *HYBRID)
    nvme = launch("single", tmp_path / "nvme", "--tier", "nvme", *common)
    cpu = launch("single", tmp_path / "cpu", "--tier", "cpu", *common)
    assert nvme[0]["on_nvme"] > 0
    assert_bitwise(nvme[0]["params"], cpu[0]["params"])


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
def test_sigkill_then_resume_is_bitwise_equal(tmp_path, storage):
    """Saves every step (the tail's masters, AdamW state, WarmupLR), killed after step 4, resumed to step 7.
    About 30-60 s."""
    common = ("--tier", "cpu", "--first_order", "--storage", storage, "--steps", "7")
    straight = run_worker("--save_dir", str(tmp_path / "a"), *common, "--out", str(tmp_path / "a.pt"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run_worker("--save_dir", str(tmp_path / "b"), *common, "--die_after", "4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_worker("--save_dir", str(tmp_path / "b"), *common, "--resume", "--out", str(tmp_path / "b.pt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_cpu_adam_offload_matches_torch_adamw():
    """offload_optimizer cpu: masters and Adam state in CPU memory, DeepSpeed's CPU Adam; the same steps as torch's
    AdamW to rounding. Slow only for the first run in an environment, which builds DeepSpeed's cpu_adam op (minutes);
    then 2-5 s."""
    import zo2_deepspeed
    from test_first_order import hybrid_config, relative_error, train
    from tiny_models import batches, make_model
    data = batches(3)
    runs = {}
    for offload in ("none", "cpu"):
        config = hybrid_config("cpu", first_order={"offload_optimizer": {"device": offload},
                                                   "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
        engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=config)
        optimizer = type(engine.first_order.optimizer).__name__
        train(engine, data)
        runs[offload] = (optimizer, engine.parameter_snapshot())
        engine.close()
    assert runs["none"][0] == "AdamW" and runs["cpu"][0] == "DeepSpeedCPUAdam"
    start = {n: p.detach() for n, p in make_model().named_parameters()}
    moved = {k: {n: v[1][n] - start[n] for n in start} for k, v in runs.items()}
    assert relative_error(moved["cpu"], moved["none"], set(start)) <= 1e-5

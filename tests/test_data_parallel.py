"""Data parallel ZO on 2 CPU ranks: same trajectory as one rank, tiny communication, failures surface."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster import python_bin
from zo2_deepspeed.distributed import free_port, without_launch_vars

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "dp_worker.py")
pytestmark = [pytest.mark.multirank, pytest.mark.slow]


def base_env() -> dict:
    env = without_launch_vars(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank unless the caller chose (CI reruns with 2)
    return env


def launch(launcher: str, out: Path, *args: str, nproc: int = 2, timeout: int = 600) -> list[dict]:
    worker_args = ["--out", str(out), *args]
    if launcher == "single":
        cmd = [sys.executable, WORKER, *worker_args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), WORKER, *worker_args]
    else:
        cmd = [python_bin("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), WORKER, *worker_args]
    result = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    n = 1 if launcher == "single" else nproc
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(n)]


def assert_bitwise(a: dict, b: dict) -> None:
    """Equal bit for bit, naming the first parameter that differs and by how much.

    Runs that split the same global batch differently (ranks, micro-batches) are compared this way,
    not within a tolerance: the group losses are float64 sums of the same fp32 token losses (exact,
    so order-free) rounded to fp32 once per step, and a row's forward does not depend on the other
    rows of its batch (tests/test_determinism.py checks both), so every later operation sees the same
    bits. A tolerance would hide a real divergence: HiZOO's curvature |L₊ + L₋ − 2L₀|/2ε² multiplies
    a one-ulp loss difference (5e-7 at a loss of 5.5) by α/2ε² = 500 before it reaches H.
    """
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), (name, float((a[name].float() - b[name].float()).abs().max()))


@pytest.mark.parametrize("tier, method", [("cpu", "mezo"), ("none", "mezo"), ("cpu", "fzoo"), ("cpu", "hizoo"),
                                          ("cpu", "lozo")])
def test_two_ranks_equal_one_rank_and_accumulation(tmp_path, tier, method):
    # LOZO: ν = 2, so the 3 steps cross a window end (step 2 merges window 0's U_acc into the partitions)
    common = ("--tier", tier, "--method", method) + (("--lazy_steps", "2") if method == "lozo" else ())
    two = launch("torchrun", tmp_path / "two", *common)
    one = launch("single", tmp_path / "one", *common)
    accumulated = launch("single", tmp_path / "gas", *common, "--global_rows", "8", "--gas", "2")
    for name in two[0]["params"]:
        assert torch.equal(two[0]["params"][name], two[1]["params"][name]), name
    assert_bitwise(two[0]["params"], one[0]["params"])
    assert_bitwise(accumulated[0]["params"], one[0]["params"])
    start = __import__("tiny_models").make_model("llama")
    moved = max(float((one[0]["params"][n] - p.detach()).abs().max()) for n, p in start.named_parameters())
    assert moved > 1e-4
    # group losses were all-reduced: both ranks saw the same projected gradient
    assert [r["projected_grad"] for r in two[0]["records"]] == [r["projected_grad"] for r in two[1]["records"]]
    # ... and the same step as one rank on the whole batch, and as accumulation over two micro-batches
    for run in (two[0], accumulated[0]):
        for key in ("group_losses", "projected_grad"):
            assert [r[key] for r in run["records"]] == [r[key] for r in one[0]["records"]], key


@pytest.mark.parametrize("method", ["mezo", "hizoo"])
def test_padded_uneven_batches_and_a_short_last_batch_give_one_ranks_step_bitwise(tmp_path, method):
    """Rows of 2 to 16 tokens, and a last step of 5 rows, which 2 data-parallel ranks split 3 + 2, accumulation
    over 2 micro-batches splits 3 + 2 too (both short of the micro-batch of 4), and 2 perturbation ranks run whole.
    Every token weighs the same in each (Σ token-loss sums / Σ tokens, divided once), so all four runs take one
    rank's steps bit for bit; averaging per-micro-batch means, as before, made each split another objective.
    HiZOO's curvature term multiplies a one-ulp loss difference by α/2ε² = 500, so it shows any rounding slip."""
    from tiny_models import padded_batches
    common = ("--tier", "cpu", "--method", method, "--padded", "--last_rows", "5")
    one = launch("single", tmp_path / "one", *common)
    runs = {"2 data-parallel ranks": launch("torchrun", tmp_path / "two", *common),
            "accumulation": launch("single", tmp_path / "gas", *common, "--gas", "2"),
            "2 perturbation ranks": launch("torchrun", tmp_path / "pert", *common, "--perturbation", "2")}
    data = padded_batches(3, rows=8, last_rows=5)
    tokens = [int(b["attention_mask"][:, 1:].sum()) for b in data]
    assert [(r["samples"], r["items"]) for r in one[0]["records"]] == list(zip([8, 8, 5], tokens))
    for name, ranks in runs.items():
        for rank in ranks:
            assert_bitwise(rank["params"], one[0]["params"])
            for key in ("group_losses", "projected_grad", "samples", "items"):
                assert [r[key] for r in rank["records"]] == [r[key] for r in one[0]["records"]], (name, key)
    start = __import__("tiny_models").make_model("llama")
    assert max(float((one[0]["params"][n] - p.detach()).abs().max()) for n, p in start.named_parameters()) > 1e-4


@pytest.mark.parametrize("method", ["mezo", "fzoo", "lozo"])
def test_counter_noise_is_the_same_on_every_rank_and_shard(tmp_path, method):
    """Philox z by element index, with bf16 partitions rounded by each rank on its own shard (ZeRO-3 splits
    every partition over the world). Two perturbation ranks run one rank's micro-batch, so they must end
    bit for bit where one rank holding the partitions whole does; two data-parallel ranks (different
    micro-batches, the same z and update) must agree with each other bit for bit."""
    common = ("--tier", "cpu", "--method", method, "--noise", "philox", "--storage", "bf16", "--directions", "3")
    one = launch("single", tmp_path / "one", *common)
    sharded = launch("torchrun", tmp_path / "p2", *common, "--perturbation", "2")
    data_parallel = launch("torchrun", tmp_path / "dp2", *common)
    expected = "rank-2 U·Vᵀ from philox (Triton kernels)" if method == "lozo" else "philox (Triton kernels)"
    assert {run[r]["noise"] for run in (one, sharded, data_parallel) for r in range(len(run))} == {expected}
    for name in one[0]["params"]:
        for rank in (0, 1):
            assert torch.equal(sharded[rank]["params"][name], one[0]["params"][name]), (name, rank)
        assert torch.equal(data_parallel[0]["params"][name], data_parallel[1]["params"][name]), name
    assert [r["projected_grad"] for r in sharded[0]["records"]] == [r["projected_grad"] for r in one[0]["records"]]
    assert_bitwise(data_parallel[0]["params"], one[0]["params"])  # same losses, same z, same seeded rounding


def test_deepspeed_launcher_matches_torchrun(tmp_path):
    ds = launch("deepspeed", tmp_path / "ds", "--tier", "cpu", "--steps", "2")
    tr = launch("torchrun", tmp_path / "tr", "--tier", "cpu", "--steps", "2")
    for name in ds[0]["params"]:
        assert torch.equal(ds[0]["params"][name], tr[0]["params"][name]), name
        assert torch.equal(ds[0]["params"][name], ds[1]["params"][name]), name


def test_bytes_all_reduced_do_not_grow_with_the_model(tmp_path):
    small = launch("torchrun", tmp_path / "s", "--tier", "cpu", "--steps", "2", "--layers", "2", "--hidden", "32")
    large = launch("torchrun", tmp_path / "l", "--tier", "cpu", "--steps", "2", "--layers", "4", "--hidden", "64")
    per_step = lambda runs: runs[0]["records"][-1]["bytes_all_reduced"] / len(runs[0]["records"])  # noqa: E731
    assert per_step(small) == per_step(large) == 32  # MeZO: two float64 group loss sums, the token and row counts
    assert large[0]["records"][-1]["bytes_gathered"] > small[0]["records"][-1]["bytes_gathered"] > 0


def start_ranks(out: Path, *args: str) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = base_env()
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, WORKER, "--out", str(out), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.parametrize("failure, perturbation", [("kill", 1), ("hang", 1), ("kill", 2), ("hang", 2)])
def test_a_dead_or_hung_rank_makes_the_survivor_fail_in_time(tmp_path, failure, perturbation):
    """With perturbation ranks (resident tier: no ZeRO gather) the survivor waits in its perturbation group's
    gather of the group losses."""
    timeout = 20
    tier = ("--tier", "none") if perturbation > 1 else ()
    procs = start_ranks(tmp_path, "--steps", "4", "--fail", failure, "--fail_step", "2", "--timeout", str(timeout),
                        "--perturbation", str(perturbation), *tier)
    try:
        # start-up and two steps take ~30 s on an idle 2-core machine and several times that under load, so the
        # wait is timed from the moment rank 1 failed (it writes the time), not from the launch
        out, err = procs[0].communicate(timeout=timeout + 600)
        elapsed = time.time() - float((tmp_path / "failed_at").read_text())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode != 0
    assert "RankSyncError" in err and "another rank died, hung past zo2.comm_timeout_s" in err, err[-3000:]
    # the comm timeout, then the error's way out of the process (seconds; 60 under load), far below the 30
    # minutes a collective waits without zo2.comm_timeout_s
    assert elapsed < timeout + 60, elapsed


@pytest.mark.parametrize("perturbation", [1, 2])
def test_sync_guard_names_the_diverged_block(tmp_path, perturbation):
    procs = start_ranks(tmp_path, "--tier", "none", "--steps", "3", "--fail", "diverge", "--fail_step", "1",
                        "--check_sync_every", "1", "--perturbation", str(perturbation))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode != 0
        assert "ranks hold different parameters at step 1: first diverged block 'model.layers.1'" in err, err[-3000:]

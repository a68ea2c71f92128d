"""The real programs under real cluster launchers: srun and sbatch, torchrun across two hosts, deepspeed via pdsh.

No test sets RANK / WORLD_SIZE / MASTER_* for a job: each launcher's own environment has to be enough
for ``zo2_deepspeed.distributed`` to build the world. Trained parameters are compared with runs that
need no cluster: the 1-rank run of the same global batch (to 1e-6: splitting the batch changes float
rounding) and the 2-rank run on one host (bitwise: the same ranks do the same arithmetic).
"""
from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import pytest
import torch

import cluster
from cluster import SLURM_SKIP, needs_netns, needs_slurm, needs_ssh
from cluster import HostPair, SlurmCluster, free_port, host_pair, logs_of, python_bin, ssh_servers, tail, wait_all  # noqa: F401
from tiny_assets import write_model_dir, write_sentiment_csv
from zo2_deepspeed.distributed import LAUNCH_VARS, LaunchEnvironmentError, detect_launch_env

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"
SBATCH = ROOT / "launch" / "slurm.sbatch"
WORKER = ROOT / "tests" / "dp_worker.py"
CONFIG = ROOT / "ds_configs" / "zo2_mezo_cpu.json"


JOB_TIMEOUT = 300  # one launch; the first multi-rank DeepSpeed run on a machine may JIT-build an op
TRAIN_STEPS = 2

F = TypeVar("F", bound=Callable)


def cluster_test(fn: F) -> F:
    """Marks a test that starts daemons or namespaces (deselect with ``-m 'not cluster'``)."""
    return pytest.mark.cluster(pytest.mark.slow(fn))


# ----------------------------------------------------------------------------- helpers

def text_tail(text: str, chars: int = 4000) -> str:
    """The end of a long output, for assertion messages."""
    return text if len(text) <= chars else "..." + text[-chars:]


def proc_output(proc: subprocess.CompletedProcess) -> str:
    """stdout and stderr of a finished process, tail only."""
    return f"stdout:\n{text_tail(proc.stdout or '', 2000)}\nstderr:\n{text_tail(proc.stderr or '')}"


def run_checked(cmd: Sequence[str], timeout: float, log: Path) -> str:
    """Run `cmd` (clean environment) to completion as its own process group; its output.

    A timeout kills the whole group (torchrun's ranks too); it and a non-zero exit fail with the log's tail.
    """
    proc = cluster.start_background([str(c) for c in cmd], log, env=cluster.clean_env(), cwd=log.parent)
    try:
        code = proc.wait(timeout)
    except TimeoutError as exc:
        pytest.fail(str(exc))
    assert code == 0, f"{' '.join(proc.cmd)} exited {code}\n{tail(log, 40)}"
    return proc.output()


def load_ranks(out: Path, world: int, context: str) -> list[dict]:
    """What every rank of a dp_worker run saved, in rank order; `context` (logs) explains a missing one."""
    found = sorted(p.name for p in out.glob("rank*.pt"))
    expected = [f"rank{r}.pt" for r in range(world)]
    assert found == expected, f"ranks saved {found}, expected {expected}\n{context}"
    saved = [torch.load(out / name, weights_only=True) for name in expected]
    assert [s["world"] for s in saved] == [world] * world, f"world sizes {[s['world'] for s in saved]}\n{context}"
    return saved


def max_abs_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Largest element-wise difference over all parameters (the names must match)."""
    assert a.keys() == b.keys(), f"parameter names differ: {sorted(set(a) ^ set(b))}"
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_bitwise(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], what: str) -> None:
    """Every parameter of `a` equals `b` bit for bit; the message lists the ones that do not."""
    assert a.keys() == b.keys(), f"{what}: parameter names differ: {sorted(set(a) ^ set(b))}"
    differ = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"{what}: {len(differ)} of {len(a)} parameters differ (max abs diff per name): {differ}"


def assert_trained_like(saved: list[dict], reference: list[dict], what: str, tol: float = 0.0) -> None:
    """All ranks hold identical parameters, equal to `reference` rank 0 (bitwise when tol == 0)."""
    for r, s in enumerate(saved[1:], start=1):
        assert_bitwise(saved[0]["params"], s["params"], f"{what}: rank 0 vs rank {r}")
    if tol == 0:
        assert_bitwise(saved[0]["params"], reference[0]["params"], f"{what} vs reference")
    else:
        diff = max_abs_diff(saved[0]["params"], reference[0]["params"])
        assert diff <= tol, f"{what}: max |param - reference| = {diff:.3g} > {tol:g}"
    assert [r["projected_grad"] for r in saved[0]["records"]] == \
        [r["projected_grad"] for r in saved[-1]["records"]], f"{what}: ranks saw different projected gradients"


def assert_trained(saved: list[dict], what: str) -> None:
    """The run moved the parameters away from their initial values (else equal results prove nothing)."""
    from tiny_models import make_model
    start = {n: p.detach() for n, p in make_model("llama").named_parameters()}
    moved = max_abs_diff({n: saved[0]["params"][n] for n in start}, start)
    assert moved > 1e-4, f"{what}: parameters moved only {moved:.3g} from their initial values"


def worker_cmd(out: Path, *extra: str) -> list[str]:
    """dp_worker with its defaults (cpu tier, 3 MeZO steps, 8 global rows) writing to `out`."""
    return [str(WORKER), "--out", str(out), *extra]


def train_args(assets: Mapping[str, Path], out: Path) -> list[str]:
    """launch/train.py arguments for the tiny model and data set, a short run without export."""
    return ["--deepspeed_config", str(CONFIG), "--model", str(assets["model"]), "--dataset", str(assets["csv"]),
            "--steps", str(TRAIN_STEPS), "--eval_samples", "16", "--output_dir", str(out), "--no_export"]


def check_summary(out: Path, world: int, context: str) -> dict:
    """train.py's summary.json exists and reports the steps and world size asked for."""
    path = out / "summary.json"
    assert path.exists(), f"{path} not written\n{context}"
    summary = json.loads(path.read_text())
    assert summary["engine"] == "ZO2Engine", summary
    assert summary["steps"] == TRAIN_STEPS, f"steps {summary['steps']} != {TRAIN_STEPS}\n{context}"
    assert summary["world_size"] == world, f"world_size {summary['world_size']} != {world}\n{context}"
    assert len(json.loads((out / "history.json").read_text())) == TRAIN_STEPS
    return summary


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny Hugging Face model directory and sentiment csv for launch/train.py."""
    root = tmp_path_factory.mktemp("assets")
    return {"model": write_model_dir(root / "model"), "csv": write_sentiment_csv(root / "sentiment.csv")}


@pytest.fixture(scope="module")
def one_rank_reference(tmp_path_factory) -> list[dict]:
    """dp_worker as one plain process over the same 8-row global batch the 2-rank runs split."""
    out = tmp_path_factory.mktemp("one_rank")
    output = run_checked([sys.executable, *worker_cmd(out, "--global_rows", "8")], JOB_TIMEOUT, out / "log")
    saved = load_ranks(out, 1, text_tail(output))
    assert_trained(saved, "one-rank reference")
    return saved


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory) -> list[dict]:
    """dp_worker as 2 ranks of ``torchrun --nproc_per_node 2`` on this host, no namespaces."""
    out = tmp_path_factory.mktemp("two_ranks_one_host")
    output = run_checked([python_bin("torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                          "--master_port", str(free_port()), *worker_cmd(out)], JOB_TIMEOUT, out / "log")
    saved = load_ranks(out, 2, text_tail(output))
    assert_bitwise(saved[0]["params"], saved[1]["params"], "one-host torchrun: rank 0 vs rank 1")
    assert_trained(saved, "one-host torchrun reference")
    return saved


def slurm_default_port(job_id: int) -> int:
    """The rendezvous port zo2_deepspeed derives for a srun task of job `job_id` without MASTER_PORT."""
    return detect_launch_env(environ={"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
                                      "SLURM_JOB_ID": str(job_id), "SLURM_STEP_ID": "0"}).master_port


def port_is_free(port: int) -> bool:
    """Whether nothing listens on `port` on any local address right now."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def first_job_id_with_free_ports(jobs: int = 4) -> int:
    """A first job id whose next `jobs` jobs get a free derived port.

    Every private cluster would otherwise number its jobs from 1, so two test runs on one machine
    would rendezvous on the same derived port.
    """
    for _ in range(200):
        first = 1 + secrets.randbelow(1_000_000)
        if all(port_is_free(slurm_default_port(first + i)) for i in range(jobs)):
            return first
    raise RuntimeError("no job id range with free derived rendezvous ports")


@pytest.fixture
def slurm_jobs(tmp_path: Path, monkeypatch) -> Iterator[SlurmCluster]:
    """A private SLURM cluster whose job ids start at a random number with free derived ports."""
    if SLURM_SKIP is not None:
        pytest.skip(SLURM_SKIP)
    first = first_job_id_with_free_ports()
    real_conf = cluster._slurm_conf
    monkeypatch.setattr(cluster, "_slurm_conf", lambda c: real_conf(c) + f"FirstJobId={first}\n")
    with cluster.slurm_cluster(tmp_path) as c:
        yield c


def srun_checked(c: SlurmCluster, args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    """``srun ARGS`` in the private cluster; a failure shows the job's output tail and the daemon logs."""
    proc = c.srun([str(a) for a in args], timeout=JOB_TIMEOUT, cwd=cwd, check=False)
    assert proc.returncode == 0, f"srun {' '.join(map(str, args))} exited {proc.returncode}\n{proc_output(proc)}\n" \
                                 f"{c.log_tails(10)}"
    return proc


def sbatch(c: SlurmCluster, args: Sequence[str], cwd: Path) -> int:
    """Submit a batch job to the private cluster; its job id. The job's interpreter is the one running the tests
    (ZO2_PYTHON, passed on by sbatch), as a user's is the environment they installed into."""
    proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], env={**c.env(), "ZO2_PYTHON": sys.executable},
                          cwd=cwd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"sbatch failed\n{proc_output(proc)}\n{c.log_tails(10)}"
    return int(proc.stdout.strip().split(";")[0])


def wait_job(c: SlurmCluster, job_id: int, timeout: float, output: Path) -> dict[str, str]:
    """Block until the job leaves the queue; its ``scontrol show job`` fields. Cancels it on timeout."""
    deadline = time.monotonic() + timeout
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=c.env(), capture_output=True,
                               text=True, timeout=15).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", shown))
        if fields.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return fields
        time.sleep(0.5)
    c.cancel_all()
    pytest.fail(f"job {job_id} not finished after {timeout:.0f} s (state {fields.get('JobState')})\n"
                f"job output:\n{tail(output, 40)}\n{c.log_tails(10)}")


# ----------------------------------------------------------------------------- SLURM

@cluster_test
@needs_slurm
def test_srun_train_script_builds_the_world_from_slurm_alone(slurm_jobs: SlurmCluster, assets, tmp_path):
    """``srun -n 2 python launch/train.py``: no RANK/MASTER_* anywhere, yet both ranks train together."""
    leaked = srun_checked(slurm_jobs, ["-n2", "bash", "-c", "env | grep -E '^(" + "|".join(LAUNCH_VARS)
                                       + ")=' || true"], tmp_path)
    assert leaked.stdout.strip() == "", f"the job environment carries torch launch variables:\n{leaked.stdout}"

    out = tmp_path / "run"
    proc = srun_checked(slurm_jobs, ["-n2", sys.executable, TRAIN, *train_args(assets, out)], tmp_path)
    check_summary(out, 2, proc_output(proc))
    assert "world=2" in proc.stdout, proc_output(proc)


@cluster_test
@needs_slurm
def test_srun_data_parallel_equals_one_rank(slurm_jobs: SlurmCluster, one_rank_reference, tmp_path):
    """Two srun tasks split the global batch: identical parameters on both, equal to the 1-rank run bit for bit
    (the group losses are float64 sums of the same token losses, so the split does not round; test_determinism)."""
    out = tmp_path / "out"
    proc = srun_checked(slurm_jobs, ["-n2", sys.executable, *worker_cmd(out)], tmp_path)
    saved = load_ranks(out, 2, proc_output(proc))
    assert_trained_like(saved, one_rank_reference, "srun -n 2")


@cluster_test
@needs_slurm
def test_sbatch_of_the_batch_script_trains(slurm_jobs: SlurmCluster, assets, tmp_path):
    """``sbatch launch/slurm.sbatch CONFIG ARGS`` with nodes/tasks overridden on the command line."""
    out, log = tmp_path / "run", tmp_path / "job-%j.out"
    job = sbatch(slurm_jobs, ["--nodes=1", "--ntasks-per-node=2", "--time=00:10:00", f"--output={log}",
                              SBATCH, CONFIG, *train_args(assets, out)[2:]], cwd=ROOT)
    log = tmp_path / f"job-{job}.out"
    fields = wait_job(slurm_jobs, job, JOB_TIMEOUT, log)
    output = tail(log, 60)
    assert (fields.get("JobState"), fields.get("ExitCode")) == ("COMPLETED", "0:0"), \
        f"job {job}: {fields.get('JobState')} exit {fields.get('ExitCode')}\n{output}\n{slurm_jobs.log_tails(10)}"
    text = log.read_text(errors="replace")
    header = f"zo2 SLURM job {job}: 2 ranks on 1 node(s), master {slurm_jobs.node}:{slurm_default_port(job)}"
    assert header in text, f"missing {header!r}\n{output}"
    assert f"[train] summary: {out / 'summary.json'}" in text, output
    check_summary(out, 2, output)


PROBE = r'''
import json, sys
from zo2_deepspeed.distributed import detect_launch_env, ensure_distributed
if sys.argv[1] == "task":
    env = detect_launch_env()
    print("PROBE", json.dumps({"where": "task", "launcher": env.launcher, "rank": env.rank, "world": env.world_size}))
else:
    env = ensure_distributed(60)
    from deepspeed import comm as dist
    print("PROBE", json.dumps({"where": "batch", "launcher": env.launcher, "rank": dist.get_rank(),
                               "world": dist.get_world_size()}))
    dist.destroy_process_group()
'''


@cluster_test
@needs_slurm
def test_python_run_directly_in_a_batch_script_is_one_process(slurm_jobs: SlurmCluster, tmp_path):
    """The batch step sees SLURM_PROCID=0 and the job's SLURM_NTASKS=2, yet it is one process, not rank 0 of 2.

    Taken for rank 0 of 2 it would wait for a rank 1 that never comes until the comm timeout.
    The srun tasks of the same script still form the 2-rank world.
    """
    probe, log = tmp_path / "probe.py", tmp_path / "probe.out"
    probe.write_text(PROBE)
    script = tmp_path / "probe.sbatch"
    script.write_text(f"#!/bin/bash\nset -euo pipefail\n\"{sys.executable}\" \"{probe}\" batch\n"
                      f"srun \"{sys.executable}\" \"{probe}\" task\n")
    job = sbatch(slurm_jobs, ["--nodes=1", "--ntasks-per-node=2", f"--output={log}", script], cwd=tmp_path)
    fields = wait_job(slurm_jobs, job, 120, log)
    output = tail(log, 40)
    assert fields.get("JobState") == "COMPLETED", f"job {job}: {fields.get('JobState')}\n{output}"
    seen = [json.loads(line.split(None, 1)[1]) for line in log.read_text().splitlines() if line.startswith("PROBE ")]
    batch = [s for s in seen if s["where"] == "batch"]
    tasks = sorted((s for s in seen if s["where"] == "task"), key=lambda s: s["rank"])
    assert batch == [{"where": "batch", "launcher": "single", "rank": 0, "world": 1}], output
    assert [(s["launcher"], s["rank"], s["world"]) for s in tasks] == [("slurm", 0, 2), ("slurm", 1, 2)], output


# ----------------------------------------------------------------------------- two hosts

@cluster_test
@needs_netns
def test_torchrun_across_two_hosts_equals_one_host(host_pair: HostPair, two_rank_reference, tmp_path):
    """One torchrun node per namespace, talking only over the veth: bitwise the one-host 2-rank result."""
    out, port = tmp_path / "out", free_port()
    procs = [host_pair.popen(h, [python_bin("torchrun"), "--nnodes", "2", "--nproc_per_node", "1",
                                 "--node_rank", str(i), "--master_addr", host_pair.a.addr,
                                 "--master_port", str(port), *worker_cmd(out)],
                             env={"GLOO_SOCKET_IFNAME": h.ifname}, cwd=tmp_path)
             for i, h in enumerate(host_pair.hosts)]
    codes = wait_all(procs, JOB_TIMEOUT)
    assert codes == [0, 0], f"exit codes {codes}\n{logs_of(*procs)}"
    saved = load_ranks(out, 2, logs_of(*procs))
    assert_trained_like(saved, two_rank_reference, "torchrun on two hosts")


@cluster_test
@needs_ssh
def test_deepspeed_pdsh_launcher_across_two_hosts_equals_one_host(host_pair: HostPair, two_rank_reference, tmp_path):
    """``deepspeed --hostfile`` from host a starts a rank on each host through pdsh/ssh: bitwise the one-host run."""
    out = tmp_path / "out"
    with ssh_servers(host_pair, tmp_path) as ssh:
        hostfile = ssh.write_hostfile(tmp_path / "hostfile")
        launcher = host_pair.popen(host_pair.a, [python_bin("deepspeed"), "--hostfile", str(hostfile),
                                                 "--ssh_port", str(ssh.port), "--master_addr", host_pair.a.addr,
                                                 "--master_port", str(free_port()), *worker_cmd(out)],
                                   env=ssh.env(), cwd=tmp_path)
        code = launcher.wait(JOB_TIMEOUT)
    output = launcher.output()
    assert code == 0, f"deepspeed launcher exited {code}\n{logs_of(launcher)}"
    assert "pdsh -S" in output and f"{host_pair.b.addr}: " in output, \
        f"not launched through pdsh on both hosts:\n{text_tail(output)}"
    saved = load_ranks(out, 2, logs_of(launcher))
    assert_trained_like(saved, two_rank_reference, "deepspeed pdsh launcher on two hosts")


# ----------------------------------------------------------------------------- incomplete environments

@pytest.mark.parametrize("environ, missing", [
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "29500"}, "MASTER_ADDR"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"},
     "SLURM_JOB_NODELIST"),
])
def test_an_incomplete_launch_environment_names_what_is_missing(environ, missing):
    """A half-set launcher environment fails at once, naming the variable, instead of hanging at rendezvous."""
    with pytest.raises(LaunchEnvironmentError, match=missing):
        detect_launch_env(environ=environ)

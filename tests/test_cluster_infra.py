"""The cluster test infrastructure works for real: SLURM jobs and two-host launches run DeepSpeed ranks.

Each test writes a tiny worker into tmp_path that joins a gloo world through
``deepspeed.init_distributed`` and all-reduces ``rank + 1``; with two ranks every rank must see 3.
The launchers covered: ``srun`` (variables mapped in the job's shell, or by the worker itself),
``torchrun`` across two network namespaces, and ``deepspeed`` across them, with ``--no_ssh`` and
with its default pdsh/ssh multi-node path.
"""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

import cluster
from cluster import needs_netns, needs_slurm, needs_ssh
from cluster import (HostPair, SlurmCluster, free_port, host_pair, logs_of, python_bin, slurm,  # noqa: F401 (fixtures)
                     slurm_cluster, ssh_servers, two_hosts, wait_all)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


# Generous: the first multi-rank DeepSpeed run on a machine JIT-builds its shm comm op (30-100 s).
JOB_TIMEOUT = 300

WORKER = r'''
"""All-reduce rank+1 over gloo via DeepSpeed; write what this rank saw to OUT/rank<R>.json."""
import argparse
import json
import re
import os
import subprocess


def slurm_to_torch_env(master_port):
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from SLURM_* unless a launcher already set them."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return "launcher"
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True, timeout=60).stdout.split()
    os.environ.setdefault("MASTER_ADDR", nodes[0])
    os.environ.setdefault("MASTER_PORT", str(master_port))
    return "slurm"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args()
    source = slurm_to_torch_env(args.master_port)

    import torch
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    dist.barrier()
    result = {"rank": rank, "world_size": world, "sum": value.item(), "source": source,
              "local_rank": int(os.environ["LOCAL_RANK"]), "master_addr": os.environ["MASTER_ADDR"],
              "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"), "netns": os.readlink("/proc/self/ns/net"),
              "local_rank_arg": args.local_rank}
    path = os.path.join(args.out, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    # Tear the group down while every rank is still alive: a rank whose peers (or the store on
    # rank 0) vanished first can abort at interpreter exit ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
'''


def write_worker(tmp_path: Path) -> tuple[Path, Path]:
    """The worker script and an empty result directory under tmp_path."""
    worker, out = tmp_path / "worker.py", tmp_path / "out"
    worker.write_text(WORKER)
    out.mkdir()
    return worker, out


def read_results(out: Path, world: int, context: str = "") -> list[dict]:
    """Every rank's result, in rank order; a missing one fails with `context` (logs)."""
    found = sorted(p.name for p in out.glob("rank*.json"))
    expected = [f"rank{r}.json" for r in range(world)]
    assert found == expected, f"ranks wrote {found}, expected {expected}\n{context}"
    return [json.loads((out / name).read_text()) for name in expected]


def assert_all_reduced(results: list[dict]) -> None:
    """Every rank of a world of len(results) saw sum(rank+1)."""
    world = len(results)
    for r in results:
        assert r["world_size"] == world, r
        assert r["sum"] == world * (world + 1) / 2, r


def netns_inode(host: cluster.Host) -> str:
    """The ``net:[inode]`` id a process inside `host` reads from /proc/self/ns/net."""
    return f"net:[{os.stat(f'/run/netns/{host.netns}').st_ino}]"


def assert_one_rank_per_host(results: list[dict], pair: HostPair) -> None:
    """Rank 0 ran in namespace a over a's veth, rank 1 in b over b's veth."""
    for r, host in zip(results, pair.hosts):
        assert r["netns"] == netns_inode(host), (r, host)
        assert r["gloo_ifname"] == host.ifname, (r, host)
        assert r["master_addr"] == pair.a.addr, r


def test_unavailable_reasons_name_what_is_missing(monkeypatch):
    """Skip reasons must say what to fix, not just that something is off."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in cluster.cluster_unavailable_reason()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(cluster, "_missing", lambda binaries: [b for b in binaries if b == "slurmd"])
    assert cluster.slurm_unavailable_reason() == (
        "SLURM/munge binaries missing: slurmd (run launch/install_cluster.sh as root)")


# ----------------------------------------------------------------------------- SLURM

@needs_slurm
def test_slurm_cluster_stops_its_daemons_even_when_the_test_fails(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with slurm_cluster(tmp_path) as c:
            assert c.sinfo_states() == {c.node: "idle"}
            pids = {d: int(c.pid_file(d).read_text()) for d in ("munged", "slurmctld", "slurmd")}
            assert all(cluster._alive(p) for p in pids.values()), pids
            1 / 0
    assert not [d for d, p in pids.items() if cluster._alive(p)], f"daemons left running: {pids}"


@needs_slurm
def test_slurm_start_failure_names_the_state_and_shows_daemon_logs(tmp_path, monkeypatch):
    """A node that never turns idle (here: it claims more memory than the machine has) fails fast."""
    real_conf = cluster._slurm_conf
    monkeypatch.setattr(cluster, "_slurm_conf",
                        lambda c: re.sub(r"RealMemory=\d+", "RealMemory=99999999", real_conf(c)))
    with pytest.raises(TimeoutError, match=r"not idle after 3 s") as info:
        with slurm_cluster(tmp_path, start_timeout=3):
            pass
    message = str(info.value)
    assert "slurmctld.log" in message and "slurmd.log" in message and "munged.log" in message
    assert "'inval'" in message and "Low RealMemory" in message, message
    assert not cluster._pids_with(str(tmp_path / "slurm")), "daemons left running"


def wait_gone(marker: str, timeout: float = 30) -> list[int]:
    """PIDs still carrying `marker` after waiting up to `timeout` s for them to end."""
    deadline = time.monotonic() + timeout
    while (pids := cluster._pids_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


@needs_slurm
def test_a_hung_srun_job_times_out_and_is_cancelled(slurm: SlurmCluster, tmp_path):
    marker = f"zo2-hung-{tmp_path.name}"
    with pytest.raises(TimeoutError, match="timed out after 3 s"):
        slurm.srun(["-N1", "-n1", "bash", "-c", f"exec -a {marker} sleep 300"], timeout=3)
    assert not wait_gone(marker), "the job's task outlived its cancellation"


@needs_slurm
def test_srun_with_torch_variables_set_in_the_job_shell(slurm: SlurmCluster, tmp_path):
    worker, out = write_worker(tmp_path)
    script = ("RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID "
              f"MASTER_ADDR=127.0.0.1 MASTER_PORT={free_port()} "
              f'exec "{sys.executable}" "{worker}" --out "{out}"')
    proc = slurm.srun(["-N1", "-n2", "bash", "-c", script], timeout=JOB_TIMEOUT, cwd=tmp_path)
    results = read_results(out, 2, proc.stdout + proc.stderr)
    assert_all_reduced(results)
    assert [r["source"] for r in results] == ["launcher", "launcher"]
    assert [r["local_rank"] for r in results] == [0, 1]


@needs_slurm
def test_srun_where_the_worker_maps_slurm_variables_itself(slurm: SlurmCluster, tmp_path):
    worker, out = write_worker(tmp_path)
    proc = slurm.srun(["-N1", "-n2", sys.executable, str(worker), "--out", str(out),
                       "--master-port", str(free_port())], timeout=JOB_TIMEOUT, cwd=tmp_path)
    results = read_results(out, 2, proc.stdout + proc.stderr)
    assert_all_reduced(results)
    assert [r["source"] for r in results] == ["slurm", "slurm"]
    assert {r["master_addr"] for r in results} == {slurm.node}


# ----------------------------------------------------------------------------- two hosts

@needs_netns
def test_two_hosts_are_private_and_deleted_even_when_the_test_fails(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with two_hosts(tmp_path) as pair:
            names = [h.netns for h in pair.hosts]
            listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
            assert all(n in listed for n in names), listed
            for h in pair.hosts:  # only lo and the veth end: no route anywhere but the pair's /24
                links = pair.run(h, ["ip", "-o", "link", "show"]).stdout
                assert sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()) \
                    == sorted(["lo", h.ifname]), links
            peer = pair.run(pair.a, [sys.executable, "-c", "import socket; s = socket.create_connection("
                                     f"('{pair.b.addr}', 22), timeout=5)"], check=False)
            assert "Connection refused" in peer.stderr, peer.stderr  # reachable, nobody listens
            sleeper = pair.popen(pair.b, ["sleep", "600"])
            1 / 0
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert not any(n in listed for n in names), listed
    assert sleeper.popen.poll() is not None
    assert not Path(f"/sys/class/net/{pair.a.ifname}").exists()


@needs_netns
def test_a_hung_rank_in_a_namespace_is_killed_on_timeout(host_pair: HostPair, tmp_path):
    marker = f"zo2-hung-{tmp_path.name}"
    procs = [host_pair.popen(h, ["bash", "-c", f"exec -a {marker} sleep 300"]) for h in host_pair.hosts]
    with pytest.raises(TimeoutError, match="still running after"):
        wait_all(procs, timeout=2)
    assert all(p.popen.poll() is not None for p in procs)
    assert not wait_gone(marker, timeout=5)


def run_one_launcher_per_host(host_pair: HostPair, tmp_path, launcher: Callable[[int, int], list[str]]) -> list:
    """Start ``launcher(node_rank, master_port) + worker`` on each host; both ranks must all-reduce, one per host."""
    worker, out = write_worker(tmp_path)
    port = free_port()
    procs = [host_pair.popen(h, [*launcher(i, port), str(worker), "--out", str(out)],
                             env={"GLOO_SOCKET_IFNAME": h.ifname}, cwd=tmp_path)
             for i, h in enumerate(host_pair.hosts)]
    codes = wait_all(procs, JOB_TIMEOUT)
    assert codes == [0, 0], logs_of(*procs)
    results = read_results(out, 2, logs_of(*procs))
    assert_all_reduced(results)
    assert_one_rank_per_host(results, host_pair)
    return results


@needs_netns
def test_torchrun_across_two_hosts(host_pair: HostPair, tmp_path):
    run_one_launcher_per_host(host_pair, tmp_path, lambda i, port: [
        python_bin("torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(i),
        "--master_addr", host_pair.a.addr, "--master_port", str(port)])


@needs_netns
def test_deepspeed_launcher_no_ssh_across_two_hosts(host_pair: HostPair, tmp_path):
    """``deepspeed --no_ssh --node_rank i``: one launcher per host, no remote shell needed."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h.addr} slots=1\n" for h in host_pair.hosts))
    results = run_one_launcher_per_host(host_pair, tmp_path, lambda i, port: [
        python_bin("deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(i),
        "--master_addr", host_pair.a.addr, "--master_port", str(port)])
    assert [r["local_rank_arg"] for r in results] == [0, 0]


@needs_ssh
def test_deepspeed_pdsh_launcher_across_two_hosts(host_pair: HostPair, tmp_path):
    """``deepspeed --hostfile`` from host a: pdsh ssh-es into both hosts and starts one rank on each."""
    worker, out = write_worker(tmp_path)
    with ssh_servers(host_pair, tmp_path) as ssh:
        hostfile = ssh.write_hostfile(tmp_path / "hostfile")
        launcher = host_pair.popen(host_pair.a, [python_bin("deepspeed"), "--hostfile", str(hostfile),
                                                 "--ssh_port", str(ssh.port), "--master_addr", host_pair.a.addr,
                                                 "--master_port", str(free_port()), str(worker), "--out", str(out)],
                                   env=ssh.env(), cwd=tmp_path)
        code = launcher.wait(JOB_TIMEOUT)
        assert code == 0, logs_of(launcher)
    output = launcher.output()
    assert "pdsh -S" in output and f"{host_pair.b.addr}: " in output, output[-3000:]
    results = read_results(out, 2, logs_of(launcher))
    assert_all_reduced(results)
    assert_one_rank_per_host(results, host_pair)


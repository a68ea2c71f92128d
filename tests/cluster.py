"""Real multi-process / multi-host environments for tests, started and torn down per test.

Three pieces, all private to the test that uses them (temp dirs, random ports, unique names):

* ``slurm_cluster(tmp_path)``: a one-node SLURM cluster (munged + slurmctld + slurmd) with its own
  munge key and socket, its own slurm.conf and non-default ports; ``cluster.srun([...])`` runs a job.
* ``two_hosts()``: two network namespaces joined by a veth pair, i.e. two "hosts" with their own
  addresses in a random 10.77.x.0/24; ``pair.popen(host, cmd)`` starts a command inside one.
  The namespaces hold only ``lo`` and their end of the veth, so traffic cannot leave them.
* ``ssh_servers(pair, workdir)``: sshd inside both namespaces plus an ``ssh`` shim with its own
  key and known_hosts, so the ``deepspeed`` pdsh launcher can start remote ranks without touching
  ``~/.ssh`` or any system sshd.

``*_unavailable_reason()`` return None where a piece can run, otherwise why not (for pytest.skip).
Installing the packages: ``launch/install_cluster.sh``.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pytest

from zo2_deepspeed.distributed import free_port  # noqa: F401 (the tests import it from here)

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "srun", "sinfo", "scontrol", "scancel")
NETNS_BINARIES = ("ip",)
SSH_BINARIES = ("pdsh", "ssh", "ssh-keygen")
SSHD = "/usr/sbin/sshd"
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
INSTALL_HINT = "run launch/install_cluster.sh as root"

# Launcher / scheduler variables that must not leak from the pytest process into a job: a job
# that inherited RANK or SLURM_JOB_ID from an outer launcher would join the wrong world.
_LEAKY_PREFIXES = ("SLURM_", "TORCHELASTIC_", "OMPI_", "PMI_", "PMIX_", "MV2_")
_LEAKY_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME", "SSH_AUTH_SOCK", "CROSS_RANK")


# ----------------------------------------------------------------------------- availability

def _missing(binaries: Sequence[str]) -> list[str]:
    """Binaries from `binaries` not found on PATH or in the sbin directories daemons live in."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [b for b in binaries if shutil.which(b, path=path) is None]


def _has_capabilities(*caps: int) -> bool:
    """Whether this process holds the given Linux capabilities (root in a locked-down container may not)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                eff = int(line.split()[1], 16)
                return all(eff >> c & 1 for c in caps)
    except OSError:
        pass
    return False


def _root_reason() -> str | None:
    """Why root-only infrastructure cannot run here, or None."""
    if sys.platform != "linux":
        return f"needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "needs root (starts system daemons / network namespaces)"
    return None


def slurm_unavailable_reason() -> str | None:
    """None if a private SLURM cluster can be started here, else why not."""
    reason = _root_reason()
    if reason is None and (missing := _missing(SLURM_BINARIES)):
        reason = f"SLURM/munge binaries missing: {', '.join(missing)} ({INSTALL_HINT})"
    return reason


def netns_unavailable_reason() -> str | None:
    """None if network namespaces and veth pairs can be created here, else why not."""
    reason = _root_reason()
    if reason is None and (missing := _missing(NETNS_BINARIES)):
        reason = f"iproute2 missing: {', '.join(missing)} ({INSTALL_HINT})"
    if reason is None and not _has_capabilities(CAP_NET_ADMIN, CAP_SYS_ADMIN):
        reason = "root lacks CAP_NET_ADMIN/CAP_SYS_ADMIN (network namespaces need both)"
    return reason


def cluster_unavailable_reason() -> str | None:
    """None if both the SLURM cluster and the two-host namespaces can run here, else why not."""
    return slurm_unavailable_reason() or netns_unavailable_reason()


def ssh_launcher_unavailable_reason() -> str | None:
    """None if the pdsh/ssh based ``deepspeed --hostfile`` launcher can run across two namespaces."""
    reason = netns_unavailable_reason()
    if reason is None and (missing := _missing(SSH_BINARIES)):
        reason = f"pdsh/ssh missing: {', '.join(missing)} ({INSTALL_HINT})"
    if reason is None and not os.access(SSHD, os.X_OK):
        reason = f"{SSHD} missing (openssh-server; {INSTALL_HINT})"
    return reason


# ----------------------------------------------------------------------------- small helpers

SLURM_SKIP = slurm_unavailable_reason()
NETNS_SKIP = netns_unavailable_reason()
SSH_SKIP = ssh_launcher_unavailable_reason()
needs_slurm = pytest.mark.skipif(SLURM_SKIP is not None, reason=SLURM_SKIP or "")
needs_netns = pytest.mark.skipif(NETNS_SKIP is not None, reason=NETNS_SKIP or "")
needs_ssh = pytest.mark.skipif(SSH_SKIP is not None, reason=SSH_SKIP or "")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher/scheduler variables, plus `extra`.

    Single-threaded BLAS by default: the ranks of a test share a couple of cores.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in _LEAKY_NAMES and not k.startswith(_LEAKY_PREFIXES)}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def python_bin(name: str) -> str:
    """The console script `name` of the running interpreter's environment (not a pyenv shim)."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def tail(path: Path, lines: int = 25) -> str:
    """The last `lines` lines of a log file, or a note that it does not exist (for error messages)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<{path}: {exc.strerror}>"
    return "\n".join(text[-lines:]) or "<empty>"


def _text(output: bytes | str | None) -> str:
    """Captured output as text (TimeoutExpired carries bytes even for text=True runs)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _cmdline(pid: int) -> str:
    """The command line of `pid` with spaces for NULs; empty if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _stop_pid(pid: int, grace: float = 10.0) -> None:
    """SIGTERM `pid`, then SIGKILL if it outlives `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


def _pids_with(marker: str) -> list[int]:
    """PIDs whose command line contains `marker` (a path unique to one test, so only ours)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and marker in _cmdline(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _run(cmd: Sequence[str], timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """subprocess.run with a timeout and captured text output; failures name the command and its stderr."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


@dataclass
class BackgroundProcess:
    """A command started in its own session with output in a log file, so it can be killed as a group."""
    popen: subprocess.Popen
    log: Path
    cmd: list[str]

    def wait(self, timeout: float) -> int:
        """Exit code; on timeout kill the whole group and raise with the log's tail."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"{' '.join(self.cmd)} still running after {timeout:.0f} s; log tail:\n"
                               f"{tail(self.log)}") from None

    def output(self) -> str:
        """Everything it wrote to stdout and stderr so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL its process group and reap it (no-op when it has exited)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=10)


def start_background(cmd: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
                     cwd: Path | None = None) -> BackgroundProcess:
    """Start `cmd` in a new session writing stdout+stderr to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        popen = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=dict(env) if env is not None else clean_env(), cwd=cwd,
                                 start_new_session=True)
    return BackgroundProcess(popen, log, list(cmd))


def wait_all(procs: Sequence[BackgroundProcess], timeout: float) -> list[int]:
    """Exit codes of all `procs` within one shared deadline; on timeout kill them all and raise."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(max(0.1, deadline - time.monotonic())) for p in procs]
    except TimeoutError as exc:
        for p in procs:
            p.kill()
        raise TimeoutError(f"{exc}\nall logs:\n{logs_of(*procs, lines=25)}") from None


def logs_of(*procs: BackgroundProcess, lines: int = 40) -> str:
    """The log tails of background processes, for assertion messages."""
    return "\n".join(f"--- {' '.join(p.cmd)}\n{tail(p.log, lines)}" for p in procs)


# ----------------------------------------------------------------------------- SLURM

@dataclass
class SlurmCluster:
    """A running private one-node SLURM cluster."""
    root: Path
    conf: Path
    node: str
    addr: str
    cpus: int
    ctld_port: int
    slurmd_port: int
    munge_socket: Path

    @property
    def logs(self) -> dict[str, Path]:
        return {name: self.root / "log" / f"{name}.log" for name in ("munged", "slurmctld", "slurmd")}

    def pid_file(self, daemon: str) -> Path:
        return self.root / "run" / f"{daemon}.pid"

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment pointing the SLURM client commands at this cluster."""
        return clean_env(SLURM_CONF=str(self.conf), **extra)

    def srun(self, args: Sequence[str], timeout: float, env: Mapping[str, str] | None = None,
             cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``srun ARGS`` against this cluster; `env` adds to :meth:`env`. Raises with logs on failure."""
        cmd = ["srun", *args]
        try:
            proc = subprocess.run(cmd, env=self.env(**(env or {})), cwd=cwd, capture_output=True, text=True,
                                  timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            self.cancel_all()
            raise TimeoutError(f"{' '.join(cmd)} timed out after {timeout:.0f} s\nstdout:\n{_text(exc.stdout)}\n"
                               f"stderr:\n{_text(exc.stderr)}\n{self.log_tails()}") from None
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                               f"stderr:\n{proc.stderr}\n{self.log_tails()}")
        return proc

    def sinfo_states(self) -> dict[str, str]:
        """Node name -> state as sinfo reports it (``idle``, ``down*``, ...)."""
        out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), timeout=15, check=False).stdout
        return dict(line.split(None, 1) for line in out.splitlines() if len(line.split()) == 2)

    def cancel_all(self) -> None:
        """Cancel every job of this cluster (before shutdown, so no slurmstepd outlives slurmd)."""
        with contextlib.suppress(Exception):
            jobs = _run(["squeue", "-h", "-o", "%i"], env=self.env(), timeout=15, check=False).stdout.split()
            if jobs:
                _run(["scancel", "--quiet", *jobs], env=self.env(), timeout=15, check=False)

    def log_tails(self, lines: int = 25) -> str:
        """The tails of the daemons' logs, for error messages."""
        return "\n".join(f"--- {path}\n{tail(path, lines)}" for path in self.logs.values())


def _munge_key(path: Path) -> None:
    """A fresh random munge key readable only by its owner (munged refuses looser modes)."""
    path.write_bytes(secrets.token_bytes(1024))
    path.chmod(0o400)


def _slurm_conf(c: SlurmCluster) -> str:
    """slurm.conf for one node with every path inside the cluster's temp dir.

    AuthInfo points slurm at this cluster's munged, not the system one. NoInAddrAny makes slurmd
    and srun bind to the address the host name resolves to (loopback here) instead of 0.0.0.0;
    slurmctld 22.05 ignores it and listens on all addresses, on a random high port.
    """
    mem_mb = max(256, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2)
    r = c.root
    return f"""\
ClusterName=zo2test{secrets.token_hex(3)}
SlurmctldHost={c.node}({c.addr})
SlurmctldPort={c.ctld_port}
SlurmdPort={c.slurmd_port}
CommunicationParameters=NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={c.munge_socket}
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
NodeName={c.node} NodeAddr={c.addr} CPUs={c.cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=test Nodes={c.node} Default=YES MaxTime=INFINITE State=UP
"""


def _node_addr(node: str) -> str:
    """The address `node` resolves to (slurm binds there), loopback where it does not resolve."""
    try:
        return socket.gethostbyname(node)
    except OSError:
        return "127.0.0.1"


def _start_daemon(cmd: Sequence[str], env: Mapping[str, str], what: str, c: SlurmCluster) -> None:
    """Run a daemon's start command (it forks into the background); raise with logs if it fails."""
    proc = _run(cmd, env=env, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed to start (exit {proc.returncode}): {proc.stderr.strip()}\n"
                           f"{c.log_tails()}")


def _wait_idle(c: SlurmCluster, timeout: float) -> None:
    """Block until sinfo reports the node idle; raise with the daemons' logs after `timeout` s."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = c.sinfo_states()
        if states.get(c.node) == "idle":
            return
        time.sleep(0.25)
    reason = _run(["sinfo", "-h", "-N", "-o", "%E"], env=c.env(), timeout=15, check=False).stdout.strip()
    raise TimeoutError(f"SLURM node {c.node} not idle after {timeout:.0f} s (sinfo: {states or 'no answer'}"
                       f"{', reason: ' + reason if reason and reason != 'none' else ''})\n{c.log_tails()}")


def _stop_daemon(pid_file: Path, marker: str) -> None:
    """Stop the daemon whose PID is in `pid_file`; fall back to processes carrying `marker`.

    The PID is only trusted when that process's command line carries `marker` (our unique
    conf / socket path), so a recycled PID never hits an unrelated process.
    """
    pids: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().split()[0])
        if marker in _cmdline(pid):
            pids.append(pid)
    for pid in pids or _pids_with(marker):
        _stop_pid(pid)


@contextlib.contextmanager
def slurm_cluster(tmp_path: Path, start_timeout: float = 30.0) -> Iterator[SlurmCluster]:
    """Start a private one-node SLURM cluster under `tmp_path`; stop every daemon on exit, even on failure."""
    if (reason := slurm_unavailable_reason()) is not None:
        raise RuntimeError(f"cannot start a SLURM cluster: {reason}")
    root = Path(tmp_path) / "slurm"
    for sub in ("state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    c = SlurmCluster(root=root, conf=root / "slurm.conf", node=node, addr=_node_addr(node),
                     cpus=os.cpu_count() or 1, ctld_port=free_port(), slurmd_port=free_port(),
                     munge_socket=root / "run" / "munge.sock")
    _munge_key(root / "munge.key")
    c.conf.write_text(_slurm_conf(c))
    env = c.env()
    try:
        _start_daemon(["munged", "--force", f"--socket={c.munge_socket}", f"--key-file={root / 'munge.key'}",
                       f"--pid-file={c.pid_file('munged')}", f"--log-file={c.logs['munged']}",
                       f"--seed-file={root / 'run' / 'munged.seed'}"], env, "munged", c)
        _start_daemon(["slurmctld", "-f", str(c.conf)], env, "slurmctld", c)
        _start_daemon(["slurmd", "-f", str(c.conf), "-N", node], env, "slurmd", c)
        _wait_idle(c, start_timeout)
        yield c
    finally:
        c.cancel_all()
        _stop_daemon(c.pid_file("slurmd"), str(c.conf))
        _stop_daemon(c.pid_file("slurmctld"), str(c.conf))
        _stop_daemon(c.pid_file("munged"), str(c.munge_socket))


# ----------------------------------------------------------------------------- two hosts

@dataclass(frozen=True)
class Host:
    """One end of the pair: a network namespace with one veth interface and one address."""
    netns: str
    ifname: str
    addr: str


@dataclass
class HostPair:
    """Two namespaces joined by a veth pair; `a` conventionally hosts rank 0 / the master."""
    a: Host
    b: Host
    prefix: int
    workdir: Path
    procs: list[BackgroundProcess] = field(default_factory=list)

    @property
    def hosts(self) -> tuple[Host, Host]:
        return self.a, self.b

    def command(self, host: Host, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
        """``ip netns exec NS env K=V ... cmd``: `cmd` inside `host` with `env` added."""
        return ["ip", "netns", "exec", host.netns, "env", *(f"{k}={v}" for k, v in (env or {}).items()), *cmd]

    def popen(self, host: Host, cmd: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: Path | None = None, log: Path | None = None) -> BackgroundProcess:
        """Start `cmd` in `host` in the background (base env: :func:`clean_env`); killed at teardown."""
        log = log or self.workdir / f"{host.netns}-{len(self.procs)}.log"
        proc = start_background(self.command(host, cmd, env), log, env=clean_env(), cwd=cwd)
        self.procs.append(proc)
        return proc

    def run(self, host: Host, cmd: Sequence[str], timeout: float = 30, check: bool = True,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run `cmd` in `host` to completion and capture its output."""
        return _run(self.command(host, cmd, env), timeout=timeout, check=check, env=clean_env())


def _netns_pids(netns: str) -> list[int]:
    """PIDs of the processes living in `netns`."""
    out = _run(["ip", "netns", "pids", netns], timeout=10, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _teardown_pair(pair: HostPair, created: list[str], veth: str) -> None:
    """Kill what runs in the namespaces, then delete them (their veth ends go with them)."""
    for proc in pair.procs:
        proc.kill()
    for netns in created:
        for pid in _netns_pids(netns):
            _stop_pid(pid, grace=2.0)
    for netns in created:
        _run(["ip", "netns", "del", netns], timeout=30, check=False)
    if Path(f"/sys/class/net/{veth}").exists():  # creation failed before the move into a namespace
        _run(["ip", "link", "del", veth], timeout=10, check=False)


@contextlib.contextmanager
def two_hosts(workdir: Path | None = None) -> Iterator[HostPair]:
    """Two network namespaces with unique names joined by a veth pair in a random 10.77.x.0/24.

    Everything is deleted on exit, whatever happened inside. `workdir` receives the logs of
    :meth:`HostPair.popen` (default: a fresh temp dir, removed at exit).
    """
    if (reason := netns_unavailable_reason()) is not None:
        raise RuntimeError(f"cannot create network namespaces: {reason}")
    tag = secrets.token_hex(3)
    subnet = f"10.77.{secrets.randbelow(256)}"
    a = Host(netns=f"zo2t-{tag}-a", ifname=f"zo2{tag}a", addr=f"{subnet}.1")
    b = Host(netns=f"zo2t-{tag}-b", ifname=f"zo2{tag}b", addr=f"{subnet}.2")
    own_dir = workdir is None
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"zo2-hosts-{tag}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pair = HostPair(a=a, b=b, prefix=24, workdir=workdir)
    created: list[str] = []
    try:
        for h in pair.hosts:
            _run(["ip", "netns", "add", h.netns])
            created.append(h.netns)
        _run(["ip", "link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname])
        for h in pair.hosts:
            _run(["ip", "link", "set", h.ifname, "netns", h.netns])
            _run(["ip", "-n", h.netns, "addr", "add", f"{h.addr}/{pair.prefix}", "dev", h.ifname])
            _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
            _run(["ip", "-n", h.netns, "link", "set", h.ifname, "up"])
        yield pair
    finally:
        _teardown_pair(pair, created, a.ifname)
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)


# ----------------------------------------------------------------------------- sshd for the pdsh launcher

@dataclass
class SshServers:
    """sshd in both namespaces of a pair, reachable with this object's key through the ``ssh`` shim."""
    pair: HostPair
    root: Path
    port: int

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    def env(self, **extra: str) -> dict[str, str]:
        """Variables that make ``ssh`` (and pdsh, which execs it) use the shim: prepend to PATH."""
        return {"PATH": f"{self.bin_dir}:{os.environ.get('PATH', '')}", **extra}

    def write_hostfile(self, path: Path, slots: int = 1) -> Path:
        """A DeepSpeed hostfile listing both hosts by address, `a` first (it gets node rank 0)."""
        path.write_text("".join(f"{h.addr} slots={slots}\n" for h in self.pair.hosts))
        return path


def _sshd_config(s: SshServers, host: Host, env: Mapping[str, str]) -> str:
    """sshd_config bound to `host`'s address only, key auth with our key only, `env` set in sessions."""
    r = s.root
    set_env = " ".join(f"{k}={v}" for k, v in env.items())
    return f"""\
ListenAddress {host.addr}
Port {s.port}
HostKey {r}/host_key
PidFile {r}/sshd-{host.netns}.pid
AuthorizedKeysFile {r}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
X11Forwarding no
AllowTcpForwarding no
{"SetEnv " + set_env if set_env else ""}
"""


def _ssh_client_files(s: SshServers) -> None:
    """Client config (own key, own known_hosts naming exactly our two servers) and the ``ssh`` shim."""
    r = s.root
    host_pub = (r / "host_key.pub").read_text().split()
    (r / "known_hosts").write_text("".join(f"[{h.addr}]:{s.port} {host_pub[0]} {host_pub[1]}\n"
                                           for h in s.pair.hosts))
    (r / "ssh_config").write_text(f"""\
Host *
  User root
  IdentityFile {r}/user_key
  IdentitiesOnly yes
  IdentityAgent none
  UserKnownHostsFile {r}/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 10
  LogLevel ERROR
""")
    s.bin_dir.mkdir(exist_ok=True)
    shim = s.bin_dir / "ssh"
    shim.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {r}/ssh_config "$@"\n')
    shim.chmod(0o755)


def _wait_listening(proc: BackgroundProcess, timeout: float) -> None:
    """Block until sshd logs that it listens; raise with its log if it dies or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "Server listening on" in proc.output():
            return
        if proc.popen.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"sshd did not come up ({' '.join(proc.cmd)}):\n{tail(proc.log)}")


@contextlib.contextmanager
def ssh_servers(pair: HostPair, workdir: Path, timeout: float = 20.0) -> Iterator[SshServers]:
    """Start sshd in both namespaces of `pair` (keys and configs under `workdir`); stop them on exit.

    Sessions on a host get ``GLOO_SOCKET_IFNAME=<that host's veth>``:
    the pdsh launcher exports the same variables to every node, but each namespace has its own
    interface name. ``/run/sshd`` (sshd's privilege-separation dir) is created if missing.
    """
    if (reason := ssh_launcher_unavailable_reason()) is not None:
        raise RuntimeError(f"cannot start sshd for the launcher: {reason}")
    root = Path(workdir) / "ssh"
    root.mkdir(parents=True, exist_ok=True)
    s = SshServers(pair=pair, root=root, port=free_port())
    for key in ("host_key", "user_key"):
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"zo2-test-{key}", "-f", str(root / key)])
    shutil.copy(root / "user_key.pub", root / "authorized_keys")
    (root / "authorized_keys").chmod(0o600)
    _ssh_client_files(s)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    servers: list[BackgroundProcess] = []
    try:
        for h in pair.hosts:
            env = {"GLOO_SOCKET_IFNAME": h.ifname}
            conf = root / f"sshd-{h.netns}.conf"
            conf.write_text(_sshd_config(s, h, env))
            servers.append(pair.popen(h, [SSHD, "-D", "-e", "-f", str(conf)], log=root / f"sshd-{h.netns}.log"))
        for proc in servers:
            _wait_listening(proc, timeout)
        yield s
    finally:
        for proc in servers:
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=5)
            proc.kill()


# ----------------------------------------------------------------------------- pytest fixtures

@pytest.fixture
def slurm(tmp_path: Path) -> Iterator[SlurmCluster]:
    """A running private SLURM cluster for one test (skips where it cannot run)."""
    if (reason := slurm_unavailable_reason()) is not None:
        pytest.skip(reason)
    with slurm_cluster(tmp_path) as c:
        yield c


@pytest.fixture
def host_pair(tmp_path: Path) -> Iterator[HostPair]:
    """Two network-namespace hosts for one test, logs under tmp_path (skips where it cannot run)."""
    if (reason := netns_unavailable_reason()) is not None:
        pytest.skip(reason)
    with two_hosts(tmp_path / "hosts") as pair:
        yield pair

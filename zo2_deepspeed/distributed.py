"""Process-group set-up from whichever launcher started us, in one place.

DeepSpeed's own ``init_distributed`` falls back to MPI discovery when RANK/WORLD_SIZE are unset,
which fails without mpi4py (e.g. under a plain ``srun``). We read each launcher's environment
ourselves: torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*), SLURM's srun
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST), Open MPI / MPICH mpirun, or none
at all (a plain ``python script.py`` runs as rank 0 of 1 on a free local port).
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, MutableMapping, Optional

import torch

from .errors import ZO2Error


class LaunchEnvironmentError(ZO2Error):
    """The launcher's environment is incomplete; the message names what is missing."""


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    def export(self, environ: MutableMapping[str, str]) -> None:
        environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                       MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


SINGLE_PORT_ATTEMPTS = 5
"""A process started without a launcher takes a free local port, which another process starting at the same
moment can take between our probe and our bind: then it probes again (the port is private to this process)."""

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""The rendezvous variables ``LaunchEnv.export`` writes into the environment."""


def without_launch_vars(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` minus the rendezvous variables: for a child process that starts its own process group."""
    return {k: v for k, v in environ.items() if k not in LAUNCH_VARS}


@dataclass(frozen=True)
class ParallelGrid:
    """A rank's place in a world of world/P data-parallel replicas × P perturbation ranks (zo2.parallel).

    The P consecutive ranks of a replica (one perturbation group) run the same micro-batch, each for
    its own contiguous share of the step's perturbation groups; replicas run different micro-batches,
    as in plain data parallelism. P = 1 is plain data parallelism.
    """

    rank: int
    world_size: int
    perturbation: int = 1

    def __post_init__(self) -> None:
        from .config import data_parallel_size
        data_parallel_size(self.world_size, self.perturbation)  # names zo2.parallel.perturbation if it does not divide

    @property
    def replicas(self) -> int:
        """Data-parallel size: replicas running different micro-batches."""
        return self.world_size // self.perturbation

    @property
    def replica(self) -> int:
        """This rank's data-parallel replica: the index its data is sharded by."""
        return self.rank // self.perturbation

    @property
    def slot(self) -> int:
        """This rank's position within its perturbation group (which share of the groups it runs)."""
        return self.rank % self.perturbation

    def replica_ranks(self, replica: Optional[int] = None) -> list[int]:
        """The global ranks of one replica's perturbation group (this rank's by default)."""
        first = (self.replica if replica is None else replica) * self.perturbation
        return list(range(first, first + self.perturbation))

    def share(self, groups: int, slot: Optional[int] = None) -> range:
        """The contiguous share of ``groups`` perturbation groups a slot runs (this rank's by default).

        Balanced: shares differ by at most one group, and the first G mod P slots run the extra one,
        because group 0 of FZOO and HiZOO is the unperturbed forward (no noise to draw), the cheapest.
        """
        s = self.slot if slot is None else slot
        size, extra = divmod(groups, self.perturbation)
        start = s * size + min(s, extra)
        return range(start, start + size + (1 if s < extra else 0))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int(environ: Mapping[str, str], key: str, launcher: str) -> int:
    try:
        return int(environ[key])
    except KeyError:
        raise LaunchEnvironmentError(f"{launcher} environment is incomplete: {key} is not set") from None
    except ValueError:
        raise LaunchEnvironmentError(f"{key}={environ[key]!r} is not an integer") from None


def slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``scontrol show hostnames`` expands ranges like n[01-04])."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    if "[" not in nodelist:
        return nodelist.split(",")[0]
    raise LaunchEnvironmentError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r}: scontrol is not available; "
                                 f"set MASTER_ADDR")


def _slurm_batch_step(environ: Mapping[str, str]) -> bool:
    """Whether we run in a job's batch script itself rather than as a task that srun started.

    The batch step sees SLURM_PROCID=0 and the job's SLURM_NTASKS (e.g. 2), but it is one process:
    taken for rank 0 of 2 it would wait at the rendezvous for a rank that never comes. Only srun
    tasks carry a step id (SLURM_STEP_ID, or SLURM_STEPID on older SLURM).
    """
    in_job = "SLURM_JOB_ID" in environ or "SLURM_JOBID" in environ
    return in_job and "SLURM_STEP_ID" not in environ and "SLURM_STEPID" not in environ


def detect_launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Rank, world size and rendezvous address from the launcher's environment variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise LaunchEnvironmentError(f"launcher environment is incomplete: {', '.join(missing)} not set "
                                         f"(RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT go together)")
        rank, world = _int(env, "RANK", launcher), _int(env, "WORLD_SIZE", launcher)
        local = int(env.get("LOCAL_RANK", rank if world == 1 else -1))
        if local < 0:
            raise LaunchEnvironmentError("launcher environment is incomplete: LOCAL_RANK is not set")
        return LaunchEnv(launcher, rank, world, local, env["MASTER_ADDR"], _int(env, "MASTER_PORT", launcher))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and not _slurm_batch_step(env):
        rank, world = _int(env, "SLURM_PROCID", "SLURM"), _int(env, "SLURM_NTASKS", "SLURM")
        local = _int(env, "SLURM_LOCALID", "SLURM")
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif world == 1:
            addr = "127.0.0.1"
        elif "SLURM_JOB_NODELIST" in env or "SLURM_NODELIST" in env:
            addr = slurm_first_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
        else:
            raise LaunchEnvironmentError("SLURM environment is incomplete: SLURM_JOB_NODELIST is not set "
                                         "(or set MASTER_ADDR)")
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else 15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return LaunchEnv("slurm", rank, world, local, addr, port)
    for rank_key, size_key, local_key, name in (
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "Open MPI"),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPICH")):
        if rank_key in env:
            rank, world = _int(env, rank_key, name), _int(env, size_key, name)
            local = int(env.get(local_key, "0"))
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
            if missing and world > 1:
                raise LaunchEnvironmentError(f"{name} launch: set {' and '.join(missing)} (e.g. mpirun -x "
                                             f"MASTER_ADDR=<rank-0 host> -x MASTER_PORT=29500)")
            return LaunchEnv("mpirun", rank, world, local, env.get("MASTER_ADDR", "127.0.0.1"),
                             int(env.get("MASTER_PORT", free_port())))
    return LaunchEnv("single", 0, 1, 0, "127.0.0.1", free_port())


def compute_device(local_rank: int) -> torch.device:
    from deepspeed.accelerator import get_accelerator
    accel = get_accelerator()
    name = accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu"
    return torch.device(name)


def use_device(local_rank: int) -> None:
    """Make the accelerator of ``local_rank`` the current device (nothing on the CPU).

    Work the engine does not name a device for (a library's allocation, a collective's stream) then
    goes to the engine's device, not to device 0.
    """
    from deepspeed.accelerator import get_accelerator
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)


SHM_FOLDER = "/dev/shm"


def shm_buffer_path(master_addr: str, master_port: int, rank: int) -> str:
    """The shared-memory all-reduce buffer DeepSpeed's CPU comm op makes for this rank (its own naming)."""
    return f"{SHM_FOLDER}/deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}"


def unlink_shm_buffer(env: LaunchEnv, synchronize: bool) -> None:
    """Remove this rank's name of DeepSpeed's shared-memory all-reduce buffer, so that no process leaves it behind.

    With every rank on one CPU host DeepSpeed's comm op creates a 66 MB segment per rank in /dev/shm at
    ``init_distributed`` and maps its peers' segments, but never removes them: they outlive the job and
    accumulate (they are RAM). Once every rank has mapped every segment (a barrier after
    ``init_distributed``: its op maps the peers' segments before returning) the names can go; the mappings
    stay valid until the processes exit, and then the kernel frees the memory, even after a crash. Where the
    script initialised the process group itself (no barrier of ours is safe there) the name is removed at exit.
    """
    path = shm_buffer_path(env.master_addr, env.master_port, env.rank)
    if not os.path.exists(path):
        return
    if not synchronize:
        atexit.register(_unlink_quietly, path)
        return
    from deepspeed import comm as dist
    if dist.get_world_size() > 1:
        dist.barrier()
    _unlink_quietly(path)


def remove_orphaned_shm_buffers(proc: str = "/proc") -> list[str]:
    """Remove this user's DeepSpeed all-reduce buffers in /dev/shm that no live process maps; returns their paths.

    For what earlier processes left behind (a first-order DeepSpeed run, a job killed before its barrier):
    a segment still mapped by any process (``/proc/<pid>/maps``) is in use and stays.
    """
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_"
    try:
        names = [n for n in os.listdir(SHM_FOLDER) if n.startswith(prefix)]
    except FileNotFoundError:
        return []
    if not names:
        return []
    mapped: set[str] = set()
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            with open(f"{proc}/{pid}/maps") as maps:
                for line in maps:
                    fields = line.split(None, 5)  # address perms offset dev inode pathname
                    if len(fields) == 6 and fields[5].startswith(SHM_FOLDER):
                        mapped.add(fields[5].rstrip("\n"))
        except OSError:  # gone, or another user's
            continue
    removed = []
    for name in names:
        path = f"{SHM_FOLDER}/{name}"
        if path not in mapped:
            _unlink_quietly(path)
            removed.append(path)
    return removed


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_DESTROY_AT_EXIT: list[bool] = []


def destroy_process_group_at_exit() -> None:
    """Tear the default process group down before the interpreter finalises (registered once).

    A gloo group still alive during finalisation can abort the process ("terminate called without an
    active exception", exit -6) when a peer exited first: a script that stops with an error, or a rank
    that simply finishes a little later, then dies of SIGABRT instead of its own exit status. Destroying
    the group from ``atexit`` (PyTorch's advice for every backend) is local and needs no peer.
    """
    if _DESTROY_AT_EXIT:
        return
    _DESTROY_AT_EXIT.append(True)

    def destroy() -> None:
        import torch.distributed as torch_dist
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.destroy_process_group()

    atexit.register(destroy)


def ensure_distributed(timeout_s: float = 1800.0) -> LaunchEnv:
    """Initialise DeepSpeed's comm layer once (gloo on CPU, the accelerator's backend otherwise)."""
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized():  # by the script (deepspeed.init_distributed()), which need not have set the device
        env = LaunchEnv("existing", dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", "0")), os.environ.get("MASTER_ADDR", ""),
                        int(os.environ.get("MASTER_PORT", "0")))
        use_device(env.local_rank)
        unlink_shm_buffer(env, synchronize=False)
        destroy_process_group_at_exit()
        return env
    env = detect_launch_env()
    env.export(os.environ)
    from .jit_ops import clear_stale_locks
    clear_stale_locks()  # init_distributed loads DeepSpeed's shared-memory comm op: never wait on a dead build
    accel = get_accelerator()
    backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    use_device(env.local_rank)
    for attempt in range(1, SINGLE_PORT_ATTEMPTS + 1):
        try:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                       timeout=timedelta(seconds=timeout_s))
            unlink_shm_buffer(env, synchronize=True)
            destroy_process_group_at_exit()
            return env
        except RuntimeError as e:  # torch's DistNetworkError is a RuntimeError
            if env.launcher != "single" or attempt == SINGLE_PORT_ATTEMPTS or "EADDRINUSE" not in str(e):
                raise
            env = dataclasses.replace(env, master_port=free_port())
            env.export(os.environ)
    return env

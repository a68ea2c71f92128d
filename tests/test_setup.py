"""The set-up scripts on the machines users have: an active venv, a stock Debian/Ubuntu with only the system python3
(externally managed, no ``python``), a stale build lock, and DeepSpeed's shared-memory buffers.

The resolution of the interpreter (launch/python_env.sh) is checked in a second or so per case; the full install
from a clean copy of the tree with the system python3 is slow-marked (2-4 min: a new venv and every package, from
pip's cache).
"""
from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STOCK_PATH = "/usr/local/bin:/usr/bin:/bin"


def resolve(env: dict, root: Path = ROOT, mode: str = "") -> subprocess.CompletedProcess:
    """Source launch/python_env.sh under ``env`` (and nothing else) and print what it chose."""
    script = f'source "{root}/launch/python_env.sh" && zo2_resolve_python {mode} && echo "PY=$ZO2_PY" && echo "WHERE=$ZO2_PY_WHERE"'
    return subprocess.run(["bash", "-c", script], env={"PATH": STOCK_PATH, "HOME": env.pop("HOME", "/tmp"), **env},
                          capture_output=True, text=True, timeout=120)


def chosen(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return next(line[3:] for line in result.stdout.splitlines() if line.startswith("PY="))


def fake_tree(tmp_path: Path) -> Path:
    """A copy of launch/ only: enough for python_env.sh, which resolves paths relative to itself."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "launch", tree / "launch")
    return tree


def test_the_active_virtual_environment_is_installed_into(tmp_path):
    venv = Path(sys.prefix)
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests do not run in a virtual environment")
    assert chosen(resolve({"VIRTUAL_ENV": str(venv)}, fake_tree(tmp_path))) == f"{venv}/bin/python"


def test_without_an_active_environment_the_project_venv_is_used(tmp_path):
    tree = fake_tree(tmp_path)
    result = resolve({}, tree)  # not "create": nothing is made, and the message says what to run
    assert result.returncode != 0 and "no environment yet: run bash launch/install.sh first" in result.stderr
    (tree / ".venv" / "bin").mkdir(parents=True)
    (tree / ".venv" / "bin" / "python").symlink_to(sys.executable)
    result = resolve({}, tree)
    assert chosen(result) == f"{tree}/.venv/bin/python"
    assert f"the project's virtual environment {tree}/.venv (use it with: source .venv/bin/activate)" in result.stdout


def test_an_externally_managed_interpreter_is_refused_never_broken_into(tmp_path):
    """ZO2_PYTHON naming a PEP 668 system interpreter: refused with the way out, not --break-system-packages."""
    system = shutil.which("python3", path=STOCK_PATH)
    managed = system and subprocess.run(
        [system, "-c", "import os, sys, sysconfig; sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists("
                       "os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')) else 1)"]).returncode == 0
    if not managed:
        pytest.skip("no externally managed python3 on the stock PATH")
    result = resolve({"ZO2_PYTHON": system}, fake_tree(tmp_path))
    assert result.returncode != 0
    assert f"{system} is externally managed (PEP 668) and is not installed into" in result.stderr
    assert "--break-system-packages" not in (ROOT / "launch" / "install.sh").read_text()


def test_an_old_or_missing_interpreter_is_named(tmp_path):
    result = resolve({"ZO2_PYTHON": str(tmp_path / "nowhere" / "python")}, fake_tree(tmp_path))
    assert result.returncode != 0 and f"{tmp_path}/nowhere/python is not a Python >= 3.10" in result.stderr


@pytest.mark.slow
def test_install_on_a_stock_system_with_only_the_system_python3(tmp_path):
    """A clean copy of the tree, ``env -i PATH=/usr/local/bin:/usr/bin:/bin``, a new HOME: install.sh makes .venv/
    from the system python3 and zo2_deepspeed (with its switch) imports from there. DeepSpeed's op builds are
    skipped (ZO2_SKIP_PREBUILD=1: minutes, checked by the NVMe tests); pip's cache is the user's. 2-4 min."""
    system = shutil.which("python3", path=STOCK_PATH)
    if system is None:
        pytest.skip(f"no python3 on {STOCK_PATH}")
    tree = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    pip_cache = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True).stdout.strip()
    env = {"PATH": STOCK_PATH, "HOME": str(tmp_path / "home"), "ZO2_SKIP_PREBUILD": "1"}
    if pip_cache and Path(pip_cache).is_dir():
        env["PIP_CACHE_DIR"] = pip_cache
    (tmp_path / "home").mkdir()
    result = subprocess.run(["bash", "launch/install.sh"], cwd=tree, env=env, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"install.sh: installing into the project's virtual environment {tree}/.venv" in result.stderr
    assert "made from " in result.stderr
    probe = subprocess.run([str(tree / ".venv" / "bin" / "python"), "-c",
                            "import os, zo2_deepspeed, zo2_deepspeed_autopatch, torch; print(zo2_deepspeed.__file__); "
                            "print(torch.__version__); print(os.environ.get('TORCH_EXTENSIONS_DIR'))"], env={"PATH": STOCK_PATH, "HOME": env["HOME"]},
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)  # not from this checkout
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.splitlines()[0].startswith(str(tree)) and probe.stdout.splitlines()[1].startswith("2.13.0")
    assert probe.stdout.splitlines()[2] == f"{tree}/.venv/torch_extensions"  # op builds per environment, not shared
    switch = subprocess.run([str(tree / ".venv" / "bin" / "python"), "-m", "zo2_deepspeed_autopatch"],
                            env={"PATH": STOCK_PATH, "HOME": env["HOME"]}, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert f"zo2_deepspeed config switch: active in {tree}/.venv/bin/python" in switch.stdout, switch.stdout


# ------------------------------------------------------------------------------------- DeepSpeed's JIT ops
def test_a_lock_left_by_a_killed_build_is_removed_before_the_op_loads(tmp_path, monkeypatch, caplog):
    """A build killed part-way leaves ``<op>/lock``, and torch's next load waits on it forever. Every op load of the
    project (the NVMe tier's included) goes through ``jit_ops.load_op``, which removes a lock no process holds,
    with a message, before DeepSpeed loads (a real rebuild would take minutes: the builder here records instead)."""
    import logging

    from deepspeed.ops.op_builder import AsyncIOBuilder
    from deepspeed.ops.op_builder.builder import OpBuilder

    from zo2_deepspeed import jit_ops
    from zo2_deepspeed.tiers import nvme_aio
    folder = tmp_path / "async_io"
    folder.mkdir()
    lock = folder / "lock"
    lock.write_text("")
    os.utime(lock, (time.time() - 60, time.time() - 60))
    loads = []
    monkeypatch.setattr(jit_ops, "build_folder", lambda builder: folder)
    monkeypatch.setattr(nvme_aio, "build_folder", lambda builder: folder)
    monkeypatch.setattr(nvme_aio, "_aio_built", lambda builder: True)
    monkeypatch.setattr(AsyncIOBuilder, "load", lambda self, verbose=True: loads.append(lock.exists()) or "op")
    monkeypatch.delitem(OpBuilder._loaded_ops, "async_io", raising=False)
    with caplog.at_level(logging.WARNING, logger="zo2_deepspeed.jit_ops"):
        assert nvme_aio.aio_op() == "op"
    assert loads == [False]  # DeepSpeed's load ran once, after the lock was gone
    assert f"zo2: removed {lock}, left by a build of DeepSpeed's async_io op that was killed" in caplog.text


def test_a_lock_held_by_a_live_build_is_left_alone(tmp_path):
    from zo2_deepspeed.jit_ops import clear_stale_lock, lock_holders
    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton holds it for the whole build
    try:
        os.utime(lock, (time.time() - 600, time.time() - 600))
        assert lock_holders(lock) == [os.getpid()]
        assert clear_stale_lock(tmp_path) is False and lock.exists()
    finally:
        os.close(fd)
    assert lock_holders(lock) == []
    os.utime(lock, None)  # just created: another host's build may hold it (a shared home); not yet removed
    assert clear_stale_lock(tmp_path, min_age_s=30) is False and lock.exists()
    os.utime(lock, (time.time() - 60, time.time() - 60))
    assert clear_stale_lock(tmp_path, min_age_s=30) is True and not lock.exists()
    assert clear_stale_lock(tmp_path) is False  # nothing to remove


def test_prebuild_names_an_unknown_op():
    result = subprocess.run([sys.executable, "-m", "zo2_deepspeed.prebuild", "FusedLambBuilder"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert "unknown op FusedLambBuilder; choose from PinMemoryBuilder, AsyncIOBuilder, CPUAdamBuilder, ShareMemCommBuilder" in result.stderr


# ------------------------------------------------------------------------------------- shared memory
def test_orphaned_shm_buffers_are_removed_and_mapped_ones_kept(tmp_path):
    from zo2_deepspeed.distributed import remove_orphaned_shm_buffers
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    stem = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_test-{os.getpid()}_1_"
    orphan, mapped = Path(stem + "0"), Path(stem + "1")
    for path in (orphan, mapped):
        path.write_bytes(b"\0" * 4096)
    with open(mapped, "r+b") as handle, mmap.mmap(handle.fileno(), 4096):
        try:
            removed = remove_orphaned_shm_buffers()
            assert str(orphan) in removed and not orphan.exists()
            assert str(mapped) not in removed and mapped.exists()
        finally:
            orphan.unlink(missing_ok=True)
            mapped.unlink(missing_ok=True)


@pytest.mark.slow
@pytest.mark.multirank
def test_two_ranks_on_one_host_leave_no_shm_buffers(tmp_path):
    """With LOCAL_SIZE set (as the deepspeed launcher sets it) DeepSpeed's CPU comm op makes a 66 MB /dev/shm segment
    per rank and never removes it; the engine removes the names once every rank has mapped them. ~20-40 s."""
    from zo2_deepspeed.distributed import free_port, without_launch_vars
    before = {n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_")}
    env = without_launch_vars(os.environ)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", LOCAL_SIZE="2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "dp_worker.py"), "--out", str(tmp_path), "--tier", "cpu", "--steps", "2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "deepspeed_shm_comm_op built successfully" in output, output[-3000:]  # the op that makes the buffers was in use
    after = {n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_")}
    assert after - before == set(), after - before

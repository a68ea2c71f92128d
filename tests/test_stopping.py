"""StopOnSignal: SIGINT/SIGTERM become a flag read at a step boundary; worker threads never see them."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from zo2_deepspeed.stopping import StopOnSignal


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_sets_the_flag_and_the_worker_thread_runs_on(signum):
    """A worker busy in a lock-protected loop (as the prefetch thread is in BufferPool.put_many) is not
    interrupted, the main thread raises nothing, and the previous handlers come back afterwards."""
    before = signal.getsignal(signum)
    lock, done, rounds = threading.Lock(), threading.Event(), []

    def worker() -> None:
        for i in range(200):
            with lock:
                rounds.append(i)
            time.sleep(0.0005)
        done.set()

    with StopOnSignal(announce=False) as stop:
        thread = threading.Thread(target=worker)
        thread.start()
        assert not stop.requested()
        os.kill(os.getpid(), signum)
        with lock:  # the main thread waits on the same lock while the signal is handled
            pass
        thread.join(timeout=30)
        assert stop.requested() and stop.name == signal.Signals(signum).name
    assert done.is_set() and rounds == list(range(200))
    assert signal.getsignal(signum) is before


def test_second_signal_stops_at_once_without_a_traceback():
    with StopOnSignal(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested()
        with pytest.raises(SystemExit) as info:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode boundary
    assert info.value.code == 128 + signal.SIGINT


def test_requested_hands_this_rank_s_flag_to_the_reduction_and_returns_its_verdict():
    """With several ranks ``requested`` is what the reduction of the local flags says: a stop seen only on
    another rank stops this one, and this rank's own signal is what it contributes."""
    contributed = []

    def another_rank_stops(flag: bool) -> bool:
        contributed.append(flag)
        return True

    def no_rank_stops(flag: bool) -> bool:
        contributed.append(flag)
        return False

    with StopOnSignal(announce=False) as stop:
        assert stop.requested(another_rank_stops) is True
        assert stop.requested(no_rank_stops) is False and not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()
        assert stop.requested(no_rank_stops) is False  # the verdict is the reduction's, not the local flag
    assert contributed == [False, False, True]


ANY_RANK_WORKER = """
import os, sys
import torch
from zo2_deepspeed.distributed import ensure_distributed
from zo2_deepspeed.stopping import any_rank
ensure_distributed()  # as the engine does; it also destroys the group at exit (else a late rank can abort, -6)
rank = int(os.environ["RANK"])
agree = any_rank(torch.device("cpu"))
verdicts = [agree(False), agree(rank == 1), agree(rank == 0), agree(True)]
print("VERDICTS", rank, verdicts, flush=True)
"""


@pytest.mark.slow
@pytest.mark.multirank
def test_any_rank_stops_every_rank_when_one_rank_is_signalled(tmp_path):
    """``any_rank``, the reduction the engine passes, over two real gloo ranks: one rank's flag reaches both. ~10 s."""
    import subprocess
    import sys

    from zo2_deepspeed.distributed import free_port, without_launch_vars
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = without_launch_vars(os.environ)
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", ANY_RANK_WORKER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, output[-3000:]
        assert f"VERDICTS {rank} [False, True, True, True]" in output, output[-3000:]


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGINT)
    seen = []

    def run() -> None:
        with StopOnSignal(announce=False):
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [before]


# -- a second signal during a save, two ranks ------------------------------------------------------------


SAVE_TIMEOUT_S = 300
"""zo2.comm_timeout_s of the ranks: a rank left waiting for its peer would fail only after it."""


def start_ranks(save_dir, *args: str, world: int = 2) -> list:
    """Two ranks of tests/ckpt_worker.py training under StopOnSignal, saving after every step; from the save of
    step 3 on, rank 0 waits inside its file write (announced) for the test's signal."""
    from test_checkpoint_integrity import start_ranks as start_worker_ranks
    return start_worker_ranks("--save_dir", str(save_dir), "--steps", "50", "--stop_on_signal",
                              "--pause_in_save_from", "3", "--pause_rank", "0", *args, world=world,
                              timeout_s=SAVE_TIMEOUT_S)


def wait_for(proc, text: str, seen: list) -> None:
    """Read ``proc``'s output until a line starts with ``text`` (the event the test acts on)."""
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(text):
            return
    raise AssertionError(f"the run ended before printing {text!r}: {''.join(seen)[-2000:]}")


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("signum, to", [(signal.SIGINT, "every rank"), (signal.SIGTERM, "rank 0")],
                         ids=["SIGINT to every rank (Ctrl-C)", "SIGTERM to the rank that is writing"])
def test_a_second_signal_during_a_save_stops_every_rank_at_once_and_keeps_the_last_checkpoint(tmp_path, signum, to):
    """The first signal asks for a stop; the second arrives while rank 0 is writing its file and rank 1 waits
    for it in the ranks' exchange. Rank 0 stops at once and its interrupt reaches rank 1, which stops too,
    long before zo2.comm_timeout_s; the partial save is gone and the step-2 checkpoint loads.

    When only rank 0 is signalled, its process then lingers (as under NCCL, rank 1 cannot see it is gone):
    rank 1 must stop because rank 0 told it, not because rank 0's process exited."""
    import time

    import zo2_deepspeed
    from ckpt_worker import dataset
    from conftest import ds_config
    from tiny_models import make_model
    save_dir = tmp_path / "ckpt"
    lingering = to == "rank 0"
    procs = start_ranks(save_dir, *(["--linger_s", "600"] if lingering else []))
    outputs: list[list[str]] = [[], []]
    try:
        wait_for(procs[0], "saved 2", outputs[0])  # a complete checkpoint exists: the one to keep
        for proc in procs:
            proc.send_signal(signum)  # the first: finish the step, then save
        wait_for(procs[0], "in save 3: rank 0 is writing", outputs[0])
        wait_for(procs[1], "in save 3: rank 1 wrote its file", outputs[1])  # rank 1 goes on to wait for rank 0
        second = time.monotonic()
        for proc in procs if to == "every rank" else procs[:1]:
            proc.send_signal(signum)
        if lingering:
            wait_for(procs[0], "interrupted (SystemExit", outputs[0])
            rank1 = procs[1].communicate(timeout=SAVE_TIMEOUT_S)
            stopped_after = time.monotonic() - second
            procs[0].kill()  # done lingering
            results = [procs[0].communicate(), rank1]
        else:
            results = [proc.communicate(timeout=SAVE_TIMEOUT_S) for proc in procs]
            stopped_after = time.monotonic() - second
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    errors = [err for _, err in results]
    print(f"{'rank 1' if lingering else 'both ranks'} stopped {stopped_after:.1f} s after the second "
          f"{signal.Signals(signum).name} (zo2.comm_timeout_s = {SAVE_TIMEOUT_S})")
    assert stopped_after < 60, errors[1][-3000:]
    if lingering:  # rank 0 stopped with the signal's exit code (then was left lingering, and killed here)
        assert f"interrupted (SystemExit {128 + signum}); lingering" in "".join(outputs[0]), errors[0][-3000:]
    else:
        assert procs[0].returncode == 128 + signum, errors[0][-3000:]
    assert "RankSyncError" not in errors[1], errors[1][-3000:]  # told by rank 0, not left to find it gone
    if to == "every rank":  # rank 1's own second signal came while it waited: held, then raised with rank 0's
        assert procs[1].returncode == 128 + signum, errors[1][-3000:]
    else:
        assert procs[1].returncode == 1, errors[1][-3000:]
        assert (f"CheckpointError: writing the checkpoint files failed on rank 0: SystemExit {128 + signum} "
                f"(interrupted: a signal, or the program exiting)") in errors[1], errors[1][-3000:]
    assert sorted(p.name for p in save_dir.iterdir()) == ["global_step1", "global_step2", "latest"]
    assert (save_dir / "latest").read_text() == "global_step2"
    config = ds_config("cpu", micro_batch=4, lr=1e-2, weight_decay=0.01, num_perturbations=3, hessian_smooth=0.1)
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=config, training_data=dataset())
    path, client = engine.load_checkpoint(str(save_dir), load_lr_scheduler_states=False)
    assert path == str(save_dir / "global_step2") and client == {"step": 2} and engine.global_steps == 2
    engine.close()

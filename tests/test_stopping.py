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

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


def test_requested_is_agreed_through_the_reduction():
    """With several ranks a stop seen on one rank stops all: requested() returns what the reduction says."""
    with StopOnSignal(announce=False) as stop:
        assert stop.requested(lambda flag: True)  # another rank got the signal
        assert not stop.requested(lambda flag: flag)


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

"""Process-group set-up without a launcher: a port taken between probe and bind is probed again."""
from __future__ import annotations

import os

import pytest

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                 "OMPI_COMM_WORLD_RANK", "PMI_RANK", "TORCHELASTIC_RUN_ID")
TAKEN = ("The server socket has failed to listen on any local network address. port: 41001, useIpv6: false, "
         "code: -98, name: EADDRINUSE, message: address already in use")


@pytest.fixture
def no_launcher(monkeypatch):
    """No launcher's variables, no process group yet, and ports handed out in order."""
    import deepspeed.comm as dist

    from zo2_deepspeed import distributed
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    ports = iter(range(41001, 41100))
    monkeypatch.setattr(distributed, "free_port", lambda: next(ports))
    return distributed


def fake_init(monkeypatch, failures: list[str]) -> list[str]:
    """deepspeed.init_distributed raising the given messages in turn, then succeeding; returns the ports tried."""
    import deepspeed
    tried = []

    def init_distributed(**_):
        tried.append(os.environ["MASTER_PORT"])
        if len(tried) <= len(failures):
            raise RuntimeError(failures[len(tried) - 1])
    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    return tried


def test_a_port_taken_by_another_process_starting_at_once_is_probed_again(no_launcher, monkeypatch):
    tried = fake_init(monkeypatch, [TAKEN, TAKEN])
    env = no_launcher.ensure_distributed()
    assert tried == ["41001", "41002", "41003"]
    assert (env.launcher, env.master_port, os.environ["MASTER_PORT"]) == ("single", 41003, "41003")


def test_other_failures_and_a_port_that_stays_taken_are_raised(no_launcher, monkeypatch):
    tried = fake_init(monkeypatch, ["connection refused"])
    with pytest.raises(RuntimeError, match="connection refused"):
        no_launcher.ensure_distributed()
    assert tried == ["41001"]
    for var in LAUNCHER_VARS:  # the failed set-up exported its launch variables
        monkeypatch.delenv(var, raising=False)
    tried = fake_init(monkeypatch, [TAKEN] * no_launcher.SINGLE_PORT_ATTEMPTS)
    with pytest.raises(RuntimeError, match="EADDRINUSE"):
        no_launcher.ensure_distributed()
    assert len(tried) == no_launcher.SINGLE_PORT_ATTEMPTS


def test_a_launcher_chosen_port_is_never_changed(no_launcher, monkeypatch):
    """Under torchrun every rank was told the port: probing another would split the rendezvous."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    tried = fake_init(monkeypatch, [TAKEN])
    with pytest.raises(RuntimeError, match="EADDRINUSE"):
        no_launcher.ensure_distributed()
    assert tried == ["29999"]

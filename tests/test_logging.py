"""Logging as DeepSpeed does it: steps_per_print lines through its logger, no deprecation noise from stage 3."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import zo2_deepspeed
from conftest import ds_config
from tiny_models import batches, make_model
from zo2_deepspeed.distributed import free_port, without_launch_vars

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def deepspeed_log(level=None):
    """DeepSpeed's logger writing to a buffer (optionally set to ``level`` with logger.setLevel only).

    For the duration its handlers are replaced by one made as DeepSpeed makes its own (a StreamHandler at
    WARNING with DeepSpeed's formatter): whatever else is attached (pytest's logging plugin, an earlier test's
    handler) neither breaks the capture nor duplicates lines, and whatever an earlier engine did to DeepSpeed's
    handler (``apply_log_level`` lowers it) does not leak in. Level, handlers and propagation are restored after.
    """
    from deepspeed.utils import logger
    saved_level, saved_handlers, saved_propagate = logger.level, list(logger.handlers), logger.propagate
    own = next((h for h in saved_handlers if type(h) is logging.StreamHandler), None)
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setLevel(logging.WARNING)
    if own is not None:
        handler.setFormatter(own.formatter)
    for old in saved_handlers:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(level if level is not None else logging.WARNING)
    try:
        yield buffer
    finally:
        logger.removeHandler(handler)
        for old in saved_handlers:
            logger.addHandler(old)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate


def train_steps(config, steps):
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=config)
    try:
        for batch in batches(steps):
            engine.backward(engine(**batch))
            engine.step()
    finally:
        engine.close()


def step_lines(text):
    return [line[line.index("] step=") + 2:] for line in text.splitlines() if "] step=" in line and "loss=" in line]


def test_steps_per_print_lines_appear_with_the_logger_at_info():
    """logger.setLevel(INFO) alone (DeepSpeed's stdout handler stays at WARNING) used to print nothing."""
    config = ds_config("cpu")
    config["steps_per_print"] = 2
    with deepspeed_log(logging.INFO) as log:
        train_steps(config, 4)
    lines = step_lines(log.getvalue())
    assert [line.split()[0] for line in lines] == ["step=2", "step=4"], log.getvalue()[-2000:]
    assert all(line.startswith("step=") and " lr=0.001 skipped=0 " in line for line in lines), lines


def test_log_level_in_the_config_is_honoured_and_the_default_stays_quiet():
    config = ds_config("cpu")
    config["steps_per_print"] = 1
    with deepspeed_log() as log:  # DeepSpeed's default: WARNING
        train_steps(config, 2)
    assert step_lines(log.getvalue()) == []
    config["log_level"] = "info"  # DeepSpeed's own config field
    with deepspeed_log() as log:
        train_steps(config, 2)
    assert [line.split()[0] for line in step_lines(log.getvalue())] == ["step=1", "step=2"]


@pytest.mark.multirank
def test_stage3_run_on_two_ranks_emits_no_all_gather_deprecation(tmp_path):
    """Every block fetch all-gathers partitions: it must use torch's current collective (no FutureWarning)."""
    env = without_launch_vars(os.environ)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(HERE / "dp_worker.py"), "--out", str(tmp_path), "--tier", "cpu", "--steps", "2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert (tmp_path / "rank1.pt").exists()
    assert "all_gather_into_tensor" not in output, output[-4000:]


def test_zo2_steps_per_print_gives_the_step_line_where_accelerate_set_the_top_level_one_to_infinity():
    """Accelerate (and so the HF Trainer) writes ``"steps_per_print": inf`` into every DeepSpeed config it prepares."""
    config = ds_config("cpu")
    config.update(steps_per_print=float("inf"), log_level="info")  # as Accelerate leaves it; log_level is the user's
    with deepspeed_log() as log:
        train_steps(config, 2)
    assert step_lines(log.getvalue()) == []
    config["zo2"]["steps_per_print"] = 1
    with deepspeed_log() as log:
        train_steps(config, 2)
    assert [line.split()[0] for line in step_lines(log.getvalue())] == ["step=1", "step=2"]

"""Shared fixtures: tiny random Hugging Face models built in code, and DeepSpeed configs."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton kernels run in its interpreter on CPU tensors: the tests check the code a GPU compiles.
# (Set before anything imports triton: @triton.jit picks the interpreter at decoration time.)
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny_models import ARCHS, make_model  # noqa: E402


@contextlib.contextmanager
def deepspeed_warnings():
    """The WARNING records of DeepSpeed's logger (at its default level) while the block runs."""
    from deepspeed.utils import logger
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (minutes); run in CI after the default suite")
    config.addinivalue_line("markers", "nvme: needs libaio and DeepSpeed's AsyncIO op")
    config.addinivalue_line("markers", "multirank: spawns several ranks")
    config.addinivalue_line("markers", "cluster: starts SLURM daemons or network namespaces (root)")


def ds_config(tier: str = "none", method: str = "mezo", micro_batch: int = 4, lr: float = 1e-3,
              weight_decay: float = 0.0, eps: float = 1e-3, seed: int = 1, gas: int = 1, **zo2) -> dict:
    """A DeepSpeed config with a zo2 section for one of the tiers none / device / cpu."""
    zero = {"none": {"stage": 0}, "device": {"stage": 3}, "cpu": {"stage": 3, "offload_param": {"device": "cpu"}}}[tier]
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": gas,
        "steps_per_print": 1000,
        "zero_optimization": copy.deepcopy(zero),
        "optimizer": {"type": "SGD", "params": {"lr": lr, "weight_decay": weight_decay}},
        "zo2": {"method": method, "eps": eps, "seed": seed, **zo2},
    }


@pytest.fixture
def make_config():
    return ds_config


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def tiny_model():
    return make_model


# ----------------------------------------------------------------------------------------- test isolation
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""Written by the first engine of the process (ensure_distributed) for the process group, which lives as long as
the process: kept, not restored."""


def _loaded(name: str):
    return sys.modules.get(name)


def _process_globals() -> dict:
    """What code under test may change for the whole process."""
    import signal

    import torch
    state = {"environ": dict(os.environ), "cwd": os.getcwd(), "dtype": torch.get_default_dtype(),
             "threads": torch.get_num_threads(),
             "signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}}
    ds_logging = _loaded("deepspeed.utils.logging")
    if ds_logging is not None:
        logger = ds_logging.logger
        state["ds_logger"] = (logger.level, logger.propagate, [(h, h.level) for h in logger.handlers])
    state["switch"] = _switch_state()
    return state


def _switch_state() -> dict:
    """Whether the config switch is installed on deepspeed and on the Trainer (where those modules are loaded)."""
    state = {}
    deepspeed = _loaded("deepspeed")
    if deepspeed is not None and hasattr(deepspeed, "initialize"):
        state["deepspeed"] = bool(getattr(deepspeed.initialize, "_zo2_dispatch", False))
    integration = _loaded("transformers.integrations.deepspeed")
    switch = _loaded("zo2_deepspeed_autopatch")
    if integration is not None and switch is not None and hasattr(integration, "deepspeed_init"):
        state["trainer"] = integration.deepspeed_init is switch.trainer_deepspeed_init
    return state


def _restore_process_globals(state: dict) -> None:
    import signal

    import torch
    for key in set(os.environ) - set(state["environ"]) - set(LAUNCH_VARS):
        del os.environ[key]
    for key, value in state["environ"].items():
        if key not in LAUNCH_VARS and os.environ.get(key) != value:
            os.environ[key] = value
    if os.getcwd() != state["cwd"]:
        os.chdir(state["cwd"])
    torch.set_default_dtype(state["dtype"])
    if torch.get_num_threads() != state["threads"]:
        torch.set_num_threads(state["threads"])
    for signum, handler in state["signals"].items():
        if signal.getsignal(signum) is not handler and handler is not None:
            signal.signal(signum, handler)
    if "ds_logger" in state:
        from deepspeed.utils.logging import logger
        level, propagate, handlers = state["ds_logger"]
        logger.setLevel(level)
        logger.propagate = propagate
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for handler, handler_level in handlers:
            handler.setLevel(handler_level)
            logger.addHandler(handler)
    before, now = state["switch"], _switch_state()
    if before.items() - now.items():
        # through the switch's own functions, which keep its bookkeeping (the original functions) consistent
        import zo2_deepspeed_autopatch as switch
        if "deepspeed" in before and now.get("deepspeed") != before["deepspeed"]:
            deepspeed = sys.modules["deepspeed"]
            (switch.install_deepspeed if before["deepspeed"] else switch.uninstall_deepspeed)(deepspeed)
        if "trainer" in before and now.get("trainer") != before["trainer"]:
            if before["trainer"]:
                switch.install_trainer(sys.modules["transformers.integrations.deepspeed"])
            else:
                switch.uninstall_trainer()


@pytest.fixture(autouse=True)
def restore_process_globals():
    """Every test leaves the process as it found it, so that no test depends on which ran before it.

    Environment variables (but the process group's rendezvous variables), the working directory, torch's default
    dtype and thread count, the SIGINT/SIGTERM handlers, DeepSpeed's logger (level, handlers and their levels)
    and the config switch (installed or not on ``deepspeed.initialize`` and on the Trainer's ``deepspeed_init``,
    put back through the switch's own functions) are restored after each test. DeepSpeed shared-memory buffers
    that no live process maps any more (left by a test's child processes) are removed.
    """
    state = _process_globals()
    shm_before = _shm_buffers()
    yield
    _restore_process_globals(state)
    if _shm_buffers() - shm_before:
        from zo2_deepspeed.distributed import remove_orphaned_shm_buffers
        remove_orphaned_shm_buffers()


def _shm_buffers() -> set:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_")}
    except FileNotFoundError:
        return set()

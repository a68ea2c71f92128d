"""Shared fixtures: tiny random Hugging Face models built in code, and DeepSpeed configs."""
from __future__ import annotations

import copy
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

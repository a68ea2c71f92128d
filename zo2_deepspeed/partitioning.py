"""Turning a model into ZeRO-3 partitions (or building it as partitions) with the config's tier and dtype.

``deepspeed.zero.Init(dtype=...)`` ignores an explicit dtype on accelerators without fp16 support
(the CPU accelerator then always picks bf16), so the storage dtype is passed the way DeepSpeed
honours everywhere: through the config's bf16/fp16 sections, with ``dtype=None``.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn


def zero_init_context(raw_config: dict, tier: str, storage_dtype: Optional[torch.dtype],
                      module: Optional[nn.Module] = None) -> Any:
    """A ``deepspeed.zero.Init`` that stores partitions in ``tier`` ("device", "cpu", "nvme") as ``storage_dtype``."""
    import deepspeed
    config = copy.deepcopy(raw_config)
    # Init would otherwise replace torch.nn.functional.linear process-wide; our blocks are gathered explicitly.
    config.setdefault("zero_optimization", {})["memory_efficient_linear"] = False
    if storage_dtype is not None:
        config["bf16"] = {"enabled": storage_dtype == torch.bfloat16}
        config["fp16"] = {"enabled": storage_dtype == torch.float16}
    remote = None if tier in (None, "none", "device") else tier
    return deepspeed.zero.Init(module=module, config_dict_or_path=config, remote_device=remote, dtype=None,
                               mem_efficient_linear=False)


def partition_in_place(model: nn.Module, raw_config: dict, tier: str, storage_dtype: torch.dtype) -> None:
    """Partition an already-built model (tied weights stay one parameter)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != storage_dtype:
            p.data = p.data.to(storage_dtype)
    zero_init_context(raw_config, tier, storage_dtype, module=model)

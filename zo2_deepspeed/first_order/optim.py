"""The tail's optimizer and LR scheduler, built from DeepSpeed's JSON vocabulary, and its gradient clipping.

``"optimizer": {"type": "AdamW" | "Adam" | "SGD", "params": {...}}`` as in a DeepSpeed config: "Adam" follows
DeepSpeed in meaning AdamW unless ``adam_w_mode`` is false; weight decay defaults to 0 (DeepSpeed's
optimizers' default, not torch AdamW's 0.01) and applies to matrices only, as the ZO update's does. With
``"offload_optimizer": {"device": "cpu"}`` the fp32 master weights and the state live in CPU memory and
Adam runs as DeepSpeed's CPU Adam, as under ZeRO-Offload. The scheduler is any of DeepSpeed's
``lr_schedules`` or torch's, stepped once per optimizer step.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..errors import ConfigError
from .settings import SECTION, optimizer_kind


def param_groups(masters: list[torch.Tensor], weight_decay: float) -> list[dict]:
    """Decay on matrices only (not on biases, norm weights)."""
    decay = [m for m in masters if m.dim() >= 2]
    rest = [m for m in masters if m.dim() < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
            if g["params"]]


def build_optimizer(section: dict, masters: list[torch.Tensor], offload: bool) -> torch.optim.Optimizer:
    """The optimizer over the fp32 master tensors; ``offload``: they are in CPU memory (CPU Adam for Adam)."""
    kind = optimizer_kind(section)
    params = dict(section.get("params", {}))
    lr = float(params.pop("lr"))
    groups = param_groups(masters, float(params.pop("weight_decay", 0.0)))
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, **params)
    adamw = kind == "adamw" or bool(params.pop("adam_w_mode", True))
    betas = tuple(params.pop("betas", (0.9, 0.999)))
    eps = float(params.pop("eps", 1e-8))
    if offload:
        if params.pop("amsgrad", False):
            raise ConfigError(f"{SECTION}.optimizer.params.amsgrad is not supported by DeepSpeed's CPU Adam "
                              f"({SECTION}.offload_optimizer.device cpu)")
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=adamw)
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    return cls(groups, lr=lr, betas=betas, eps=eps, **params)


def scheduler_class(section: dict) -> type:
    """The scheduler class ``section["type"]`` names: DeepSpeed's (``deepspeed.runtime.lr_schedules``) or torch's."""
    from deepspeed.runtime import lr_schedules
    name = section["type"]
    cls = getattr(lr_schedules, name, None) or getattr(torch.optim.lr_scheduler, name, None)
    if cls is None or not isinstance(cls, type):
        raise ConfigError(f"{SECTION}.scheduler.type {name!r} is neither a DeepSpeed nor a torch LR scheduler")
    return cls


def build_scheduler(section: Optional[dict], optimizer: torch.optim.Optimizer) -> Any:
    """The scheduler of ``section`` on ``optimizer``, stepped once per optimizer step; None without a section."""
    if section is None:
        return None
    cls, name = scheduler_class(section), section["type"]
    try:
        return cls(optimizer, **section.get("params", {}))
    except TypeError as e:
        raise ConfigError(f"{SECTION}.scheduler.params do not fit {name}: {e}") from None


def clip(masters: list[torch.Tensor], max_norm: float) -> float:
    """The gradient's global norm before clipping; scaled to ``max_norm`` when above it (0: no clipping), as
    DeepSpeed's ``gradient_clipping`` does."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(masters, max_norm))
    return float(torch.nn.utils.get_total_norm([m.grad for m in masters]))

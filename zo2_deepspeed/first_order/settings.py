"""Checks of the ``zo2.first_order`` section beyond its field types: what it selects and its optimizer's vocabulary.

The optimizer and scheduler sections speak DeepSpeed's JSON vocabulary (``{"type": ..., "params": {...}}``),
so they arrive as plain dicts; here every key is checked by name, before anything is built, so that a bad
value fails at ``initialize`` with its path (``zo2.first_order.optimizer.params.betas``).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from ..errors import ConfigError

SECTION = "zo2.first_order"

OPTIMIZER_PARAMS: dict[str, frozenset[str]] = {
    "adamw": frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad"}),
    "adam": frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "adam_w_mode"}),
    "sgd": frozenset({"lr", "momentum", "dampening", "nesterov", "weight_decay"}),
}
"""Optimizer types (case-insensitive, as DeepSpeed reads them) and the params each accepts."""

OFFLOAD_DEVICES = ("none", "cpu")


def optimizer_kind(section: Mapping[str, Any]) -> str:
    return str(section.get("type", "AdamW")).lower()


def _number(value: Any, path: str, open_low: bool = False) -> float:
    """A number >= 0 (> 0 with ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path} must be a number, got {value!r} ({type(value).__name__})")
    if value < 0 or (open_low and value == 0):
        raise ConfigError(f"{path} must be {'> 0' if open_low else '>= 0'}, got {value!r}")
    return float(value)


def _check_optimizer(section: Any) -> None:
    path = f"{SECTION}.optimizer"
    if not isinstance(section, dict):
        raise ConfigError(f"{path} must be an object like {{\"type\": \"AdamW\", \"params\": {{\"lr\": 1e-5}}}}, "
                          f"got {section!r}")
    unknown = sorted(set(section) - {"type", "params"})
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]} is not a known field (known fields: type, params)")
    kind = optimizer_kind(section)
    if kind not in OPTIMIZER_PARAMS:
        raise ConfigError(f"{path}.type must be one of AdamW, Adam, SGD, got {section.get('type')!r}")
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{path}.params must be an object, got {params!r}")
    allowed = OPTIMIZER_PARAMS[kind]
    extra = sorted(set(params) - allowed)
    if extra:
        raise ConfigError(f"{path}.params.{extra[0]} is not used by {section.get('type', 'AdamW')} "
                          f"(accepted: {', '.join(sorted(allowed))})")
    if "lr" not in params:
        raise ConfigError(f"{path}.params.lr is required: the first-order tail has its own learning rate "
                          f"(AdamW on a head: typically 1e-5 to 1e-4)")
    _number(params["lr"], f"{path}.params.lr")
    if "weight_decay" in params:
        _number(params["weight_decay"], f"{path}.params.weight_decay")
    if "eps" in params:
        _number(params["eps"], f"{path}.params.eps", open_low=True)
    if "betas" in params:
        betas = params["betas"]
        if not (isinstance(betas, list) and len(betas) == 2):
            raise ConfigError(f"{path}.params.betas must be a list of two numbers, got {betas!r}")
        for i, beta in enumerate(betas):
            if _number(beta, f"{path}.params.betas[{i}]") >= 1.0:
                raise ConfigError(f"{path}.params.betas[{i}] must be in [0, 1), got {beta!r}")
    for key in ("momentum", "dampening"):
        if key in params:
            _number(params[key], f"{path}.params.{key}")
    for key in ("amsgrad", "adam_w_mode", "nesterov"):
        if key in params and not isinstance(params[key], bool):
            raise ConfigError(f"{path}.params.{key} must be true or false, got {params[key]!r}")


def _check_scheduler(section: Any) -> None:
    path = f"{SECTION}.scheduler"
    if not isinstance(section, dict) or not isinstance(section.get("type"), str):
        raise ConfigError(f"{path} must be an object with a \"type\" (e.g. {{\"type\": \"WarmupLR\", \"params\": "
                          f"{{\"warmup_num_steps\": 10}}}}), got {section!r}")
    unknown = sorted(set(section) - {"type", "params"})
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]} is not a known field (known fields: type, params)")
    if not isinstance(section.get("params", {}), dict):
        raise ConfigError(f"{path}.params must be an object, got {section['params']!r}")


def _check_offload(section: Any) -> None:
    path = f"{SECTION}.offload_optimizer"
    if not isinstance(section, dict):
        raise ConfigError(f"{path} must be an object like {{\"device\": \"cpu\"}}, got {section!r}")
    unknown = sorted(set(section) - {"device", "pin_memory"})
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]} is not a known field (known fields: device, pin_memory)")
    device = section.get("device", "none")
    if device not in OFFLOAD_DEVICES:
        raise ConfigError(f"{path}.device must be one of {list(OFFLOAD_DEVICES)}, got {device!r}")
    if "pin_memory" in section and not isinstance(section["pin_memory"], bool):
        raise ConfigError(f"{path}.pin_memory must be true or false, got {section['pin_memory']!r}")


def check_first_order(config: Any, raw: Mapping[str, Any]) -> None:
    """Refuse a first_order section that selects nothing, mixes its two ways of selecting, or names an
    optimizer, scheduler or offload setting DeepSpeed's vocabulary does not have. ``raw``: the section as given
    (to tell an explicit ``blocks``/``head`` from a default)."""
    if config.modules is not None:
        mixed = [k for k in ("blocks", "head") if k in raw]
        if mixed:
            raise ConfigError(f"{SECTION}.modules selects the tail by parameter name instead of {SECTION}.blocks and "
                              f".head: drop {SECTION}.{mixed[0]}")
        if not config.modules:
            raise ConfigError(f"{SECTION}.modules is empty: give at least one regular expression, or drop it to use "
                              f"blocks and head")
        for i, pattern in enumerate(config.modules):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{SECTION}.modules[{i}] {pattern!r} is not a regular expression: {e}") from None
    elif config.blocks == 0 and not config.head:
        raise ConfigError(f"{SECTION} selects nothing (blocks 0 and head false): set blocks >= 1, head true or "
                          f"modules, or drop the section")
    elif config.blocks > 0 and not config.head:
        raise ConfigError(f"{SECTION}.head is false but blocks is {config.blocks}: the tail is the end of the model "
                          f"(its backward starts at the loss), so the final norm and the head that run after the last "
                          f"layers belong to it; keep head true (freeze them with requires_grad=False to keep them "
                          f"fixed)")
    _check_optimizer(config.optimizer)
    if config.scheduler is not None:
        _check_scheduler(config.scheduler)
    _check_offload(config.offload_optimizer)

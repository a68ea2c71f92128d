"""Hugging Face Trainer / Accelerate helpers: a zo2 DeepSpeed config made ready for their DeepSpeed path.

With ``zo2_deepspeed.patch_deepspeed()`` the Trainer and Accelerate build a ``ZO2Engine`` for any
config with a ``"zo2"`` section; no helper is needed for that. What they add are two rules of their
own: Accelerate's DeepSpeed plugin refuses a config without ``zero_optimization`` (and reads its
``stage`` when saving), and every non-``"auto"`` batch-size value must equal the TrainingArguments'
or the Trainer stops with a mismatch. ``trainer_config`` applies both to a shipped config.
"""
from __future__ import annotations

from typing import Any

from .config import load_config
from .errors import ConfigError

TRAINER_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
"""Top-level fields the Trainer fills from TrainingArguments when they are "auto"."""


def trainer_config(config: Any, auto_batch: bool = True) -> dict:
    """A copy of a zo2 DeepSpeed config for ``TrainingArguments(deepspeed=...)`` or ``DeepSpeedPlugin``.

    * ``zero_optimization.stage`` is made explicit (0 when the section is absent: parameters stay
      whole on the device, the MeZO baseline).
    * With ``auto_batch``, the batch-size fields become ``"auto"``, so ``per_device_train_batch_size``
      and ``gradient_accumulation_steps`` of the TrainingArguments decide them.

    The optimizer section is left as it is: its lr is the ZO learning rate (typically 1e-6 to
    1e-7), and the Trainer's mismatch check against ``learning_rate`` (default 5e-5, far too large
    for ZO) is a guard worth keeping. Drop the section to let the Trainer's own optimizer and
    schedule supply the lr instead.
    """
    raw = load_config(config)  # a fresh copy
    if "zo2" not in raw:
        raise ConfigError("trainer_config() is for zo2 configs: this config has no 'zo2' section")
    zero = raw.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"zero_optimization must be an object, got {type(zero).__name__}")
    zero.setdefault("stage", 0)
    if auto_batch:
        for key in TRAINER_OWNED:
            raw[key] = "auto"
    return raw

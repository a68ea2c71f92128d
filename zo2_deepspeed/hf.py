"""Hugging Face Trainer / Accelerate helpers: a zo2 DeepSpeed config made ready for their DeepSpeed path.

With the config switch (installed with the package, or ``zo2_deepspeed.patch_deepspeed()``) the Trainer
and Accelerate build a ``ZO2Engine`` for any config with a ``"zo2"`` section; no helper is needed for
that. What they add are two rules of their own: Accelerate's DeepSpeed plugin refuses a config without ``zero_optimization`` (and reads its
``stage`` when saving), and every non-``"auto"`` batch-size value must equal the TrainingArguments'
or the Trainer stops with a mismatch. ``trainer_config`` applies both to a shipped config.

The switch also wraps the Trainer's ``deepspeed_init`` for zo2 configs only (``zo2_deepspeed_init``),
so that ``trainer.evaluate()`` before ``train()`` and a second ``train()`` in one process work; other configs go to transformers' function unchanged.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

from zo2_deepspeed_autopatch import install_trainer, trainer_deepspeed_init, uninstall_trainer

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


# ------------------------------------------------------------------------------------- Trainer lifecycle
_held_for_training: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
"""Per Trainer: the optimizer/scheduler sections kept out of the config while evaluating before training."""


def zo2_deepspeed_init(trainer: Any, num_training_steps: int, inference: bool, original: Callable) -> tuple:
    """transformers' ``deepspeed_init`` (``original``), made to fit the ZO2 engine's lifecycle for zo2 configs.

    ``trainer_deepspeed_init`` (what the switch puts in transformers' place) calls it for zo2 configs only.

    Two things of the Trainer's own break ZO users' first steps, for any DeepSpeed engine:

    * ``evaluate()`` before ``train()`` (MeZO's zero-shot baseline) is refused below ZeRO stage 3, and
      at stage 3 it deletes the optimizer section for good and fills the scheduler's step counts with
      0, so a later ``train()`` fails. For zo2 it evaluates at every stage: the engine Accelerate then
      prepares has no optimizer (it only evaluates), and the sections come back for training.
    * ``train()`` starts with Accelerate's ``free_memory()``, which drops the engine; a Trainer that
      already holds one (from ``evaluate()`` or an earlier ``train()``) then does not prepare again and
      fails in ``accelerator.backward``. For zo2 the released engine is closed (the model keeps its
      current weights) and the Trainer gets its plain model back, so ``train()`` prepares a new engine
      on the current weights: a new run, as the Trainer's own state starts over (steps, schedule and
      the ZO seeds from step 0). ``resume_from_checkpoint`` continues a run instead. With ``model_init``
      (``hyperparameter_search``) every ``train()`` starts from a new model: the previous trial's
      engine is closed the same way (its pinned buffers and NVMe files freed), not left behind.

    This depends on the Trainer calling ``deepspeed_init`` at those two points and on its
    ``model_wrapped``/``deepspeed`` attributes; tests/test_hf_integration.py pins both.
    """
    plugin = trainer.accelerator.state.deepspeed_plugin
    config = plugin.hf_ds_config.config
    if inference:
        if trainer not in _held_for_training:
            _held_for_training[trainer] = {k: config.pop(k) for k in ("optimizer", "scheduler") if k in config}
        from deepspeed.utils import logger as ds_logger
        plugin.hf_ds_config.trainer_config_finalize(trainer.args, trainer.model, num_training_steps)
        ds_logger.setLevel(trainer.args.get_process_log_level())
        return None, None
    config.update(_held_for_training.pop(trainer, {}))
    from .engine import ZO2Engine
    # With model_init (hyper-parameter search) train() has already put the new trial's model in
    # model_wrapped; the previous engine is then reachable only as trainer.deepspeed.
    if isinstance(getattr(trainer, "deepspeed", None), ZO2Engine):
        trainer.deepspeed.close()
        trainer.deepspeed = None
    if isinstance(trainer.model_wrapped, ZO2Engine):
        trainer.model_wrapped.close()
        trainer.model_wrapped = trainer.model
    return original(trainer, num_training_steps, inference=False)


def patch_trainer() -> bool:
    """Install ``trainer_deepspeed_init`` where transformers binds ``deepspeed_init``; False without transformers."""
    try:
        import transformers.integrations.deepspeed as integration
    except ImportError:
        return False
    install_trainer(integration)
    return True


def unpatch_trainer() -> None:
    """Give transformers its own ``deepspeed_init`` back."""
    uninstall_trainer()

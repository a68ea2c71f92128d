"""From what a caller passes to ``engine(...)`` to the model's inputs: collecting, checking and repeating the batch.

``BatchInputs`` is a mixin of ``ZO2Engine``. A batch arrives as a mapping, keyword or positional
arguments; it is checked (input_ids, labels and attention_mask shapes, at most the micro-batch's rows) with a
``BatchError`` naming the bad input, stripped of keys the model's forward does not take (they are for a
``loss_fn``), and for a ZO forward repeated once per perturbation group along the batch dimension.
The engine fields it uses are declared in ``EngineState`` (engine_state.py).
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .engine_state import EngineState
from .errors import BatchError
from .tasks import model_forwards


def _logger():
    from deepspeed.utils import logger
    return logger


class BatchInputs(EngineState):
    """The engine's batch handling: collect the call's inputs, check them, and build the model's inputs."""

    @staticmethod
    def _named_inputs(model: nn.Module) -> Optional[frozenset[str]]:
        """Inputs the model's forward names explicitly; None when it names none (takes anything)."""
        names: set[str] = set()
        for forward in model_forwards(model):
            try:
                params = inspect.signature(forward).parameters.values()
            except (TypeError, ValueError):
                return None
            names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        return frozenset(names) or None

    @staticmethod
    def _takes_var_kwargs(model: nn.Module) -> bool:
        try:
            params = inspect.signature(model.forward).parameters.values()
        except (TypeError, ValueError):
            return False
        return any(p.kind == p.VAR_KEYWORD for p in params)

    def _for_model(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch without the keys the model's forward does not name (they are for loss_fn only)."""
        if self._input_names is None:
            return dict(batch)
        unused = [k for k in batch if k not in self._input_names]
        fresh = [k for k in unused if k not in self._warned_unused]
        if fresh and self.loss_fn is None and self.global_rank == 0:
            _logger().warning(f"batch keys {fresh} are not inputs of {type(self.module).__name__}.forward and are "
                              f"not passed to it")
        self._warned_unused.update(fresh)
        return {k: v for k, v in batch.items() if k not in unused}

    def _collect_batch(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:
            batch = dict(args[0])
        elif args:
            try:
                bound = inspect.signature(self.module.forward).bind_partial(*args, **kwargs)
            except TypeError as e:
                raise BatchError(f"cannot match positional inputs to the model's forward: {e}") from None
            batch = dict(bound.arguments)
            batch.update(batch.pop("kwargs", {}) or {})
        else:
            batch = dict(kwargs)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _check_batch(self, batch: Mapping[str, Any]) -> int:
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            raise BatchError(f"the batch has no 'input_ids' tensor (keys: {sorted(batch)})")
        if ids.dim() != 2:
            raise BatchError(f"input_ids must be [batch, sequence], got shape {tuple(ids.shape)}")
        rows = ids.shape[0]
        # fewer rows than the micro-batch (the short last batch of an epoch) train with every row weighing as
        # on one rank (loss.LossSums); more would exceed the micro-batch the run was sized and counted for
        if rows == 0 or rows > self.train_micro_batch_size_per_gpu():
            raise BatchError(f"the batch has {rows} rows but train_micro_batch_size_per_gpu is "
                             f"{self.train_micro_batch_size_per_gpu()}: a training micro-batch holds 1 to "
                             f"{self.train_micro_batch_size_per_gpu()} rows (raise train_micro_batch_size_per_gpu, "
                             f"or batch the data by it)")
        for key in ("labels", "attention_mask"):
            value = batch.get(key)
            if value is not None and (not isinstance(value, torch.Tensor) or value.shape != ids.shape):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise BatchError(f"{key} must have the shape of input_ids {tuple(ids.shape)}, got {shape}")
        if self.loss_fn is None and batch.get("labels") is None:
            raise BatchError("the batch has no 'labels': pass labels (input_ids for language modelling, -100 to "
                             "ignore a position) or give initialize(loss_fn=...)")
        return rows

    def _model_inputs(self, batch: Mapping[str, Any], groups: int, rows: int) -> dict[str, Any]:
        inputs = {}
        for key, value in self._for_model(batch).items():
            if key == "labels" and self.loss_fn is None:
                continue
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows and groups > 1:
                value = value.repeat(groups, *([1] * (value.dim() - 1)))
            inputs[key] = value
        inputs.update(self._call_kwargs)
        if self.loss_fn is not None:
            inputs.pop("labels", None)
        return inputs

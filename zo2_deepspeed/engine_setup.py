"""Building the engine's parts from the config: the model's placement, optimizer, scheduler, data loader, monitor.

``EngineSetup`` is a mixin of ``ZO2Engine``, called once from its ``__init__``: the model is moved or
partitioned to its tier (and checked against the config), the ZO-SGD optimizer is made from the
config's section or adopted from the client's, parameters are assigned to its groups, and the LR
scheduler, the training data loader and DeepSpeed's monitor are built as DeepSpeedEngine builds them.
The engine fields it uses are declared in ``EngineState`` (engine_state.py).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .blocks import find_blocks
from .comm import guarded
from .config import DTYPES, LR_REQUIRED, ConfigError
from .data import ZO2DataLoader
from .engine_state import EngineState
from .optimizer import ZOSGD
from .partitioning import partition_in_place
from .tiers.partitioned import is_partitioned, shard_dtype


def _logger():
    from deepspeed.utils import logger
    return logger


def storage_mismatch(wanted: str, name: str, stored: torch.dtype) -> str:
    """Why a partition's dtype is not zo2.storage_dtype, and the fixes, the JSON-only one first.

    Under the config switch a ``deepspeed.zero.Init`` that sees the zo2 section builds partitions in the
    storage dtype; one that did not see it (another config, the switch off, an explicit dtype) built these.
    """
    stored_name = next((key for key, dtype in DTYPES.items() if dtype == stored), None)
    in_json = (f"set zo2.storage_dtype to {stored_name!r} in the config (the partitions' dtype), or " if stored_name
               else "")
    return (f"zo2.storage_dtype is {wanted!r} but {name} is stored as {stored}: the model was partitioned by a "
            f"deepspeed.zero.Init that did not see this config's zo2 section (another config, the config switch off, "
            f"or an explicit dtype). Fix: {in_json}build the model under a zero.Init of this config (the config switch "
            f"on, or zo2_deepspeed.zero_init(config))")


class EngineSetup(EngineState):
    """The engine's construction steps: model placement, optimizer and parameter groups, scheduler, loader, monitor."""

    def _warn_unpinned(self) -> None:
        """Copies from pageable host memory block the host: the streams then cannot overlap them with compute."""
        if not self.pipeline.asynchronous or self.settings.tier != "cpu" or self.global_rank != 0:
            return
        loose = [s.name for s in self.pipeline.slots if not s.param.ds_tensor.is_pinned()]
        loose += [f"{s.name} ({name})" for s in self.pipeline.slots for name, state in s.stored_state.items()
                  if state.device.type == "cpu" and not state.is_pinned()]  # HiZOO's Hessian partitions
        if loose:
            _logger().warning(f"{len(loose)} CPU partitions (e.g. {loose[0]}) are not in pinned memory: copies to "
                              f"and from {self.device} cannot overlap compute; set "
                              f"zero_optimization.offload_param.pin_memory to true")

    def _register_flush_on_state_dict(self, model: nn.Module) -> Any:
        """Make ``model.state_dict()`` current: Accelerate and the HF Trainer save ``engine.module.state_dict()``.

        Only for whole (resident) parameters: their flush is local, while a partitioned tier's flush
        gathers, which would hang if one rank alone asked for a state dict (and its state dict holds
        empty partitions anyway; those tiers save through ``_zero3_consolidated_16bit_state_dict``).
        """
        if self.settings.tier != "resident":
            return None
        pipeline = self.pipeline

        def flush_pending(module: nn.Module, prefix: str, keep_vars: bool) -> None:
            if pipeline._pass is None:
                pipeline.flush()

        return model.register_state_dict_pre_hook(flush_pending)

    def _prepare_model(self, model: nn.Module) -> None:
        partitioned = [n for n, p in model.named_parameters() if is_partitioned(p)]
        if self.settings.tier == "resident":
            if partitioned:
                raise ConfigError(f"model parameters are ZeRO-3 partitions (e.g. {partitioned[0]}) but "
                                  f"zero_optimization.stage is {self.settings.zero_stage}: use stage 3")
            model.to(self.device)
            if self.world_size > 1:  # replicas start identical, as DeepSpeedEngine makes them
                from deepspeed import comm as dist
                with guarded("broadcast of the initial parameters from rank 0"):
                    for tensor in list(model.parameters()) + list(model.buffers()):
                        dist.broadcast(tensor.data, src=0)
            return
        storage = self.zo2.storage_torch_dtype()
        nvme = self.settings.tier == "nvme"
        if not partitioned:
            config = self.settings.raw
            if nvme:
                from .tiers.nvme_swapper import sized_swap_config
                config = sized_swap_config(model, config, storage, self.zo2.prefetch_blocks, self.world_size)
            partition_in_place(model, config, self.settings.tier, storage)
        elif any(not is_partitioned(p) for p in model.parameters()):
            # e.g. LoRA adapters added to a model built under zero_init: partition just those
            partition_in_place(model, self.settings.raw, self.settings.tier, storage)
        for name, p in model.named_parameters():
            if (getattr(p, "nvme_swapper", None) is not None) != nvme:
                where = "NVMe" if not nvme else "memory"
                raise ConfigError(f"zero_optimization.offload_param.device does not match the model: {name} was "
                                  f"partitioned to {where}; build the model under zo2_deepspeed.zero_init(config)")
            if shard_dtype(p) != storage:
                raise ConfigError(storage_mismatch(self.zo2.storage_dtype, name, shard_dtype(p)))
        if nvme:
            from .tiers.nvme_swapper import check_swap_capacity
            check_swap_capacity(find_blocks(model), self.zo2.prefetch_blocks)
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None and buf.device != self.device:
                    module._buffers[key] = buf.to(self.device)

    def _build_optimizer(self, optimizer: Any, model_parameters: Optional[Iterable[Any]],
                         lr_scheduler: Any = None) -> Optional[ZOSGD]:
        """ZO-SGD from the config's section or the client's optimizer; None for an engine that only evaluates.

        As DeepSpeed builds an engine without an optimizer for inference, nothing asking for training
        (no lr, optimizer, model_parameters or schedule) gives one whose training forwards are refused:
        the HF Trainer's ``evaluate()`` before ``train()`` prepares such an engine.
        """
        lr, wd = self.settings.lr, self.settings.weight_decay
        if isinstance(optimizer, torch.optim.Optimizer) and "optimizer" in self.config:
            raise ConfigError(f"both a client optimizer ({type(optimizer).__name__}) and an 'optimizer' section in the "
                              f"config were given: drop one")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and callable(optimizer):
            optimizer = optimizer(self._param_groups(model_parameters, lr or 0.0, wd))
        if isinstance(optimizer, ZOSGD):
            return optimizer
        if isinstance(optimizer, torch.optim.Optimizer):
            return self._adopt_client_optimizer(optimizer)
        if optimizer is not None:
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer (or a callable building one from "
                              f"parameter groups), got {type(optimizer).__name__}")
        if lr is None:
            if model_parameters is None and lr_scheduler is None and self._config.scheduler_name is None:
                return None
            raise ConfigError(LR_REQUIRED)
        return ZOSGD(self._param_groups(model_parameters, lr, wd), lr=lr, weight_decay=wd)

    def _adopt_client_optimizer(self, client: torch.optim.Optimizer) -> ZOSGD:
        """ZO-SGD on the client optimizer's own parameter groups (the HF Trainer's AdamW, a script's optimizer).

        The groups are shared, not copied, so the client's scheduler (the Trainer's LambdaLR, a
        script's scheduler on its optimizer) still sets the lr the ZO update uses; each group's
        weight_decay applies as decoupled decay. Momentum cannot be honoured without a stored
        gradient, so an SGD with momentum is an error; an adaptive optimizer's betas/eps are ignored.
        """
        name = type(client).__name__
        if isinstance(client, torch.optim.SGD) and any(g.get("momentum", 0) for g in client.param_groups):
            raise ConfigError("the client torch.optim.SGD has momentum; zo2 keeps no gradient state: use 0")
        if not isinstance(client, torch.optim.SGD) and self.global_rank == 0:
            _logger().warning(f"client optimizer {name}: zo2 trains its parameter groups with ZO-SGD, using each "
                              f"group's lr (and any schedule on it) and weight_decay; {name}'s other settings and "
                              f"state are not used")
        try:
            return ZOSGD.sharing_groups_of(client)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _param_groups(self, model_parameters: Optional[Iterable[Any]], lr: float, wd: float) -> list[dict]:
        """MeZO's grouping by default: weight decay on matrices only (not on biases or norm weights)."""
        if model_parameters is None:
            chosen: list[Any] = [p for p in self.module.parameters() if p.requires_grad]
        else:
            chosen = list(model_parameters)
        if chosen and isinstance(chosen[0], dict):
            return [dict(g, params=list(g["params"])) for g in chosen]
        shape = lambda p: getattr(p, "ds_shape", p.shape)  # noqa: E731
        decay = [p for p in chosen if len(shape(p)) >= 2]
        no_decay = [p for p in chosen if len(shape(p)) < 2]
        groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ConfigError("no trainable parameters: every parameter has requires_grad=False")
        return groups

    def _assign_groups(self) -> None:
        groups = self.optimizer.param_groups if self.optimizer is not None else []  # none: evaluation only
        where = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        slots = {id(s.param): s for b in self.blocks for s in b.slots}
        unknown = [i for i in where if i not in slots]
        if unknown:
            raise ConfigError("the optimizer holds parameters that are not part of the model")
        for key, slot in slots.items():
            slot.trainable = key in where
            slot.group_index = where.get(key, -1)

    def _build_scheduler(self, lr_scheduler: Any) -> Any:
        if lr_scheduler is not None:
            if callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
                return lr_scheduler(self.optimizer)
            return lr_scheduler
        name, params = self._config.scheduler_name, dict(self._config.scheduler_params or {})
        if name is None:
            return None
        from deepspeed.runtime import lr_schedules
        cls = getattr(lr_schedules, name, None) or getattr(torch.optim.lr_scheduler, name, None)
        if cls is None:
            raise ConfigError(f"scheduler.type {name!r} is neither a DeepSpeed nor a torch LR scheduler")
        return cls(self.optimizer, **params)

    def _build_dataloader(self, training_data: Any, collate_fn: Optional[Callable]) -> Optional[ZO2DataLoader]:
        """The loader of ``initialize(training_data=...)``, built by ``deepspeed_io`` as DeepSpeedEngine builds it."""
        self.training_data, self.collate_fn = training_data, collate_fn
        if training_data is None:
            return None
        return self.deepspeed_io(training_data, collate_fn=collate_fn)

    def _build_monitor(self) -> Any:
        from deepspeed.monitor.monitor import MonitorMaster
        return MonitorMaster(self._config.monitor_config)

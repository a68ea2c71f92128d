"""ZO2Engine: the DeepSpeedEngine-shaped façade over the block pipeline.

Users drive it exactly as a DeepSpeed engine: ``loss = engine(**batch)``, ``engine.backward(loss)``,
``engine.step()``. The forward runs every perturbation group of the step in one streamed pass,
``backward`` has nothing to do, and ``step`` turns the group losses into the projected gradient at
the gradient-accumulation boundary, advancing the LR scheduler and the step counters.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from torch import nn

from .blocks import find_blocks
from .buffers import BufferPool
from .checkpoint import CheckpointSubject, Counters, RunSettings
from .comm import average_across_ranks, batch_digest, first_disagreement, gather_group_losses, guarded, \
    perturbation_group
from .config import LR_REQUIRED, ConfigError, TrainSettings, batch_sizes_for_world
from .data import ZO2DataLoader
from .distributed import ParallelGrid, compute_device, ensure_distributed
from .errors import BatchError, RankSyncError, TrainingDivergedError
from .loss import IGNORE_INDEX, LossFn, ZOLoss, group_losses, masked_labels
from .methods import build_method
from .model_saving import ModelSaving
from .noise import build_noise, step_seed
from .optimizer import ZOSGD
from .partitioning import partition_in_place
from .pipeline import BlockPipeline, ForwardPass
from .tasks import forward_accepts, model_forwards
from .tiers import build_tier
from .tiers.base import MovementStats
from .tiers.partitioned import is_partitioned, shard_dtype


def _logger():
    from deepspeed.utils import logger
    return logger


def _log_rank0(message: str) -> None:
    from deepspeed.utils import log_dist
    log_dist(message, ranks=[0])


def _apply_log_level(level: Optional[str]) -> None:
    """DeepSpeed's logger at the config's ``log_level`` (as DeepSpeedEngine applies it), and its handlers at the
    logger's level.

    DeepSpeed makes its logger with a stdout handler at WARNING; ``logger.setLevel(logging.INFO)`` (what the HF
    Trainer's deepspeed_init does too) then lets INFO records through the logger but the handler drops them, so
    the ``steps_per_print`` lines never appeared. A handler stricter than the logger is lowered to it; a
    handler a user set less strict is left alone.
    """
    from deepspeed.utils import logger, set_log_level_from_string
    if level is not None:
        set_log_level_from_string(str(level))
    for handler in logger.handlers:
        if handler.level > logger.getEffectiveLevel():
            handler.setLevel(logger.getEffectiveLevel())


class _DataParallelSize:
    """What DeepSpeedConfig asks of an ``mpu``: the data-parallel size its batch-size rule multiplies by.

    With perturbation ranks world/P replicas run distinct micro-batches, so train_batch_size is micro ×
    accumulation × world/P, as DeepSpeed counts it under model parallelism.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def get_data_parallel_world_size(self) -> int:
        return self.size


class ZO2Engine(ModelSaving, DeepSpeedEngine):
    """A zeroth-order training engine with the surface of ``deepspeed.DeepSpeedEngine``.

    It subclasses DeepSpeedEngine only for its type: ``isinstance(engine, DeepSpeedEngine)`` is how
    Accelerate's ``unwrap_model`` (and so the HF Trainer's ``save_model``) finds ``engine.module``.
    DeepSpeedEngine's own ``__init__`` (a first-order engine) never runs; every method that HF
    Trainer, Accelerate or a DeepSpeed loop calls is defined here (saving the model: in the
    ``ModelSaving`` mixin, ``model_saving.py``). Unknown attributes fall through to ``module``, as
    with DeepSpeedEngine.
    """

    def __init__(self, model: nn.Module, settings: TrainSettings, args: Any = None,
                 optimizer: Any = None, model_parameters: Optional[Iterable[Any]] = None,
                 training_data: Any = None, lr_scheduler: Any = None, collate_fn: Optional[Callable] = None,
                 loss_fn: Optional[LossFn] = None) -> None:
        nn.Module.__init__(self)  # not DeepSpeedEngine.__init__: that builds a first-order engine
        from deepspeed import comm as dist
        from deepspeed.runtime.config import DeepSpeedConfig

        self.settings = settings
        self.zo2 = settings.zo2
        self.args = args
        self.loss_fn = loss_fn
        self.launch = ensure_distributed(self.zo2.comm_timeout_s)
        self.local_rank = self.launch.local_rank
        self.global_rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.grid = ParallelGrid(self.global_rank, self.world_size, self.zo2.parallel.perturbation)
        self.dp_world_size = self.grid.replicas
        self.device = compute_device(self.local_rank)
        batch_sizes_for_world(settings.raw, self.world_size)  # fields named before DeepSpeedConfig asserts
        self._config = DeepSpeedConfig(settings.raw, mpu=_DataParallelSize(self.dp_world_size))
        self._perturbation_group = perturbation_group(self.grid, self.zo2.comm_timeout_s)
        self.config = settings.raw
        _apply_log_level(self._config.log_level)
        for warning in settings.warnings:
            if self.global_rank == 0:
                _logger().warning(warning)

        self.module = model
        self._prepare_model(model)
        self.module.eval()  # dropout off: the groups' loss difference must come from the perturbation alone
        self.blocks = find_blocks(model)
        self.optimizer = self._build_optimizer(optimizer, model_parameters, lr_scheduler)
        self._assign_groups()
        self.method = build_method(self.zo2)
        self.pool = BufferPool(self.device)
        self.noise = self.method.noise_source(build_noise(self.zo2.noise_generator, self.device))
        self.tier = build_tier(settings.tier, self.device, self.pool, settings.compute_dtype,
                               self.zo2.stochastic_rounding, self.noise.stochastic_round,
                               self.noise.stochastic_round_many if self.noise.batched_rounding else None)
        self.pipeline = BlockPipeline(model, self.blocks, self.tier, self.method, self.noise, self.zo2,
                                      settings.compute_dtype, self.pool,
                                      device_timing=bool(settings.raw.get("wall_clock_breakdown", False)))
        self._warn_unpinned()
        self.lr_scheduler = self._build_scheduler(lr_scheduler)
        self.training_dataloader = self._build_dataloader(training_data, collate_fn)
        self.monitor = self._build_monitor()
        self._call_kwargs = {"use_cache": False} if forward_accepts(model, "use_cache") else {}
        self._input_names = self._named_inputs(model)
        self._takes_num_items = self._takes_var_kwargs(model)  # HF models normalise their loss by it
        self._warned_unused: set[str] = set()
        self._boundary: Optional[bool] = None
        self._is_compiled = False  # read by DeepSpeedEngine.is_compiled
        self._state_dict_hook = self._register_flush_on_state_dict(model)

        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.bytes_all_reduced = 0
        self._loss_sum: Optional[torch.Tensor] = None
        self._loss_count = 0
        self._step_started: Optional[float] = None
        self._step_movement: MovementStats = self.tier.stats.snapshot()
        self._step_noise = 0
        self._step_times = self.pipeline.times.snapshot()
        self.last_step: dict[str, Any] = {}
        self._closed = False
        if self.global_rank == 0:
            trainable = sum(s.numel for s in self.pipeline.slots if s.trainable)
            _log_rank0(f"ZO2Engine: method={self.zo2.method} tier={settings.tier} blocks={len(self.blocks)} "
                       f"trainable={trainable:,} world_size={self.world_size} replicas={self.dp_world_size} "
                       f"perturbation_ranks={self.grid.perturbation} device={self.device} "
                       f"compute_dtype={settings.compute_dtype} noise={self.noise.description} "
                       f"movement={'streams' if self.pipeline.asynchronous else 'worker' if self.zo2.prefetch_blocks else 'inline'}")

    # ------------------------------------------------------------------ construction
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
                raise ConfigError(f"zo2.storage_dtype is {self.zo2.storage_dtype!r} but {name} is stored as "
                                  f"{shard_dtype(p)}: build the model under zo2_deepspeed.zero_init(config)")
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
        if training_data is None:
            return None
        return ZO2DataLoader(training_data, self.train_micro_batch_size_per_gpu(), self.grid.replicas,
                             self.grid.replica, self.zo2.seed, collate_fn=collate_fn,
                             drop_last=bool(self.config.get("dataloader_drop_last", True)))

    def _build_monitor(self) -> Any:
        from deepspeed.monitor.monitor import MonitorMaster
        return MonitorMaster(self._config.monitor_config)

    # ------------------------------------------------------------------ DeepSpeed surface
    def train_batch_size(self) -> int:
        return self._config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._config.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        return self._config.gradient_accumulation_steps

    def steps_per_print(self) -> int:
        return self._config.steps_per_print or 10

    def is_gradient_accumulation_boundary(self) -> bool:
        """The boundary set by ``set_gradient_accumulation_boundary``, else the micro-step counter's."""
        if self._boundary is not None:
            return self._boundary
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """Let the caller decide where accumulation ends (Accelerate sets it before every backward).

        Accelerate then calls ``step()`` only at boundaries, including the short accumulation at the
        end of an epoch; the step averages the group losses of however many forwards it saw.
        """
        self._boundary = bool(is_boundary)

    def zero_optimization_stage(self) -> int:
        return self.settings.zero_stage

    def zero_optimization_partition_weights(self) -> bool:
        return self.settings.zero_stage == 3

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> Optional[float]:
        """Norm of the last step's projected gradient (the directional-derivative estimates); None before one.

        This is what a ZO step knows of the gradient (MeZO: one number per step). The full estimate
        Σ c·z is this times about √(trainable parameters). The HF Trainer logs it as ``grad_norm``.
        """
        if not self.last_step or self.last_step.get("skipped"):
            return None
        return math.sqrt(sum(float(c) ** 2 for c in self.last_step["projected_grad"]))

    def was_step_applied(self) -> bool:
        return bool(self.last_step) and not self.last_step.get("skipped", False)

    def train(self, mode: bool = True) -> "ZO2Engine":
        """ZO mode (perturbed groups) or plain forwards; the model itself always runs without dropout."""
        self.training = mode
        self.module.eval()
        return self

    def eval(self) -> "ZO2Engine":
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No gradients exist; kept for loops written for first-order engines."""

    def backward(self, loss: Any = None, retain_graph: bool = False, scale_wrt_gas: bool = True) -> Any:
        """Nothing to do: the ZO step needs only the forwards that already ran; returns ``loss`` as given.

        No autograd runs, so neither ``retain_graph`` nor ``scale_wrt_gas`` changes anything: the
        update comes from the group losses the forwards recorded (averaged over the accumulated
        micro-batches at the boundary), never from the value or graph of ``loss``. Any scaling the
        caller applied to it (the HF Trainer divides by the accumulation steps before calling this
        with ``scale_wrt_gas=False``) affects only what the caller logs.
        """
        return loss

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Nothing to hold back: no gradients are reduced (the group losses are, once, at the boundary)."""
        yield

    def compile(self, backend: Any = None, compile_kwargs: Optional[dict] = None, **kwargs: Any) -> None:
        """Refused: the block pipeline runs Python (fetch, perturb, write back) around every block's forward."""
        raise ConfigError("torch.compile is not supported by the ZO2 engine (TrainingArguments.torch_compile, "
                          "Accelerate's dynamo_backend): turn it off")

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        batch = self._collect_batch(args, kwargs)
        num_items = batch.pop("num_items_in_batch", None)
        if not self.training:
            return self._plain_forward(batch, num_items)
        if self.optimizer is None:
            raise ConfigError(f"{LR_REQUIRED}: this engine was built without an optimizer and only evaluates "
                              f"(engine.eval())")
        return self._zo_forward(batch, num_items)

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
        if rows != self.train_micro_batch_size_per_gpu():
            raise BatchError(f"the batch has {rows} rows but train_micro_batch_size_per_gpu is "
                             f"{self.train_micro_batch_size_per_gpu()} (drop the last partial batch: "
                             f"drop_last=True; with the HF Trainer dataloader_drop_last=True)")
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

    def _zo_forward(self, batch: dict[str, Any], num_items: Any = None) -> ZOLoss:
        rows = self._check_batch(batch)
        if self._loss_count == 0:
            self._begin_step()
            every = self.zo2.check_sync_every
            self.pipeline.collect_checksums = bool(every and self.world_size > 1 and self.global_steps % every == 0)
            self.pipeline.checksums.clear()
        every_group = self.method.groups()
        share = self.grid.share(len(every_group))
        groups = every_group[share.start:share.stop]  # this rank's share; all of them without perturbation ranks
        forward = ForwardPass(training=True, groups=groups, rows_per_group=rows, step=self.global_steps,
                              step_seed=step_seed(self.zo2.seed, self.global_steps))
        inputs = self._model_inputs(batch, len(groups), rows)
        with torch.no_grad(), self.pipeline.forward_pass(forward):
            outputs = self.module(**inputs)
        with torch.no_grad():
            losses = group_losses(outputs, batch, len(groups), rows, self.loss_fn)
        del outputs
        losses = self._assemble_group_losses(losses, len(every_group), batch).double().cpu()
        self._loss_sum = losses if self._loss_sum is None else self._loss_sum + losses
        self._loss_count += 1
        estimate = self.method.estimate(losses)
        value = estimate.loss * self._items_share(batch, num_items)
        return ZOLoss.wrap(torch.tensor(value, dtype=torch.float32, device=self.device), losses.float())

    def _assemble_group_losses(self, local: torch.Tensor, groups: int, batch: Mapping[str, Any]) -> torch.Tensor:
        """The micro-batch's whole vector of G group losses from the shares of its perturbation group's ranks.

        Gathered after every forward (not only at the step's end) so that each forward returns the
        method's loss estimate, as without perturbation ranks. The ranks' batch digests come in the
        same collective: ranks that ran different micro-batches would combine losses of different data.
        """
        if self.grid.perturbation == 1:
            return local
        losses, digests, sent = gather_group_losses(
            local, self.grid, groups, batch_digest(batch), self._perturbation_group,
            f"gathering the group losses in perturbation group {self.grid.replica} at step {self.global_steps}")
        self.bytes_all_reduced += sent
        if len(set(digests)) > 1:
            ranks = self.grid.replica_ranks()
            odd = [r for r, d in zip(ranks, digests) if d != digests[0]]
            raise BatchError(
                f"ranks {ranks} form one perturbation group (zo2.parallel.perturbation {self.grid.perturbation}) and "
                f"must run the same micro-batch, but at step {self.global_steps} rank(s) {odd} ran a different one "
                f"than rank {ranks[0]}: shard the data by data-parallel replica (engine.grid.replica of "
                f"engine.dp_world_size), as the loader of initialize(training_data=...) does, not by global rank")
        return losses

    def _items_share(self, batch: Mapping[str, Any], num_items: Any) -> float:
        """The factor that turns this micro-batch's mean loss into Hugging Face's ``num_items_in_batch`` form.

        Given ``num_items_in_batch`` (the label tokens of every micro-batch of the step, from the HF
        Trainer), an HF model returns its token-loss sum divided by it, and the Trainer then does not
        divide by the accumulation steps. The returned value follows that contract so the Trainer logs
        the right loss. It changes only the returned value: the update uses the group losses. With a
        ``loss_fn`` the items are unknown and the mean is returned.
        """
        if num_items is None or self.loss_fn is not None:
            return 1.0
        total = float(num_items)
        if total <= 0:
            return 1.0
        labels = masked_labels(batch["labels"], batch.get("attention_mask"))
        return float((labels[..., 1:] != IGNORE_INDEX).sum()) / total

    def _plain_forward(self, batch: dict[str, Any], num_items: Any = None) -> Any:
        ids = batch.get("input_ids")
        rows = ids.shape[0] if isinstance(ids, torch.Tensor) else 0
        forward = ForwardPass(training=False, groups=[None], rows_per_group=rows, step=self.global_steps,
                              step_seed=0)
        inputs = self._for_model(batch)
        inputs.update({k: v for k, v in self._call_kwargs.items() if k not in inputs})
        if num_items is not None and self._takes_num_items:
            inputs["num_items_in_batch"] = num_items
        with torch.no_grad(), self.pipeline.forward_pass(forward):
            return self.module(**inputs)

    # ------------------------------------------------------------------ step
    def _begin_step(self) -> None:
        self._step_started = time.perf_counter()
        self._step_movement = self.tier.stats.snapshot()
        self._step_noise = self.noise.elements_generated
        self._step_times = self.pipeline.settle_times().snapshot()

    def step(self, lr_kwargs: Optional[dict] = None) -> None:
        """Count a micro-step; at the accumulation boundary commit the ZO update and advance the schedule."""
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        if self._loss_count == 0:
            raise RuntimeError("engine.step() without a training forward: call loss = engine(batch) first")
        local = self._loss_sum / self._loss_count
        losses, reduced_bytes = average_across_ranks(local.to(self.device), grid=self.grid)
        # float64 up to here (exact sums); rounded to fp32 once, so that 1 rank, N ranks and accumulation,
        # whose float64 means differ by an ulp at most, give the same losses and the same update
        losses = losses.cpu().float().double()
        self.bytes_all_reduced += reduced_bytes
        self._loss_sum, self._loss_count = None, 0
        self._check_sync()
        estimate = self.method.estimate(losses)
        finite = bool(torch.isfinite(losses).all()) and all(math.isfinite(c) for _, c in estimate.terms)
        skip = estimate.skip_reason or (None if finite else f"non-finite group losses {losses.tolist()}")
        if skip:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            _logger().warning(f"step {self.global_steps} skipped: {skip}")
            self.pipeline.commit(None)
            if self.consecutive_skips >= self.zo2.max_skipped_steps:
                raise TrainingDivergedError(
                    f"{self.consecutive_skips} consecutive steps were skipped (last: {skip}); stopping as "
                    f"zo2.max_skipped_steps={self.zo2.max_skipped_steps}. Lower the lr or eps, or check the data.")
        else:
            self.consecutive_skips = 0
            self.optimizer.prepare(self.global_steps, step_seed(self.zo2.seed, self.global_steps), estimate)
            self.optimizer.step()
            self.pipeline.commit(self.optimizer.last_update)
        self.optimizer.overflow = bool(skip)
        if self.lr_scheduler is not None and not skip:
            self.lr_scheduler.step(**(lr_kwargs or {}))
        self._record_step(losses, estimate, skip)
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        self._report()

    def _check_sync(self) -> None:
        """Compare the parameters every rank holds after this step's update (zo2.check_sync_every)."""
        if not self.pipeline.collect_checksums:
            return
        self.pipeline.collect_checksums = False
        slots = [s for s in self.pipeline.slots if s.trainable]
        values = torch.tensor([self.pipeline.checksums.get(s.name, 0) for s in slots], dtype=torch.int64,
                              device=self.device)
        first = first_disagreement(values, f"parameter sync check at step {self.global_steps}")
        if first is not None:
            slot = slots[first]
            raise RankSyncError(f"ranks hold different parameters at step {self.global_steps}: first diverged block "
                                f"{slot.owners[0].name!r} (parameter {slot.name}); training cannot continue consistently")

    def _record_step(self, losses: torch.Tensor, estimate: Any, skip: Optional[str]) -> None:
        moved = self.tier.stats.since(self._step_movement)
        self.last_step = {
            "step": self.global_steps,
            "loss": estimate.loss,
            "group_losses": losses.tolist(),
            "projected_grad": [c for _, c in estimate.terms],
            "skipped": bool(skip),
            "lr": self.get_lr()[0],
            "bytes_read": moved.bytes_read,
            "bytes_written": moved.bytes_written,
            "bytes_gathered": moved.bytes_gathered,
            "block_fetches": moved.block_fetches,
            "noise_elements": self.noise.elements_generated - self._step_noise,
            "phase_s": vars(self.pipeline.settle_times().since(self._step_times)),
            "step_time_s": time.perf_counter() - (self._step_started or time.perf_counter()),
        }

    def _report(self) -> None:
        s = self.last_step
        if self.global_steps % self.steps_per_print() == 0:
            _apply_log_level(None)  # a level set on DeepSpeed's logger after initialize
            _log_rank0(f"step={self.global_steps} loss={s['loss']:.4f} lr={s['lr']:.3g} skipped={self.skipped_steps} "
                       f"moved={(s['bytes_read'] + s['bytes_written']) / 2**20:.1f}MiB "
                       f"time={s['step_time_s']:.2f}s")
        if self.monitor.enabled and self.global_rank == 0:
            x = self.global_samples
            self.monitor.write_events([("Train/Samples/train_loss", s["loss"], x), ("Train/Samples/lr", s["lr"], x),
                                       ("Train/Samples/bytes_moved", s["bytes_read"] + s["bytes_written"], x),
                                       ("Train/Samples/skipped_steps", self.skipped_steps, x)])

    # ------------------------------------------------------------------ lifecycle
    @property
    def movement(self) -> MovementStats:
        """Cumulative bytes moved between the tier and the device, and block fetches."""
        return self.tier.stats

    def flush(self) -> None:
        """Apply the pending update everywhere now (evaluation, saving and export call this)."""
        self.pipeline.flush()

    def save_checkpoint(self, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
        """DeepSpeed-layout checkpoint (``global_step{N}`` tags, ``latest``), written atomically by every rank."""
        from .checkpoint import save_checkpoint
        self.flush()
        return save_checkpoint(self._checkpoint_subject(), save_dir, tag, client_state, save_latest,
                               exclude_frozen_parameters)

    def load_checkpoint(self, load_dir: str, tag: Optional[str] = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, verify: bool = True,
                        **kwargs: Any) -> tuple[Optional[str], Optional[dict]]:
        """Resume from ``save_checkpoint``'s output (a save_dir, or a tag directory given directly): (checkpoint
        path, client_state).

        As in DeepSpeed, a missing or empty ``load_dir`` is a fresh start: (None, None), with a warning on rank
        0. A path that exists but holds no checkpoint raises a CheckpointError naming it. ``verify=False``
        skips comparing the files with the checksums recorded at save."""
        from .checkpoint import load_checkpoint
        return load_checkpoint(self._checkpoint_subject(), load_dir, tag, load_module_strict, load_optimizer_states,
                               load_lr_scheduler_states, load_module_only, verify=verify)

    def _checkpoint_subject(self) -> CheckpointSubject:
        """What the checkpoint package reads from and restores into this engine (it never sees the engine)."""
        config = getattr(self.module, "config", None)

        def restore_counters(c: Counters) -> None:
            self.global_steps, self.global_samples, self.micro_steps = c.global_steps, c.global_samples, c.micro_steps
            self.skipped_steps, self.consecutive_skips = c.skipped_steps, c.consecutive_skips

        def drop_pending_update() -> None:
            self.pipeline.pending = None

        return CheckpointSubject(
            rank=self.global_rank, world_size=self.world_size, store=self.tier, slots=self.pipeline.slots,
            counters=Counters(self.global_steps, self.global_samples, self.micro_steps, self.skipped_steps,
                              self.consecutive_skips),
            settings=RunSettings(
                method=self.zo2.method, zo2=self.zo2.model_dump(), tier=self.settings.tier,
                state_names=sorted(self.method.state_init),
                batch={"micro": self.train_micro_batch_size_per_gpu(),
                       "gradient_accumulation_steps": self.gradient_accumulation_steps()},
                module_config=config.to_dict() if hasattr(config, "to_dict") else None),
            optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, data_loader=self.training_dataloader,
            restore_counters=restore_counters, drop_pending_update=drop_pending_update)

    def close(self) -> None:
        """Flush, give the model its own forwards back (it stays partitioned if it was) and close the tier."""
        if not self._closed:
            try:
                if self._state_dict_hook is not None:
                    self._state_dict_hook.remove()
                self.pipeline.close()
                self.noise.close()
            finally:
                self.tier.close()
                self._closed = True

    def destroy(self) -> None:
        """Free memory, as ``DeepSpeedEngine.destroy`` does: apply the pending update, drop pooled buffers.

        Accelerate's ``free_memory()`` calls it; as with DeepSpeedEngine the engine stays usable
        (the model keeps streaming for evaluation and ``generate``). ``close()`` ends an engine.
        """
        if not self._closed:
            self.flush()
            self.pool.clear()

    def __del__(self) -> None:
        """Nothing implicit at garbage collection (``DeepSpeedEngine.__del__`` would destroy): close() is explicit."""

"""ZO2Engine: the DeepSpeedEngine-shaped façade over the block pipeline.

Users drive it exactly as a DeepSpeed engine: ``loss = engine(**batch)``, ``engine.backward(loss)``,
``engine.step()``. The forward runs every perturbation group of the step in one streamed pass,
``backward`` has nothing to do, and ``step`` turns the group losses into the projected gradient at
the gradient-accumulation boundary, advancing the LR scheduler and the step counters.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from torch import nn

from .batch_inputs import BatchInputs
from .blocks import find_blocks
from .buffers import BufferPool
from .checkpointing import Checkpointing
from .comm import batch_digest, first_disagreement, gather_group_losses, perturbation_group, reduce_and_divide
from .config import LR_REQUIRED, ConfigError, TrainSettings, batch_sizes_for_world
from .deepspeed_surface import DeepSpeedSurface
from .distributed import ParallelGrid, compute_device, ensure_distributed
from .engine_setup import EngineSetup
from .errors import BatchError, RankSyncError, TrainingDivergedError
from .first_order.part import FirstOrderPart
from .loss import LossFn, LossSums, ZOLoss, group_loss_sums, hf_items_scale
from .methods import build_method
from .model_saving import ModelSaving
from .noise import build_noise, step_seed
from .pipeline import BlockPipeline, ForwardPass
from .step_report import StepReporting, apply_log_level, log_rank0
from .tasks import forward_accepts
from .tiers import build_tier
from .tiers.base import MovementStats


def _logger():
    from deepspeed.utils import logger
    return logger


class _DataParallelSize:
    """What DeepSpeedConfig asks of an ``mpu``: the data-parallel size its batch-size rule multiplies by.

    With perturbation ranks world/P replicas run distinct micro-batches, so train_batch_size is micro ×
    accumulation × world/P, as DeepSpeed counts it under model parallelism.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def get_data_parallel_world_size(self) -> int:
        return self.size


class ZO2Engine(EngineSetup, BatchInputs, StepReporting, Checkpointing, DeepSpeedSurface, ModelSaving,
                DeepSpeedEngine):
    """A zeroth-order training engine with the surface of ``deepspeed.DeepSpeedEngine``.

    It subclasses DeepSpeedEngine only for its type: ``isinstance(engine, DeepSpeedEngine)`` is how
    Accelerate's ``unwrap_model`` (and so the HF Trainer's ``save_model``) finds ``engine.module``.
    DeepSpeedEngine's own ``__init__`` (a first-order engine) never runs; every method that HF
    Trainer, Accelerate or a DeepSpeed loop calls is defined here or in a mixin named for its part:
    construction (``EngineSetup``, ``engine_setup.py``), the batch (``BatchInputs``, ``batch_inputs.py``),
    the step's report (``StepReporting``, ``step_report.py``), checkpoints (``Checkpointing``,
    ``checkpointing.py``), DeepSpeed's getters and first-order calls (``DeepSpeedSurface``,
    ``deepspeed_surface.py``) and saving the model (``ModelSaving``, ``model_saving.py``). This class
    keeps the step itself: forward, the group losses, ``step`` and the engine's lifecycle. The fields
    it sets for the mixins are declared in ``EngineState`` (``engine_state.py``); how each public name of
    DeepSpeedEngine is answered (implemented, inherited config getter, or refused) is the table in
    ``surface_table.py``. Unknown attributes fall through to ``module``, as with DeepSpeedEngine.
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
        apply_log_level(self._config.log_level)
        for warning in settings.warnings:
            if self.global_rank == 0:
                _logger().warning(warning)

        self.module = model
        self._prepare_model(model)
        self.module.eval()  # dropout off: the groups' loss difference must come from the perturbation alone
        self.blocks = find_blocks(model)
        self.optimizer = self._build_optimizer(optimizer, model_parameters, lr_scheduler)
        self._assign_groups()
        # a first-order tail (zo2.first_order): its parameters leave ZO before the pipeline sees them
        self.first_order = FirstOrderPart(self.zo2.first_order, model, self.blocks,
                                          self.train_micro_batch_size_per_gpu()) \
            if self.zo2.first_order is not None and self.optimizer is not None else None
        self.method = build_method(self.zo2)
        self.pool = BufferPool(self.device)
        self.noise = self.method.noise_source(build_noise(self.zo2.noise_generator, self.device))
        self.tier = build_tier(settings.tier, self.device, self.pool, settings.compute_dtype,
                               self.zo2.stochastic_rounding, self.noise.stochastic_round,
                               self.noise.stochastic_round_many if self.noise.batched_rounding else None)
        self.pipeline = BlockPipeline(model, self.blocks, self.tier, self.method, self.noise, self.zo2,
                                      settings.compute_dtype, self.pool,
                                      device_timing=bool(settings.raw.get("wall_clock_breakdown", False)))
        if self.first_order is not None:
            self.first_order.attach(self.pipeline, self.method, self.grid, self.device, self.global_rank)
        self._warn_unpinned()
        self.lr_scheduler = self._build_scheduler(lr_scheduler)
        self.training_dataloader = self._build_dataloader(training_data, collate_fn)
        self.monitor = self._build_monitor()
        self._call_kwargs = {"use_cache": False} if forward_accepts(model, "use_cache") else {}
        self._input_names = self._named_inputs(model)
        self._takes_num_items = self._takes_var_kwargs(model)  # HF models normalise their loss by it
        self._warned_unused: set[str] = set()
        self._boundary: Optional[bool] = None
        self._state_dict_hook = self._register_flush_on_state_dict(model)

        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.bytes_all_reduced = 0
        self._loss_tally: Optional[LossSums] = None  # this rank's record of the step's forwards (loss.LossSums)
        self._step_started: Optional[float] = None
        self._step_movement: MovementStats = self.tier.stats.snapshot()
        self._step_noise = 0
        self._step_times = self.pipeline.times.snapshot()
        self.last_step: dict[str, Any] = {}
        self._closed = False
        if self.global_rank == 0:
            trainable = sum(s.numel for s in self.pipeline.slots if s.trainable)
            log_rank0(f"ZO2Engine: method={self.zo2.method} tier={settings.tier} blocks={len(self.blocks)} "
                       f"trainable={trainable:,} world_size={self.world_size} replicas={self.dp_world_size} "
                       f"perturbation_ranks={self.grid.perturbation} device={self.device} "
                       f"compute_dtype={settings.compute_dtype} noise={self.noise.description} "
                       f"movement={'streams' if self.pipeline.asynchronous else 'worker' if self.zo2.prefetch_blocks else 'inline'}"
                       f"{self.pipeline.perturbation.write_back_description}")

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

    def _zo_forward(self, batch: dict[str, Any], num_items: Any = None) -> ZOLoss:
        rows = self._check_batch(batch)
        if self._loss_tally is None:
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
        tail = self.first_order
        if tail is not None:  # the tail runs with autograd (the pipeline keeps the body under no_grad)
            tail.before_forward(share)
        with torch.no_grad() if tail is None else torch.enable_grad(), self.pipeline.forward_pass(forward):
            outputs = self.module(**inputs)
        # --- losses: (sum, items) per forward, summed over the step and divided once (loss.py, comm.py)
        with torch.no_grad():
            mine = group_loss_sums(outputs, batch, len(groups), rows, self.loss_fn)
        if tail is not None:
            tail.backward(outputs, batch, rows, self.loss_fn)
        del outputs
        sums = self._assemble_group_losses(mine.sums, len(every_group), batch).double().cpu()
        record = LossSums(sums, mine.items, mine.rows)
        self._loss_tally = record if self._loss_tally is None else self._loss_tally + record
        losses = record.means()  # this micro-batch's own losses: what this forward returns an estimate of
        estimate = self.method.estimate(losses)
        value = estimate.loss * (1.0 if self.loss_fn is not None else hf_items_scale(record.items, num_items))
        # --- end losses
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
        if self._loss_tally is None:
            raise RuntimeError("engine.step() without a training forward: call loss = engine(batch) first")
        # --- losses: Σ sums / Σ items over every micro-batch and replica, divided once, rounded to fp32 once
        reduced = reduce_and_divide(self._loss_tally, self.grid, self.device)
        losses = reduced.losses
        self.bytes_all_reduced += reduced.bytes_all_reduced
        self._loss_tally = None
        # --- end losses
        self._check_sync()
        tail_skip = None
        if self.first_order is not None:
            tail_skip, sent = self.first_order.reduce(self.global_steps, reduced.total.items)
            self.bytes_all_reduced += sent
        estimate = self.method.estimate(losses)
        finite = bool(torch.isfinite(losses).all()) and all(math.isfinite(c) for _, c in estimate.terms)
        skip = estimate.skip_reason or (None if finite else f"non-finite group losses {losses.tolist()}") or tail_skip
        if skip:
            if self.first_order is not None:
                self.first_order.discard()
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
            if self.first_order is not None:
                self.first_order.step()
        self.optimizer.overflow = bool(skip)
        if self.lr_scheduler is not None and not skip:
            self.lr_scheduler.step(**(lr_kwargs or {}))
        self._record_step(losses, estimate, skip, reduced.total)
        if self.first_order is not None:
            self.last_step["first_order"] = {} if skip else dict(self.first_order.last)
        self.global_steps += 1
        self.global_samples += reduced.total.rows  # the rows trained (a short last batch counts what it had)
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

    # ------------------------------------------------------------------ lifecycle
    @property
    def movement(self) -> MovementStats:
        """Cumulative bytes moved between the tier and the device, and block fetches."""
        return self.tier.stats

    def flush(self) -> None:
        """Apply the pending update everywhere now (evaluation, saving and export call this); the first-order
        tail, resident, writes its parameters through to their tier."""
        self.pipeline.flush()
        if self.first_order is not None:
            self.first_order.write_through(self.global_steps)

    def close(self) -> None:
        """Flush, give the model its own forwards back (it stays partitioned if it was) and close the tier."""
        if not self._closed:
            try:
                if self._state_dict_hook is not None:
                    self._state_dict_hook.remove()
                if self.first_order is not None:
                    self.first_order.close(self.global_steps)
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

"""The engine state that ZO2Engine's parts share, declared in one place.

``ZO2Engine`` is one object assembled from mixins, one file each: construction (``EngineSetup``),
the batch (``BatchInputs``), the step's report (``StepReporting``), checkpoints (``Checkpointing``),
DeepSpeed's surface (``DeepSpeedSurface``) and saving the model (``ModelSaving``). ``ZO2Engine.__init__``
sets the fields below and the mixins read them; the few a mixin writes say so. Every mixin
subclasses ``EngineState``, so a type checker sees each field it touches, and
``tests/test_engine_surface.py`` fails when a mixin reads or writes a field of the engine that is not
declared here (or declared but never set).

Why a declaration rather than parts that own their state: the mixins are the engine's methods, as
DeepSpeed, Accelerate and Hugging Face callers meet them on one object, and most of them read the
same few fields (the rank, the pipeline, the counters). Passing that state into separate objects
would repeat it in every constructor and make ``engine.py`` route each call; a declaration keeps
``engine.py`` as it is and makes the contract between it and its parts a list one can read.

Annotations only: this class adds no attribute, default or behaviour to the engine.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig
    from torch import nn

    from .blocks import Block
    from .buffers import BufferPool
    from .config import TrainSettings, ZO2Config
    from .data import ZO2DataLoader
    from .distributed import ParallelGrid
    from .first_order.part import FirstOrderPart
    from .loss import LossFn, LossSums
    from .methods.base import ZOMethod
    from .noise import NoiseSource
    from .optimizer import ZOSGD
    from .pipeline import BlockPipeline, PhaseTimes
    from .tiers.base import MovementStats, Tier


class EngineState:
    """The fields ``ZO2Engine.__init__`` sets and its mixins use (see the module docstring)."""

    # -- the run's settings
    settings: TrainSettings
    """The parsed config: tier, ZeRO stage, dtypes, lr."""
    zo2: ZO2Config
    """Its "zo2" section."""
    config: dict[str, Any]
    """The DeepSpeed config as given (``DeepSpeedEngine.config``)."""
    _config: DeepSpeedConfig
    """DeepSpeed's reading of it: batch sizes, monitor, scheduler, log level. ``set_train_batch_size`` and
    ``set_train_micro_batch_size`` (DeepSpeedSurface) write its batch sizes."""

    # -- where this rank stands
    device: torch.device
    global_rank: int
    world_size: int
    dp_world_size: int
    """Data-parallel replicas: ``world_size / zo2.parallel.perturbation``."""
    grid: ParallelGrid
    """This rank's replica and its slot among the replica's perturbation ranks."""

    # -- the model and the parts that run it
    module: nn.Module
    blocks: list[Block]
    pipeline: BlockPipeline
    tier: Tier
    noise: NoiseSource
    method: ZOMethod
    pool: BufferPool
    """Device buffers reused across blocks; ``empty_partition_cache`` (DeepSpeedSurface) empties it."""
    optimizer: Optional[ZOSGD]
    """None for an engine built only to evaluate."""
    first_order: Optional[FirstOrderPart]
    """The first-order tail (zo2.first_order), None without one; Checkpointing saves it as a named part."""
    lr_scheduler: Any
    monitor: Any
    """DeepSpeed's MonitorMaster (csv, TensorBoard, W&B)."""

    # -- data
    training_data: Any
    """The dataset given to initialize (None without one)."""
    collate_fn: Optional[Callable]
    """The collate_fn given to initialize; ``deepspeed_io`` uses it by default."""
    training_dataloader: Optional[ZO2DataLoader]

    # -- the batch (BatchInputs)
    loss_fn: Optional[LossFn]
    _input_names: Optional[frozenset[str]]
    """Inputs the model's forward names (None: it takes anything)."""
    _call_kwargs: dict[str, Any]
    """Added to every model call (``use_cache=False`` where the forward takes it)."""
    _warned_unused: set[str]
    """Batch keys already warned about; BatchInputs adds to it."""

    # -- counters (Checkpointing restores them)
    global_steps: int
    global_samples: int
    micro_steps: int
    skipped_steps: int
    consecutive_skips: int
    _boundary: Optional[bool]
    """The accumulation boundary a caller set (``set_gradient_accumulation_boundary``), else None."""
    _loss_tally: Optional[LossSums]
    """This rank's record of the accumulation window's forwards (token-loss sums, token counts, rows), None at a
    boundary; Checkpointing saves and restores it with the counters."""

    # -- the step in progress and the last one (StepReporting)
    _step_started: Optional[float]
    _step_movement: MovementStats
    _step_noise: int
    _step_times: PhaseTimes
    """The pipeline's phase times at the step's start."""
    last_step: dict[str, Any]
    """The finished step's record; written by ``StepReporting._record_step``."""

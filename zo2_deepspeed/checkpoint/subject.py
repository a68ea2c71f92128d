"""What a checkpoint reads from and writes back to a training engine, and nothing more.

The checkpoint code never sees the engine: ``ZO2Engine`` builds a ``CheckpointSubject`` (its
parameter slots and their tier, the run's counters and settings, its optimizer, scheduler and
data loader, and two callbacks) and passes it in. So the package imports nothing of the engine,
and a new engine or tier only has to provide these few things to be saved and resumed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import torch


class Slot(Protocol):
    """One parameter as the engine streams it (``blocks.ParamSlot``)."""

    name: str
    shape: torch.Size
    numel: int
    trainable: bool
    stored_state: Mapping[str, Any]
    """the method's per-parameter state saved with it, by name (HiZOO's Hessian)"""
    updated_through: int
    """the last step whose update the stored parameter holds; -1 after a load: nothing pending applies"""


class PartitionStore(Protocol):
    """Where this rank's partitions of the parameters and their method state live (``tiers.base.Tier``)."""

    def storage_dtype(self, slot: Any) -> torch.dtype: ...

    def partition_size(self, slot: Any) -> Optional[int]:
        """Elements of this rank's ZeRO-3 partition, or None when the parameter is not sharded."""

    def read_partition(self, slot: Any) -> torch.Tensor: ...

    def read_state_partition(self, slot: Any, name: str) -> torch.Tensor: ...

    def write_partition(self, slot: Any, values: torch.Tensor) -> None: ...

    def write_state_partition(self, slot: Any, name: str, values: torch.Tensor) -> None: ...


class Stateful(Protocol):
    """An optimizer, LR scheduler or data loader: saved and restored through its state dict."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class FirstOrderState(Protocol):
    """A first-order tail's training state (``first_order.FirstOrderPart``), saved as a named part of the
    checkpoint: its fp32 masters where they differ from the stored parameters, the optimizer state, and the
    gradient accumulated since the last step."""

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]: ...

    def checkpoint_state(self) -> dict:
        """The JSON part (optimizer hyper-parameters and counters, scheduler state, names of the tensors)."""

    def reload(self) -> None:
        """The parameters were just rewritten in the store: take them up."""

    def load_checkpoint_state(self, read: Callable[[str], torch.Tensor], state: dict) -> None:
        """Restore from ``checkpoint_state()``'s dict and its tensors (``read(key)``)."""


@dataclass
class Counters:
    """The engine's step counters: saved, and restored on a full load."""

    global_steps: int
    global_samples: int
    micro_steps: int
    skipped_steps: int
    consecutive_skips: int
    accumulated: Optional[dict] = None
    """A gradient-accumulation window in progress: its record of the group losses (``loss.LossSums.state()``:
    {"sums": [float64, ...], "items": n, "rows": n})"""


@dataclass
class RunSettings:
    """What the run was configured with: recorded in the manifest, compared on load."""

    method: str
    zo2: dict
    """the "zo2" section as a dict (``ZO2Config.model_dump()``)"""
    tier: str
    state_names: list[str]
    batch: dict[str, int]
    """the batch settings a resumed run must match: micro batch and gradient accumulation steps"""
    module_config: Optional[dict]
    """the model's config (``config.to_dict()``), when it has one"""


@dataclass
class CheckpointSubject:
    """Everything a save reads and a load writes, built by the engine for one call."""

    rank: int
    world_size: int
    store: PartitionStore
    slots: Sequence[Slot]
    counters: Counters
    settings: RunSettings
    optimizer: Stateful
    lr_scheduler: Optional[Stateful]
    data_loader: Optional[Stateful]
    restore_counters: Callable[[Counters], None]
    """sets the engine's counters from a loaded checkpoint"""
    drop_pending_update: Callable[[], None]
    """forgets the deferred ZO update: the loaded parameters are up to date"""
    first_order: Optional[FirstOrderState] = None
    """the first-order tail's state (``zo2.first_order``), or None"""


def trains(slot: Slot) -> bool:
    """Whether a parameter trains, zeroth-order or in the first-order tail (``first_order``: not ZO-trainable)."""
    return bool(slot.trainable or getattr(slot, "first_order", False))


def parameter_index(subject: CheckpointSubject) -> list[dict]:
    """The manifest's description of every parameter (name, shape, dtype, partition size)."""
    store = subject.store
    return [{"name": s.name, "shape": list(s.shape), "numel": s.numel, "trainable": trains(s),
             "dtype": str(store.storage_dtype(s)).replace("torch.", ""), "partition_size": store.partition_size(s)}
            for s in subject.slots]


def is_sharded(subject: CheckpointSubject) -> bool:
    """True when the parameters are ZeRO-3 partitions: then every rank writes its own file."""
    slots = subject.slots
    return bool(slots) and subject.store.partition_size(slots[0]) is not None

"""Planning a save: what this rank will write, with every size known before a byte is written.

Each rank lists its partitions (as meta tensors, read one at a time later, so a model larger than
memory is never held whole) and the header of its safetensors file; rank 0 also builds the
manifest, serialises the small files and measures the free space. The sizes go to the space check.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..version import __version__
from .format import (CLIENT_STATE, FIRST_ORDER, FORMAT, HASH, LATEST, LR_SCHEDULER, _jsonable, _safe_bytes,
                     _safetensors_header, rank_file)
from .space import _block_size, _free_bytes, _on_disk
from .subject import CheckpointSubject, is_sharded, parameter_index, trains


@dataclass
class _Plan:
    """What this rank will write, all sizes known before a byte is written."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Shape and dtype of each tensor to write (meta tensors): read one at a time while writing, so a
    model larger than memory is never held whole."""
    readers: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    header: bytes = b""
    extras: dict[str, bytes] = field(default_factory=dict)
    """rank 0: the small files beside the tensors (client_state.pt, lr_scheduler.pt)"""
    meta: Optional[dict] = None
    """rank 0: the manifest, without the checksums"""
    disk_bytes: int = 0
    free: Optional[int] = None
    """rank 0: bytes free for the save"""
    latest: Optional[str] = None
    """rank 0: the tag 'latest' names now"""
    first_order: dict[str, torch.Tensor] = field(default_factory=dict)
    """rank 0: the first-order tail's tensors (``FIRST_ORDER``), written after the rank file"""
    first_order_header: bytes = b""


def _plan(subject: CheckpointSubject, root: Path, tag: str, client_state: Optional[dict],
          exclude_frozen_parameters: bool) -> _Plan:
    """Read this rank's partitions and build (rank 0) the manifest; measure what the save will take."""
    plan = _Plan()
    rank, sharded = subject.rank, is_sharded(subject)
    block = _block_size(root)
    if sharded or rank == 0:
        store = subject.store
        for slot in subject.slots:
            if exclude_frozen_parameters and not trains(slot):
                continue
            size = store.partition_size(slot)
            numel = slot.numel if size is None else size
            plan.tensors[f"param/{slot.name}"] = torch.empty(numel, dtype=store.storage_dtype(slot), device="meta")
            plan.readers[f"param/{slot.name}"] = lambda slot=slot: store.read_partition(slot)
            for name in slot.stored_state:
                plan.tensors[f"state/{name}/{slot.name}"] = torch.empty(numel, dtype=torch.float32, device="meta")
                plan.readers[f"state/{name}/{slot.name}"] = lambda slot=slot, name=name: store.read_state_partition(
                    slot, name)
        plan.header, size = _safetensors_header(plan.tensors, {"format": str(FORMAT)})
        plan.disk_bytes += _on_disk(size, block)
    if rank != 0:
        return plan
    scheduler = subject.lr_scheduler.state_dict() if subject.lr_scheduler is not None else None
    meta = _manifest(subject, tag, sharded, exclude_frozen_parameters, scheduler)
    if client_state:
        plan.extras[CLIENT_STATE] = _safe_bytes(client_state, "client_state")
        meta["client_state"] = CLIENT_STATE
    if scheduler is not None and meta["lr_scheduler"] is None:
        plan.extras[LR_SCHEDULER] = _safe_bytes(scheduler, "the lr scheduler state")
        meta["lr_scheduler_file"] = LR_SCHEDULER
    if subject.first_order is not None:
        plan.first_order = subject.first_order.checkpoint_tensors()
        meta["first_order"] = {"file": FIRST_ORDER, "state": subject.first_order.checkpoint_state()}
        plan.first_order_header, size = _safetensors_header(
            {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in plan.first_order.items()},
            {"format": str(FORMAT)})
        plan.disk_bytes += _on_disk(size, block)
    plan.meta = meta
    entry = {"algorithm": HASH, "digest": "0" * 32, "bytes": 10 ** 15}  # at least as long as a real one
    sized = dict(meta, checksums={name: entry for name in [*meta["files"], *plan.extras]})
    small = [len(json.dumps(sized, indent=1, sort_keys=True)), len(tag), *map(len, plan.extras.values())]
    plan.disk_bytes += sum(_on_disk(n, block) for n in small)
    plan.free = _free_bytes(root)
    plan.latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    return plan


def _manifest(subject: CheckpointSubject, tag: str, sharded: bool, exclude_frozen_parameters: bool,
              scheduler: Optional[dict]) -> dict:
    """The checkpoint's metadata, all but the checksums (known once the files are written)."""
    counters, settings = subject.counters, subject.settings
    return {
        "format": FORMAT, "tag": tag, "zo2_version": __version__, "torch_version": torch.__version__,
        "global_steps": counters.global_steps, "global_samples": counters.global_samples,
        "micro_steps": counters.micro_steps, "skipped_steps": counters.skipped_steps,
        "consecutive_skips": counters.consecutive_skips, "accumulated_losses": counters.accumulated,
        "world_size": subject.world_size,
        "tier": settings.tier, "sharded": sharded, "method": settings.method,
        "zo2": settings.zo2, "state_names": settings.state_names,
        "batch": settings.batch,
        "parameters": parameter_index(subject), "exclude_frozen_parameters": exclude_frozen_parameters,
        "optimizer": subject.optimizer.state_dict(),
        "lr_scheduler": scheduler if _jsonable(scheduler) else None,
        "data_loader": subject.data_loader.state_dict() if subject.data_loader else None,
        "module_config": settings.module_config,
        "files": [rank_file(r) for r in range(subject.world_size if sharded else 1)],
        "client_state": None,
    }

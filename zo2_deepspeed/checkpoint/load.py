"""Loading: find the checkpoint, check it fits the engine, verify and open its files, then write.

``load_checkpoint`` on every rank: ``paths.resolve`` finds the directory (nothing there is a fresh
start), ``paths.read_meta`` reads the manifest, ``_check_compatible`` compares it with the engine's
parameters and settings, ``_open_checkpoint`` verifies every file this rank reads (``verify``) and
opens the tensor files (``shards``); only then are the partitions written into the store and the
counters, optimizer, scheduler and data loader restored. ``open_full_state`` and
``read_full_state`` read whole parameters without an engine (the export).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import CheckpointError
from .format import OPERATIONAL_KEYS, rank_file
from .paths import _other_tags, nothing_to_resume, read_meta, resolve
from .ranks import _warn_rank0, raise_held, together
from .shards import _local_slice, _Shards
from .subject import CheckpointSubject, Counters, parameter_index
from .verify import _verify


def _holds_own_partitions(subject: CheckpointSubject, meta: dict) -> bool:
    """True when this rank's file of the checkpoint holds exactly its partitions (same world size and
    partitioning): then it reads only that file."""
    if not meta["sharded"] or meta["world_size"] != subject.world_size:
        return False
    saved = {p["name"]: p.get("partition_size") for p in meta["parameters"]}
    sizes = [(saved.get(s.name), subject.store.partition_size(s)) for s in subject.slots if s.name in saved]
    return all(ours is not None and theirs == ours for theirs, ours in sizes)


def _check_compatible(subject: CheckpointSubject, meta: dict, path: Path, module_only: bool, strict: bool) -> None:
    ours = {p["name"]: p for p in parameter_index(subject)}
    theirs = {p["name"]: p for p in meta["parameters"]}
    problems = []
    missing = [n for n in ours if n not in theirs]
    if meta.get("exclude_frozen_parameters"):  # saved on purpose without the frozen base weights (PEFT)
        missing = [n for n in missing if ours[n]["trainable"]]
    if missing and strict:
        problems.append(f"parameters missing from the checkpoint: {missing[:5]}")
    unexpected = [n for n in theirs if n not in ours]
    if unexpected and strict:
        problems.append(f"parameters in the checkpoint but not in the model: {unexpected[:5]}")
    shapes = [f"{n}: checkpoint {theirs[n]['shape']} vs model {ours[n]['shape']}"
              for n in ours if n in theirs and theirs[n]["shape"] != ours[n]["shape"]]
    if shapes:
        problems.append(f"shape mismatch: {shapes[:3]}")
    if not module_only:
        settings = subject.settings
        if meta["method"] != settings.method:
            problems.append(f"zo2.method: checkpoint {meta['method']!r} vs config {settings.method!r}")
        current = settings.zo2
        changed = [k for k, v in meta["zo2"].items() if k not in OPERATIONAL_KEYS and current.get(k) != v]
        if changed:
            problems.append("zo2 fields differ from the checkpoint's: " + ", ".join(
                f"{k} {meta['zo2'][k]!r} -> {current.get(k)!r}" for k in changed))
        batch = settings.batch
        if meta["batch"] != batch:
            problems.append(f"batch settings differ: checkpoint {meta['batch']} vs config {batch}")
    if problems:
        hint = "" if module_only else " (load_module_only=True loads just the parameters)"
        raise CheckpointError(f"checkpoint {path} does not match this engine: " + "; ".join(problems) + hint)


def _torch_file(path: Path, name: str) -> Any:
    """A small torch-serialised file of the checkpoint, read without running code."""
    try:
        return torch.load(path / name, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path / name} (checkpoint {path.name}) cannot be read: {type(e).__name__}: {e}; "
                              f"{_other_tags(path)}") from None


@dataclass
class _Opened:
    """Everything a load reads from disk, verified, before the engine is touched."""

    shards: _Shards
    client_state: Any
    lr_scheduler: Any
    first_order: Optional[_Shards] = None


def _open_checkpoint(rank: int, path: Path, meta: dict, own: bool, scheduler: bool,
                     verify: bool, first_order: bool) -> _Opened:
    files = [rank_file(rank)] if own else list(meta["files"])
    extras = [meta["client_state"]] if meta.get("client_state") else []
    if scheduler and meta.get("lr_scheduler") is None and meta.get("lr_scheduler_file"):
        extras.append(meta["lr_scheduler_file"])
    if first_order:
        extras.append(meta["first_order"]["file"])
    _verify(path, meta, [*files, *extras], verify)
    shards = _Shards(path, files)
    client_state = _torch_file(path, meta["client_state"]) if meta.get("client_state") else None
    lr_state = _torch_file(path, meta["lr_scheduler_file"]) if meta.get("lr_scheduler_file") in extras else None
    tail = _Shards(path, [meta["first_order"]["file"]]) if first_order else None
    return _Opened(shards, client_state, lr_state, tail)


def load_checkpoint(subject: CheckpointSubject, load_dir: str, tag: Optional[str] = None, load_module_strict: bool = True,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False, verify: bool = True) -> tuple[Optional[str], Optional[dict]]:
    """Restore ``subject`` from a checkpoint (every rank calls this); (path, client_state), or (None, None).

    Every file this rank reads is checked against the size and checksum recorded at save before the
    engine is changed (``verify=False`` skips the checksums); a damaged file on any rank is refused
    on every rank with a CheckpointError naming the file.
    """
    world_size, rank = subject.world_size, subject.rank
    path, _ = together(world_size, f"finding the checkpoint in {load_dir}", lambda: resolve(load_dir, tag))
    if path is None:
        _warn_rank0(nothing_to_resume(load_dir))
        raise_held()
        return None, None
    meta = read_meta(path)
    _check_compatible(subject, meta, path, load_module_only, load_module_strict)
    own = _holds_own_partitions(subject, meta)
    scheduler = not load_module_only and load_lr_scheduler_states and subject.lr_scheduler is not None
    first_order = (not load_module_only and load_optimizer_states and subject.first_order is not None
                   and meta.get("first_order") is not None)
    opened, _ = together(world_size, f"reading checkpoint {path}",
                         lambda: _open_checkpoint(rank, path, meta, own, scheduler, verify, first_order))
    subject.drop_pending_update()  # the loaded parameters are up to date: no deferred update applies
    shards = opened.shards
    index = {p["name"]: p for p in meta["parameters"]}
    tier = subject.store
    for slot in subject.slots:
        key = f"param/{slot.name}"
        if slot.name not in index or not shards.has(key):
            continue
        size = tier.partition_size(slot)
        keys = [(key, None)] + [(f"state/{name}/{slot.name}", name) for name in slot.stored_state]
        for tensor_key, state in keys:
            if not shards.has(tensor_key):
                if not load_module_only:
                    raise CheckpointError(f"checkpoint {path} has no {state!r} state for {slot.name}")
                continue
            values = shards.full(tensor_key, size) if own else _local_slice(
                shards.full(tensor_key, slot.numel), rank, size)
            if state is None:
                tier.write_partition(slot, values.to(tier.storage_dtype(slot)))
            else:
                tier.write_state_partition(slot, state, values)
        slot.updated_through = -1
    if subject.first_order is not None:
        subject.first_order.reload()  # the tail is resident: it takes up the parameters just written
    if opened.first_order is not None:
        tail = opened.first_order
        subject.first_order.load_checkpoint_state(lambda key: tail.tensor(key), meta["first_order"]["state"])
    if not load_module_only:
        _restore_training_state(subject, meta, load_optimizer_states, scheduler, opened.lr_scheduler)
    together(world_size, "finishing the checkpoint load", lambda: None, last=True)
    return str(path), opened.client_state if opened.client_state is not None else {}


def _restore_training_state(subject: CheckpointSubject, meta: dict, optimizer: bool, scheduler: bool,
                            lr_file_state: Any) -> None:
    subject.restore_counters(Counters(meta["global_steps"], meta["global_samples"], meta["micro_steps"],
                                      meta["skipped_steps"], meta["consecutive_skips"], meta.get("accumulated_losses")))
    if optimizer:
        subject.optimizer.load_state_dict(meta["optimizer"])
    if scheduler:
        state = meta["lr_scheduler"] if meta.get("lr_scheduler") is not None else lr_file_state
        if state is not None:
            subject.lr_scheduler.load_state_dict(state)
    if subject.data_loader is not None and meta.get("data_loader"):
        subject.data_loader.load_state_dict(meta["data_loader"])


def open_full_state(path: str, verify: bool = True) -> tuple[_Shards, dict]:
    """The tensor files of a checkpoint directory, to read whole parameters one at a time (``shards.full``),
    and its metadata; no process group needed.

    The tensor files are checked against their recorded checksums first (``verify=False`` skips it).
    """
    ckpt = resolve(path, None)
    if ckpt is None:
        state = "does not exist" if not Path(path).exists() else "is empty"
        raise CheckpointError(f"{path} {state}: it is neither a zo2 checkpoint directory nor a save_dir with a "
                              f"'latest' file")
    meta = read_meta(ckpt)
    _verify(ckpt, meta, list(meta["files"]), verify)
    return _Shards(ckpt, meta["files"]), meta


def read_full_state(path: str, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Whole parameter tensors of a checkpoint directory (all in memory), and its metadata."""
    shards, meta = open_full_state(path, verify)
    tensors = {}
    for entry in meta["parameters"]:
        key = f"param/{entry['name']}"
        if shards.has(key):
            tensors[entry["name"]] = shards.full(key, entry["numel"]).view(entry["shape"])
    return tensors, meta

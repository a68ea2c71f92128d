"""Atomic, DeepSpeed-layout checkpoints that are data, never code.

Layout (``save_dir`` as given to ``engine.save_checkpoint``)::

    latest                          the tag of the newest complete checkpoint (replaced by rename)
    global_step{N}/
        zo2_checkpoint.json         counters, config, optimizer/scheduler/data-loader state, tensor index
        rank00000.safetensors ...   each rank's partitions ("param/<name>", "state/<state>/<name>")
        client_state.pt             optional; loaded with ``torch.load(weights_only=True)``

A save writes into a hidden ``.partial-<tag>`` directory, fsyncs every file and the directory, then
renames it into place and replaces ``latest`` by rename: a crash at any moment leaves ``latest``
pointing at a complete checkpoint. ZeRO-3 partitions are saved by their rank (a sharded model is
never gathered to save) and reassembled on load, for any world size. The pending ZO update is
flushed first, so resuming continues bitwise as if the run had never stopped.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from .errors import CheckpointError
from .version import __version__

if TYPE_CHECKING:
    from .engine import ZO2Engine

FORMAT = 1
META = "zo2_checkpoint.json"
LATEST = "latest"
CLIENT_STATE = "client_state.pt"
OPERATIONAL_KEYS = {"prefetch_blocks", "comm_timeout_s", "check_sync_every", "max_skipped_steps"}
"""zo2 fields that may change between save and resume without changing the trajectory."""


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _safe_bytes(value: Any, what: str) -> bytes:
    """``value`` serialised so that ``torch.load(weights_only=True)`` can read it back (checked now)."""
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{what} holds objects a safe loader cannot read back ({type(e).__name__}: {e}); "
                              f"keep it to tensors, numbers, strings, lists and dicts") from None
    return buffer.getvalue()


def _barrier(engine: "ZO2Engine") -> None:
    if engine.world_size > 1:
        from deepspeed import comm as dist
        from .comm import guarded
        with guarded("checkpoint barrier"):
            dist.barrier()


def _parameter_index(engine: "ZO2Engine") -> list[dict]:
    tier = engine.tier
    return [{"name": s.name, "shape": list(s.shape), "numel": s.numel, "trainable": s.trainable,
             "dtype": str(tier.storage_dtype(s)).replace("torch.", ""), "partition_size": tier.partition_size(s)}
            for s in engine.pipeline.slots]


def _module_config(engine: "ZO2Engine") -> Optional[dict]:
    config = getattr(engine.module, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else None


def _batch_settings(engine: Any) -> dict[str, int]:
    """The batch settings a resumed run must match."""
    return {"micro": engine.train_micro_batch_size_per_gpu(),
            "gradient_accumulation_steps": engine.gradient_accumulation_steps()}


def save_checkpoint(engine: "ZO2Engine", save_dir: str, tag: Optional[str] = None,
                    client_state: Optional[dict] = None, save_latest: bool = True,
                    exclude_frozen_parameters: bool = False) -> bool:
    """Write a checkpoint of ``engine`` (every rank calls this). Returns True, as DeepSpeed does."""
    engine.flush()
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    if "/" in tag or tag.startswith("."):
        raise CheckpointError(f"checkpoint tag {tag!r} must be a plain directory name")
    root = Path(save_dir)
    partial = root / f".partial-{tag}"
    final = root / tag
    sharded = engine.tier.partition_size(engine.pipeline.slots[0]) is not None if engine.pipeline.slots else False
    client_bytes = _safe_bytes(client_state, "client_state") if client_state else None
    if engine.global_rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    _barrier(engine)

    if sharded or engine.global_rank == 0:
        from safetensors.torch import save_file
        tensors: dict[str, torch.Tensor] = {}
        for slot in engine.pipeline.slots:
            if exclude_frozen_parameters and not slot.trainable:
                continue
            tensors[f"param/{slot.name}"] = engine.tier.read_partition(slot).contiguous()
            for name in slot.stored_state:
                tensors[f"state/{name}/{slot.name}"] = engine.tier.read_state_partition(slot, name).contiguous()
        path = partial / rank_file(engine.global_rank)
        save_file(tensors, str(path), metadata={"format": str(FORMAT)})
        _fsync_file(path)
    _barrier(engine)

    if engine.global_rank == 0:
        scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
        meta = {
            "format": FORMAT, "tag": tag, "zo2_version": __version__, "torch_version": torch.__version__,
            "global_steps": engine.global_steps, "global_samples": engine.global_samples,
            "micro_steps": engine.micro_steps, "skipped_steps": engine.skipped_steps,
            "consecutive_skips": engine.consecutive_skips, "world_size": engine.world_size,
            "tier": engine.settings.tier, "sharded": sharded, "method": engine.zo2.method,
            "zo2": engine.zo2.model_dump(), "state_names": sorted(engine.method.state_init),
            "batch": _batch_settings(engine),
            "parameters": _parameter_index(engine), "exclude_frozen_parameters": exclude_frozen_parameters,
            "optimizer": engine.optimizer.state_dict(),
            "lr_scheduler": scheduler if _jsonable(scheduler) else None,
            "data_loader": engine.training_dataloader.state_dict() if engine.training_dataloader else None,
            "module_config": _module_config(engine),
            "files": [rank_file(r) for r in range(engine.world_size if sharded else 1)],
            "client_state": CLIENT_STATE if client_bytes else None,
        }
        if scheduler is not None and meta["lr_scheduler"] is None:
            (partial / "lr_scheduler.pt").write_bytes(_safe_bytes(scheduler, "the lr scheduler state"))
            _fsync_file(partial / "lr_scheduler.pt")
            meta["lr_scheduler_file"] = "lr_scheduler.pt"
        if client_bytes:
            (partial / CLIENT_STATE).write_bytes(client_bytes)
            _fsync_file(partial / CLIENT_STATE)
        _write_json(partial / META, meta)
        _fsync_dir(partial)
        _replace_dir(partial, final)
        _fsync_dir(root)
        if save_latest:
            latest_tmp = root / f".{LATEST}.tmp"
            latest_tmp.write_text(tag)
            _fsync_file(latest_tmp)
            os.replace(latest_tmp, root / LATEST)
            _fsync_dir(root)
    _barrier(engine)
    return True


def _replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; an existing ``target`` is set aside first and removed after."""
    if not target.exists():
        os.rename(source, target)
        return
    trash = target.with_name(f".trash-{target.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(target, trash)
    os.rename(source, target)
    shutil.rmtree(trash, ignore_errors=True)


def resolve(load_dir: str, tag: Optional[str]) -> Optional[Path]:
    """The checkpoint directory for ``tag`` (or ``latest``); None when there is none."""
    root = Path(load_dir)
    if tag is None:
        latest = root / LATEST
        if not latest.exists():
            return None
        tag = latest.read_text().strip()
    path = root / str(tag)
    if not (path / META).exists():
        raise CheckpointError(f"{path} is not a complete zo2 checkpoint (no {META})")
    return path


def read_meta(path: Path) -> dict:
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not supported (expected {FORMAT})")
    return meta


def _check_compatible(engine: "ZO2Engine", meta: dict, path: Path, module_only: bool, strict: bool) -> None:
    ours = {p["name"]: p for p in _parameter_index(engine)}
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
        if meta["method"] != engine.zo2.method:
            problems.append(f"zo2.method: checkpoint {meta['method']!r} vs config {engine.zo2.method!r}")
        current = engine.zo2.model_dump()
        changed = [k for k, v in meta["zo2"].items() if k not in OPERATIONAL_KEYS and current.get(k) != v]
        if changed:
            problems.append("zo2 fields differ from the checkpoint's: " + ", ".join(
                f"{k} {meta['zo2'][k]!r} -> {current.get(k)!r}" for k in changed))
        batch = _batch_settings(engine)
        if meta["batch"] != batch:
            problems.append(f"batch settings differ: checkpoint {meta['batch']} vs config {batch}")
    if problems:
        hint = "" if module_only else " (load_module_only=True loads just the parameters)"
        raise CheckpointError(f"checkpoint {path} does not match this engine: " + "; ".join(problems) + hint)


class _Shards:
    """Lazy access to the checkpoint's per-rank tensor files."""

    def __init__(self, path: Path, files: list[str]) -> None:
        from safetensors import safe_open
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
        self.handles = [safe_open(str(path / f), framework="pt") for f in files]

    def full(self, key: str, numel: int) -> torch.Tensor:
        """The whole flat tensor: the concatenation of every rank's partition, without padding."""
        parts = [h.get_tensor(key) for h in self.handles]
        return torch.cat(parts)[:numel] if len(parts) > 1 else parts[0][:numel]

    def has(self, key: str) -> bool:
        return key in self.handles[0].keys()


def _local_slice(full: torch.Tensor, rank: int, size: Optional[int]) -> torch.Tensor:
    """This rank's partition of a flat tensor (zero-padded at the end, as ZeRO-3 pads)."""
    if size is None:
        return full
    out = torch.zeros(size, dtype=full.dtype)
    start = rank * size
    n = max(0, min(size, full.numel() - start))
    if n:
        out[:n] = full[start:start + n]
    return out


def load_checkpoint(engine: "ZO2Engine", load_dir: str, tag: Optional[str] = None, load_module_strict: bool = True,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False) -> tuple[Optional[str], Optional[dict]]:
    """Restore ``engine`` from a checkpoint (every rank calls this); (path, client_state), or (None, None)."""
    path = resolve(load_dir, tag)
    if path is None:
        return None, None
    meta = read_meta(path)
    _check_compatible(engine, meta, path, load_module_only, load_module_strict)
    engine.pipeline.pending = None  # the loaded parameters are up to date: no deferred update applies
    shards = _Shards(path, meta["files"])
    index = {p["name"]: p for p in meta["parameters"]}
    tier, rank = engine.tier, engine.global_rank
    for slot in engine.pipeline.slots:
        entry = index.get(slot.name)
        key = f"param/{slot.name}"
        if entry is None or not shards.has(key):
            continue
        size = tier.partition_size(slot)
        full = shards.full(key, slot.numel)
        tier.write_partition(slot, _local_slice(full, rank, size).to(tier.storage_dtype(slot)))
        for name in slot.stored_state:
            state_key = f"state/{name}/{slot.name}"
            if shards.has(state_key):
                tier.write_state_partition(slot, name, _local_slice(shards.full(state_key, slot.numel), rank, size))
            elif not load_module_only:
                raise CheckpointError(f"checkpoint {path} has no {name!r} state for {slot.name}")
        slot.updated_through = -1
    if not load_module_only:
        _restore_training_state(engine, meta, path, load_optimizer_states, load_lr_scheduler_states)
    client_state = None
    if meta.get("client_state"):
        client_state = torch.load(path / meta["client_state"], weights_only=True)
    _barrier(engine)
    return str(path), client_state if client_state is not None else {}


def _restore_training_state(engine: "ZO2Engine", meta: dict, path: Path, optimizer: bool, scheduler: bool) -> None:
    engine.global_steps = meta["global_steps"]
    engine.global_samples = meta["global_samples"]
    engine.micro_steps = meta["micro_steps"]
    engine.skipped_steps = meta["skipped_steps"]
    engine.consecutive_skips = meta["consecutive_skips"]
    if optimizer:
        engine.optimizer.load_state_dict(meta["optimizer"])
    if scheduler and engine.lr_scheduler is not None:
        state = meta["lr_scheduler"]
        if state is None and meta.get("lr_scheduler_file"):
            state = torch.load(path / meta["lr_scheduler_file"], weights_only=True)
        if state is not None:
            engine.lr_scheduler.load_state_dict(state)
    if engine.training_dataloader is not None and meta.get("data_loader"):
        engine.training_dataloader.load_state_dict(meta["data_loader"])


def read_full_state(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Whole parameter tensors of a checkpoint directory (no process group needed), and its metadata."""
    ckpt = Path(path)
    if not (ckpt / META).exists():
        resolved = resolve(path, None)
        if resolved is None:
            raise CheckpointError(f"{path} is neither a zo2 checkpoint directory nor a save_dir with a 'latest' file")
        ckpt = resolved
    meta = read_meta(ckpt)
    shards = _Shards(ckpt, meta["files"])
    tensors = {}
    for entry in meta["parameters"]:
        key = f"param/{entry['name']}"
        if shards.has(key):
            tensors[entry["name"]] = shards.full(key, entry["numel"]).view(entry["shape"])
    return tensors, meta

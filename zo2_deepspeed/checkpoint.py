"""Atomic, verified, DeepSpeed-layout checkpoints that are data, never code.

Layout (``save_dir`` as given to ``engine.save_checkpoint``)::

    latest                          the tag of the newest complete checkpoint (replaced by rename)
    global_step{N}/
        zo2_checkpoint.json         counters, config, optimizer/scheduler/data-loader state, tensor index,
                                    the size and checksum of every other file, and its own checksum
        rank00000.safetensors ...   each rank's partitions ("param/<name>", "state/<state>/<name>")
        client_state.pt             optional; loaded with ``torch.load(weights_only=True)``

Before anything is written, the bytes the checkpoint needs are compared with the free space of the
target filesystem. A save writes into a hidden ``.partial-<tag>`` directory, hashing every file as it
is written (xxh3-128), fsyncs every file and the directory, then renames it into place and replaces
``latest`` by rename: a crash at any moment leaves ``latest`` pointing at a complete checkpoint, and
a failure on any rank removes the partial directory on every rank. Loading checks every file it
reads against the recorded size and checksum before touching the engine. ZeRO-3 partitions are
saved by their rank (a sharded model is never gathered to save) and reassembled on load for another
world size; with the same world size each rank reads only its own file. The pending ZO update is
flushed first, so resuming continues bitwise as if the run had never stopped.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import itertools
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, TypeVar

import torch

from .errors import CheckpointError, RankSyncError
from .version import __version__

if TYPE_CHECKING:
    from .engine import ZO2Engine

FORMAT = 1
META = "zo2_checkpoint.json"
LATEST = "latest"
CLIENT_STATE = "client_state.pt"
LR_SCHEDULER = "lr_scheduler.pt"
PARTIAL = ".partial-"
TRASH = ".trash-"
HASH = "xxh3_128"
"""Checksum of every file; stored with each digest, so it can change later."""
MANIFEST_CHECKSUM = "manifest_checksum"
"""The manifest's own checksum, over its canonical JSON without this key (a flipped digit still parses)."""
CHUNK = 4 << 20
"""Bytes hashed and written (or read and hashed) at a time: small enough to stay in the CPU cache."""
OPERATIONAL_KEYS = {"prefetch_blocks", "comm_timeout_s", "check_sync_every", "max_skipped_steps", "parallel"}
"""zo2 fields that may change between save and resume without changing the trajectory."""
REQUIRED_KEYS = ("format", "tag", "global_steps", "world_size", "sharded", "method", "zo2", "batch", "parameters",
                 "files")
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
SAFETENSORS_NAMES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
T = TypeVar("T")


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def _warn_rank0(message: str) -> None:
    """A warning on rank 0 (or in a process without a process group): DeepSpeed shows WARNING by default."""
    from deepspeed import comm as dist
    from deepspeed.utils import log_dist, logger
    if dist.is_initialized():
        log_dist(message, ranks=[0], level=logging.WARNING)
    else:
        logger.warning(message)


def _log_info(message: str) -> None:
    """Info on rank 0 (or in a process without a process group, e.g. the export CLI)."""
    from deepspeed import comm as dist
    from deepspeed.utils import log_dist, logger
    if dist.is_initialized():
        log_dist(message, ranks=[0])
    else:
        logger.info(message)


# ---------------------------------------------------------------------------------------------
# Ranks acting together


def _gather(engine: "ZO2Engine", what: str, value: Any) -> list[Any]:
    """Every rank's small picklable ``value``, in rank order; a dead or hung rank raises RankSyncError."""
    if engine.world_size == 1:
        return [value]
    from deepspeed import comm as dist
    from .comm import guarded
    values: list[Any] = [None] * engine.world_size
    with guarded(f"checkpoint: {what}"):
        dist.all_gather_object(values, value)
    return values


def together(engine: "ZO2Engine", what: str, fn: Callable[[], T],
             share: Optional[Callable[[T], Any]] = None) -> tuple[T, list[Any]]:
    """Run ``fn`` on every rank, then make its outcome common: a failure on one rank raises on all.

    Why: a rank that raised on its own would leave the others waiting at the next collective until
    the comm timeout. Here the failing rank raises its own exception, the others a CheckpointError
    naming that rank and its error. It doubles as the guarded barrier of saves, loads and
    ``engine.save_pretrained``. Returns ``fn``'s result and every rank's ``share(result)``.
    """
    error: Optional[Exception] = None
    result: Any = None
    try:
        result = fn()
    except Exception as e:  # reported to the other ranks, then re-raised below
        error = e
    summary = f"{type(error).__name__}: {error}" if error is not None else None
    try:
        outcomes = _gather(engine, what, (summary, share(result) if share and error is None else None))
    except RankSyncError:
        if error is not None:
            raise error
        raise
    if error is not None:
        raise error
    failed = [(rank, message) for rank, (message, _) in enumerate(outcomes) if message]
    if failed:
        rank, message = failed[0]
        raise CheckpointError(f"{what} failed on rank {rank}: {message}")
    return result, [shared for _, shared in outcomes]


# ---------------------------------------------------------------------------------------------
# Checksums and writing


def _hasher(algorithm: str) -> Any:
    """A streaming hash object for ``algorithm`` as named in a manifest."""
    if algorithm in ("xxh3_128", "xxh3_64", "xxh64", "xxh32"):
        import xxhash
        return getattr(xxhash, algorithm)()
    if algorithm in hashlib.algorithms_guaranteed:
        return hashlib.new(algorithm)
    raise CheckpointError(f"checksum algorithm {algorithm!r} is unknown to zo2_deepspeed {__version__}: "
                          f"load the checkpoint with the version that wrote it, or pass verify=False")


class _HashingFile:
    """A new file whose bytes are hashed as they are written: one pass over the data, no re-read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._hash = _hasher(HASH)
        self.size = 0
        self._file = open(path, "xb")

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK):
            chunk = view[start:start + CHUNK]
            self._hash.update(chunk)
            self._file.write(chunk)
        self.size += len(view)

    def finish(self) -> dict:
        """Flush and fsync; the manifest entry (algorithm, hex digest, size) of the file."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"algorithm": HASH, "digest": self._hash.hexdigest(), "bytes": self.size}

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()


def _write_hashed(path: Path, chunks: Iterable[Any]) -> dict:
    """Write ``chunks`` (bytes-like) to a new file at ``path``; its manifest entry."""
    out = _HashingFile(path)
    try:
        for chunk in chunks:
            out.write(chunk)
        return out.finish()
    except BaseException:
        out.abandon()
        raise


def _raw_bytes(t: torch.Tensor) -> Any:
    """A tensor's bytes as a numpy view (no copy for a contiguous CPU tensor)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, int]:
    """The leading bytes (length + JSON header) of a safetensors file holding ``tensors`` in order, and the
    file's total size.

    Why our own writer: the bytes are hashed while written, the size is known before anything is
    written (for the free-space check), and tensors are written from their own memory, not copied.
    The files are standard safetensors (``safetensors.safe_open`` reads them).
    """
    entries: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, which a safetensors checkpoint cannot hold")
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    entries["__metadata__"] = metadata
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # tensor data starts 8-byte aligned
    prefix = struct.pack("<Q", len(header)) + header
    return prefix, len(prefix) + offset


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# ---------------------------------------------------------------------------------------------
# Free space


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _block_size(root: Path) -> int:
    return os.statvfs(_existing_ancestor(root)).f_frsize or 4096


def _allocated_bytes(path: Path) -> int:
    """Bytes a directory tree holds on disk (what removing it gives back)."""
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in [*names, "."]:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _set_aside_tag(path: Path) -> Optional[str]:
    """The tag whose old version ``path`` holds, if it is a directory set aside by ``replace_dir``."""
    return path.name[len(TRASH):] if path.is_dir() and path.name.startswith(TRASH) else None


def _leftovers(root: Path) -> list[Path]:
    """Directories of interrupted saves that hold nothing needed: partial copies, and old versions of a
    tag whose new version is in place."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PARTIAL)
                  or _set_aside_tag(p) and (root / _set_aside_tag(p)).exists())


def free_space(path: Path) -> int:
    """Bytes free on the filesystem that holds ``path`` (or will: its nearest existing ancestor's)."""
    return shutil.disk_usage(_existing_ancestor(path)).free


def bytes_on_disk(path: Path, sizes: Iterable[int]) -> int:
    """What files of ``sizes`` bytes take on the filesystem of ``path``: whole blocks, plus one each for metadata."""
    block = _block_size(path)
    return sum(_on_disk(n, block) for n in sizes)


def _free_bytes(root: Path) -> int:
    """Bytes a save into ``root`` may use: free space plus what removing leftovers of interrupted saves frees."""
    return free_space(root) + sum(_allocated_bytes(p) for p in _leftovers(root))


@dataclass
class _Space:
    """What a save needs and had, for the messages of a refused or failed save."""

    root: Path
    needed: int
    free: int
    latest: Optional[str]

    def kept(self) -> str:
        return f"'latest' still names {self.latest}" if self.latest else "there is no 'latest' yet"

    def explain(self) -> str:
        return (f"the checkpoint needs {self.needed:,} bytes in {self.root} and {self.free:,} bytes were free "
                f"there; {self.kept()}")


def _on_disk(size: int, block: int) -> int:
    return -(-size // block) * block + block  # rounded up to whole blocks, plus one for metadata


# ---------------------------------------------------------------------------------------------
# Save


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


def _is_sharded(engine: "ZO2Engine") -> bool:
    slots = engine.pipeline.slots
    return bool(slots) and engine.tier.partition_size(slots[0]) is not None


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


def _plan(engine: "ZO2Engine", root: Path, tag: str, client_state: Optional[dict],
          exclude_frozen_parameters: bool) -> _Plan:
    """Read this rank's partitions and build (rank 0) the manifest; measure what the save will take."""
    plan = _Plan()
    rank, sharded = engine.global_rank, _is_sharded(engine)
    block = _block_size(root)
    if sharded or rank == 0:
        tier = engine.tier
        for slot in engine.pipeline.slots:
            if exclude_frozen_parameters and not slot.trainable:
                continue
            size = tier.partition_size(slot)
            numel = slot.numel if size is None else size
            plan.tensors[f"param/{slot.name}"] = torch.empty(numel, dtype=tier.storage_dtype(slot), device="meta")
            plan.readers[f"param/{slot.name}"] = lambda slot=slot: tier.read_partition(slot)
            for name in slot.stored_state:
                plan.tensors[f"state/{name}/{slot.name}"] = torch.empty(numel, dtype=torch.float32, device="meta")
                plan.readers[f"state/{name}/{slot.name}"] = lambda slot=slot, name=name: tier.read_state_partition(
                    slot, name)
        plan.header, size = _safetensors_header(plan.tensors, {"format": str(FORMAT)})
        plan.disk_bytes += _on_disk(size, block)
    if rank != 0:
        return plan
    scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    meta = _manifest(engine, tag, sharded, exclude_frozen_parameters, scheduler)
    if client_state:
        plan.extras[CLIENT_STATE] = _safe_bytes(client_state, "client_state")
        meta["client_state"] = CLIENT_STATE
    if scheduler is not None and meta["lr_scheduler"] is None:
        plan.extras[LR_SCHEDULER] = _safe_bytes(scheduler, "the lr scheduler state")
        meta["lr_scheduler_file"] = LR_SCHEDULER
    plan.meta = meta
    entry = {"algorithm": HASH, "digest": "0" * 32, "bytes": 10 ** 15}  # at least as long as a real one
    sized = dict(meta, checksums={name: entry for name in [*meta["files"], *plan.extras]})
    small = [len(json.dumps(sized, indent=1, sort_keys=True)), len(tag), *map(len, plan.extras.values())]
    plan.disk_bytes += sum(_on_disk(n, block) for n in small)
    plan.free = _free_bytes(root)
    plan.latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    return plan


def _manifest(engine: "ZO2Engine", tag: str, sharded: bool, exclude_frozen_parameters: bool,
              scheduler: Optional[dict]) -> dict:
    """The checkpoint's metadata, all but the checksums (known once the files are written)."""
    return {
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
        "client_state": None,
    }


@contextlib.contextmanager
def _writing(file: Path, space: _Space) -> Iterator[None]:
    """Turn an OS error while writing ``file`` into a CheckpointError that says what the save needed."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"cannot write {file}: {reason}; {space.explain()}; the partial checkpoint is "
                                  f"removed: free space or save to another directory") from e
        raise CheckpointError(f"cannot write {file}: {reason}; the partial checkpoint is removed and "
                              f"{space.kept()}") from e


def _write_rank(plan: _Plan, partial: Path, rank: int, space: _Space) -> Optional[tuple[str, dict]]:
    """This rank's tensor file (name and manifest entry), or None when it has none to write."""
    if not plan.header:
        return None
    path = partial / rank_file(rank)
    tensors = (_raw_bytes(_read_planned(key, expected, plan.readers[key])) for key, expected in plan.tensors.items())
    with _writing(path, space):
        entry = _write_hashed(path, itertools.chain([plan.header], tensors))
    return path.name, entry


def _read_planned(key: str, expected: torch.Tensor, read: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A tensor of the plan, checked against the size and dtype its header entry was written with."""
    tensor = read().contiguous()
    if tensor.numel() != expected.numel() or tensor.dtype != expected.dtype:
        raise CheckpointError(f"{key} read back as {tensor.numel()} x {tensor.dtype}, but the checkpoint plans "
                              f"{expected.numel()} x {expected.dtype}")
    return tensor


def _publish(plan: _Plan, root: Path, partial: Path, final: Path, tag: str, save_latest: bool,
             rank_entries: list[Optional[tuple[str, dict]]], space: _Space) -> None:
    """Rank 0: write the small files and the manifest, then move the checkpoint into place."""
    checksums = dict(entry for entry in rank_entries if entry is not None)
    for name, data in plan.extras.items():
        with _writing(partial / name, space):
            checksums[name] = _write_hashed(partial / name, [data])
    meta = dict(plan.meta, checksums=checksums)
    meta[MANIFEST_CHECKSUM] = {"algorithm": HASH, "digest": _manifest_digest(meta, HASH)}
    with _writing(partial / META, space):
        with open(partial / META, "x") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(partial)
    latest_tmp = root / f".{LATEST}.tmp"
    if save_latest:  # written before the rename: after it, nothing is left that needs space
        with _writing(latest_tmp, space):
            latest_tmp.write_text(tag)
            with open(latest_tmp, "rb+") as f:
                os.fsync(f.fileno())
    replace_dir(partial, final)
    _fsync_dir(root)
    if save_latest:
        os.replace(latest_tmp, root / LATEST)
        _fsync_dir(root)


def _prepare_dir(root: Path, partial: Path, space: _Space) -> None:
    """Rank 0: an empty ``partial`` directory, after tidying what interrupted saves left.

    A save killed while replacing an existing tag leaves its old version set aside and the tag
    missing: that complete checkpoint is put back. Partial copies are removed.
    """
    with _writing(partial, space):
        root.mkdir(parents=True, exist_ok=True)
        for path in root.iterdir():
            tag = _set_aside_tag(path)
            if tag and not (root / tag).exists():
                _log_info(f"restoring {root / tag} from {path}, set aside by an interrupted save")
                os.rename(path, root / tag)
        for leftover in _leftovers(root):
            _log_info(f"removing {leftover}, left by an interrupted save")
            shutil.rmtree(leftover, ignore_errors=True)
        partial.mkdir()


def _discard(engine: "ZO2Engine", root: Path, partial: Path) -> None:
    """After a failed save: each rank removes its own file, rank 0 the partial directory."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial / rank_file(engine.global_rank))
    if engine.global_rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(root / f".{LATEST}.tmp")


def save_checkpoint(engine: "ZO2Engine", save_dir: str, tag: Optional[str] = None,
                    client_state: Optional[dict] = None, save_latest: bool = True,
                    exclude_frozen_parameters: bool = False) -> bool:
    """Write a checkpoint of ``engine`` (every rank calls this). Returns True, as DeepSpeed does.

    Raises CheckpointError before writing anything when the filesystem lacks the space, and after
    removing every partial file when a write fails on any rank.
    """
    engine.flush()
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    if "/" in tag or tag.startswith(".") or not tag:
        raise CheckpointError(f"checkpoint tag {tag!r} must be a plain directory name")
    root = Path(save_dir)
    partial, final = root / f"{PARTIAL}{tag}", root / tag
    plan, shared = together(engine, "preparing the checkpoint",
                            lambda: _plan(engine, root, tag, client_state, exclude_frozen_parameters),
                            share=lambda p: (p.disk_bytes, p.free, p.latest))
    space = _Space(root.absolute(), sum(n for n, _, _ in shared), shared[0][1], shared[0][2])
    if space.needed > space.free:
        raise CheckpointError(f"not enough space to save checkpoint {tag}: {space.explain()}; nothing was written: "
                              f"free space or save to another directory")
    rank0 = engine.global_rank == 0
    try:
        together(engine, "creating the checkpoint directory",
                 lambda: _prepare_dir(root, partial, space) if rank0 else None)
        _, entries = together(engine, "writing the checkpoint files",
                              lambda: _write_rank(plan, partial, engine.global_rank, space), share=lambda e: e)
        together(engine, "publishing the checkpoint", lambda: _publish(
            plan, root, partial, final, tag, save_latest, entries, space) if rank0 else None)
    except BaseException:
        _discard(engine, root, partial)
        raise
    return True


def replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; an existing ``target`` is set aside first and removed after."""
    if not target.exists():
        os.rename(source, target)
        return
    trash = target.with_name(f"{TRASH}{target.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(target, trash)
    os.rename(source, target)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Load


def _other_tags(path: Path) -> str:
    """What to do about a damaged checkpoint: the other checkpoints beside it, newest first."""
    root = path.parent
    others = [p for p in root.iterdir() if p.is_dir() and p != path and not p.name.startswith(".")
              and (p / META).is_file()] if root.is_dir() else []
    others.sort(key=lambda p: (p / META).stat().st_mtime, reverse=True)
    if not others:
        return f"no other checkpoint is in {root}"
    return f"use an earlier tag instead; other checkpoints in {root}, newest first: " + ", ".join(
        p.name for p in others[:5])


def _visible_entries(root: Path) -> list[Path]:
    """What a directory holds, without hidden entries (leftovers of interrupted saves, ``.latest.tmp``)."""
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


def _checkpoint_tags(root: Path) -> list[str]:
    """The complete checkpoints directly in ``root``, newest first."""
    found = [p for p in _visible_entries(root) if p.is_dir() and (p / META).is_file()]
    found.sort(key=lambda p: (p / META).stat().st_mtime, reverse=True)
    return [p.name for p in found]


def resolve(load_dir: str, tag: Optional[str]) -> Optional[Path]:
    """The checkpoint directory ``load_dir`` and ``tag`` name; None when there is nothing to resume.

    Following DeepSpeed, a ``load_dir`` that does not exist or is empty (no ``latest``, nothing but
    leftovers of interrupted saves) is a fresh start: None. A ``global_step{N}`` directory given as
    ``load_dir`` is that checkpoint. Anything else that holds no checkpoint is refused with a
    CheckpointError naming the path: a file, a directory of other files, a save_dir whose ``latest``
    was deleted (its tags are listed), a tag that is not there. ``zo2-export`` resolves its input here too.
    """
    root = Path(load_dir)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} is a file, not a checkpoint directory: give the save_dir holding 'latest' "
                              f"or a {META}-holding tag directory such as global_step<N>")
    if tag is not None:
        path = root / str(tag)
        if not (path / META).is_file():
            where = "does not exist" if not path.exists() else f"is not a complete zo2 checkpoint (no {META})"
            tags = _checkpoint_tags(root) if root.is_dir() else []
            hint = f"; checkpoints in {root}, newest first: {', '.join(tags[:5])}" if tags else ""
            raise CheckpointError(f"checkpoint {path} {where}{hint}")
        return path
    if (root / META).is_file():  # a tag directory given directly
        return root
    if not root.exists() or not _visible_entries(root):
        return None
    latest = root / LATEST
    if not latest.is_file():
        tags = _checkpoint_tags(root)
        if tags:
            raise CheckpointError(f"{root} has no '{LATEST}' file, but holds checkpoints (newest first: "
                                  f"{', '.join(tags[:5])}): pass tag= (or the tag directory itself) to load one")
        raise CheckpointError(f"{root} holds no zo2 checkpoint (neither a '{LATEST}' file nor a {META}): give the "
                              f"directory save_checkpoint wrote, or a tag directory such as global_step<N>")
    tag = latest.read_text(errors="replace").strip()
    if not tag or any(c in tag for c in "/\0\ufffd") or tag.startswith("."):
        raise CheckpointError(f"{latest} is damaged: it holds {tag[:40]!r}, not a tag; pass tag= to load one; "
                              f"{_other_tags(latest)}")
    path = root / tag
    if not (path / META).exists():
        raise CheckpointError(f"{path} (named by {latest}) is not a complete zo2 checkpoint (no {META})")
    return path


def nothing_to_resume(load_dir: str) -> str:
    """The message for a ``load_dir`` that ``resolve`` found empty or missing."""
    state = "does not exist" if not Path(load_dir).exists() else "holds no checkpoint yet"
    return (f"load_checkpoint: {load_dir} {state}: nothing to resume, training starts from the model as given "
            f"(step 0)")


def read_meta(path: Path) -> dict:
    """The manifest of the checkpoint at ``path``; a damaged one is refused with its file named."""
    file = path / META
    try:
        meta = json.loads(file.read_bytes())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{file} (checkpoint {path.name}) cannot be read: {type(e).__name__}: {e}; "
                              f"{_other_tags(path)}") from None
    missing = [k for k in REQUIRED_KEYS if k not in meta] if isinstance(meta, dict) else list(REQUIRED_KEYS)
    if missing:
        raise CheckpointError(f"{file} (checkpoint {path.name}) is damaged: it lacks {missing}; {_other_tags(path)}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not supported (expected {FORMAT})")
    return meta


def _verify_file(path: Path, name: str, entry: Any) -> None:
    """Refuse a file whose size or checksum differs from what the manifest recorded when it was saved."""
    file = path / name
    if not isinstance(entry, dict) or not {"algorithm", "digest", "bytes"} <= entry.keys():
        raise CheckpointError(f"{path / META} (checkpoint {path.name}) has no valid checksum for {name}: the "
                              f"manifest is damaged; {_other_tags(path)}")
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path.name} is incomplete: {file} is missing; {_other_tags(path)}")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(f"{file} (checkpoint {path.name}) is {size:,} bytes but was saved with "
                              f"{entry['bytes']:,} (truncated or overwritten); {_other_tags(path)}")
    hasher = _hasher(entry["algorithm"])
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            hasher.update(view[:n])
    if hasher.hexdigest() != entry["digest"]:
        raise CheckpointError(f"{file} (checkpoint {path.name}) is damaged: its {entry['algorithm']} checksum "
                              f"{hasher.hexdigest()} differs from the {entry['digest']} recorded at save; "
                              f"{_other_tags(path)}")


def _manifest_digest(meta: dict, algorithm: str) -> str:
    """Checksum of the manifest's content: its canonical JSON (sorted keys, no spaces) without its own checksum."""
    content = {k: v for k, v in meta.items() if k != MANIFEST_CHECKSUM}
    hasher = _hasher(algorithm)
    hasher.update(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())
    return hasher.hexdigest()


def _verify_manifest(path: Path, meta: dict) -> None:
    """Refuse a manifest whose content changed after it was saved (it parsed, so the change is in a value)."""
    entry = meta.get(MANIFEST_CHECKSUM)
    if entry is None:
        _log_info(f"checkpoint {path}: its manifest has no checksum of its own (saved before one was recorded)")
        return
    if not isinstance(entry, dict) or not {"algorithm", "digest"} <= entry.keys():
        raise CheckpointError(f"{path / META} (checkpoint {path.name}) is damaged: '{MANIFEST_CHECKSUM}' is not an "
                              f"algorithm and a digest; {_other_tags(path)}")
    digest = _manifest_digest(meta, entry["algorithm"])
    if digest != entry["digest"]:
        raise CheckpointError(f"{path / META} (checkpoint {path.name}) is damaged: the {entry['algorithm']} checksum "
                              f"of its content, {digest}, differs from the {entry['digest']} recorded at save (a "
                              f"value was changed after the save); {_other_tags(path)}")


def _verify(path: Path, meta: dict, names: list[str], verify: bool) -> None:
    """Check the manifest and the files about to be read (all of them before any is used)."""
    if not verify:
        _log_info(f"checkpoint {path}: checksums not verified (verify=False)")
        return
    _verify_manifest(path, meta)
    checksums = meta.get("checksums")
    if checksums is None:
        _log_info(f"checkpoint {path} has no checksums (saved before they were recorded): its files cannot be "
                  f"verified")
        return
    if not isinstance(checksums, dict):
        raise CheckpointError(f"{path / META} (checkpoint {path.name}) is damaged: 'checksums' is not a mapping; "
                              f"{_other_tags(path)}")
    for name in names:
        _verify_file(path, name, checksums.get(name))


def _open_safetensors(file: Path, tag: str) -> Any:
    from safetensors import safe_open
    if not file.is_file():
        raise CheckpointError(f"checkpoint {tag} is incomplete: {file} is missing; {_other_tags(file.parent)}")
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # SafetensorError: truncated file, damaged header
        raise CheckpointError(f"{file} (checkpoint {tag}) cannot be read: {type(e).__name__}: {e}; "
                              f"{_other_tags(file.parent)}") from None


class _Shards:
    """Lazy access to per-rank tensor files: all of them (reassembly) or this rank's own.

    Each file is checked by safetensors when opened, then its tensors are read one at a time with plain
    reads at their offsets: safetensors memory-maps the file, and every page read through the map stays
    in the process's resident set while it is open, so loading a checkpoint larger than memory would
    hold all of it.
    """

    def __init__(self, path: Path, files: list[str]) -> None:
        self.path = path
        self.files = files
        self.index: list[tuple[dict, int]] = []
        for name in files:
            handle = _open_safetensors(path / name, path.name)  # refuses a damaged header or a short file now
            del handle  # unmaps the file
            self.index.append(_tensor_index(path / name))

    def _read(self, i: int, key: str) -> torch.Tensor:
        file = self.path / self.files[i]
        entries, data_start = self.index[i]
        try:
            entry = entries[key]
            start, end = entry["data_offsets"]
            dtype = SAFETENSORS_NAMES[entry["dtype"]]
            out = torch.empty(end - start, dtype=torch.uint8)
            view = memoryview(out.numpy())
            with open(file, "rb", buffering=0) as f:
                f.seek(data_start + start)
                done = 0
                while done < len(view):
                    n = f.readinto(view[done:])
                    if not n:
                        raise EOFError(f"the file ends {len(view) - done:,} bytes early")
                    done += n
            return out.view(dtype).view(entry["shape"])
        except Exception as e:
            raise CheckpointError(f"{file} (checkpoint {self.path.name}): cannot read {key}: "
                                  f"{type(e).__name__}: {e}; {_other_tags(self.path)}") from None

    def full(self, key: str, numel: int) -> torch.Tensor:
        """The flat tensor over the files: the concatenation of their partitions, cut to ``numel``."""
        parts = [self._read(i, key) for i in range(len(self.files))]
        return torch.cat(parts)[:numel] if len(parts) > 1 else parts[0][:numel]

    def has(self, key: str) -> bool:
        return key in self.index[0][0]


def _tensor_index(file: Path) -> tuple[dict, int]:
    """A safetensors file's tensor entries (dtype, shape, data_offsets) and where its data starts."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(length))
    entries.pop("__metadata__", None)
    return entries, 8 + length


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


def _holds_own_partitions(engine: "ZO2Engine", meta: dict) -> bool:
    """True when this rank's file of the checkpoint holds exactly its partitions (same world size and
    partitioning): then it reads only that file."""
    if not meta["sharded"] or meta["world_size"] != engine.world_size:
        return False
    saved = {p["name"]: p.get("partition_size") for p in meta["parameters"]}
    sizes = [(saved.get(s.name), engine.tier.partition_size(s)) for s in engine.pipeline.slots if s.name in saved]
    return all(ours is not None and theirs == ours for theirs, ours in sizes)


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


def _open_checkpoint(engine: "ZO2Engine", path: Path, meta: dict, own: bool, scheduler: bool,
                     verify: bool) -> _Opened:
    files = [rank_file(engine.global_rank)] if own else list(meta["files"])
    extras = [meta["client_state"]] if meta.get("client_state") else []
    if scheduler and meta.get("lr_scheduler") is None and meta.get("lr_scheduler_file"):
        extras.append(meta["lr_scheduler_file"])
    _verify(path, meta, [*files, *extras], verify)
    shards = _Shards(path, files)
    client_state = _torch_file(path, meta["client_state"]) if meta.get("client_state") else None
    lr_state = _torch_file(path, meta["lr_scheduler_file"]) if meta.get("lr_scheduler_file") in extras else None
    return _Opened(shards, client_state, lr_state)


def load_checkpoint(engine: "ZO2Engine", load_dir: str, tag: Optional[str] = None, load_module_strict: bool = True,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False, verify: bool = True) -> tuple[Optional[str], Optional[dict]]:
    """Restore ``engine`` from a checkpoint (every rank calls this); (path, client_state), or (None, None).

    Every file this rank reads is checked against the size and checksum recorded at save before the
    engine is changed (``verify=False`` skips the checksums); a damaged file on any rank is refused
    on every rank with a CheckpointError naming the file.
    """
    path, _ = together(engine, f"finding the checkpoint in {load_dir}", lambda: resolve(load_dir, tag))
    if path is None:
        _warn_rank0(nothing_to_resume(load_dir))
        return None, None
    meta = read_meta(path)
    _check_compatible(engine, meta, path, load_module_only, load_module_strict)
    own = _holds_own_partitions(engine, meta)
    scheduler = not load_module_only and load_lr_scheduler_states and engine.lr_scheduler is not None
    opened, _ = together(engine, f"reading checkpoint {path}",
                         lambda: _open_checkpoint(engine, path, meta, own, scheduler, verify))
    engine.pipeline.pending = None  # the loaded parameters are up to date: no deferred update applies
    shards = opened.shards
    index = {p["name"]: p for p in meta["parameters"]}
    tier, rank = engine.tier, engine.global_rank
    for slot in engine.pipeline.slots:
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
    if not load_module_only:
        _restore_training_state(engine, meta, load_optimizer_states, scheduler, opened.lr_scheduler)
    together(engine, "finishing the checkpoint load", lambda: None)
    return str(path), opened.client_state if opened.client_state is not None else {}


def _restore_training_state(engine: "ZO2Engine", meta: dict, optimizer: bool, scheduler: bool,
                            lr_file_state: Any) -> None:
    engine.global_steps = meta["global_steps"]
    engine.global_samples = meta["global_samples"]
    engine.micro_steps = meta["micro_steps"]
    engine.skipped_steps = meta["skipped_steps"]
    engine.consecutive_skips = meta["consecutive_skips"]
    if optimizer:
        engine.optimizer.load_state_dict(meta["optimizer"])
    if scheduler:
        state = meta["lr_scheduler"] if meta.get("lr_scheduler") is not None else lr_file_state
        if state is not None:
            engine.lr_scheduler.load_state_dict(state)
    if engine.training_dataloader is not None and meta.get("data_loader"):
        engine.training_dataloader.load_state_dict(meta["data_loader"])


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

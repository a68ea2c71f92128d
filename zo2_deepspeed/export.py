"""Export a zo2 checkpoint as a Hugging Face model directory: ``python -m zo2_deepspeed.export CKPT OUT``.

CKPT is a ``global_step{N}`` directory or the ``save_dir`` holding a ``latest`` file. The partitions
of every rank are reassembled (no process group, no GPU needed), one parameter at a time, into the
tensors of the model described by the configuration saved with the checkpoint, and written in their
stored dtype to safetensors shards (with Hugging Face's index), so that
``AutoModelForCausalLM.from_pretrained(OUT)`` loads it without zo2_deepspeed; a model larger than
memory exports in the memory of its largest tensor. Every tensor file is
first checked against the size and checksum recorded when it was saved (``--no-verify`` skips the
checksums); a damaged checkpoint is refused with the file named and exit status 2.

The export is written as checkpoints are (``export_dir``): the space it needs is checked first, it
is built in a hidden sibling of OUT and renamed into place, replacing an earlier export whole; a full
disk or an I/O error leaves OUT as it was and exits with status 2 and a one-line error.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from .checkpoint import open_full_state
from .checkpoint.format import SAFETENSORS_NAMES, _raw_bytes, _safetensors_header
from .errors import CheckpointError, ExportError
from .export_dir import staged_export

MAX_SHARD_BYTES = 5 * 10**9
"""Tensor bytes per safetensors file of the export (Hugging Face's default shard size)."""
INDEX = "model.safetensors.index.json"


@dataclass
class _Entry:
    """One tensor of the export: its name, shape and dtype, and how to read it when its turn comes."""

    name: str
    shape: list[int]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def export(checkpoint: str, out_dir: str, tokenizer: Optional[str] = None, verify: bool = True,
           max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write the checkpoint's model as a Hugging Face directory, one tensor at a time.

    The model is never built with real weights (a skeleton on the meta device gives the names,
    shapes and persistent buffers), so a checkpoint larger than memory exports in the memory of its
    largest tensor. Tensors keep the dtype they were stored in.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    shards, meta = open_full_state(checkpoint, verify=verify)
    config_dict = meta.get("module_config")
    if config_dict is None:
        raise CheckpointError(f"{checkpoint} was saved from a model without a Hugging Face config: load it with "
                              f"engine.load_checkpoint and call engine.save_pretrained instead")
    if meta.get("exclude_frozen_parameters"):
        raise CheckpointError(f"{checkpoint} holds only the trainable parameters (exclude_frozen_parameters): "
                              f"export from the engine with engine.save_pretrained")
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    with init_empty_weights(include_buffers=False):  # buffers (e.g. rotary tables) are rebuilt from the config
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # tied parameters are one again (empty-weight construction makes each its own)
    entries = _entries(checkpoint, shards, meta, model)
    dtypes = [e.dtype for e in entries if e.dtype.is_floating_point]
    config.dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    config.architectures = [type(model).__name__]
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer)
    shards = _plan_shards(entries, max_shard_bytes)
    sizes = [_file_bytes(group) for _, group in shards] + _tokenizer_bytes(tokenizer)
    with staged_export(out_dir, sizes, replace=True) as staging:
        _write_shards(shards, str(staging))
        config.save_pretrained(staging)
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
        if tok is not None:
            tok.save_pretrained(staging)


def _tokenizer_bytes(tokenizer: Optional[str]) -> list[int]:
    """Sizes of the files of a local tokenizer directory (what saving it writes, about)."""
    if not tokenizer or not os.path.isdir(tokenizer):
        return []
    return [entry.stat().st_size for entry in os.scandir(tokenizer) if entry.is_file()]


def _entries(checkpoint: str, shards: Any, meta: dict, model: torch.nn.Module) -> list[_Entry]:
    """The tensors to write: every stored parameter (a tied weight once), then the persistent buffers."""
    model_type = model.config.model_type
    by_name = dict(model.named_parameters(remove_duplicate=False))
    stored = [p for p in meta["parameters"] if shards.has(f"param/{p['name']}")]
    unknown = [p["name"] for p in stored if p["name"] not in by_name]
    if unknown:
        raise CheckpointError(f"{checkpoint}: tensors {unknown[:5]} are not parameters of a {model_type} model")
    covered = {id(by_name[p["name"]]) for p in stored}
    missing = [name for name, p in by_name.items() if id(p) not in covered]
    if missing:
        raise CheckpointError(f"{checkpoint}: no tensors for {missing[:5]}")
    shapes = [f"{p['name']}: checkpoint {p['shape']} vs {model_type} {list(by_name[p['name']].shape)}"
              for p in stored if list(by_name[p["name"]].shape) != list(p["shape"])]
    if shapes:
        raise CheckpointError(f"{checkpoint}: shape mismatch with its own config: {shapes[:3]}")
    entries = [_Entry(p["name"], list(p["shape"]), _stored_dtype(p),
                      lambda p=p: shards.full(f"param/{p['name']}", p["numel"]).view(p["shape"]))
               for p in stored]
    for name, value in model.state_dict().items():
        if name not in by_name:  # a persistent buffer: real, small, made by the constructor
            entries.append(_Entry(name, list(value.shape), value.dtype, lambda value=value: value))
    return entries


def _stored_dtype(entry: dict) -> torch.dtype:
    dtype = getattr(torch, str(entry.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or dtype not in SAFETENSORS_NAMES.values():
        raise CheckpointError(f"parameter {entry['name']} has dtype {entry.get('dtype')!r}, which cannot be exported")
    return dtype


def _plan_shards(entries: list[_Entry], max_shard_bytes: int) -> list[tuple[str, list[_Entry]]]:
    """Safetensors files of at most ``max_shard_bytes`` of tensors (a larger tensor gets its own), named as
    Hugging Face names them."""
    groups: list[list[_Entry]] = [[]]
    for entry in entries:
        if groups[-1] and sum(e.nbytes for e in groups[-1]) + entry.nbytes > max_shard_bytes:
            groups.append([])
        groups[-1].append(entry)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    return list(zip(names, groups))


def _placeholders(group: list[_Entry]) -> dict[str, torch.Tensor]:
    return {e.name: torch.empty(e.shape, dtype=e.dtype, device="meta") for e in group}


def _file_bytes(group: list[_Entry]) -> int:
    """The size of the safetensors file holding ``group``."""
    return _safetensors_header(_placeholders(group), {"format": "pt"})[1]


def _write_shards(shards: list[tuple[str, list[_Entry]]], out_dir: str) -> None:
    """The planned safetensors files and, for more than one, the index Hugging Face loads them by; each tensor
    is read just before it is written."""
    entries = [e for _, group in shards for e in group]
    progress = tqdm(total=sum(e.nbytes for e in entries), unit="B", unit_scale=True, desc="export", disable=None)
    for name, group in shards:
        _write_file(os.path.join(out_dir, name), group, progress)
    progress.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                 "weight_map": {e.name: name for name, group in shards for e in group}}
        with open(os.path.join(out_dir, INDEX), "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True))  # one write: fsynced with the others before publishing


def _write_file(path: str, group: list[_Entry], progress: Any) -> None:
    header, _ = _safetensors_header(_placeholders(group), {"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        for entry in group:
            tensor = entry.read()
            if list(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                raise CheckpointError(f"{entry.name} reads as {list(tensor.shape)} {tensor.dtype}, expected "
                                      f"{entry.shape} {entry.dtype}")
            f.write(_raw_bytes(tensor))
            progress.update(entry.nbytes)
        f.flush()
        os.fsync(f.fileno())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zo2_deepspeed.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a global_step{N} directory, or the save_dir with a 'latest' file")
    parser.add_argument("out_dir", help="where to write the Hugging Face model directory")
    parser.add_argument("--tokenizer", default=None, help="copy this tokenizer (a model directory) alongside")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the files against their checksums (saves reading them twice)")
    parser.add_argument("--max-shard-bytes", dest="max_shard_bytes", type=int, default=MAX_SHARD_BYTES,
                        help=f"tensor bytes per safetensors file (default {MAX_SHARD_BYTES:,})")
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint, args.out_dir, args.tokenizer, verify=args.verify,
               max_shard_bytes=args.max_shard_bytes)
    except (CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # reading the checkpoint or the tokenizer
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Saving the trained model from the engine: snapshots, the consolidated state dict, save_16bit_model, save_pretrained.

``ModelSaving`` is a mixin of ``ZO2Engine`` (the engine's methods of the same names, as DeepSpeed
and Hugging Face callers meet them). It streams the parameters through the pipeline block by block
(``BlockPipeline.read_parameters``), so a partitioned model is never whole on the device, and it
refuses a save_pretrained whose gathered state dict would not fit in host memory. The engine fields it
uses are declared in ``EngineState`` (engine_state.py).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from .checkpoint import together
from .checkpoint.durable import fsync_dir, make_dirs
from .engine_state import EngineState
from .errors import NotSupportedError
from .hostmem import available_host_bytes
from .step_report import log_rank0


class ModelSaving(EngineState):
    """The engine's model-export surface: snapshots, consolidated state dicts, save_pretrained."""

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        """True for stage 3: Accelerate then saves ``_zero3_consolidated_16bit_state_dict()``, not the partitions."""
        return self.settings.zero_stage == 3

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor]:
        """The full, up-to-date state dict on rank 0 (empty elsewhere), as DeepSpeed's ZeRO-3 save path returns it.

        Every rank must call it (parameters are gathered block by block). The name is DeepSpeed's;
        the tensors keep their stored dtype.
        """
        state = self.consolidated_state_dict(rank0_only=True)
        if exclude_frozen_parameters:
            frozen = {n for n, p in self.module.named_parameters(remove_duplicate=False) if not p.requires_grad}
            state = {k: v for k, v in state.items() if k not in frozen}
        return state

    def save_16bit_model(self, save_dir: str, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        """Write the up-to-date full state dict to ``save_dir/save_filename`` (rank 0), as DeepSpeedEngine does.

        Every rank must call it (parameters are gathered block by block). The tensors keep their stored
        dtype. The file is written with ``torch.save`` (a state dict of tensors, which
        ``torch.load(weights_only=True)`` reads) or, for a ``.safetensors`` name, with safetensors; it is
        written beside its target and renamed over it, so a failed save leaves an earlier file intact.
        Unlike DeepSpeed at stage 3, nothing depends on ``stage3_gather_16bit_weights_on_model_save``: the
        block-by-block gather needs one block on the device. Returns True.
        """
        path = Path(save_dir) / save_filename
        together(self.world_size, f"save_16bit_model to {path}", self._check_room_for_whole_model)
        state = self._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=exclude_frozen_parameters)

        def write() -> None:
            if self.global_rank == 0:
                log_rank0(f"ZO2Engine: saving the model's weights to {path} (step {self.global_steps})")
                _write_state_dict(state, path)

        together(self.world_size, f"save_16bit_model to {path}", write)
        return True

    def save_fp16_model(self, save_dir: str, save_filename: str = "pytorch_model.bin") -> bool:
        """DeepSpeed's former name of ``save_16bit_model``."""
        return self.save_16bit_model(save_dir, save_filename)

    def module_state_dict(self, destination: Optional[dict] = None, prefix: str = "", keep_vars: bool = False,
                          exclude_frozen_parameters: bool = False) -> dict[str, Any]:
        """``module.state_dict()`` with the pending update applied, for whole (resident) parameters.

        A partitioned tier's module holds only partitions, and gathering them is collective, so there it
        is refused: ``consolidated_state_dict()`` or ``save_16bit_model()``, called on every rank, gather.
        """
        if self.settings.tier != "resident":
            raise NotSupportedError(
                f"ZO2Engine.module_state_dict() is not supported on the {self.settings.tier} tier: the module holds "
                f"ZeRO-3 partitions; call consolidated_state_dict() or save_16bit_model() on every rank, which gather "
                f"them block by block")
        self.flush()
        state = self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        if exclude_frozen_parameters:
            for name, p in self.module.named_parameters():
                if not p.requires_grad:
                    state.pop(prefix + name, None)
        return state

    def parameter_snapshot(self, names: Optional[Iterable[str]] = None, rank0_only: bool = False
                           ) -> dict[str, torch.Tensor]:
        """Up-to-date full copies (on CPU) of the model's parameters, by their first qualified name.

        Streams block by block like a forward, so a partitioned model is never whole on the device.
        Every rank must call it (gathers are collective); with ``rank0_only`` the others keep nothing.
        """
        wanted = set(names) if names is not None else None
        keep = not rank0_only or self.global_rank == 0
        out: dict[str, torch.Tensor] = {}

        def visit(slot: Any, tensor: torch.Tensor) -> None:
            if keep and (wanted is None or slot.name in wanted):
                out[slot.name] = tensor.detach().to("cpu", copy=True)

        self.pipeline.read_parameters(visit)
        return out

    def consolidated_state_dict(self, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """The module's full state dict (every parameter name, tied ones included, and persistent buffers)."""
        snapshot = self.parameter_snapshot(rank0_only=rank0_only)
        if rank0_only and self.global_rank != 0:
            return {}
        canonical = {id(s.param): s.name for s in self.pipeline.slots}
        state = {name: snapshot[canonical[id(p)]]
                 for name, p in self.module.named_parameters(remove_duplicate=False)}
        for name, value in self.module.state_dict().items():
            if name not in state:
                state[name] = value.detach().to("cpu", copy=True)
        return state

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True, **kwargs: Any) -> None:
        """Export the up-to-date model as a Hugging Face directory that loads without zo2_deepspeed.

        Parameters are gathered block by block; rank 0 writes (safetensors by default) into a hidden sibling
        directory, after checking the space, and moves the files into ``save_directory`` (other files there,
        such as a tokenizer, are kept; earlier weight files are replaced): a full disk raises an ExportError
        naming the directory and the bytes needed, and leaves the directory as it was. The ranks then meet
        as after a checkpoint save: a failure on rank 0 raises on every rank, a dead rank gives a RankSyncError.
        """
        together(self.world_size, f"save_pretrained to {save_directory}", self._check_room_for_whole_model)
        state = self.consolidated_state_dict(rank0_only=True)

        def write() -> None:
            if self.global_rank != 0:
                return
            if not hasattr(self.module, "save_pretrained"):
                raise TypeError(f"{type(self.module).__name__} has no save_pretrained(); use "
                                f"consolidated_state_dict() and save it yourself")
            from .export_dir import staged_export
            stored = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
            with staged_export(save_directory, list(stored.values()), replace=False) as staging:
                self.module.save_pretrained(str(staging), state_dict=state, safe_serialization=safe_serialization,
                                            **kwargs)

        together(self.world_size, f"save_pretrained to {save_directory}", write, last=True)

    def _check_room_for_whole_model(self) -> None:
        """Refuse, on rank 0, a save_pretrained whose gathered state dict would not fit in host memory.

        Without this a model trained beyond RAM (the NVMe tier) ends its run killed by the OOM killer at
        the final save, instead of with an error that leaves the engine usable and names the path that
        works: a checkpoint, exported tensor by tensor.
        """
        if self.global_rank != 0:
            return
        available = available_host_bytes()
        if available is None:
            return
        needed = sum(s.numel * self.tier.work_dtype(s).itemsize for s in self.pipeline.slots)
        if needed > available:
            raise MemoryError(
                f"save_pretrained gathers the whole model in rank 0's memory ({needed / 2**30:.1f} GiB of "
                f"parameters), but only {available / 2**30:.1f} GiB is available: save a checkpoint with "
                f"engine.save_checkpoint(dir) and export it tensor by tensor with "
                f"`python -m zo2_deepspeed.export dir out_dir` (the memory of its largest tensor)")


def _write_state_dict(state: dict[str, torch.Tensor], path: Path) -> None:
    """``state`` to ``path`` by a rename of a finished, synced file beside it (safetensors for a .safetensors name);
    the directory is synced after the rename, so a power loss cannot undo it."""
    make_dirs(path.parent)
    partial = path.with_name(f".{path.name}.partial")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            seen: set[int] = set()
            unshared = {}
            for name, tensor in state.items():  # tied weights share storage, which safetensors refuses
                key = tensor.untyped_storage().data_ptr()
                unshared[name] = tensor.clone() if key in seen else tensor.contiguous()
                seen.add(key)
            save_file(unshared, str(partial), metadata={"format": "pt"})
        else:
            torch.save(state, partial)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
        fsync_dir(path.parent)
    finally:
        partial.unlink(missing_ok=True)

"""The first-order tail as the engine sees it: built from ``zo2.first_order``, driven at each forward and step.

A ZO step already runs the last blocks and the head on the device, for every perturbation group, when it
computes the group losses. ``FirstOrderPart`` makes that suffix a first-order tail: it stays resident,
runs with autograd on the body's outputs (``tail``), and its backward, inside the same training forward,
reaches only the tail's parameters; no forward is added. At the step the gradient is reduced and
normalised (``gradient``), clipped, and applied by the tail's own optimizer and scheduler (``optim``) to
fp32 masters (``residency``); the ZO body gets its update from the same forwards as before. Which blocks
form the tail, and what happens to tied weights: ``selection``.

Call order: ``FirstOrderPart(config, model, blocks, micro_batch)`` before the pipeline is built (the tail's parameters
leave ZO), ``attach`` once the pipeline exists (pins the tail, builds the optimizer, logs the memory line);
then per micro-batch ``before_forward`` and ``backward``, at each accumulation boundary ``reduce`` and
then ``step`` or ``discard``; ``write_through`` before the host reads the tier, ``close`` at the end.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..blocks import Block
from ..distributed import ParallelGrid
from ..errors import CheckpointError, ConfigError
from ..loss import LossFn
from .gradient import TailGradient
from .objective import tail_objective
from .optim import build_optimizer, build_scheduler, clip, scheduler_class
from .residency import TailResidency
from .selection import mark_first_order, select_tail
from .settings import SECTION, optimizer_kind
from .tail import TailRunner


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _logger():
    from deepspeed.utils import logger
    return logger


class FirstOrderPart:
    """The tail's selection, residency, gradient, optimizer and scheduler, and their checkpoint state."""

    def __init__(self, config: Any, model: nn.Module, blocks: list[Block], micro_batch: int) -> None:
        if config.chunk_rows is not None and micro_batch % config.chunk_rows:
            raise ConfigError(f"{SECTION}.chunk_rows {config.chunk_rows} does not divide "
                              f"train_micro_batch_size_per_gpu {micro_batch}: each chunk is a fixed set of rows of "
                              f"a micro-batch")
        if config.scheduler is not None:
            scheduler_class(config.scheduler)
        self.config = config
        self.selection = select_tail(model, blocks, config)
        mark_first_order(self.selection)
        self.offload = config.offload_optimizer.get("device", "none") == "cpu"
        self.residency: Optional[TailResidency] = None
        self.gradient: Optional[TailGradient] = None
        self.runner: Optional[TailRunner] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.lr_scheduler: Any = None
        self.weights: list[float] = []
        self.memory: dict[str, Any] = {}
        """Bytes and device of the tail's parameters, masters, gradient accumulator, optimizer state and
        activations (these measured at the first training forward)."""
        self.last: dict[str, Any] = {}
        """The last step's gradient norm (before clipping) and lr."""
        self._grads: Optional[list[torch.Tensor]] = None
        self._rank = 0

    # ------------------------------------------------------------------ construction
    def attach(self, pipeline: Any, method: Any, grid: ParallelGrid, device: torch.device, rank: int) -> None:
        """Pin the tail on the device and build what trains it; logs the choices and the memory line on rank 0."""
        config, selection = self.config, self.selection
        self._rank = rank
        master_device = torch.device("cpu") if self.offload else torch.device(device)
        self.residency = TailResidency(selection.blocks, selection.first_order, pipeline.movement, pipeline.tier,
                                       master_device, bool(config.offload_optimizer.get("pin_memory", False)))
        self.residency.pin()
        self.gradient = TailGradient(selection.first_order, torch.device(device), grid)
        self.runner = TailRunner(selection.blocks, selection.first_order, self.gradient, config.chunk_rows)
        self.runner.meter.enabled = True  # the first training forward measures the tail's activations
        self.runner.meter.exclude = {s.compute.untyped_storage().data_ptr() for s in self.residency.slots}
        self.weights = list(method.tail_weights())
        self.optimizer = build_optimizer(config.optimizer, self.residency.masters, self.offload)
        self.lr_scheduler = build_scheduler(config.scheduler, self.optimizer)
        pipeline.tail = self.runner
        self.memory = self._memory()
        if rank == 0:
            self._log_choices()

    def _memory(self) -> dict[str, Any]:
        residency = self.residency
        held = residency.bytes_by_kind()
        numel = self.selection.first_order_numel
        kind = optimizer_kind(self.config.optimizer)
        params = self.config.optimizer.get("params", {})
        per_param = 8 if kind in ("adam", "adamw") else (4 if params.get("momentum") else 0)
        return {"parameters": held["parameters"], "masters": held["masters"],
                "gradients": (self.gradient.flat.numel() * 8, self.gradient.flat.device),
                "optimizer_state": (numel * per_param, residency.master_device),
                "activations": (None, self.gradient.flat.device)}

    def _log_choices(self) -> None:
        selection, config = self.selection, self.config
        for slot in selection.tied:
            others = [b.name for b in slot.owners if b not in selection.blocks]
            _logger().warning(f"{SECTION}: {slot.name} is tied: blocks {others} of the ZO body use it too; it trains "
                              f"first-order from the tail's gradient only, and the body uses it unperturbed (no ZO "
                              f"perturbation or update, no gradient from its use there)")
        _logger().warning(self.memory_line())  # at WARNING, as the config switch's banner: shown by default

    def memory_line(self) -> str:
        """One line: the tail's blocks, and bytes and device of its parameters, gradients, optimizer state and
        activations."""
        def part(name: str) -> str:
            size, device = self.memory[name]
            return f"{name.replace('_', ' ')} {'measured at the first step' if size is None else _mib(size)} " \
                   f"on {device}"
        selection = self.selection
        optimizer = f"{self.config.optimizer.get('type', 'AdamW')}{' (CPU Adam)' if self._cpu_adam() else ''}"
        return (f"ZO2Engine first-order tail: blocks [{', '.join(b.name for b in selection.blocks)}], "
                f"{selection.first_order_numel:,} first-order parameters ({selection.numel / selection.model_numel:.1%}"
                f" of the model, cap {self.config.max_fraction:g}); {part('parameters')}, fp32 masters "
                f"{_mib(self.memory['masters'][0])} on {self.memory['masters'][1]}, gradients (float64 sums) "
                f"{_mib(self.memory['gradients'][0])} on {self.memory['gradients'][1]}, optimizer state {optimizer} "
                f"{_mib(self.memory['optimizer_state'][0])} on {self.memory['optimizer_state'][1]}, "
                f"{part('activations')}")

    def _cpu_adam(self) -> bool:
        return self.offload and optimizer_kind(self.config.optimizer) in ("adam", "adamw")

    # ------------------------------------------------------------------ a micro-batch
    def before_forward(self, share: range) -> None:
        """This rank runs the groups ``share`` of the step: their gradient weights."""
        self.runner.weights = self.weights[share.start:share.stop]

    def backward(self, outputs: Any, batch: Any, rows_per_group: int, loss_fn: Optional[LossFn]) -> None:
        """The tail's backward from the forward that just ran (its graph is freed here)."""
        runner = self.runner
        try:
            with runner.meter.scope():
                total, count = tail_objective(outputs, batch, runner.weights, rows_per_group, loss_fn)
            if total is not None:
                if not total.requires_grad:
                    raise ConfigError(f"{SECTION}: the loss does not depend on the first-order tail "
                                      f"[{', '.join(runner.names)}] (no gradient reached it)")
                total.backward()
            self.gradient.add_count(count)
        finally:
            runner.end_pass()
        if runner.meter.enabled:
            runner.meter.enabled = False
            self.memory["activations"] = (runner.meter.bytes, self.memory["activations"][1])
            if self._rank == 0:
                _logger().warning(f"ZO2Engine first-order tail: activations kept for its backward at the first step: "
                                  f"{_mib(runner.meter.bytes)} on {self.memory['activations'][1]}")

    # ------------------------------------------------------------------ the step
    def reduce(self, step: int, items: Optional[int] = None) -> tuple[Optional[str], int]:
        """Every rank, at each accumulation boundary: sum the gradient over the ranks and normalise it.

        ``items``: the step's item count of the ZO part's reduction (``comm.reduce_and_divide``), which the
        tail's own count must equal: both divide the same loss. Returns (a reason to skip the step, or None;
        bytes this rank all-reduced)."""
        sent = self.gradient.reduce(f"all-reduce of the first-order tail's gradient at step {step}")
        if items is not None and self.gradient.count != items:
            raise RuntimeError(f"{SECTION}: the tail counted {self.gradient.count:g} items at step {step}, the ZO "
                               f"losses {items}: they must divide the same loss")
        self._grads, reason = self.gradient.finish()
        return reason, sent

    def step(self) -> None:
        """Clip, apply the optimizer and the scheduler, and bring the resident tensors up to the masters."""
        masters = self.residency.masters
        for master, grad in zip(masters, self._grads):
            master.grad = grad.to(master.device)
        norm = clip(masters, self.config.gradient_clipping)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.residency.publish()
        self.discard()
        self.last = {"grad_norm": norm, "lr": float(self.optimizer.param_groups[0]["lr"])}

    def discard(self) -> None:
        """Forget the step's gradient (a skipped step)."""
        self.gradient.clear()
        self._grads = None

    # ------------------------------------------------------------------ the tier and the end
    def write_through(self, step: int) -> None:
        self.residency.write_through(step)

    def close(self, step: int) -> None:
        if self.residency is not None:
            self.residency.release(step)

    # ------------------------------------------------------------------ checkpoints (checkpoint.FirstOrderState)
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Masters that the stored parameters cannot hold exactly, optimizer state, accumulated gradient."""
        out = {f"master/{self.selection.first_order[i].name}": self.residency.masters[i] for i in self._saved_masters()}
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    out[f"optimizer/{index}/{key}"] = value
        if not self.gradient.empty:
            out["accumulated"] = self.gradient.state()
        return out

    def _saved_masters(self) -> list[int]:
        """First-order parameters whose master the stored parameter does not hold exactly (16-bit storage)."""
        tier = self.residency.tier
        return [i for i, slot in enumerate(self.selection.first_order) if tier.storage_dtype(slot) != torch.float32]

    def checkpoint_state(self) -> dict:
        state = self.optimizer.state_dict()
        scalars = {str(i): {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)}
                   for i, s in state["state"].items()}
        scheduler = self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None
        return {"parameters": [s.name for s in self.selection.first_order],
                "masters": [self.selection.first_order[i].name for i in self._saved_masters()],
                "param_groups": state["param_groups"],
                "state_scalars": scalars, "state_tensors": {str(i): sorted(k for k, v in s.items()
                                                                          if isinstance(v, torch.Tensor))
                                                          for i, s in state["state"].items()},
                "lr_scheduler": scheduler, "accumulated": not self.gradient.empty}

    def reload(self) -> None:
        self.residency.reload()

    def load_checkpoint_state(self, read: Callable[[str], torch.Tensor], state: dict) -> None:
        names = [s.name for s in self.selection.first_order]
        if state["parameters"] != names:
            raise CheckpointError(f"the checkpoint's first-order tail trains {state['parameters'][:3]}..., this "
                                  f"engine's {names[:3]}...: load it with load_optimizer_states=False")
        saved = set(state["masters"])
        self.residency.load_masters({i: read(f"master/{n}") for i, n in enumerate(names) if n in saved})
        optimizer_state = {"param_groups": state["param_groups"], "state": {}}
        for index, keys in state["state_tensors"].items():
            entry = dict(state["state_scalars"].get(index, {}))
            entry.update({key: read(f"optimizer/{index}/{key}") for key in keys})
            optimizer_state["state"][int(index)] = entry
        self.optimizer.load_state_dict(optimizer_state)
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.gradient.clear()
        if state.get("accumulated"):
            self.gradient.load(read("accumulated"))

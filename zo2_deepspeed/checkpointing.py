"""The engine's DeepSpeed checkpoint methods: ``save_checkpoint`` and ``load_checkpoint``.

``Checkpointing`` is a mixin of ``ZO2Engine``. The ``checkpoint`` package does the work and never
sees the engine: ``_checkpoint_subject`` hands it what it reads and restores (the tier, the slots, the
counters, the run's settings, optimizer, scheduler and data loader) and callbacks to set the counters
and drop the pending update.
"""
from __future__ import annotations

from typing import Any, Optional

from .checkpoint import CheckpointSubject, Counters, RunSettings
from .engine_state import EngineState
from .errors import CheckpointError
from .loss import LossSums


class Checkpointing(EngineState):
    """``save_checkpoint`` / ``load_checkpoint`` with DeepSpeed's signatures, over the checkpoint package."""

    def save_checkpoint(self, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
        """DeepSpeed-layout checkpoint (``global_step{N}`` tags, ``latest``), written atomically by every rank."""
        from .checkpoint import save_checkpoint
        self.flush()
        return save_checkpoint(self._checkpoint_subject(), save_dir, tag, client_state, save_latest,
                               exclude_frozen_parameters)

    def load_checkpoint(self, load_dir: str, tag: Optional[str] = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, verify: bool = True,
                        **kwargs: Any) -> tuple[Optional[str], Optional[dict]]:
        """Resume from ``save_checkpoint``'s output (a save_dir, or a tag directory given directly): (checkpoint
        path, client_state).

        As in DeepSpeed, a missing or empty ``load_dir`` is a fresh start: (None, None), with a warning on rank
        0. A path that exists but holds no checkpoint raises a CheckpointError naming it. ``verify=False``
        skips comparing the files with the checksums recorded at save."""
        from .checkpoint import load_checkpoint
        return load_checkpoint(self._checkpoint_subject(), load_dir, tag, load_module_strict, load_optimizer_states,
                               load_lr_scheduler_states, load_module_only, verify=verify)

    def _checkpoint_subject(self) -> CheckpointSubject:
        """What the checkpoint package reads from and restores into this engine (it never sees the engine)."""
        config = getattr(self.module, "config", None)

        def restore_counters(c: Counters) -> None:
            self.global_steps, self.global_samples, self.micro_steps = c.global_steps, c.global_samples, c.micro_steps
            self.skipped_steps, self.consecutive_skips = c.skipped_steps, c.consecutive_skips
            # a save inside a gradient-accumulation window: its record of the group losses so far
            if c.accumulated is not None and "sums" not in c.accumulated:
                raise CheckpointError("the checkpoint was saved inside a gradient-accumulation window by a version "
                                      "that averaged per-micro-batch losses; resume it with that version, or from "
                                      "a checkpoint saved at an accumulation boundary")
            self._loss_tally = LossSums.from_state(c.accumulated) if c.accumulated else None

        def drop_pending_update() -> None:
            self.pipeline.pending = None
            self.pipeline.perturbation.discard_held_updates()  # LOZO's U_acc: the stored copies are rewritten

        return CheckpointSubject(
            rank=self.global_rank, world_size=self.world_size, store=self.tier, slots=self.pipeline.slots,
            counters=Counters(self.global_steps, self.global_samples, self.micro_steps, self.skipped_steps,
                              self.consecutive_skips,
                              self._loss_tally.state() if self._loss_tally is not None else None),
            settings=RunSettings(
                method=self.zo2.method, zo2=self.zo2.model_dump(), tier=self.settings.tier,
                state_names=sorted(self.method.state_init),
                batch={"micro": self.train_micro_batch_size_per_gpu(),
                       "gradient_accumulation_steps": self.gradient_accumulation_steps()},
                module_config=config.to_dict() if hasattr(config, "to_dict") else None),
            optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, data_loader=self.training_dataloader,
            restore_counters=restore_counters, drop_pending_update=drop_pending_update,
            first_order=getattr(self, "first_order", None))

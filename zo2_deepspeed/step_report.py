"""What a finished step reports: ``engine.last_step``, the ``steps_per_print`` line and DeepSpeed's monitor.

``StepReporting`` is a mixin of ``ZO2Engine``; ``apply_log_level`` makes DeepSpeed's logger show the
config's ``log_level`` (the engine applies it at construction and before each printed step).
The engine fields it uses are declared in ``EngineState`` (engine_state.py).
"""
from __future__ import annotations

import time
from typing import Any, Optional

import torch

from .engine_state import EngineState


def log_rank0(message: str) -> None:
    from deepspeed.utils import log_dist
    log_dist(message, ranks=[0])


def apply_log_level(level: Optional[str]) -> None:
    """DeepSpeed's logger at the config's ``log_level`` (as DeepSpeedEngine applies it), and its handlers at the
    logger's level.

    DeepSpeed makes its logger with a stdout handler at WARNING; ``logger.setLevel(logging.INFO)`` (what the HF
    Trainer's deepspeed_init does too) then lets INFO records through the logger but the handler drops them, so
    the ``steps_per_print`` lines never appeared. A handler stricter than the logger is lowered to it; a
    handler a user set less strict is left alone.
    """
    from deepspeed.utils import logger, set_log_level_from_string
    if level is not None:
        set_log_level_from_string(str(level))
    for handler in logger.handlers:
        if handler.level > logger.getEffectiveLevel():
            handler.setLevel(logger.getEffectiveLevel())


def _window_text(record: dict) -> str:
    """``window=k:i/ν merged=…MiB `` under LOZO's window write-back, else nothing."""
    window = record.get("window")
    if window is None:
        return ""
    return (f"window={window['index']}:{window['position']}/{window['steps']} "
            f"merged={record['bytes_merged'] / 2**20:.1f}MiB ")


class StepReporting(EngineState):
    """The engine's per-step record and its log line and monitor events."""

    def _record_step(self, losses: torch.Tensor, estimate: Any, skip: Optional[str], total: Any = None) -> None:
        """``total``: the step's reduced ``loss.LossSums`` (its samples: rows over every micro-batch and replica,
        and its items: the tokens, or loss_fn values, its losses average over)."""
        moved = self.tier.stats.since(self._step_movement)
        self.last_step = {
            "step": self.global_steps,
            "loss": estimate.loss,
            "group_losses": losses.tolist(),
            "samples": total.rows if total is not None else None,
            "items": total.items if total is not None else None,
            "projected_grad": [c for _, c in estimate.terms],
            "skipped": bool(skip),
            "lr": self.get_lr()[0],
            "bytes_read": moved.bytes_read,
            "bytes_written": moved.bytes_written,
            "bytes_merged": moved.bytes_merged,
            "bytes_gathered": moved.bytes_gathered,
            "block_fetches": moved.block_fetches,
            "noise_elements": self.noise.elements_generated - self._step_noise,
            "phase_s": vars(self.pipeline.settle_times().since(self._step_times)),
            "step_time_s": time.perf_counter() - (self._step_started or time.perf_counter()),
        }
        if self.zo2.window_write_back:  # LOZO's window write-back: where this step sits in its lazy window
            nu = self.zo2.lazy_steps
            self.last_step["window"] = {"index": self.global_steps // nu, "position": self.global_steps % nu,
                                        "steps": nu}

    def _report(self) -> None:
        s = self.last_step
        if self.global_steps % self.steps_per_print() == 0:
            apply_log_level(None)  # a level set on DeepSpeed's logger after initialize
            log_rank0(f"step={self.global_steps} loss={s['loss']:.4f} lr={s['lr']:.3g} skipped={self.skipped_steps} "
                       f"moved={(s['bytes_read'] + s['bytes_written']) / 2**20:.1f}MiB "
                       f"{_window_text(s)}time={s['step_time_s']:.2f}s")
        if self.monitor.enabled and self.global_rank == 0:
            x = self.global_samples
            self.monitor.write_events([("Train/Samples/train_loss", s["loss"], x), ("Train/Samples/lr", s["lr"], x),
                                       ("Train/Samples/bytes_moved", s["bytes_read"] + s["bytes_written"], x),
                                       ("Train/Samples/skipped_steps", self.skipped_steps, x)])

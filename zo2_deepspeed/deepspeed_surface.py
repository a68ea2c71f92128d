"""The parts of ``DeepSpeedEngine``'s surface that mean little for a ZO engine but that loops and libraries call.

``DeepSpeedSurface`` is a mixin of ``ZO2Engine``: batch-size and ZeRO getters read from the config,
the accumulation boundary, ``get_lr`` / ``get_global_grad_norm`` / ``was_step_applied`` from the last
step, ``train``/``eval``, and the first-order calls that have nothing to do here (``zero_grad``,
``backward``, ``no_sync``) or are refused (``compile``). HF Trainer, Accelerate and DeepSpeed loops
call them as they would on a DeepSpeedEngine.
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Iterator, Optional

from .config import ConfigError

if TYPE_CHECKING:
    from .engine import ZO2Engine


class DeepSpeedSurface:
    """DeepSpeedEngine's getters and first-order calls, answered for a zeroth-order engine."""

    def train_batch_size(self) -> int:
        return self._config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._config.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        return self._config.gradient_accumulation_steps

    def steps_per_print(self) -> int:
        """How often the step line is logged: ``zo2.steps_per_print``, else DeepSpeed's (Accelerate sets it to inf)."""
        return self.zo2.steps_per_print or self._config.steps_per_print or 10

    def is_gradient_accumulation_boundary(self) -> bool:
        """The boundary set by ``set_gradient_accumulation_boundary``, else the micro-step counter's."""
        if self._boundary is not None:
            return self._boundary
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """Let the caller decide where accumulation ends (Accelerate sets it before every backward).

        Accelerate then calls ``step()`` only at boundaries, including the short accumulation at the
        end of an epoch; the step averages the group losses of however many forwards it saw.
        """
        self._boundary = bool(is_boundary)

    def zero_optimization_stage(self) -> int:
        return self.settings.zero_stage

    def zero_optimization_partition_weights(self) -> bool:
        return self.settings.zero_stage == 3

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> Optional[float]:
        """Norm of the last step's projected gradient (the directional-derivative estimates); None before one.

        This is what a ZO step knows of the gradient (MeZO: one number per step). The full estimate
        Σ c·z is this times about √(trainable parameters). The HF Trainer logs it as ``grad_norm``.
        """
        if not self.last_step or self.last_step.get("skipped"):
            return None
        return math.sqrt(sum(float(c) ** 2 for c in self.last_step["projected_grad"]))

    def was_step_applied(self) -> bool:
        return bool(self.last_step) and not self.last_step.get("skipped", False)

    def train(self, mode: bool = True) -> "ZO2Engine":
        """ZO mode (perturbed groups) or plain forwards; the model itself always runs without dropout."""
        self.training = mode
        self.module.eval()
        return self

    def eval(self) -> "ZO2Engine":
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No gradients exist; kept for loops written for first-order engines."""

    def backward(self, loss: Any = None, retain_graph: bool = False, scale_wrt_gas: bool = True) -> Any:
        """Nothing to do: the ZO step needs only the forwards that already ran; returns ``loss`` as given.

        No autograd runs, so neither ``retain_graph`` nor ``scale_wrt_gas`` changes anything: the
        update comes from the group losses the forwards recorded (their token-loss sums over the
        accumulated micro-batches divided once at the boundary), never from the value or graph of ``loss``. Any scaling the
        caller applied to it (the HF Trainer divides by the accumulation steps before calling this
        with ``scale_wrt_gas=False``) affects only what the caller logs.
        """
        return loss

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Nothing to hold back: no gradients are reduced (the group losses are, once, at the boundary)."""
        yield

    def compile(self, backend: Any = None, compile_kwargs: Optional[dict] = None, **kwargs: Any) -> None:
        """Refused: the block pipeline runs Python (fetch, perturb, write back) around every block's forward."""
        raise ConfigError("torch.compile is not supported by the ZO2 engine (TrainingArguments.torch_compile, "
                          "Accelerate's dynamo_backend): turn it off")

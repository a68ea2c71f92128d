"""DeepSpeedEngine's surface answered for a zeroth-order engine: getters, first-order calls, refusals.

``DeepSpeedSurface`` is a mixin of ``ZO2Engine``. It answers the DeepSpeedEngine methods that loops and
libraries call and that have a ZO meaning: batch sizes (and changing them), the data loader, a rank's
data-parallel place (per replica under ``zo2.parallel.perturbation``), the accumulation boundary,
``get_lr`` / ``get_global_grad_norm`` / ``was_step_applied`` from the last step, precision and ZeRO
getters, ``train``/``eval``, and the first-order calls that have nothing to do here (``zero_grad``,
``backward``, ``no_sync``). Which DeepSpeedEngine name is answered how is the table in
``surface_table.py``; every name it refuses, and every public DeepSpeedEngine method it does not
list, raises a ``NotSupportedError`` saying why (installed on the engine class by ``__init_subclass__``).
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from .config import ConfigError, replicas_label
from .data import ZO2DataLoader
from .distributed import ParallelGrid
from .engine_state import EngineState
from .errors import BatchError, NotSupportedAttributeError, NotSupportedError
from .surface_table import SURFACE, Kind

if TYPE_CHECKING:
    from .engine import ZO2Engine


class ReplicaMpu:
    """``engine.mpu``: the model-parallel unit DeepSpeed code asks for a rank's data-parallel place.

    DeepSpeedEngine without an ``mpu`` answers with ``deepspeed.utils.groups``, whose data-parallel rank
    is the global rank. Here a data-parallel rank is a replica: with ``zo2.parallel.perturbation`` P the P
    ranks of a replica run the same micro-batch and share its data shard. There is no model parallelism.
    """

    def __init__(self, grid: ParallelGrid) -> None:
        self.grid = grid

    def get_data_parallel_rank(self) -> int:
        return self.grid.replica

    def get_data_parallel_world_size(self) -> int:
        return self.grid.replicas

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1


class DeepSpeedSurface(EngineState):
    """DeepSpeedEngine's getters and first-order calls, answered for a zeroth-order engine."""

    # ------------------------------------------------------------------ refusals (surface_table.SURFACE)
    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse, on the engine class, every DeepSpeedEngine method the table refuses or does not list."""
        super().__init_subclass__(**kwargs)
        if issubclass(cls, DeepSpeedEngine):
            _install_refusals(cls)

    def __getattr__(self, name: str) -> Any:
        """As DeepSpeedEngine (unknown names fall through to ``module``); a refused attribute says why."""
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            answer = SURFACE.get(name)
            if answer is not None and answer.kind is Kind.REFUSED:
                raise NotSupportedAttributeError(f"{type(self).__name__} has no attribute {name!r} (an attribute "
                                                 f"of DeepSpeedEngine): {answer.why}") from None
            raise

    # ------------------------------------------------------------------ batch sizes and data
    def train_batch_size(self) -> int:
        return self._config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._config.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        return self._config.gradient_accumulation_steps

    def get_batch_info(self) -> tuple[int, int, int]:
        """(train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps), as numbers."""
        return self.train_batch_size(), self.train_micro_batch_size_per_gpu(), self.gradient_accumulation_steps()

    def set_train_batch_size(self, train_batch_size: int) -> None:
        """Change the global batch through the accumulation steps (the micro-batch stays), as DeepSpeedEngine does.

        Boundaries keep DeepSpeed's count (``micro_steps`` modulo the accumulation steps), so the
        accumulation in progress ends at the new count; each step averages the group losses of the
        micro-batches it saw. A checkpoint records the sizes: set them again before ``load_checkpoint``.
        """
        micro = self.train_micro_batch_size_per_gpu()
        per_step = micro * self.dp_world_size
        if not _positive_int(train_batch_size) or train_batch_size % per_step:
            raise ConfigError(f"set_train_batch_size({train_batch_size!r}): the train batch must be a positive multiple "
                              f"of train_micro_batch_size_per_gpu {micro} × {self._replicas_label()} = {per_step}")
        self._config.train_batch_size = train_batch_size
        self._config.gradient_accumulation_steps = train_batch_size // per_step

    def set_train_micro_batch_size(self, micro_batch_size: int) -> None:
        """Change the micro-batch, keeping the accumulation steps, as DeepSpeedEngine does.

        Batches must then have the new size; the loader built at initialize keeps its own (build
        another with ``deepspeed_io``). A checkpoint records the sizes: set them again before
        ``load_checkpoint``.
        """
        if not _positive_int(micro_batch_size):
            raise ConfigError(f"set_train_micro_batch_size({micro_batch_size!r}): the micro-batch must be a positive "
                              f"integer")
        self._config.train_micro_batch_size_per_gpu = micro_batch_size
        self._config.train_batch_size = micro_batch_size * self.gradient_accumulation_steps() * self.dp_world_size

    def _replicas_label(self) -> str:
        return replicas_label(self.world_size, self.grid.perturbation)

    def dataloader_drop_last(self) -> bool:
        """Whether the engine's loaders drop a last partial batch (``dataloader_drop_last``, default true)."""
        return bool(self.config.get("dataloader_drop_last", True))

    def deepspeed_io(self, dataset: Any, batch_size: Optional[int] = None, route: str = "train",
                     pin_memory: bool = True, data_sampler: Any = None, collate_fn: Optional[Callable] = None,
                     num_local_io_workers: Optional[int] = None) -> ZO2DataLoader:
        """A loader sharded by data-parallel replica, as ``initialize(training_data=...)`` builds it.

        DeepSpeedEngine shards by global rank, which under ``zo2.parallel.perturbation`` would give the
        ranks of one replica different micro-batches. Route ``"train"`` reshuffles every epoch (seeded by
        ``zo2.seed``; the engine's own training loader resumes from checkpoints), ``"eval"`` and
        ``"predict"`` keep the dataset's order. ``pin_memory`` is accepted and has no effect: the engine
        copies each batch to the device itself. A sampler of one's own cannot shard by replica and is refused.
        """
        if data_sampler is not None:
            raise NotSupportedError("deepspeed_io(data_sampler=...) is not supported: the ZO engine's loader shards "
                                    "the data by data-parallel replica with its own resumable sampler")
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise BatchError(f"deepspeed_io needs a map-style dataset (with __len__ and __getitem__), got "
                             f"{type(dataset).__name__}")
        loader = ZO2DataLoader(dataset, batch_size or self.train_micro_batch_size_per_gpu(), self.grid.replicas,
                               self.grid.replica, self.zo2.seed,
                               collate_fn=collate_fn if collate_fn is not None else self.collate_fn,
                               drop_last=self.dataloader_drop_last(), shuffle=route not in ("eval", "predict"),
                               num_workers=num_local_io_workers or 0)
        if route == "train":
            loader.require_batches()
        return loader

    def steps_per_print(self) -> int:
        """How often the step line is logged: ``zo2.steps_per_print``, else DeepSpeed's (Accelerate sets it to inf)."""
        return self.zo2.steps_per_print or self._config.steps_per_print or 10

    # ------------------------------------------------------------------ a rank's place
    def get_data_parallel_rank(self) -> int:
        """This rank's data-parallel replica (of ``dp_world_size``): the index its data is sharded by.

        Without perturbation ranks it is the global rank; with ``zo2.parallel.perturbation`` P the P
        ranks of a replica answer alike (DeepSpeedEngine would answer the global rank).
        """
        return self.grid.replica

    def get_model_parallel_rank(self) -> int:
        """0: there is no model parallelism (each perturbation rank runs the whole model on its groups)."""
        return 0

    def get_tensor_parallel_rank(self) -> int:
        """0: there is no tensor parallelism."""
        return 0

    @property
    def mpu(self) -> ReplicaMpu:
        return ReplicaMpu(self.grid)

    mp_world_size = 1
    """No model parallelism."""
    sequence_parallel_size = 1
    """No sequence parallelism."""
    gradient_average = True
    """The replicas' group losses are averaged (DeepSpeed: gradients averaged, not summed)."""

    @property
    def seq_dp_world_size(self) -> int:
        """Without sequence parallelism, the data-parallel size."""
        return self.dp_world_size

    @property
    def communication_data_type(self) -> torch.dtype:
        """float64: what ranks exchange is the vector of group losses, reduced exactly in float64."""
        return torch.float64

    # ------------------------------------------------------------------ the accumulation boundary
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

    # ------------------------------------------------------------------ precision and ZeRO
    def fp16_enabled(self) -> bool:
        """Whether the blocks compute in fp16 (``zo2.compute_dtype``; by default the fp16 section's)."""
        return self.settings.compute_dtype == torch.float16

    def bfloat16_enabled(self) -> bool:
        """Whether the blocks compute in bf16 (``zo2.compute_dtype``; by default the bf16 section's)."""
        return self.settings.compute_dtype == torch.bfloat16

    def get_data_types(self) -> tuple[torch.dtype, torch.dtype]:
        """(the blocks' compute dtype, float64): across micro-batches the engine accumulates token-loss sums, in float64."""
        return self.settings.compute_dtype, torch.float64

    def zero_optimization_stage(self) -> int:
        return self.settings.zero_stage

    def zero_optimization_partition_weights(self) -> bool:
        return self.settings.zero_stage == 3

    def zero_optimization_partition_gradients(self) -> bool:
        """False at every stage: there are no gradients to partition."""
        return False

    def zero_nvme_offload_optimizer(self) -> bool:
        """False: ZO-SGD keeps no optimizer state to swap."""
        return False

    def empty_partition_cache(self) -> None:
        """Free the device buffers the pipeline keeps for reuse; parameters stay in their tier, training goes on."""
        from deepspeed.accelerator import get_accelerator
        self.pool.clear()
        get_accelerator().empty_cache()

    # ------------------------------------------------------------------ the last step
    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups] if self.optimizer is not None else []

    def get_mom(self) -> list[float]:
        """0.0 per parameter group: ZO-SGD has no momentum (an SGD with momentum is refused at initialize)."""
        return [0.0 for _ in self.optimizer.param_groups] if self.optimizer is not None else []

    def optimizer_name(self) -> Optional[str]:
        """The optimizer that trains: ``"ZOSGD"`` (whatever the config or the client named); None without one."""
        return type(self.optimizer).__name__ if self.optimizer is not None else None

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

    def get_wall_clock_timers(self) -> dict[str, float]:
        """The last step's wall-clock times in milliseconds (DeepSpeed's unit): each pipeline phase, and ``step``."""
        if not self.last_step:
            return {}
        times = {phase: 1000.0 * seconds for phase, seconds in self.last_step["phase_s"].items()}
        times["step"] = 1000.0 * self.last_step["step_time_s"]
        return times

    # ------------------------------------------------------------------ modes and first-order calls
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

    @contextlib.contextmanager
    def coalesce_grad_reduction(self) -> Iterator[None]:
        """Nothing to coalesce: the group losses are reduced once per step whatever the loop does."""
        yield

    def compile(self, backend: Any = None, compile_kwargs: Optional[dict] = None, **kwargs: Any) -> None:
        """Refused: the block pipeline runs Python (fetch, perturb, write back) around every block's forward."""
        raise ConfigError("torch.compile is not supported by the ZO2 engine (TrainingArguments.torch_compile, "
                          "Accelerate's dynamo_backend): turn it off")

    @property
    def is_compiled(self) -> bool:
        """False: ``compile`` is refused."""
        return False

    def is_deepcompile_active(self) -> bool:
        """False: DeepSpeed's compiler never runs the ZO engine."""
        return False


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# ---------------------------------------------------------------------------------------------- refusals
def _owner(cls: type, name: str) -> Optional[type]:
    """The class in ``cls``'s MRO whose own namespace defines ``name``."""
    return next((k for k in cls.__mro__ if name in vars(k)), None)


def _unreviewed(name: str) -> str:
    import deepspeed
    return (f"DeepSpeedEngine.{name} (deepspeed {deepspeed.__version__}) has not been reviewed for the ZO engine, so "
            f"DeepSpeed's code for it, written for a first-order engine, is not run (zo2_deepspeed/surface_table.py "
            f"lists the reviewed names)")


def _refusing_method(name: str, why: str) -> Callable[..., Any]:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise NotSupportedError(f"ZO2Engine.{name}() is not supported: {why}")

    refused.__name__, refused.__qualname__, refused.__doc__ = name, f"ZO2Engine.{name}", f"Refused: {why}."
    refused.refusal = why  # type: ignore[attr-defined]
    return refused


def _refusing_property(name: str, why: str) -> property:
    def refused(self: Any) -> Any:
        raise NotSupportedError(f"ZO2Engine.{name} is not supported: {why}")

    refused.refusal = why  # type: ignore[attr-defined]
    return property(refused, doc=f"Refused: {why}.")


def _install_refusals(cls: type) -> None:
    """Every public DeepSpeedEngine method or property that ``cls`` would inherit from DeepSpeedEngine and that
    the table refuses, or does not list, raises instead."""
    for name, value in vars(DeepSpeedEngine).items():
        if name.startswith("_") or _owner(cls, name) is not DeepSpeedEngine:
            continue  # private, or answered by a class of ours
        answer = SURFACE.get(name)
        if answer is not None and answer.kind is not Kind.REFUSED:
            continue  # a config getter or helper, inherited on purpose
        why = answer.why if answer is not None else _unreviewed(name)
        if isinstance(value, property):
            setattr(cls, name, _refusing_property(name, why))
        elif callable(getattr(value, "__func__", value)):
            setattr(cls, name, _refusing_method(name, why))

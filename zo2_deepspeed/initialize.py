"""``initialize``: DeepSpeed's entry point, dispatching on the config's ``"zo2"`` section.

With a "zo2" section the model trains with the ZO2 engine; without one the call goes to
``deepspeed.initialize`` unchanged, so one config key switches between ZO and first-order ZeRO.
"""
from __future__ import annotations

import contextlib
import copy
import sys
from typing import Any, Callable, Iterator, Optional

import zo2_deepspeed_autopatch as switch

from .config import (LR_REQUIRED, TrainSettings, batch_sizes_for_world, load_config, parse_config,
                     storage_settings)
from .data import require_batches
from .errors import ConfigError
from .loss import LossFn

def _resolve_config(args: Any, config: Any, config_params: Any) -> Any:
    if config is None and config_params is not None:
        config = config_params
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    if from_args is not None:
        if config is not None:
            raise ConfigError("a DeepSpeed config came both as args.deepspeed_config and as config=: pass one")
        config = from_args
    if config is None:
        raise ConfigError("no DeepSpeed config: pass config=<dict or path> or --deepspeed_config <path>")
    return config


def initialize(args: Any = None, model: Any = None, optimizer: Any = None, model_parameters: Any = None,
               training_data: Any = None, lr_scheduler: Any = None, distributed_port: int = 29500, mpu: Any = None,
               dist_init_required: Optional[bool] = None, collate_fn: Optional[Callable] = None, config: Any = None,
               mesh_param: Any = None, config_params: Any = None, loss_fn: Optional[LossFn] = None) -> tuple:
    """Same signature and 4-tuple ``(engine, optimizer, training_dataloader, lr_scheduler)`` as
    ``deepspeed.initialize``; ``loss_fn(outputs, batch) -> per-example loss`` is the one addition."""
    raw = load_config(_resolve_config(args, config, config_params))
    if model is None:
        raise ConfigError("initialize() needs a model")
    if "zo2" not in raw:
        if loss_fn is not None:
            raise ConfigError("loss_fn is a zo2 option, but the config has no 'zo2' section")
        import deepspeed

        from .distributed import ensure_distributed
        ensure_distributed()
        if args is not None and getattr(args, "deepspeed_config", None) is not None:
            args = copy.copy(args)
            args.deepspeed_config = None
        return switch.original_initialize(deepspeed)(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                           training_data=training_data, lr_scheduler=lr_scheduler, distributed_port=distributed_port,
                           mpu=mpu, dist_init_required=dist_init_required, collate_fn=collate_fn, config=raw,
                           mesh_param=mesh_param)
    if mpu is not None or mesh_param is not None:
        raise ConfigError("zo2 runs data parallel only: model/sequence parallelism (mpu, mesh_param) is not supported")
    settings = parse_config(raw)
    if "accelerate.state" in sys.modules:
        _require_accelerate_process_count(settings)
    if training_data is not None:
        if optimizer is None and settings.lr is None:
            raise ConfigError(f"{LR_REQUIRED}: training_data was given")
        _require_training_batches(training_data, settings)
    from .engine import ZO2Engine
    engine = ZO2Engine(model, settings, args=args, optimizer=optimizer, model_parameters=model_parameters,
                       training_data=training_data, lr_scheduler=lr_scheduler, collate_fn=collate_fn, loss_fn=loss_fn)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def _require_training_batches(training_data: Any, settings: TrainSettings) -> None:
    """Refuse training data that gives no micro-batch before the model is touched (a loop over it would spin)."""
    from deepspeed import comm as dist

    from .distributed import ensure_distributed
    ensure_distributed(settings.zo2.comm_timeout_s)
    world = dist.get_world_size()
    micro, _, _ = batch_sizes_for_world(settings.raw, world)
    require_batches(len(training_data), micro, world, bool(settings.raw.get("dataloader_drop_last", True)),
                    settings.zo2.parallel.perturbation)


def _require_accelerate_process_count(settings: TrainSettings) -> None:
    """Refuse a run in which Accelerate's process count is not the number of ranks, or with perturbation ranks.

    Accelerate shards its data loaders (and so the HF Trainer's) by its own process count. On a
    machine without an accelerator its DeepSpeed path starts the process group without a backend of
    its own and then counts one process, so every rank would train on the same batches.
    """
    import accelerate.state
    if not accelerate.state.is_initialized():
        return
    ranks = settings.zo2.parallel.perturbation
    if ranks > 1:  # said first: the batch-size checks below would otherwise send the user the wrong way
        raise ConfigError(
            f"zo2.parallel.perturbation is {ranks}, but the HF Trainer and Accelerate cannot drive perturbation "
            f"ranks: they shard the data by process, while the {ranks} ranks of a perturbation group must run the "
            f"same micro-batch. Set zo2.parallel.perturbation to 1 (the ranks then run data parallel), or train "
            f"with launch/train.py or a loop over the loader of zo2_deepspeed.initialize(training_data=...) "
            f"(docs/parallelism.md, Perturbation parallelism)")
    from deepspeed import comm as dist

    from .distributed import ensure_distributed
    ensure_distributed(settings.zo2.comm_timeout_s)
    counted, world = accelerate.state.PartialState().num_processes, dist.get_world_size()
    if counted != world:
        raise ConfigError(
            f"Accelerate counts {counted} process(es) but {world} ranks run, so each rank would see the batches "
            f"of the others: on a machine without an accelerator give Accelerate a process-group backend, "
            f"Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend=\"gloo\")]); with the HF Trainer "
            f"PartialState(backend=\"gloo\") before TrainingArguments(accelerator_config={{\"use_configured_state\": "
            f"True}}) (docs/huggingface.md, Accelerate)")


def patch_deepspeed() -> None:
    """Install the config switch in this process now (idempotent; done at ``import deepspeed`` when installed).

    ``deepspeed.initialize`` then dispatches on the "zo2" section (ZO2 engine with one, DeepSpeed's own
    function with the caller's arguments untouched without), and where transformers is installed the
    Trainer's ``deepspeed_init`` is wrapped for zo2 configs (``zo2_deepspeed.hf.zo2_deepspeed_init``:
    evaluate before train, train twice). Needed only where the package's .pth file is not loaded at
    interpreter start, or to switch back on after ``ZO2_DEEPSPEED_AUTOPATCH=0``.
    """
    import deepspeed

    from .hf import patch_trainer
    switch.install_deepspeed(deepspeed)
    patch_trainer()


def unpatch_deepspeed() -> None:
    """Give ``deepspeed.initialize`` (and the Trainer's ``deepspeed_init``) back; a zo2 config then stops with an error
    at DeepSpeedEngine instead of training first-order."""
    import deepspeed

    from .hf import unpatch_trainer
    switch.uninstall_deepspeed(deepspeed)
    unpatch_trainer()


@contextlib.contextmanager
def zero_init(config: Any, enabled: bool = True) -> Iterator[None]:
    """Build a model whose parameters are born as ZeRO-3 partitions in the config's tier (never whole in RAM).

    ``with zo2_deepspeed.zero_init(ds_config): model = AutoModelForCausalLM.from_pretrained(path)`` (or
    ``from_config``) — a thin wrapper over ``deepspeed.zero.Init`` with the config's ``offload_param`` and
    ``zo2.storage_dtype``; Hugging Face models load their weights shard by shard into the partitions.
    """
    if not enabled:
        yield
        return
    from .distributed import ensure_distributed
    from .partitioning import hf_zero3, init_config, zero_init_context
    raw = load_config(config)
    if "zo2" in raw:
        tier, zo2 = storage_settings(raw)  # a Trainer config's "auto" batch fields are fine here
        if tier == "resident":
            raise ConfigError("zero_init needs zero_optimization.stage 3 (parameters stored as partitions)")
        dtype, timeout = zo2.storage_torch_dtype(), zo2.comm_timeout_s
    else:
        dtype, tier, timeout = None, (raw.get("zero_optimization", {}).get("offload_param") or {}).get("device"), \
            1800.0
    ensure_distributed(timeout)
    with zero_init_context(raw, tier, dtype), hf_zero3(init_config(raw, dtype)):
        yield

"""Turning a model into ZeRO-3 partitions (or building it as partitions) with the config's tier and dtype.

``deepspeed.zero.Init(dtype=...)`` ignores an explicit dtype on accelerators without fp16 support
(the CPU accelerator then always picks bf16), so the storage dtype is passed the way DeepSpeed
honours everywhere: through the config's bf16/fp16 sections, with ``dtype=None``.
"""
from __future__ import annotations

import contextlib
import copy
import re
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .errors import ConfigError
from .tiers.partitioned import is_partitioned

_SHARD_TOO_BIG = re.compile(r"More elements (\d+) than buffer size (\d+)")


def _named_swap_error(error: AssertionError) -> Optional[ConfigError]:
    """DeepSpeed's bare assertion for an NVMe shard larger than a swap buffer, as an error naming the field."""
    match = _SHARD_TOO_BIG.search(str(error))
    if match is None:
        return None
    return ConfigError(f"zero_optimization.offload_param.buffer_size is {match[2]} elements, but a parameter's NVMe "
                       f"partition has {match[1]}: set it to at least the largest partition ({match[1]} or more)")


class _InitScope:
    """``deepspeed.zero.Init`` as a context whose NVMe buffer errors name the config field."""

    def __init__(self, init: Any) -> None:
        self.init = init

    def __enter__(self) -> Any:
        self.init.__enter__()
        self._share_swapper()
        return self.init

    def __exit__(self, kind: Any, error: Optional[BaseException], traceback: Any) -> Any:
        self._restore_swapper()
        suppressed = self.init.__exit__(kind, error, traceback)
        named = _named_swap_error(error) if isinstance(error, AssertionError) else None
        if named is not None:
            raise named from error
        return suppressed

    def _share_swapper(self) -> None:
        self._original = _share_swapper(getattr(self.init, "param_swapper", None))

    def _restore_swapper(self) -> None:
        _restore_swapper(self._original)


def _share_swapper(swapper: Any) -> Any:
    """Nested ``zero.Init`` scopes (transformers opens its own in ``from_config``/``from_pretrained``) reuse this
    scope's NVMe swapper: each new swapper would pin another buffer_count × buffer_size of RAM. Returns what
    ``_restore_swapper`` puts back."""
    from deepspeed.runtime.zero import partition_parameters
    original = partition_parameters.AsyncPartitionedParameterSwapper
    if swapper is not None:
        def shared_swapper(ds_config: Any, dtype: torch.dtype) -> Any:
            return swapper if dtype == swapper.dtype else original(ds_config, dtype)

        partition_parameters.AsyncPartitionedParameterSwapper = shared_swapper
    return original


def _restore_swapper(original: Any) -> None:
    from deepspeed.runtime.zero import partition_parameters
    partition_parameters.AsyncPartitionedParameterSwapper = original


def _track_nvme(init: Any) -> None:
    """Have the swapper's aio handles released before interpreter exit (else the process may abort)."""
    if getattr(init, "param_swapper", None) is not None:
        from .tiers.nvme_swapper import track_swapper
        track_swapper(init.param_swapper)


def init_config(raw_config: dict, storage_dtype: Optional[torch.dtype]) -> dict:
    """The config ``deepspeed.zero.Init`` (and HF's ZeRO-3 path) should see for our storage dtype.

    It has no "zo2" section: it already says what that section means for the partitions, and a
    ``zero.Init`` that transformers nests inside ours then stays DeepSpeed's own (the config switch
    redirects only configs with the section).
    """
    config = copy.deepcopy(raw_config)
    config.pop("zo2", None)
    # Init checks the batch fields against the world size, which they need not match with perturbation ranks
    # (zo2.parallel: train_batch_size counts replicas); it uses none of them, so it gets a consistent stand-in.
    for key in ("train_batch_size", "gradient_accumulation_steps"):
        config.pop(key, None)
    config["train_micro_batch_size_per_gpu"] = 1
    # Init would otherwise replace torch.nn.functional.linear process-wide; our blocks are gathered explicitly.
    config.setdefault("zero_optimization", {})["memory_efficient_linear"] = False
    if storage_dtype is not None:
        config["bf16"] = {"enabled": storage_dtype == torch.bfloat16}
        config["fp16"] = {"enabled": storage_dtype == torch.float16}
    return config


@contextlib.contextmanager
def hf_zero3(config: dict) -> Iterator[None]:
    """Tell transformers that ZeRO-3 is on while models are built inside our own ``zero.Init``.

    transformers then skips weight initialisation on empty partitions and initialises and loads
    weights through ``GatheredParameters`` (a padding row of an embedding, ``from_pretrained``
    shards); the ``zero.Init`` it opens nests inside ours, which decides tier and dtype.
    """
    try:
        from transformers.integrations import HfDeepSpeedConfig
    except ImportError:  # without transformers, plain torch modules still partition
        yield
        return
    keep_alive = HfDeepSpeedConfig(config)  # transformers holds only a weak reference to it
    try:
        yield
    finally:
        del keep_alive


def sized_swapper(config: dict, storage_dtype: Optional[torch.dtype]) -> Any:
    """The NVMe swapper for a zo2 model: swap buffers pinned per shard size as needed, not count x size up front.

    ``config`` is the one ``zero.Init`` sees (``init_config``), whose bf16/fp16 sections give the dtype.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    from .tiers.nvme_swapper import sized_swapper_class
    offload = (config.get("zero_optimization") or {}).get("offload_param") or {}
    if not offload.get("nvme_path"):
        raise ConfigError("zero_optimization.offload_param.nvme_path is required with offload_param.device nvme: "
                          "give a folder on a fast local disk")
    return sized_swapper_class()(DeepSpeedConfig(config), storage_dtype or torch.float32)


def zero_init_context(raw_config: dict, tier: str, storage_dtype: Optional[torch.dtype],
                      module: Optional[nn.Module] = None) -> Any:
    """A ``deepspeed.zero.Init`` that stores partitions in ``tier`` ("device", "cpu", "nvme") as ``storage_dtype``."""
    import deepspeed
    # zero.Init swaps torch.Tensor.__new__ while active; torch._dynamo checks that signature when first
    # imported (transformers imports it lazily with a model class), so import it before the swap.
    import torch._dynamo  # noqa: F401
    config = init_config(raw_config, storage_dtype)
    remote = None if tier in (None, "none", "device") else tier
    swapper = sized_swapper(config, storage_dtype) if tier == "nvme" and "zo2" in raw_config else None
    try:
        init = deepspeed.zero.Init(module=module, config_dict_or_path=config, remote_device=remote, dtype=None,
                                   mem_efficient_linear=False, param_swapper=swapper)
    except AssertionError as e:
        named = _named_swap_error(e)
        if named is None:
            raise
        raise named from e
    _track_nvme(init)
    return _InitScope(init)


def partition_in_place(model: nn.Module, raw_config: dict, tier: str, storage_dtype: torch.dtype) -> None:
    """Partition an already-built model's parameters that are not partitions yet (tied weights stay one)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != storage_dtype and not is_partitioned(p):
            p.data = p.data.to(storage_dtype)
    zero_init_context(raw_config, tier, storage_dtype, module=model)


# ------------------------------------------------------------------------------------- zero.Init under the switch
_switched_init_classes: dict = {}


def switched_init_class(init_class: type) -> type:
    """``deepspeed.zero.Init`` for a config with a "zo2" section: what the config switch builds instead of DeepSpeed's.

    A script that never imports zo2_deepspeed (the HF Trainer's ``from_pretrained`` under ZeRO-3, a
    DeepSpeed tutorial's ``with deepspeed.zero.Init(config_dict_or_path=...)``) then gets the
    partitions the ZO2 engine stores, from the JSON alone: in ``zo2.storage_dtype`` (DeepSpeed would
    pick fp32 unless a bf16/fp16 section is on), on zo2's NVMe swapper (buffers pinned as needed, a
    run folder of its own) with DeepSpeed's AsyncIO op loaded through ``aio_op`` (which announces a
    first, minutes-long build). The partitions are born in the storage dtype: nothing is converted
    later, so host memory peaks as it would for a model built under ``zo2_deepspeed.zero_init``.
    An explicit ``dtype``, ``param_swapper`` or ``enabled=False`` is the caller's choice and is kept.
    """
    switched = _switched_init_classes.get(init_class)
    if switched is None:
        switched = _switched_init_classes[init_class] = _make_switched_init(init_class)
    return switched


def _make_switched_init(init_class: type) -> type:
    import inspect

    import zo2_deepspeed_autopatch as switch
    signature = inspect.signature(init_class.__init__)

    class SwitchedInit(init_class):
        __doc__ = switched_init_class.__doc__

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            arguments = signature.bind(self, *args, **kwargs).arguments
            del arguments["self"]
            deprecated = arguments.pop("config", None)  # DeepSpeed's older name for config_dict_or_path
            if arguments.get("config_dict_or_path") is None:
                arguments["config_dict_or_path"] = deprecated
            self._zo2_swapper_shared = None
            if arguments.get("enabled", True) and arguments.get("dtype") is None \
                    and arguments.get("param_swapper") is None:
                arguments = _zo2_init_arguments(switch.read_config(arguments["config_dict_or_path"]), arguments)
            try:
                init_class.__init__(self, **arguments)
            except AssertionError as e:
                named = _named_swap_error(e)
                if named is None:
                    raise
                raise named from e
            _track_nvme(self)

        def __enter__(self) -> Any:
            result = super().__enter__()
            self._zo2_swapper_shared = _share_swapper(getattr(self, "param_swapper", None))
            return result

        def __exit__(self, kind: Any, error: Optional[BaseException], traceback: Any) -> Any:
            if self._zo2_swapper_shared is not None:
                _restore_swapper(self._zo2_swapper_shared)
            suppressed = super().__exit__(kind, error, traceback)
            named = _named_swap_error(error) if isinstance(error, AssertionError) else None
            if named is not None:
                raise named from error
            return suppressed

    SwitchedInit.__qualname__ = SwitchedInit.__name__ = f"SwitchedInit[{init_class.__name__}]"
    return SwitchedInit


def _zo2_init_arguments(raw: dict, arguments: dict) -> dict:
    """``zero.Init``'s arguments for the zo2 section's tier and storage dtype."""
    from .config import storage_settings
    tier, zo2 = storage_settings(raw)
    dtype = zo2.storage_torch_dtype()
    config = init_config(raw, dtype)
    arguments = dict(arguments, config_dict_or_path=config, mem_efficient_linear=False)
    if tier == "nvme":
        arguments["param_swapper"] = _active_swapper(dtype) or sized_swapper(config, dtype)
    return arguments


def _active_swapper(dtype: torch.dtype) -> Any:
    """The NVMe swapper of the ``zero.Init`` this one nests in, when it stores the same dtype (one set of buffers)."""
    from deepspeed.runtime.zero import partition_parameters
    swapper = getattr(partition_parameters.top_level_context, "param_swapper", None)
    return swapper if swapper is not None and swapper.dtype == dtype else None

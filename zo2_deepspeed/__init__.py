"""zo2_deepspeed: zeroth-order fine-tuning inside DeepSpeed, streaming ZeRO-3 partitions block by block.

A ``"zo2"`` section in the DeepSpeed config selects the ZO2 engine; without it everything is plain
DeepSpeed. See docs/config-reference.md for the config reference.
"""
from .config import ZO2Config, parse_config
from .errors import (BatchError, CheckpointError, ConfigError, ExportError, ModelStructureError, NotSupportedError,
                     RankSyncError, TrainingDivergedError, ZO2Error)
from .initialize import initialize, patch_deepspeed, unpatch_deepspeed, zero_init
from .version import __version__
from zo2_deepspeed_autopatch import SwitchError  # noqa: E402  (the config switch, loaded at interpreter start)


def __getattr__(name: str):  # the engine imports deepspeed: load it on first use only
    if name == "ZO2Engine":
        from .engine import ZO2Engine
        return ZO2Engine
    raise AttributeError(name)


__all__ = ["initialize", "patch_deepspeed", "unpatch_deepspeed", "zero_init", "ZO2Config", "ZO2Engine",
           "parse_config", "ZO2Error", "ConfigError", "BatchError", "ModelStructureError", "RankSyncError",
           "TrainingDivergedError", "CheckpointError", "ExportError", "NotSupportedError", "SwitchError", "__version__"]

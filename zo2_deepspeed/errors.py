"""Exceptions a user can catch by kind; every message names the field or input at fault."""


class ZO2Error(RuntimeError):
    """Base class of the errors raised by zo2_deepspeed."""


class ConfigError(ZO2Error, ValueError):
    """A DeepSpeed config field (standard or in the "zo2" section) has a bad or missing value."""


class BatchError(ZO2Error, ValueError):
    """A batch passed to the engine does not fit the model or the config."""


class ModelStructureError(ZO2Error):
    """The model cannot be split into blocks that stream through the device."""


class TrainingDivergedError(ZO2Error):
    """Too many consecutive steps produced a non-finite loss."""


class RankSyncError(ZO2Error):
    """Data-parallel ranks hold different parameters, or a rank stopped answering."""


class CheckpointError(ZO2Error):
    """A checkpoint is missing, incomplete, or does not match the model/config."""


class ExportError(ZO2Error):
    """A Hugging Face export could not be written (no space, an I/O error, a directory it must not replace)."""


class NotSupportedError(ZO2Error, NotImplementedError):
    """A DeepSpeedEngine method that the zeroth-order engine has no counterpart for; the message says why."""


class NotSupportedAttributeError(NotSupportedError, AttributeError):
    """A DeepSpeedEngine attribute the ZO2Engine does not have, and why.

    An AttributeError too, so ``hasattr`` and ``getattr(engine, name, default)`` behave as for any
    missing attribute.
    """

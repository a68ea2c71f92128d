"""DeepSpeed's AsyncIO op for the NVMe tier: whether it loads here, announcing its first (slow) build, handle options.

The first load on a machine compiles the op for minutes without output; every NVMe part (the swapper,
the state files, the tests' and benchmarks' availability checks) loads it through ``aio_op``.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

from ..jit_ops import build_folder, is_built, load_op


def _aio_built(builder: Any) -> bool:
    """True when loading the op will not compile it: installed with DeepSpeed, or in torch's extension cache."""
    return is_built(builder)


def aio_op() -> Any:
    """DeepSpeed's AsyncIO op module; the first load on a machine compiles it (minutes, silently), so say so.

    A lock left by a killed earlier build is removed first (``jit_ops.load_op``): the load never waits forever.
    """
    from deepspeed.ops.op_builder import AsyncIOBuilder
    from deepspeed.ops.op_builder.builder import OpBuilder
    builder = AsyncIOBuilder()
    if builder.name not in OpBuilder._loaded_ops and not _aio_built(builder):
        import logging

        from deepspeed.utils import log_dist
        log_dist(f"zo2 nvme: compiling DeepSpeed's AsyncIO op ({builder.name}) for the NVMe tier; the first build on a "
                 f"machine takes several minutes without output, later runs load it from {build_folder(builder)} "
                 f"(python -m zo2_deepspeed.prebuild builds it ahead of time)", ranks=[0], level=logging.WARNING)
    return load_op(builder)


@functools.lru_cache(maxsize=None)
def nvme_unavailable_reason() -> Optional[str]:
    """None when DeepSpeed's AsyncIO op loads here (building it once if needed), else why not."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
        builder = AsyncIOBuilder()
        if not builder.is_compatible(verbose=False):
            return "DeepSpeed's AsyncIO op is not compatible here (install libaio-dev: launch/install.sh does)"
        aio_op()
    except Exception as e:  # a missing library or a failed build, whatever DeepSpeed raises
        return f"DeepSpeed's AsyncIO op is unavailable: {e}"
    return None


def aio_options(aio_config: dict) -> dict[str, Any]:
    """Keyword arguments of DeepSpeed's ``aio_handle`` from its ``aio`` config section."""
    from deepspeed.runtime.swap_tensor import constants as c
    return dict(block_size=aio_config[c.AIO_BLOCK_SIZE], queue_depth=aio_config[c.AIO_QUEUE_DEPTH],
                single_submit=aio_config[c.AIO_SINGLE_SUBMIT], overlap_events=aio_config[c.AIO_OVERLAP_EVENTS],
                intra_op_parallelism=aio_config[c.AIO_INTRA_OP_PARALLELISM])

"""The noise kernels compile for a Hopper GPU, with the thread layout that makes them cheap.

The interpreter the other kernel tests use accepts code the GPU compiler refuses (a non-constexpr
global read inside a kernel passed there and failed here), so every variant the engine launches is
compiled ahead of time to cubin for sm_90 in a child process without ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
HAS_NVIDIA_BACKEND = (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.fixture(scope="module")
def compiled() -> dict:
    if not HAS_NVIDIA_BACKEND:
        pytest.skip("this Triton has no NVIDIA backend (ptxas) to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_compile.py"), "90"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_variant_compiles_for_sm90(compiled):
    failed = {name: result["error"] for name, result in compiled.items() if not result["ok"]}
    assert not failed, json.dumps(failed, indent=1)
    assert len(compiled) == 15


def test_full_aligned_tiles_give_each_thread_whole_generator_rows_and_vector_stores(compiled):
    """One Philox call yields a row of LANES values: a thread holding a whole Gaussian row (4 values)
    or >= 4 Rademacher lanes calls it once for all of them. Unaligned tensors still compile (scalar path)."""
    for name, result in compiled.items():
        if "start_aligned" in result:  # stochastic rounding: a row of 4 uniforms is one call
            assert result["size_per_thread"] == [1, 4] and result["vector_stores"], (name, result)
            continue
        if result["aligned"]:
            per_thread = result["size_per_thread"][-1]
            assert per_thread >= 4 and (result["lanes"] != 4 or per_thread == 4), (name, result)
            assert result["vector_stores"], (name, result)
        else:
            assert result["size_per_thread"][-1] == 1, (name, result)

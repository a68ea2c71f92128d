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
    compiled = compiled["variants"]
    failed = {name: result["error"] for name, result in compiled.items() if not result["ok"]}
    assert not failed, json.dumps(failed, indent=1)
    assert len(compiled) == 17


def test_full_aligned_tiles_give_each_thread_whole_generator_rows_and_vector_stores(compiled):
    """One Philox call yields a row of LANES values: a thread holding a whole Gaussian row (4 values)
    or >= 4 Rademacher lanes calls it once for all of them. Unaligned tensors still compile (scalar path)."""
    compiled = compiled["variants"]
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


def test_the_gaussian_full_tile_path_is_cheap_in_sass(compiled):
    """The unmasked tile (nearly every tile) with the fast sin/cos: measured in SASS for sm_90.

    Philox is ~15 instructions per element; the precise log/sin/cos with their slow paths for huge
    angles made the transform ~8x that, at 40 registers. The angle is reduced to [−π, π) and sin/cos
    run on the special-function unit: under 60 instructions per element at no more than 40 registers
    (full occupancy needs <= 64 at 128 threads per program).
    """
    fast, precise = compiled["full_tile"]["fast"], compiled["full_tile"]["precise"]
    assert fast["instructions_per_element"] <= 60, fast
    assert fast["registers"] <= 40, fast
    assert fast["instructions"] * 3 <= precise["instructions"], (fast, precise)
    # two angles per Philox row, each one MUFU.SIN and one MUFU.COS, 2 rows per thread
    assert fast["mufu"] >= precise["mufu"] + 8, (fast, precise)

"""Compiles the noise kernels for an NVIDIA GPU without one (ahead of time, to PTX and cubin).

Run as a script, outside the interpreter (``TRITON_INTERPRET`` unset): the interpreter accepts code a
GPU compiler refuses, so this is what catches such code on a machine without a GPU. Prints, per
kernel variant, whether it compiled and the thread layout and vector widths the compiler chose, and
for the full-tile Gaussian path alone the SASS instructions per element and the registers per
thread (from Triton's bundled cuobjdump), with the GPU's fast sin/cos and with the precise ones.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from zo2_deepspeed import kernels  # noqa: E402
from zo2_deepspeed.philox import GAUSSIAN_LANES, RADEMACHER_LANES  # noqa: E402

# (name, kind, terms, src dtype or None, dst dtype, scaling dtype or None): the launches the engine makes
COMBINE_VARIANTS = [
    ("perturbed copy fp32 -> fp16", "gaussian", 1, "fp32", "fp16", None),
    ("fill fp32", "gaussian", 1, None, "fp32", None),
    ("in-place shift bf16", "gaussian", 1, "bf16", "bf16", None),
    ("HiZOO update with scaling", "gaussian", 2, "fp32", "fp32", "fp32"),
    ("FZOO update, 8 directions", "rademacher", 8, "fp32", "fp32", None),
    ("rademacher perturbed copy bf16", "rademacher", 1, "bf16", "bf16", None),
]


NUM_WARPS = 4
"""Triton's default, which the launches use."""
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@triton.jit
def _full_tile_kernel(meta, factors, n_tensors, src_example, dst_example, scaling_example,
                      GAUSSIAN: tl.constexpr, LANES: tl.constexpr, ROWS: tl.constexpr, FAST_TRIG: tl.constexpr):
    """The combine kernel's unmasked branch alone (a fill of tensor 0's tile 0): what almost every tile runs."""
    kernels._combine_tile(meta, factors, n_tensors, 0, 0, ROWS * LANES, src_example, dst_example, scaling_example,
                          1, False, False, GAUSSIAN, LANES, ROWS, True, False, FAST_TRIG)


def _sass_cost(cubin: bytes) -> dict:
    """SASS instruction count (NOPs excluded), MUFU count and registers per thread of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)]
    ops = [op for op in ops if op != "NOP"]
    return {"instructions": len(ops), "mufu": sum(op.startswith("MUFU") for op in ops),
            "registers": int(re.search(r"REG:(\d+)", usage).group(1))}


def measure_full_tile(arch: int) -> dict:
    """Per element cost of the full-tile Gaussian fill, with the fast and the precise sin/cos."""
    target = GPUTarget("cuda", arch, 32)
    lanes = GAUSSIAN_LANES
    per_thread = kernels.TILE_ELEMENTS // (32 * NUM_WARPS)
    results = {}
    for fast in (True, False):
        signature = {"meta": "*i64", "factors": "*fp32", "n_tensors": "i32", "src_example": "*fp32",
                     "dst_example": "*fp32", "scaling_example": "*fp32"}
        constants = {"GAUSSIAN": True, "LANES": lanes, "ROWS": kernels.TILE_ELEMENTS // lanes, "FAST_TRIG": fast}
        signature.update({key: "constexpr" for key in constants})
        attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 3, 4, 5)}
        source = ASTSource(fn=_full_tile_kernel, signature=signature, constexprs=constants, attrs=attrs)
        cost = _sass_cost(triton.compile(source, target=target, options={"num_warps": NUM_WARPS}).asm["cubin"])
        results["fast" if fast else "precise"] = {**cost, "elements_per_thread": per_thread,
                                                  "instructions_per_element": cost["instructions"] / per_thread}
    return results


def _layout(ttgir: str) -> list[int]:
    match = re.search(r"#blocked\d* = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\]", ttgir)
    return [int(v) for v in match.group(1).split(",")] if match else []


def _summary(compiled) -> dict:
    ptx = compiled.asm["ptx"]
    return {"ok": True, "size_per_thread": _layout(compiled.asm["ttgir"]),
            "vector_stores": sorted(set(re.findall(r"st\.global\.(v\d)", ptx))),
            "cubin_bytes": len(compiled.asm["cubin"])}


def compile_all(arch: int) -> dict:
    target = GPUTarget("cuda", arch, 32)
    results = {}
    for name, kind, terms, src, dst, scaling in COMBINE_VARIANTS:
        lanes = GAUSSIAN_LANES if kind == "gaussian" else RADEMACHER_LANES
        for aligned in (True, False):
            signature = {"tiles": "*i32", "meta": "*i64", "factors": "*fp32", "n_tensors": "i32",
                         "src_example": "*" + (src or dst), "dst_example": "*" + dst,
                         "scaling_example": "*" + (scaling or dst)}
            constants = {"TERMS": terms, "HAS_SRC": src is not None, "HAS_SCALING": scaling is not None,
                         "GAUSSIAN": kind == "gaussian", "LANES": lanes, "ROWS": kernels.TILE_ELEMENTS // lanes,
                         "ALIGNED": aligned, "FAST_TRIG": True}
            signature.update({key: "constexpr" for key in constants})
            key = f"{name}{'' if aligned else ', unaligned'}"
            try:
                source = ASTSource(fn=kernels._combine_kernel, signature=signature, constexprs=constants)
                results[key] = {**_summary(triton.compile(source, target=target)), "lanes": lanes,
                                "aligned": aligned}
            except Exception as error:  # reported, not raised: the test names every variant that fails
                results[key] = {"ok": False, "error": f"{type(error).__name__}: {error}"[-3000:]}
    for dtype, start_aligned in (("bf16", True), ("fp16", True), ("bf16", False)):
        signature = {"src": "*fp32", "dst": "*" + dtype, "n": "i32", "seed": "i64", "start": "i64",
                     "TO_BF16": "constexpr", "ROWS": "constexpr", "START_ALIGNED": "constexpr"}
        constants = {"TO_BF16": dtype == "bf16", "ROWS": kernels.ROUND_BLOCK // 4, "START_ALIGNED": start_aligned}
        key = f"stochastic rounding fp32 -> {dtype}{'' if start_aligned else ', start % 4 != 0'}"
        # what the launcher specialises for torch's allocations and a size divisible by 16
        attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}
        try:
            source = ASTSource(fn=kernels._round_kernel, signature=signature, constexprs=constants, attrs=attrs)
            results[key] = {**_summary(triton.compile(source, target=target)), "start_aligned": start_aligned}
        except Exception as error:
            results[key] = {"ok": False, "error": f"{type(error).__name__}: {error}"[-3000:]}
    for dtype, start_aligned in (("bf16", True), ("fp16", False)):  # a block's write-back in one launch
        signature = {"tiles": "*i32", "meta": "*i64", "n_tensors": "i32", "src_example": "*fp32",
                     "dst_example": "*" + dtype, "TO_BF16": "constexpr", "ROWS": "constexpr",
                     "START_ALIGNED": "constexpr", "ALIGNED": "constexpr"}
        constants = {"TO_BF16": dtype == "bf16", "ROWS": kernels.ROUND_BLOCK // 4, "START_ALIGNED": start_aligned,
                     "ALIGNED": True}
        key = f"block stochastic rounding fp32 -> {dtype}{'' if start_aligned else ', start % 4 != 0'}"
        attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
        try:
            source = ASTSource(fn=kernels._round_many_kernel, signature=signature, constexprs=constants, attrs=attrs)
            results[key] = {**_summary(triton.compile(source, target=target)), "start_aligned": start_aligned}
        except Exception as error:
            results[key] = {"ok": False, "error": f"{type(error).__name__}: {error}"[-3000:]}
    return results


if __name__ == "__main__":
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    print(json.dumps({"variants": compile_all(arch), "full_tile": measure_full_tile(arch)}))

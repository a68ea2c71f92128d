"""Compiles the noise kernels for an NVIDIA GPU without one (ahead of time, to PTX and cubin).

Run as a script, outside the interpreter (``TRITON_INTERPRET`` unset): the interpreter accepts code a
GPU compiler refuses, so this is what catches such code on a machine without a GPU. Prints, per
kernel variant, whether it compiled and the thread layout and vector widths the compiler chose.
"""
from __future__ import annotations

import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
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
                         "ALIGNED": aligned}
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
    return results


if __name__ == "__main__":
    print(json.dumps(compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)))

"""LOZO under the window write-back: a perturbed linear layer formed (materialised) or applied factored.

    python benchmarks/lowrank_forward.py                          # TinyLlama-1.1B's layer, 32/256/1024 rows
    python benchmarks/lowrank_forward.py --hidden 256 --inter 704 --kv 64 --rows 8,32 --repeats 2 --no_results

One decoder layer's seven linear layers (q, k, v, o, gate, up, down) run one training step's two groups
(+ε, −ε) in both forms, side by side in one process, the forms alternating repeat by repeat:

  materialised  what the pipeline did before the factored form (``zo2.lowrank_forward`` "materialised"): after
                the upload W' = a·W + U_acc·Vᵀ (one GEMM into the working copy), z = (U/√r)·Vᵀ (one GEMM), then
                per group a perturbed copy W' ± ε·z in the compute dtype and x·(W' ± ε·z)ᵀ;
  factored      per group x·Wᵀ + (x·V)·Bᵀ with B = U_acc ± ε·U/√r (m × r): no m × n tensor is formed.

Both start from the same fp32 working copy and compute-dtype copy (the upload and the conversion are the
same in both and left out). Reports the median seconds per layer and the ratio factored / materialised;
``factored.LOWRANK_FORWARD`` keeps, per device type, the form this measures faster. Writes the
"lowrank_forward" section of benchmarks/RESULTS.md. ``benchmarks/gpu.py`` runs the same measurement on a GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from results import table, write_section  # noqa: E402


def layer_shapes(hidden: int, inter: int, kv: int) -> list[tuple[str, int, int]]:
    """(name, out, in) of a LLaMA layer's linear layers."""
    return [("q", hidden, hidden), ("k", kv, hidden), ("v", kv, hidden), ("o", hidden, hidden),
            ("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)]


class Layer:
    """One linear layer's tensors as the pipeline holds them while its block is resident."""

    def __init__(self, out: int, inp: int, rank: int, compute: torch.dtype, device: torch.device) -> None:
        gen = torch.Generator(device="cpu").manual_seed(out * 7919 + inp)
        draw = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
        self.work = draw(out, inp) * 0.02           # fp32 working copy (a·W)
        self.compute = self.work.to(compute)        # the forward's copy
        self.u_acc = draw(out, rank) * 1e-4
        self.u = draw(out, rank) / rank ** 0.5
        self.v = draw(inp, rank)
        self.v_compute = self.v.to(compute)
        self.scratch = torch.empty_like(self.work)
        self.z = torch.empty_like(self.work)
        self.perturbed = torch.empty_like(self.compute)


def materialised(layers: list[Layer], xs: list[torch.Tensor], eps: float) -> None:
    for layer, x in zip(layers, xs):
        layer.scratch.copy_(layer.work)
        layer.scratch.addmm_(layer.u_acc, layer.v.t())          # W' = a·W + U_acc·Vᵀ
        torch.mm(layer.u, layer.v.t(), out=layer.z)             # z = (U/√r)·Vᵀ
        for s in (eps, -eps):
            torch.add(layer.scratch, layer.z, alpha=s, out=layer.perturbed)
            F.linear(x, layer.perturbed)


def factored(layers: list[Layer], xs: list[torch.Tensor], eps: float) -> None:
    for layer, x in zip(layers, xs):
        for s in (eps, -eps):
            b = torch.add(layer.u_acc, layer.u, alpha=s).to(layer.compute.dtype)
            y = F.linear(x, layer.compute)
            t = torch.matmul(x, layer.v_compute)
            y.view(-1, y.shape[-1]).addmm_(t.reshape(-1, t.shape[-1]), b.t())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_forms(hidden: int, inter: int, kv: int, rows_list: list[int], rank: int, compute: torch.dtype,
                  device: torch.device, repeats: int, warmup: int = 1) -> list[dict[str, Any]]:
    """Median seconds per layer of each form for each row count (a group's rows of x: batch × tokens)."""
    shapes = layer_shapes(hidden, inter, kv)
    layers = [Layer(out, inp, rank, compute, device) for _, out, inp in shapes]
    results = []
    for rows in rows_list:
        gen = torch.Generator(device="cpu").manual_seed(rows)
        xs = [torch.randn(rows, inp, generator=gen).to(device=device, dtype=compute) for _, _, inp in shapes]
        times: dict[str, list[float]] = {"materialised": [], "factored": []}
        forms = {"materialised": materialised, "factored": factored}
        for r in range(warmup + repeats):
            for name, fn in forms.items():
                synchronize(device)
                start = time.perf_counter()
                with torch.no_grad():
                    fn(layers, xs, 1e-3)
                synchronize(device)
                if r >= warmup:
                    times[name].append(time.perf_counter() - start)
        m, f = statistics.median(times["materialised"]), statistics.median(times["factored"])
        results.append({"rows": rows, "materialised_s": m, "factored_s": f, "ratio": f / m,
                        "faster": "factored" if f < m else "materialised"})
    return results


def render(results: list[dict[str, Any]], hidden: int, inter: int, kv: int, rank: int, compute: str,
           device: str, repeats: int, load: tuple[float, float]) -> str:
    rows = [[r["rows"], f"{r['materialised_s'] * 1e3:.1f}", f"{r['factored_s'] * 1e3:.1f}", f"**{r['ratio']:.2f}**",
             r["faster"]] for r in results]
    return f"""**One LLaMA layer's seven linear layers (hidden {hidden}, MLP {inter}, k/v {kv}), rank {rank}, a training
step's two groups, {compute} forwards on {device}**: the perturbed weight formed (W' = a·W + U_acc·Vᵀ, z, a
perturbed copy per group) against applied factored (x·Wᵀ + (x·V)·Bᵀ); median of {repeats} repeats, the two
forms alternating. Rows: one group's rows of x (batch × tokens). Load average {load[0]:.1f} before, {load[1]:.1f}
after, on {os.cpu_count()} cores (other work on the machine slows both forms alike).

{table(["rows per group", "materialised ms", "factored ms", "factored / materialised", "faster"], rows)}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=5632)
    parser.add_argument("--kv", type=int, default=256)
    parser.add_argument("--rows", default="32,256,1024")
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--compute", default=None, help="fp32 or bf16 (default: fp32 on the CPU, bf16 on a GPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_results", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute = args.compute or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[compute]
    before = os.getloadavg()[0]
    results = measure_forms(args.hidden, args.inter, args.kv, [int(r) for r in args.rows.split(",")], args.rank,
                            dtype, device, args.repeats)
    text = render(results, args.hidden, args.inter, args.kv, args.rank, compute, device.type, args.repeats,
                  (before, os.getloadavg()[0]))
    print(text, flush=True)
    if not args.no_results:
        write_section("lowrank_forward", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

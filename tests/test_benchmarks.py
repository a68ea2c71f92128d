"""The benchmarks run unchanged where they are meant to: benchmarks/gpu.py's CPU smoke test, and the shared harness."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zo2_deepspeed import loss as loss_module
from zo2_deepspeed.distributed import without_launch_vars

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_runs_its_smoke_test_without_a_gpu(tmp_path):
    results, report = tmp_path / "RESULTS.md", tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--results", str(results),
                          "--json", str(report)], env=without_launch_vars(os.environ), capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["device"] == "cpu"
    settings = [(r["dtype"], r["rows"]) for r in data["mezo"]]
    assert settings == [("fp32", 1), ("bf16", 4)]
    for r in data["mezo"]:
        assert set(r["median_s"]) == {"plain MeZO", "engine resident", "engine cpu tier, prefetch 0",
                                      "engine cpu tier, prefetch 1"}
        assert all(t > 0 for t in r["median_s"].values())
        assert r["losses_identical"] is True
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    assert set(data["fzoo"][0]["median_s"]) == {"plain FZOO", "engine FZOO resident"}
    per_step = data["writeback"][0]["per_step"]  # LOZO's window write-back: the byte ratio a GPU reports at once
    assert set(per_step) == {"MeZO", "LOZO step", "LOZO window"}
    assert per_step["LOZO step"]["written"] == per_step["MeZO"]["written"] > per_step["LOZO window"]["written"] > 0
    text = results.read_text()
    assert "<!-- gpu (CPU smoke test):start -->" in text and "smoke test of the script" in text
    assert "engine resident / plain MeZO" in text
    # the section is rebuilt from the JSON alone (numbers measured on another machine come back as JSON)
    rendered = tmp_path / "rendered.md"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--render", str(report),
                          "--results", str(rendered)], env=without_launch_vars(os.environ), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert rendered.read_text() == text


@pytest.mark.slow
def test_gpu_benchmark_past_its_deadline_lists_what_it_did_not_measure(tmp_path):
    """--deadline_s 0: the deadline is checked before each part and setting, so none starts; each is listed."""
    results, report = tmp_path / "RESULTS.md", tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--results", str(results),
                          "--json", str(report), "--deadline_s", "0", "--parts", "mezo,fzoo"],
                         env=without_launch_vars(os.environ), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["skipped"] == ["MeZO opt-tiny fp32 B1×T64", "MeZO opt-tiny bf16 B4×T16", "FZOO opt-tiny"]
    assert "mezo" not in data and "fzoo" not in data
    assert "**Not measured** (past `--deadline_s 0.0`): MeZO opt-tiny fp32 B1×T64" in results.read_text()


def test_long_logits_are_reduced_in_slices_to_the_same_loss(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 300, 1000, generator=gen)
    labels = torch.randint(0, 1000, (2, 300), generator=gen)
    labels[0, :7] = -100
    whole = loss_module.causal_lm_loss(logits, labels)
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_ELEMENTS", 7000)  # 7 positions per slice
    sliced = loss_module.causal_lm_loss(logits, labels)
    assert torch.equal(sliced, whole)  # float64 sums of the same fp32 token losses: exact, whatever the slicing
    # ... and the mean Hugging Face computes (an fp32 sum of 592 positive terms: relative error under 600 · 2^-24)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 1000), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(float(whole) - float(expected)) <= 600 * 2 ** -24 * float(expected)
    with pytest.raises(Exception, match="no position to predict"):
        loss_module.causal_lm_loss(logits, torch.full_like(labels, -100))


@pytest.mark.slow
def test_time_to_accuracy_races_zo_methods_hybrids_and_adam_on_equal_budgets(tmp_path):
    """convergence.py --wall_budget on a tiny model: every variant trains its budget from the same start, each
    variant's peak RSS is measured in a process of its own, and the targets are called hits or misses.

    Costs about 2 minutes on an idle 2-core machine (six engines, one of them DeepSpeed ZeRO-3 AdamW, and six RSS
    processes)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_assets import write_model_dir, write_sentiment_csv
    model, data = write_model_dir(tmp_path / "model"), write_sentiment_csv(tmp_path / "sentiment.csv")
    results = tmp_path / "RESULTS.md"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--model", str(model),
                          "--dataset", str(data), "--wall_budget", "2", "--slice_s", "0.5", "--eval_every_s", "1",
                          "--eval_batch", "8", "--batch", "4", "--lr_adam", "1e-3", "--max_fraction", "0.9",
                          "--methods", "mezo,fzoo,hizoo,lozo,hybrid0,hybrid1,adam", "--rss_steps", "1",
                          "--out_dir", str(tmp_path), "--results", str(results)],
                         env=without_launch_vars(os.environ), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    runs = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    assert [r["variant"] for r in runs] == ["mezo", "fzoo", "hizoo", "lozo", "hybrid0", "hybrid1", "adam"]
    validation = runs[0]["points"][0]["val_examples"]
    assert validation > 16, "the whole validation split by default"
    for r in runs:
        assert r["rss"]["peak_rss_bytes"] > 0 and (r["rss"]["first_order_bytes"] > 0) == r["variant"].startswith("hyb")
        low, high = r["points"][-1]["val_interval"]
        assert low <= r["points"][-1]["val_accuracy"] <= high
    start = runs[0]["points"][0]
    for r in runs:
        first, last = r["points"][0], r["points"][-1]
        assert first["train_s"] == 0 and first["val_loss"] == pytest.approx(start["val_loss"], rel=1e-4), r["variant"]
        assert last["train_s"] >= 2 and last["steps"] == r["steps"] > 0 and len(r["points"]) >= 3, r["variant"]
        assert 0 < last["cpu_s"] and last["forwards"] > 0
    adam = runs[-1]["points"]
    assert adam[-1]["val_loss"] != adam[0]["val_loss"], "first-order AdamW must train"
    assert adam[-1]["forwards"] == runs[-1]["steps"]
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 1000
    text = results.read_text()
    assert "<!-- time_to_accuracy:start -->" in text
    assert "LOZO's time to MeZO's final accuracy / MeZO's" in text
    for target in ("AdamW's accuracy − best hybrid's", "best hybrid's (", "peak host RSS of hybrid", "Second task: none"):
        assert target in text, target
    assert text.count("(hit") + text.count("(miss") + text.count("hit)") >= 3


@pytest.mark.slow
def test_time_to_accuracy_sweep_chooses_each_variants_lr_for_the_race(tmp_path):
    """--sweep on a tiny model: every (variant, lr) trains its budget, is scored on a dev slice of the training
    split, and the race reads the choice back with --lrs_from. About a minute."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_assets import write_model_dir, write_sentiment_csv
    model, data = write_model_dir(tmp_path / "model"), write_sentiment_csv(tmp_path / "sentiment.csv")
    results = tmp_path / "RESULTS.md"
    common = [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--model", str(model), "--dataset",
              str(data), "--slice_s", "0.5", "--eval_batch", "8", "--batch", "4", "--max_fraction", "0.9",
              "--methods", "mezo,hybrid0", "--out_dir", str(tmp_path), "--results", str(results)]
    sweep = subprocess.run([*common, "--sweep", "--sweep_budget", "1", "--sweep_dev", "16", "--sweep_widen", "0",
                            "--sweep_grid", '{"mezo": [1e-4, 1e-2], "hybrid0": [1e-4, 1e-2]}'],
                           env=without_launch_vars(os.environ), capture_output=True, text=True, timeout=900)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    chosen = json.loads((tmp_path / "time_to_accuracy_lrs.json").read_text())
    assert set(chosen["chosen"]) == {"mezo", "hybrid0"} and chosen["sweep_budget_s"] == 1
    assert len(chosen["runs"]) == 4 and all(r["points"][-1]["val_examples"] == 16 for r in chosen["runs"])
    assert "<!-- time_to_accuracy_sweep:start -->" in results.read_text()
    race = subprocess.run([*common, "--wall_budget", "1", "--eval_every_s", "1", "--rss_steps", "0",
                           "--lrs_from", str(tmp_path / "time_to_accuracy_lrs.json")],
                          env=without_launch_vars(os.environ), capture_output=True, text=True, timeout=900)
    assert race.returncode == 0, race.stderr[-3000:]
    runs = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    assert {r["variant"]: r["lr"] for r in runs} == chosen["chosen"]



def test_the_sweep_tries_one_lr_further_when_the_best_lies_at_the_edge_of_those_tried():
    """A best lr at the top (bottom) of the lrs tried is not a choice but a bound: the sweep tries the next lr beyond
    it at the ratio of the two lrs on that edge; a best lr inside them ends the widening."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import time_to_accuracy as tta

    def run(lr: float, accuracy: float, loss: float = 1.0):
        return tta.Racer("mezo", lr, None, iter(()), tta._finished, 0,
                         points=[{"val_accuracy": accuracy, "val_loss": loss}])

    assert tta.beyond_edge([run(1e-5, 0.5), run(3e-5, 0.6), run(1e-4, 0.7)]) == 3.3e-4
    assert tta.beyond_edge([run(1e-5, 0.8), run(3e-5, 0.6), run(1e-4, 0.7)]) == 3.3e-6
    assert tta.beyond_edge([run(1e-5, 0.5), run(3e-5, 0.8), run(1e-4, 0.7)]) is None
    assert tta.beyond_edge([run(1e-5, 0.7, 0.9), run(3e-5, 0.7, 0.5)]) == 9e-5, "ties: the lower dev loss"
    assert tta.beyond_edge([run(1e-5, 0.5)]) is None, "one lr: no edge to widen from"


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--jobs 2 needs two cores")
def test_time_to_accuracy_jobs_train_each_run_alone_on_a_core_of_its_own(tmp_path):
    """--jobs 2: the sweep and the race train each (variant, lr) in a process of its own, two at a time, each pinned
    to one core with one thread; the sweep scores each run once, at the end of its budget; the results come back in
    the grid's order. Without --clock cpu, --jobs is refused. About a minute and a half."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_assets import write_model_dir, write_sentiment_csv
    model, data = write_model_dir(tmp_path / "model"), write_sentiment_csv(tmp_path / "sentiment.csv")
    results = tmp_path / "RESULTS.md"
    common = [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--model", str(model), "--dataset",
              str(data), "--slice_s", "0.5", "--eval_batch", "8", "--batch", "4", "--max_fraction", "0.9",
              "--out_dir", str(tmp_path), "--results", str(results), "--jobs", "2"]
    env = without_launch_vars(os.environ)
    wall = subprocess.run([*common, "--methods", "mezo", "--wall_budget", "1"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert wall.returncode != 0 and "--jobs > 1 needs --clock cpu" in wall.stderr
    cores = sorted(os.sched_getaffinity(0))[:2]
    sweep = subprocess.run([*common, "--clock", "cpu", "--methods", "mezo,adam", "--sweep", "--sweep_budget", "1",
                            "--sweep_dev", "16", "--sweep_widen", "1",
                            "--sweep_grid", '{"mezo": [1e-4, 1e-2], "adam": [1e-3]}'],
                           env=env, capture_output=True, text=True, timeout=900)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    chosen = json.loads((tmp_path / "time_to_accuracy_lrs.json").read_text())
    runs = [(r["variant"], r["lr"]) for r in chosen["runs"]]
    assert runs[:3] == [("mezo", 1e-4), ("mezo", 1e-2), ("adam", 1e-3)] and runs[3:] in ([], [("mezo", 1e-6)],
                                                                                       [("mezo", 1.0)])
    for r in chosen["runs"]:
        assert len(r["points"]) == 1 and r["points"][0]["val_examples"] == 16 and r["points"][0]["cpu_s"] >= 1
        assert r["process"]["threads"] == 1 and len(r["process"]["cores"]) == 1 and r["process"]["cores"][0] in cores
    assert {r["process"]["cores"][0] for r in chosen["runs"]} == set(cores), "two runs at a time, one per core"
    assert "each run in a process of its own, 2 at a time" in results.read_text()
    race = subprocess.run([*common, "--clock", "cpu", "--methods", "mezo,hybrid0", "--wall_budget", "1",
                           "--eval_every_s", "1", "--rss_steps", "0",
                           "--lrs_from", str(tmp_path / "time_to_accuracy_lrs.json")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert race.returncode == 0, race.stdout[-3000:] + race.stderr[-3000:]
    assert race.stdout.count("val_acc=") >= 4, "each process's evaluation lines are relayed"
    runs = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    assert [r["variant"] for r in runs] == ["mezo", "hybrid0"] and runs[0]["lr"] == chosen["chosen"]["mezo"]
    for r in runs:
        first, last = r["points"][0], r["points"][-1]
        assert first["cpu_s"] == 0 and first["val_loss"] == pytest.approx(runs[0]["points"][0]["val_loss"], rel=1e-4)
        assert last["cpu_s"] >= 1 and last["steps"] == r["steps"] > 0 and r["process"]["threads"] == 1


@pytest.mark.slow
def test_write_back_benchmark_rehearses_its_flow_on_a_tiny_model(tmp_path):
    """benchmarks/write_back.py on the cpu tier at a tiny shape: a process per variant, turns step by step, the
    targets judged from the per-step bytes (~1 min)."""
    out = tmp_path / "write_back.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "write_back.py"), "--tiers", "cpu", "--layers",
                          "2", "--hidden", "128", "--inter", "352", "--heads", "4", "--kv_heads", "2", "--vocab",
                          "256", "--lazy_steps", "3", "--min_params", "0", "--no_results", "--json", str(out)],
                         env=without_launch_vars(os.environ), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    variants = data["results"][0]["variants"]
    assert list(variants) == ["mezo", "lozo-step", "lozo-window", "lozo-window-materialised"]
    full = variants["mezo"]["steps"][1]["bytes_written"]
    vectors = variants["lozo-window"]["ready"]["vector_bytes"]
    assert [s["bytes_written"] for s in variants["mezo"]["steps"]] == [0, full, full, full]
    assert [s["bytes_written"] for s in variants["lozo-step"]["steps"]] == [0, full, full, full]
    assert [s["bytes_written"] for s in variants["lozo-window"]["steps"]] == [0, vectors, vectors, full]
    assert all(v["peak_rss"] > 0 for v in variants.values())
    verdict = data["verdicts"]["cpu"]
    assert verdict["written_ok"] and not verdict["moved_ok"]  # ν = 3: 0.5 + 0.5/3 > 0.55
    assert "| steady-state bytes written per step" in run.stdout and "**miss**: reading every block" in run.stdout


@pytest.mark.slow
def test_lowrank_forward_benchmark_times_both_forms(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lowrank_forward.py"), "--hidden", "128",
                          "--inter", "352", "--kv", "32", "--rows", "4,16", "--repeats", "1", "--no_results"],
                         env=without_launch_vars(os.environ), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| 4 |") or line.startswith("| 16 |")]
    assert len(rows) == 2 and all(line.rstrip(" |").endswith(("factored", "materialised")) for line in rows)

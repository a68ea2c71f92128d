"""Short last batches: a micro-batch with fewer rows than train_micro_batch_size_per_gpu trains, and every row (every
token) weighs as it would in one batch of the step's rows on one rank.

A step's loss is Σ token-loss sums / Σ tokens over all its micro-batches (loss.LossSums, comm.reduce_and_divide), so
an epoch's short last batch, alone or in a short accumulation window, gives the step one engine would take on those
rows joined into one batch, bit for bit. Checked in a plain loop, with the engine's own loader
(dataloader_drop_last false), in a script shaped like Hugging Face's run_clm.py (the Trainer's default
dataloader_drop_last=False) and in an Accelerate loop; the multi-rank cases are in tests/test_data_parallel.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zo2_deepspeed
from conftest import ds_config
from tiny_models import make_model, padded_batches

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def rows_of(batch: dict, part: slice) -> dict:
    return {k: v[part] for k, v in batch.items()}


def test_a_short_batch_and_a_short_window_step_as_one_batch_of_the_steps_rows():
    """15 padded rows (2 to 16 tokens each) in steps of 8, 6 and 1 rows. Micro-batches of 4 with accumulation 2
    run them as [4, 4], [4, 2] and a lone 1-row micro-batch whose window the caller ends early (as Accelerate and
    the Trainer do at the end of an epoch); micro-batches of 8 run each step as one batch. Same steps, bit for bit,
    and the step records count the rows and tokens that were trained."""
    data = padded_batches(1, rows=15)[0]
    steps = [slice(0, 8), slice(8, 14), slice(14, 15)]
    split = [[slice(0, 4), slice(4, 8)], [slice(8, 12), slice(12, 14)], [slice(14, 15)]]
    config = dict(lr=1e-2, weight_decay=0.1, eps=1e-2)
    accumulated, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("cpu", micro_batch=4, gas=2,
                                                                                    **config))
    joined, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none", micro_batch=8, **config))
    records_a, records_b = [], []
    for window in split:
        for i, part in enumerate(window):
            accumulated.set_gradient_accumulation_boundary(i == len(window) - 1)
            accumulated(**rows_of(data, part))
            accumulated.step()
        records_a.append(dict(accumulated.last_step))
    for part in steps:
        joined(**rows_of(data, part))
        joined.step()
        records_b.append(dict(joined.last_step))
    tokens = [int(data["attention_mask"][part][:, 1:].sum()) for part in steps]
    for a, b, rows, items in zip(records_a, records_b, [8, 6, 1], tokens):
        assert (a["samples"], a["items"]) == (b["samples"], b["items"]) == (rows, items)
        assert a["group_losses"] == b["group_losses"] and a["projected_grad"] == b["projected_grad"]
    assert accumulated.global_steps == joined.global_steps == 3
    assert accumulated.global_samples == joined.global_samples == 15
    pa, pb = accumulated.parameter_snapshot(), joined.parameter_snapshot()
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    start = make_model()
    assert max(float((pa[n] - p.detach()).abs().max()) for n, p in start.named_parameters()) > 1e-4
    accumulated.close(), joined.close()


def test_the_engines_loader_without_drop_last_ends_each_epoch_with_a_short_batch():
    """13 examples, micro-batch 4, "dataloader_drop_last": false: epochs of 4, 4, 4 and 1 rows, every example once."""
    data = padded_batches(1, rows=13)[0]
    examples = [rows_of(data, i) for i in range(13)]
    config = dict(ds_config("none", micro_batch=4, lr=1e-3), dataloader_drop_last=False)
    engine, _, loader, _ = zo2_deepspeed.initialize(model=make_model(), config=config, training_data=examples)
    assert len(loader) == 4
    for epoch in range(2):
        seen = []
        for batch in loader:
            engine(**batch)
            engine.step()
            seen.append(batch["input_ids"])
        assert [len(b) for b in seen] == [4, 4, 4, 1]
        assert sorted(map(tuple, torch.cat(seen).tolist())) == sorted(map(tuple, data["input_ids"].tolist()))
        assert engine.last_step["samples"] == 1
    assert engine.global_steps == 8 and engine.global_samples == 26
    engine.close()


def test_a_first_order_tail_trains_on_short_batches_as_on_the_joined_rows():
    """zo2.first_order with chunk_rows 2: a 3-row micro-batch ends with a 1-row chunk, so every row reaches the tail's
    gradient. Micro-batches of 4 with accumulation 2 on rows [4, 3] and a lone 1-row window equal micro-batches of 8
    on [7] and [1] (the same chunks), tail and body bit for bit; the tail divides by the ZO losses' token count."""
    from zo2_deepspeed.first_order.tail import pieces
    assert [(p.start, p.stop, p.group, p.chunk) for p in pieces([0.5, 0.5], 3, 2)] == [
        (0, 2, 0, 0), (2, 3, 0, 1), (3, 5, 1, 0), (5, 6, 1, 1)]
    data = padded_batches(1, rows=8)[0]
    section = {"blocks": 1, "head": True, "max_fraction": 0.9, "chunk_rows": 2,
               "optimizer": {"type": "SGD", "params": {"lr": 1e-2}}}

    def hybrid(micro: int, gas: int) -> dict:
        config = ds_config("none", micro_batch=micro, gas=gas, lr=1e-2, eps=1e-2)
        config["zo2"]["first_order"] = dict(section)
        return config

    accumulated, *_ = zo2_deepspeed.initialize(model=make_model(), config=hybrid(4, 2))
    joined, *_ = zo2_deepspeed.initialize(model=make_model(), config=hybrid(8, 1))
    records = []
    for window in ([slice(0, 4), slice(4, 7)], [slice(7, 8)]):
        for i, part in enumerate(window):
            accumulated.set_gradient_accumulation_boundary(i == len(window) - 1)
            accumulated(**rows_of(data, part))
            accumulated.step()
        joined(**rows_of(data, slice(window[0].start, window[-1].stop)))
        joined.step()
        records.append((dict(accumulated.last_step), dict(joined.last_step)))
    for a, b in records:
        assert a["first_order"]["grad_norm"] == b["first_order"]["grad_norm"] > 0
        assert (a["samples"], a["items"], a["group_losses"]) == (b["samples"], b["items"], b["group_losses"])
    pa, pb = accumulated.parameter_snapshot(), joined.parameter_snapshot()
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    accumulated.close(), joined.close()


def test_a_scalar_loss_fn_weighs_a_short_batch_by_its_rows_in_the_zo_step_and_the_tail():
    """loss_fn returning a 0-dim mean: it stands for rows × itself, for the ZO losses and the tail's gradient alike
    (the step checks that both count the same items)."""
    import torch.nn.functional as F

    def mean_loss(outputs, batch):
        logits = outputs.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1))

    data = padded_batches(1, rows=6)[0]
    config = ds_config("none", micro_batch=4, gas=2, lr=1e-2, eps=1e-2)
    config["zo2"]["first_order"] = {"blocks": 1, "head": True, "max_fraction": 0.9,
                                    "optimizer": {"type": "SGD", "params": {"lr": 1e-2}}}
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=config, loss_fn=mean_loss)
    means = []
    for part in (slice(0, 4), slice(4, 6)):
        means.append(engine(**rows_of(data, part)).group_losses.double())
        engine.step()
    assert (engine.last_step["samples"], engine.last_step["items"]) == (6, 6)
    # rows-weighted, not the mean of the two means; from the returned fp32 means (each within 2^-24 relative of its
    # float64 value), so within 3 × 2^-24 < 2e-7 relative of the step's fp32 losses
    expected = (means[0] * 4 + means[1] * 2) / 6
    got = torch.tensor(engine.last_step["group_losses"], dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=2e-7, atol=0)
    assert not torch.allclose(got, (means[0] + means[1]) / 2, rtol=1e-4, atol=0)
    assert engine.last_step["first_order"]["grad_norm"] > 0
    engine.close()


# ------------------------------------------------------------------------------------------- scripts
# Both scripts train, then (in the same process, so with the same threads) run one engine per step on that step's
# rows joined into one batch, and write both runs' records to result.json.

REFERENCE = '''
def reference(windows, zo2):
    """One engine, micro-batch 8, no accumulation, no schedule: each step is one forward on the step's rows."""
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0},
              "optimizer": {"type": "SGD", "params": {"lr": 1e-2, "weight_decay": 0.0}}, "zo2": zo2}
    engine, *_ = zo2_deepspeed.initialize(model=make_model("llama"), config=config)
    records = []
    for window in windows:
        engine(**{k: torch.cat([b[k] for b in window]) for k in window[0]})
        engine.step()
        records.append(dict(engine.last_step))
    return engine, records


def compare(trained, engine, records, out, **extra):
    """The trained engine's parameters against the reference engine's, and both runs' records, to result.json."""
    mine, theirs = trained.parameter_snapshot(), engine.parameter_snapshot()
    differ = [n for n in theirs if not torch.equal(mine[n], theirs[n])]
    keys = ("samples", "items", "group_losses", "projected_grad", "loss")
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"differ": differ, "reference": [{k: r[k] for k in keys} for r in records], **extra}, f)
'''

# The shape of Hugging Face's examples/pytorch/language-modeling/run_clm.py: HfArgumentParser over its own data
# arguments and TrainingArguments, the dataset handed to the Trainer; dataloader_drop_last is left at its default.
TRAINER_SCRIPT = '''
import json, os
from dataclasses import dataclass, field
import torch
import zo2_deepspeed
zo2_deepspeed.patch_deepspeed()
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, default_data_collator
from tiny_models import make_model, padded_batches
''' + REFERENCE + '''

@dataclass
class DataTrainingArguments:
    rows: int = field(default=26, metadata={"help": "training rows"})


parser = HfArgumentParser((DataTrainingArguments, TrainingArguments))
data_args, training_args = parser.parse_args_into_dataclasses()
data = padded_batches(1, rows=data_args.rows, seed=11)[0]
rows = [{k: v[i] for k, v in data.items()} for i in range(data_args.rows)]
seen, steps = [], []


def collate(features):
    batch = default_data_collator(features)
    batch["labels"] = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)  # as LM collators do
    seen.append({k: v.clone() for k, v in batch.items()})
    return batch


class RecordSteps(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        steps.append(dict(trainer.model_wrapped.last_step))


trainer = Trainer(model=make_model("llama"), args=training_args, train_dataset=rows, data_collator=collate,
                  callbacks=[RecordSteps()])
trainer.train()
per_epoch = -(-data_args.rows // training_args.per_device_train_batch_size)
accumulation = training_args.gradient_accumulation_steps
windows = [seen[e + i:e + min(i + accumulation, per_epoch)] for e in range(0, len(seen), per_epoch)
           for i in range(0, per_epoch, accumulation)]
engine, records = reference(windows, trainer.model_wrapped.config["zo2"])
logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
keys = ("samples", "items", "group_losses", "projected_grad", "loss")
compare(trainer.model_wrapped, engine, records, training_args.output_dir, drop_last=training_args.dataloader_drop_last,
        rows=[len(b["input_ids"]) for b in seen], windows=[len(w) for w in windows], logged=logged,
        global_step=trainer.state.global_step, samples=trainer.model_wrapped.global_samples,
        steps=[{k: s[k] for k in keys} for s in steps])
'''

# A loop in the shape of Accelerate's examples/by_feature: a DataLoader without drop_last, accumulate(), a client
# AdamW; started with `accelerate launch --use_deepspeed`.
ACCELERATE_SCRIPT = '''
import json, os, sys
import torch
import zo2_deepspeed
zo2_deepspeed.patch_deepspeed()
from accelerate import Accelerator
from tiny_models import make_model, padded_batches
''' + REFERENCE + '''

out = sys.argv[1]
accelerator = Accelerator()
model = make_model("llama")
data = padded_batches(1, rows=26, seed=12)[0]
rows = [{k: v[i] for k, v in data.items()} for i in range(26)]
loader = torch.utils.data.DataLoader(rows, batch_size=4, shuffle=False)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
windows, window, steps = [], [], []
for epoch in range(2):
    for batch in loader:
        window.append({k: v.clone() for k, v in batch.items()})
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            windows.append(window)
            window = []
            steps.append(dict(model.last_step))
engine, records = reference(windows, model.config["zo2"])
keys = ("samples", "items", "group_losses", "projected_grad", "loss")
compare(model, engine, records, out, rows=[len(b["input_ids"]) for w in windows for b in w],
        windows=[len(w) for w in windows], global_step=model.global_steps, samples=model.global_samples,
        steps=[{k: s[k] for k in keys} for s in steps])
accelerator.end_training()
'''


def script_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]))
    return env


def zo2_section() -> dict:
    return {"method": "mezo", "eps": 1e-2, "seed": 5}


def check_steps_equal_the_reference(result: dict) -> None:
    """Every step as one engine on the step's rows joined: same rows and tokens, same losses, same parameters."""
    assert result["differ"] == [], result["differ"][:3]
    assert len(result["steps"]) == len(result["reference"]) == 8
    for step, ref in zip(result["steps"], result["reference"]):
        assert (step["samples"], step["items"]) == (ref["samples"], ref["items"])
        assert step["group_losses"] == ref["group_losses"] and step["projected_grad"] == ref["projected_grad"]
    assert [s["samples"] for s in result["steps"]] == [8, 8, 8, 2] * 2
    assert result["global_step"] == 8 and result["samples"] == 52


def test_trainer_script_with_the_default_drop_last_trains_through_the_short_last_batch(tmp_path):
    """26 rows, batches of 4, accumulation 2, 2 epochs: each epoch ends with a 2-row micro-batch alone in its window.

    Before, the first epoch's end raised "the batch has 2 rows but train_micro_batch_size_per_gpu is 4". The
    logged loss is the step's per-token estimate: the Trainer's num_items_in_batch arithmetic over the engine's
    returned values gives what the engine's step reports for the step's rows joined (up to fp32 rounding)."""
    script = tmp_path / "run_clm_like.py"
    script.write_text(TRAINER_SCRIPT)
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "zero_optimization": {"stage": 0},
        "optimizer": {"type": "SGD", "params": {"lr": "auto", "weight_decay": "auto"}}, "zo2": zo2_section()}))
    out = tmp_path / "out"
    cmd = [sys.executable, str(script), "--output_dir", str(out), "--deepspeed", str(config),
           "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--num_train_epochs", "2",
           "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--logging_steps", "1",
           "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0"]
    run = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    result = json.loads((out / "result.json").read_text())
    assert result["drop_last"] is False
    assert result["rows"] == [4, 4, 4, 4, 4, 4, 2] * 2 and result["windows"] == [2, 2, 2, 1] * 2
    check_steps_equal_the_reference(result)
    assert result["logged"] == pytest.approx([r["loss"] for r in result["reference"]], rel=1e-6)


def test_accelerate_loop_trains_through_the_short_last_batch(tmp_path):
    """The same 26-row epochs in an Accelerate loop (accumulate(), no drop_last option) under `accelerate launch`."""
    from zo2_deepspeed.distributed import free_port
    script = tmp_path / "train_accelerate.py"
    script.write_text(ACCELERATE_SCRIPT)
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2,
                                  "zero_optimization": {"stage": 0}, "zo2": zo2_section()}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
           str(config), "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(script), str(tmp_path)]
    run = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["rows"] == [4, 4, 4, 4, 4, 4, 2] * 2 and result["windows"] == [2, 2, 2, 1] * 2
    check_steps_equal_the_reference(result)

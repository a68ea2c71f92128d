"""Training scripts in the three shapes users bring, none of which imports zo2_deepspeed.

tests/test_config_switch.py writes them out and runs them under their launchers; each rank saves
``rank{N}.pt``: the engine's and optimizer's class names, the batches it trained on and, on rank 0,
the trained parameters (gathered from the ZeRO-3 partitions with the engine's own consolidation).
"""

# A DeepSpeed-tutorial loop: add_config_arguments, deepspeed.initialize(args=..., model=..., model_parameters=...).
DEEPSPEED_TUTORIAL = '''
import argparse, os
import deepspeed, torch
from tiny_models import batches, make_model

parser = argparse.ArgumentParser(description="tiny LM")
parser.add_argument("--local_rank", type=int, default=-1)
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=3)
parser = deepspeed.add_config_arguments(parser)
args = parser.parse_args()

model = make_model("llama")
engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
seen = []
for batch in batches(args.steps, seed=7):
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    seen.append(batch)
params = engine._zero3_consolidated_16bit_state_dict()
rank = torch.distributed.get_rank()
torch.save({"engine": type(engine).__name__, "optimizer": type(engine.optimizer).__name__, "batches": seen,
            "params": params}, os.path.join(args.out, f"rank{rank}.pt"))
'''

# The shape of Hugging Face's examples/pytorch/language-modeling/run_clm.py: HfArgumentParser, --deepspeed.
TRAINER_EXAMPLE = '''
import os, sys
from dataclasses import dataclass, field
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, default_data_collator
from tiny_models import VOCAB, make_model


@dataclass
class DataTrainingArguments:
    rows: int = field(default=48, metadata={"help": "training rows"})


parser = HfArgumentParser((DataTrainingArguments, TrainingArguments))
data_args, training_args = parser.parse_args_into_dataclasses()
gen = torch.Generator().manual_seed(3)
rows = []
for _ in range(data_args.rows):
    ids = torch.randint(3, VOCAB, (16,), generator=gen)
    rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
seen = []


def collate(features):
    batch = default_data_collator(features)
    seen.append({k: v.clone() for k, v in batch.items()})
    return batch


trainer = Trainer(model=make_model("llama"), args=training_args, train_dataset=rows, data_collator=collate)
trainer.train()
engine = trainer.model_wrapped
params = engine._zero3_consolidated_16bit_state_dict()
rank = torch.distributed.get_rank()
torch.save({"engine": type(engine).__name__, "optimizer": type(engine.optimizer).__name__, "batches": seen,
            "params": params}, os.path.join(training_args.output_dir, f"rank{rank}.pt"))
'''

# An Accelerate loop as in accelerate's examples/by_feature/deepspeed_with_config_support.py.
ACCELERATE_LOOP = '''
import os, sys
import torch
from accelerate import Accelerator
from accelerate.utils import DummyOptim
from tiny_models import batches, make_model

out = sys.argv[1]
accelerator = Accelerator()
model = make_model("llama")
rows = [{k: v[i] for k, v in b.items()} for b in batches(3, seed=7) for i in range(4)]
loader = torch.utils.data.DataLoader(rows, batch_size=4, shuffle=False)
plugin = accelerator.state.deepspeed_plugin
optimizer_cls = DummyOptim if plugin is not None and "optimizer" in plugin.deepspeed_config else torch.optim.AdamW
optimizer = optimizer_cls(model.parameters(), lr=1e-3)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
seen = []
for batch in loader:
    loss = model(**batch).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    seen.append(batch)
params = model._zero3_consolidated_16bit_state_dict()
rank = accelerator.process_index
torch.save({"engine": type(model).__name__, "optimizer": type(model.optimizer).__name__, "batches": seen,
            "params": params}, os.path.join(out, f"rank{rank}.pt"))
accelerator.end_training()
'''

# The DeepSpeed-tutorial loop run once per config in one process (each config a fresh model and engine): what
# each shipped config, its "zo2" section removed, trains with. Saves ``<name>.pt`` per config: the engine's and
# optimizer's class names, the ZeRO stage DeepSpeed ran, the batch and the parameters before and after one step.
FIRST_ORDER_SWEEP = '''
import argparse, copy, json, os
import deepspeed, torch
from tiny_models import batches, make_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("configs", nargs="+")
args = parser.parse_args()
for path in args.configs:
    args.deepspeed_config = path
    model = make_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    batch = batches(1, rows=engine.train_micro_batch_size_per_gpu(), seed=7)[0]
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    stage = engine.zero_optimization_stage()
    after = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else engine.module.state_dict()
    torch.save({"engine": type(engine).__name__, "optimizer": type(engine.optimizer).__name__, "stage": stage,
                "basic_optimizer": type(getattr(engine, "basic_optimizer", None) or engine.optimizer).__name__,
                "batch": batch, "before": before, "after": {n: t.detach().clone() for n, t in after.items()}},
               os.path.join(args.out, os.path.basename(path).replace(".json", ".pt")))
    engine.destroy()
'''

"""The checkpoint package works from a CheckpointSubject alone: it imports no engine, and a subject built
by hand (a dict for a tier) saves and resumes exactly."""
import ast
from pathlib import Path
from types import SimpleNamespace

import torch

from zo2_deepspeed import checkpoint
from zo2_deepspeed.checkpoint import CheckpointSubject, Counters, RunSettings


def test_no_module_of_the_package_imports_the_engine():
    imported = {}
    for file in Path(checkpoint.__file__).parent.glob("*.py"):
        tree = ast.parse(file.read_text())
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported[file.name] = names
    assert len(imported) == 13
    assert {f: [m for m in names if "engine" in m] for f, names in imported.items()} == {f: [] for f in imported}


class DictStore:
    """A tier of unsharded tensors kept in a dict."""

    def __init__(self, tensors: dict) -> None:
        self.tensors = tensors

    def storage_dtype(self, slot):
        return self.tensors[slot.name].dtype

    def partition_size(self, slot):
        return None

    def read_partition(self, slot):
        return self.tensors[slot.name]

    def read_state_partition(self, slot, name):
        return self.tensors[f"{name}/{slot.name}"]

    def write_partition(self, slot, values):
        self.tensors[slot.name] = values.clone()

    def write_state_partition(self, slot, name, values):
        self.tensors[f"{name}/{slot.name}"] = values.clone()


class Recorded:
    """An optimizer or scheduler stand-in: its state dict, and what a load gave it."""

    def __init__(self, state: dict) -> None:
        self.state, self.loaded = state, None

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.loaded = state


def subject_of(store: DictStore, counters: Counters, events: list) -> CheckpointSubject:
    slots = [SimpleNamespace(name="w", shape=torch.Size([2, 3]), numel=6, trainable=True,
                             stored_state={"hessian": None}, updated_through=7),
             SimpleNamespace(name="b", shape=torch.Size([3]), numel=3, trainable=False, stored_state={},
                             updated_through=7)]
    settings = RunSettings(method="hizoo", zo2={"method": "hizoo", "eps": 1e-3}, tier="none",
                           state_names=["hessian"], batch={"micro": 2, "gradient_accumulation_steps": 1},
                           module_config=None)
    return CheckpointSubject(rank=0, world_size=1, store=store, slots=slots, counters=counters,
                             settings=settings, optimizer=Recorded({"lr": 0.5}), lr_scheduler=None,
                             data_loader=None, restore_counters=lambda c: events.append(c),
                             drop_pending_update=lambda: events.append("dropped"))


def test_a_subject_built_by_hand_saves_and_resumes_exactly(tmp_path):
    saved = {"w": torch.randn(6), "hessian/w": torch.rand(6), "b": torch.randn(3, dtype=torch.float64)}
    store = DictStore({k: v.clone() for k, v in saved.items()})
    counters = Counters(global_steps=4, global_samples=8, micro_steps=4, skipped_steps=1, consecutive_skips=0)
    assert checkpoint.save_checkpoint(subject_of(store, counters, []), str(tmp_path)) is True
    assert (tmp_path / "latest").read_text() == "global_step4"

    later = DictStore({k: torch.zeros_like(v) for k, v in saved.items()})
    events: list = []
    subject = subject_of(later, Counters(0, 0, 0, 0, 0), events)
    path, client_state = checkpoint.load_checkpoint(subject, str(tmp_path))
    assert (path, client_state) == (str(tmp_path / "global_step4"), {})
    for name, value in saved.items():
        assert torch.equal(later.tensors[name], value), name
    assert events == ["dropped", counters]
    assert subject.optimizer.loaded == {"lr": 0.5}
    assert [s.updated_through for s in subject.slots] == [-1, -1]
    tensors, meta = checkpoint.read_full_state(str(tmp_path))
    assert meta["method"] == "hizoo" and meta["batch"] == {"micro": 2, "gradient_accumulation_steps": 1}
    assert torch.equal(tensors["w"], saved["w"].view(2, 3)) and torch.equal(tensors["b"], saved["b"])

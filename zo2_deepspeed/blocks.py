"""Execution blocks of any Hugging Face model, and splitting a batch into perturbation groups.

A block is a module whose parameters are resident together: each layer of the model's repeated
layer list, plus every other module that owns parameters (embeddings, positional embeddings, final
norm, head). No model's forward is rewritten: a block's ``forward`` attribute is wrapped so that
the pipeline can run it once per perturbation group on that group's rows of the batch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .errors import ModelStructureError


def param_numel(p: torch.Tensor) -> int:
    """Element count of a parameter, also while it is a ZeRO-3 partition (``p.numel()`` is then 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def param_shape(p: torch.Tensor) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)


@dataclass(eq=False)
class ParamSlot:
    """One model parameter as the pipeline sees it (a tied weight is one slot, named once)."""

    name: str
    param: nn.Parameter
    trainable: bool
    decays: bool
    group_index: int = -1
    owners: list["Block"] = field(default_factory=list, repr=False)
    # residency state, owned by the pipeline
    work: Optional[torch.Tensor] = field(default=None, repr=False)
    compute: Optional[torch.Tensor] = field(default=None, repr=False)
    perturbed: Optional[torch.Tensor] = field(default=None, repr=False)
    noise: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    offset: Optional[Any] = field(default=None, repr=False)
    updated_through: int = -1
    fetches: int = 0
    dirty: bool = False
    state: dict[str, Any] = field(default_factory=dict, repr=False)
    """Method state (e.g. HiZOO's H) as full tensors on the device while resident."""
    stored_state: dict[str, Any] = field(default_factory=dict, repr=False)
    """The tier's at-rest form of the method state (owned by the tier)."""
    written: Any = field(default=None, repr=False)
    """Event after which an asynchronous write-back of this parameter has landed (None: nothing in flight)."""
    first_order: bool = False
    """Trained by the first-order tail's optimizer (then ``trainable`` is False: ZO never touches it)."""
    pinned: bool = False
    """Kept resident for the whole run (the first-order tail): never fetched again nor released by the pipeline."""

    @property
    def shared(self) -> bool:
        return len(self.owners) > 1

    @property
    def resident(self) -> bool:
        return self.work is not None

    @property
    def numel(self) -> int:
        return param_numel(self.param)

    @property
    def shape(self) -> torch.Size:
        return param_shape(self.param)


@dataclass(eq=False)
class Block:
    """A module whose parameters are gathered, perturbed, updated and released together."""

    index: int
    name: str
    module: nn.Module
    slots: list[ParamSlot] = field(default_factory=list, repr=False)
    original_forward: Optional[Callable] = field(default=None, repr=False)
    had_instance_forward: bool = False

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.slots)


def _layer_list(model: nn.Module) -> tuple[str, Optional[nn.ModuleList]]:
    """The model's repeated layer stack: the largest ModuleList of one class that holds parameters."""
    best: tuple[tuple[int, int], str, Optional[nn.ModuleList]] = ((0, 0), "", None)
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(param_numel(p) for p in module.parameters())
        if size == 0:
            continue
        key = (len(module), size)
        if key > best[0]:
            best = (key, name, module)
    return best[1], best[2]


def _is_within(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def find_blocks(model: nn.Module) -> list[Block]:
    """Blocks of ``model`` in registration order (the pipeline learns the call order at run time)."""
    canonical: dict[int, str] = {id(p): n for n, p in model.named_parameters()}
    list_name, layers = _layer_list(model)
    layer_names = {f"{list_name}.{i}" if list_name else str(i) for i in range(len(layers))} if layers is not None \
        else set()

    owners: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name in layer_names:
            owners.append((name, module))
            continue
        if layers is not None and any(_is_within(name, ln) for ln in layer_names):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            owners.append((name, module))

    if layers is not None:
        for name, module in owners:
            if name not in layer_names and _is_within(list_name, name):
                direct = [f"{name}.{n}" if name else n for n, _ in module.named_parameters(recurse=False)]
                raise ModelStructureError(
                    f"parameter {direct[0]} is owned by module {name or '<model>'!r}, whose forward runs the whole "
                    f"layer stack {list_name!r}: it cannot stream as a block. Move it into a submodule.")

    # Keep only the outermost owners: a parameter-owning module inside another one runs inside it.
    roots = [(n, m) for n, m in owners if not any(other != n and _is_within(n, other) for other, _ in owners)]

    blocks: list[Block] = []
    slots: dict[int, ParamSlot] = {}
    for index, (name, module) in enumerate(roots):
        block = Block(index=index, name=name or "<model>", module=module)
        for p in module.parameters():
            slot = slots.get(id(p))
            if slot is None:
                shape = param_shape(p)
                slot = ParamSlot(name=canonical[id(p)], param=p, trainable=p.requires_grad, decays=len(shape) >= 2)
                slots[id(p)] = slot
            if block not in slot.owners:
                slot.owners.append(block)
            block.slots.append(slot)
        blocks.append(block)

    covered = {id(s.param) for s in slots.values()}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise ModelStructureError(f"parameters outside every block: {missing[:5]}")
    return blocks


# ---------------------------------------------------------------------------------------------
# Group splitting: the batch is replicated G times (group-major); a block runs group g on rows
# [g*B, (g+1)*B) of every batched tensor argument.


def _is_batched(x: Any, rows: int) -> bool:
    # 1-D tensors are never split: a length-G*B vector is as likely to be positions (cache_position).
    return isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == rows


def split_groups(obj: Any, groups: int, rows: int) -> tuple[list[Any], bool]:
    """Split every batched tensor inside ``obj`` into ``groups`` parts; (parts, whether any was batched)."""
    if _is_batched(obj, rows):
        return list(obj.chunk(groups, dim=0)), True
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
        parts = [split_groups(x, groups, rows) for x in obj]
        found = any(f for _, f in parts)
        return [type(obj)(p[0][g] for p in parts) for g in range(groups)], found
    if isinstance(obj, dict) and type(obj) is dict:
        parts = {k: split_groups(v, groups, rows) for k, v in obj.items()}
        found = any(f for _, f in parts.values())
        return [{k: v[0][g] for k, v in parts.items()} for g in range(groups)], found
    return [obj] * groups, False


def concat_groups(outs: list[Any], per_group_rows: int, batched_input: bool, block_name: str) -> Any:
    """Join per-group outputs along dim 0; outputs of unbatched inputs are expanded to B rows first."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        if not batched_input:
            if first.dim() == 0 or first.shape[0] != 1:
                raise ModelStructureError(
                    f"block {block_name!r} got no batched input and returned shape {tuple(first.shape)}: without a "
                    f"leading batch (or singleton) dimension its per-group outputs cannot be kept apart")
            outs = [o.expand(per_group_rows, *o.shape[1:]) for o in outs]
        return torch.cat(outs, dim=0)
    if first is None or isinstance(first, (int, float, bool, str)):
        return first
    if isinstance(first, dict):  # also transformers ModelOutput (an OrderedDict)
        joined = {k: concat_groups([o[k] for o in outs], per_group_rows, batched_input, block_name) for k in first}
        try:
            return type(first)(**joined)
        except TypeError:
            return type(first)(joined)
    if isinstance(first, (tuple, list)):
        joined = [concat_groups([o[i] for o in outs], per_group_rows, batched_input, block_name)
                  for i in range(len(first))]
        return type(first)(*joined) if hasattr(first, "_fields") else type(first)(joined)
    raise ModelStructureError(f"block {block_name!r} returned a {type(first).__name__}, which cannot be joined across "
                              f"perturbation groups (use_cache=False keeps caches out of block outputs)")


BlockRunner = Callable[[Block, Callable, tuple, dict], Any]


def install_wrappers(blocks: list[Block], runner: BlockRunner) -> None:
    """Route every block's forward through ``runner(block, original_forward, args, kwargs)``."""
    for block in blocks:
        if block.original_forward is not None:
            continue
        module = block.module
        block.had_instance_forward = "forward" in module.__dict__
        original = module.forward
        block.original_forward = original

        @functools.wraps(original)
        def wrapped(*args: Any, __block: Block = block, __original: Callable = original, **kwargs: Any) -> Any:
            return runner(__block, __original, args, kwargs)

        module.forward = wrapped


def remove_wrappers(blocks: list[Block]) -> None:
    """Give every block its own forward back."""
    for block in blocks:
        if block.original_forward is None:
            continue
        if block.had_instance_forward:
            block.module.forward = block.original_forward
        else:
            del block.module.forward
        block.original_forward = None


def iter_slots(blocks: list[Block]) -> Iterator[ParamSlot]:
    """Every parameter slot once, in block order."""
    seen: set[int] = set()
    for block in blocks:
        for slot in block.slots:
            if id(slot) not in seen:
                seen.add(id(slot))
                yield slot

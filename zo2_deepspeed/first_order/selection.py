"""Which blocks form the first-order tail, which of their parameters train first-order, and the size cap.

The tail is the end of the model: the last K layers of its layer stack and the head (the final norm and
the LM head, found as the block finder finds blocks: the model's own output embedding, plus every other
parameter-owning module outside the layer stack that is not an embedding), or the blocks holding a
parameter that ``modules`` names. Every trainable parameter of a tail block trains first-order; a frozen
one stays fixed and resident. That the tail really runs last is checked at every training forward
(``tail.TailRunner``): the registration order of a model's modules need not be its execution order.

Tied weights (a head tied to the input embedding, as in SmolLM2): the tied matrix is one parameter, held
by a body block and a tail block. It trains first-order, from the head's gradient only, and is excluded
from ZO: the input embedding uses it unperturbed and gives it no gradient (the body runs without autograd).
So it is updated once per step, by the first-order optimizer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from ..blocks import Block, ParamSlot, _layer_list, iter_slots
from ..errors import ConfigError
from .settings import SECTION


@dataclass
class TailSelection:
    """The tail's blocks (model order) and slots, split into first-order and frozen ones."""

    blocks: list[Block]
    first_order: list[ParamSlot]
    """Trainable parameters of the tail: trained by the first-order optimizer, never by ZO."""
    frozen: list[ParamSlot]
    """Parameters of the tail that do not train (PEFT's base weights, a frozen norm): resident and fixed."""
    tied: list[ParamSlot] = field(default_factory=list)
    """First-order parameters that body blocks use too (a head tied to the input embedding)."""
    model_numel: int = 0

    @property
    def slots(self) -> list[ParamSlot]:
        return self.first_order + self.frozen

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.slots)

    @property
    def first_order_numel(self) -> int:
        return sum(s.numel for s in self.first_order)


def _call(model: nn.Module, name: str) -> Optional[nn.Module]:
    get = getattr(model, name, None)
    try:
        module = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    return module if isinstance(module, nn.Module) else None


def head_blocks(model: nn.Module, blocks: list[Block], layer_blocks: set[int]) -> list[Block]:
    """The final norm and the LM head: the output embedding's block and every other non-layer block that is not
    an embedding (input, positional)."""
    output = _call(model, "get_output_embeddings")
    inputs = _call(model, "get_input_embeddings")
    if output is None or not any(b.module is output for b in blocks):
        raise ConfigError(f"{SECTION}.head: {type(model).__name__} has no output embedding among its blocks "
                          f"(get_output_embeddings() returned {type(output).__name__ if output else None}): name the "
                          f"tail's parameters with {SECTION}.modules instead")
    return [b for b in blocks if b.index not in layer_blocks and
            (b.module is output or (b.module is not inputs and not isinstance(b.module, nn.Embedding)))]


def _layer_blocks(model: nn.Module, blocks: list[Block]) -> list[Block]:
    list_name, layers = _layer_list(model)
    if layers is None:
        return []
    names = {f"{list_name}.{i}" if list_name else str(i) for i in range(len(layers))}
    return [b for b in blocks if b.name in names]


def _qualified_names(block: Block) -> list[str]:
    prefix = "" if block.name == "<model>" else f"{block.name}."
    return [prefix + n for n, _ in block.module.named_parameters(remove_duplicate=False)]


def select_tail(model: nn.Module, blocks: list[Block], config: Any) -> TailSelection:
    """The tail ``config`` (a ``FirstOrderConfig``) names; raises ConfigError naming the field when it cannot."""
    if config.modules is not None:
        patterns = [re.compile(p) for p in config.modules]
        chosen = [b for b in blocks if any(p.search(n) for p in patterns for n in _qualified_names(b))]
        if not chosen:
            raise ConfigError(f"{SECTION}.modules {config.modules} matches no parameter of the model (e.g. "
                              f"{next(iter(_qualified_names(blocks[-1])), '?')}): the patterns are searched in "
                              f"parameter names")
    else:
        layers = _layer_blocks(model, blocks)
        if config.blocks > len(layers):
            raise ConfigError(f"{SECTION}.blocks is {config.blocks}, but the model has {len(layers)} layers")
        layer_ids = {b.index for b in layers}
        chosen = layers[len(layers) - config.blocks:] if config.blocks else []
        if config.head:
            chosen = chosen + head_blocks(model, blocks, layer_ids)
    chosen = sorted({b.index: b for b in chosen}.values(), key=lambda b: b.index)
    tail_ids = {id(b) for b in chosen}
    seen: set[int] = set()
    first_order, frozen, tied = [], [], []
    for block in chosen:
        for slot in block.slots:
            if id(slot) in seen:
                continue
            seen.add(id(slot))
            (first_order if slot.trainable else frozen).append(slot)
            if slot.trainable and any(id(owner) not in tail_ids for owner in slot.owners):
                tied.append(slot)
    names = ", ".join(b.name for b in chosen)
    if not first_order:
        raise ConfigError(f"{SECTION} selects blocks [{names}], which hold no trainable parameter (all are frozen or "
                          f"outside the optimizer's groups): select blocks that train")
    total = sum(s.numel for s in iter_slots(blocks))
    selection = TailSelection(chosen, first_order, frozen, tied, total)
    if selection.numel > config.max_fraction * total:
        raise ConfigError(f"{SECTION}.max_fraction is {config.max_fraction:g}, but the first-order tail [{names}] holds "
                          f"{selection.numel:,} parameters, {selection.numel / total:.1%} of the model's {total:,} (it "
                          f"stays resident on the device with its gradients and optimizer state): select fewer "
                          f"blocks, or raise {SECTION}.max_fraction")
    return selection


def mark_first_order(selection: TailSelection) -> None:
    """Take the tail's trainable parameters out of ZO: never perturbed, never given a ZO update."""
    for slot in selection.first_order:
        slot.trainable = False
        slot.group_index = -1
        slot.first_order = True

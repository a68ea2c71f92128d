"""Running the tail's blocks with autograd inside the ZO forward: pieces of rows, one autograd leaf per piece.

The model calls its blocks as usual. A body block runs under ``no_grad`` (the pipeline's job): its output
for every group enters the tail as a plain tensor, and the body keeps no activations. A tail block runs
here, on the batch's rows cut into pieces:

* rows of a group whose gradient counts (``ZOMethod.tail_weights``: MeZO's two groups, FZOO's and HiZOO's
  unperturbed one), in chunks of ``chunk_rows``: with autograd, each piece with its own leaf tensors in
  place of the block's first-order parameters (aliases of the same memory, swapped into the module for the
  call), so that one backward gives each piece's gradient separately; a hook adds it to the float64
  accumulator (``gradient.TailGradient``) and frees it;
* rows of the other groups: under ``no_grad`` (they only give the ZO part its losses).

The pieces' outputs are concatenated in row order, so the model's code between blocks (slicing before the
head, the final norm) sees one tensor; autograd keeps the pieces apart, as no op of a causal LM mixes rows.
The tail's parameters are never perturbed: the pipeline's perturbation part only sees ZO parameters.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from ..blocks import Block, ParamSlot, concat_groups
from ..errors import ModelStructureError
from .gradient import TailGradient


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of the grouped batch; ``group`` (index in this rank's share) and ``chunk`` when it
    takes part in the gradient, None for rows that run without autograd."""

    start: int
    stop: int
    group: Optional[int] = None
    chunk: int = 0


def pieces(weights: list[float], rows_per_group: int, chunk_rows: Optional[int]) -> list[Piece]:
    """The pieces of a grouped batch (group-major rows) for the given per-group gradient weights.

    A short micro-batch (fewer rows than chunk_rows divides) ends with a shorter chunk: every row is in one."""
    chunk = chunk_rows or rows_per_group
    out: list[Piece] = []
    for g, weight in enumerate(weights):
        first = g * rows_per_group
        if weight == 0:
            if out and out[-1].group is None and out[-1].stop == first:
                out[-1] = Piece(out[-1].start, first + rows_per_group)
            else:
                out.append(Piece(first, first + rows_per_group))
            continue
        out.extend(Piece(first + k * chunk, first + min((k + 1) * chunk, rows_per_group), g, k)
                   for k in range(-(-rows_per_group // chunk)))
    return out


def slice_rows(obj: Any, start: int, stop: int, rows: int) -> tuple[Any, bool]:
    """Rows [start, stop) of every batched tensor inside ``obj`` (leading dimension ``rows``); (result, found one)."""
    if isinstance(obj, torch.Tensor) and obj.dim() >= 2 and obj.shape[0] == rows:
        return obj[start:stop], True
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
        parts = [slice_rows(x, start, stop, rows) for x in obj]
        return type(obj)(p[0] for p in parts), any(p[1] for p in parts)
    if isinstance(obj, dict) and type(obj) is dict:
        parts = {k: slice_rows(v, start, stop, rows) for k, v in obj.items()}
        return {k: v[0] for k, v in parts.items()}, any(v[1] for v in parts.values())
    return obj, False


def _registrations(block: Block, slots: list[ParamSlot]) -> list[tuple[nn.Module, str, ParamSlot]]:
    """Where each first-order parameter of ``block`` is registered: (module, attribute, slot), tied names too."""
    by_param = {id(s.param): s for s in slots}
    return [(module, attr, by_param[id(p)]) for module in block.module.modules()
            for attr, p in module._parameters.items() if p is not None and id(p) in by_param]


class ActivationMeter:
    """Bytes of the tensors autograd saves for the tail's backward (parameters excluded), counted on request."""

    def __init__(self) -> None:
        self.enabled = False
        self.exclude: set[int] = set()
        self.storages: dict[int, int] = {}

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude:
            self.storages[ptr] = storage.nbytes()
        return t

    def scope(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


class TailRunner:
    """What the pipeline calls for the tail's blocks in a training forward (``BlockPipeline.tail``)."""

    def __init__(self, blocks: list[Block], first_order: list[ParamSlot], gradient: TailGradient,
                 chunk_rows: Optional[int]) -> None:
        self.indices = {b.index for b in blocks}
        self.names = [b.name for b in blocks]
        self.gradient = gradient
        self.chunk_rows = chunk_rows
        self.registrations = {b.index: _registrations(b, first_order) for b in blocks}
        self.weights: list[float] = []
        """Gradient weight of each group of this rank's share, set before each forward."""
        self.meter = ActivationMeter()
        self._pieces: tuple[Optional[int], list[Piece]] = (None, [])
        self._leaves: dict[tuple[int, int, int], nn.Parameter] = {}

    def owns(self, block: Block) -> bool:
        return block.index in self.indices

    def check_body(self, block: Block, forward: Any) -> None:
        """A body block must not run once the tail has begun: the backward starts at the loss."""
        if forward.tail_entered is not None:
            raise ModelStructureError(
                f"block {block.name!r} runs after {forward.tail_entered!r}, a block of the first-order tail "
                f"[{', '.join(self.names)}]: the tail must be the last blocks the model runs (their backward starts "
                f"at the loss); choose them with zo2.first_order.modules")

    def graded(self) -> bool:
        """Whether this rank's share of the groups has a group whose gradient counts (else: nothing to backward)."""
        return any(w != 0 for w in self.weights)

    def run(self, block: Block, original: Callable, args: tuple, kwargs: dict, forward: Any) -> Any:
        if forward.tail_entered is None:
            forward.tail_entered = block.name
        rows = len(forward.groups) * forward.rows_per_group
        outputs, batched = [], False
        for piece in self._pieces_of(forward):
            piece_args, found_args = slice_rows(args, piece.start, piece.stop, rows)
            piece_kwargs, found_kwargs = slice_rows(kwargs, piece.start, piece.stop, rows)
            batched = batched or found_args or found_kwargs
            if piece.group is None:
                with torch.no_grad():
                    outputs.append(original(*piece_args, **piece_kwargs))
                continue
            with torch.enable_grad(), self._swapped(block, piece), self.meter.scope():
                outputs.append(original(*piece_args, **piece_kwargs))
        if not batched:
            raise ModelStructureError(f"block {block.name!r} of the first-order tail got no input with the batch's "
                                      f"{rows} rows: its rows cannot be cut into pieces")
        return concat_groups(outputs, forward.rows_per_group, True, block.name)

    def _pieces_of(self, forward: Any) -> list[Piece]:
        key, cached = self._pieces
        if key != id(forward):
            self._leaves.clear()
            cached = pieces(self.weights, forward.rows_per_group, self.chunk_rows)
            self._pieces = (id(forward), cached)
        return cached

    def end_pass(self) -> None:
        """Drop the pass's leaves (after its backward)."""
        self._leaves.clear()
        self._pieces = (None, [])

    @contextlib.contextmanager
    def _swapped(self, block: Block, piece: Piece) -> Iterator[None]:
        registrations = self.registrations[block.index]
        try:
            for module, attr, slot in registrations:
                module._parameters[attr] = self._leaf(slot, piece)
            yield
        finally:
            for module, attr, slot in registrations:
                module._parameters[attr] = slot.param

    def _leaf(self, slot: ParamSlot, piece: Piece) -> nn.Parameter:
        """This piece's alias of ``slot``: a separate autograd leaf, so its gradient arrives on its own."""
        key = (id(slot), piece.group, piece.chunk)
        leaf = self._leaves.get(key)
        if leaf is None:
            leaf = nn.Parameter(slot.compute, requires_grad=True)
            weight, gradient = self.weights[piece.group], self.gradient

            def collect(tensor: torch.Tensor, slot: ParamSlot = slot, weight: float = weight) -> None:
                gradient.add(slot, tensor.grad, weight)
                tensor.grad = None

            leaf.register_post_accumulate_grad_hook(collect)
            self._leaves[key] = leaf
        return leaf

"""Per-group losses from one grouped forward (the group-major rows [g*B, (g+1)*B) are group g), and how a
step's losses are weighted and reduced.

A step's group loss is the mean over every *item* of the step: the predicted tokens of the default
causal-LM loss, or the elements a ``loss_fn`` returns, in all micro-batches of the accumulation window
on all data-parallel replicas. Each forward contributes a ``LossSums`` record (per group the float64
sum of its fp32 item losses, and its item and row counts); records are added across micro-batches,
gathered across perturbation ranks and all-reduced across replicas (``comm.reduce_and_divide``), and
divided once. So how the rows were split (1 rank of B, 2 ranks of B/2, accumulation, a short last
batch, padding that leaves different token counts per row) does not change the weighting: every item
weighs the same, as on one rank with one batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from .errors import BatchError

LossFn = Callable[[Any, Mapping[str, Any]], torch.Tensor]
"""loss_fn(outputs_of_one_group, batch) -> per-example losses [B] (each element one item of weight 1; any
shape works, e.g. [B, T] per-token losses), or a 0-dim tensor: the mean over the micro-batch's B rows, which
then weighs as B items (so a short last batch weighs by its rows, as the per-example form does)."""

IGNORE_INDEX = -100
LOSS_CHUNK_ELEMENTS = 1 << 26
"""Logits per group above this are reduced in slices of positions (fp32 copies of one slice at a time)."""


def group_slice(obj: Any, group: int, groups: int, rows: int) -> Any:
    """The part of a model output that belongs to one group (tensors with G*B leading rows are cut)."""
    if isinstance(obj, torch.Tensor):
        return obj.chunk(groups, dim=0)[group] if obj.dim() >= 1 and obj.shape[0] == rows else obj
    if isinstance(obj, Mapping):
        items = {k: group_slice(v, group, groups, rows) for k, v in obj.items()}
        try:
            return type(obj)(**items)
        except TypeError:
            return dict(items)
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
        return type(obj)(group_slice(v, group, groups, rows) for v in obj)
    return obj


def logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        logits = outputs[0]
    if logits is None:
        raise BatchError("the model output has no 'logits': give the engine a loss_fn(outputs, batch)")
    return logits


def masked_labels(labels: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Labels with padded positions (attention_mask == 0) set to the ignore index."""
    if attention_mask is None:
        return labels
    return labels.masked_fill(attention_mask.to(labels.device) == 0, IGNORE_INDEX)


def shifted_labels(labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Flat next-token labels (padded with the ignore index after the last position) on ``device``."""
    return F.pad(labels.to(device), (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, counted: Optional[int] = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not ignored (float64).

    The loss Hugging Face's ``ForCausalLMLoss`` computes (labels shifted by padding with the ignore
    index, mean reduction), so an unperturbed group's loss equals ``model(..., labels=...).loss`` to
    fp32 rounding. It is ``causal_lm_loss_sum / counted``: the sum is what the engine reduces.
    ``counted``: the positions counted, when the caller knows them (counting reads a device value: a host wait).
    """
    if counted is None:
        counted = predicted_tokens(labels)
    if counted == 0:
        raise BatchError("labels hold no position to predict (all -100 or padding after the causal shift)")
    return causal_lm_loss_sum(logits, labels) / counted


def predicted_tokens(labels: torch.Tensor) -> int:
    """The positions a causal LM predicts: labels not ignored after the shift (what ``num_items_in_batch`` counts)."""
    return int((shifted_labels(labels, labels.device) != IGNORE_INDEX).sum())


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the next-token cross-entropies of the positions whose label is not ignored (float64, exact).

    The fp32 token losses are summed in float64, where the sum of values within a loss's range is
    exact whatever the order (see ``sum_exactly``): the sum depends only on the tokens, not on how the
    batch was split (rows per rank, micro-batches, slices, threads).
    """
    vocab = logits.shape[-1]
    shifted = shifted_labels(labels, logits.device)
    flat = logits.reshape(-1, vocab)
    # Long sequences × large vocabularies: an fp32 copy (and its log-softmax) of every position's logits
    # would be the largest allocation of the step; reduce slices of positions one at a time.
    rows = flat.shape[0] if flat.numel() <= LOSS_CHUNK_ELEMENTS else max(1, LOSS_CHUNK_ELEMENTS // vocab)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, flat.shape[0], rows):
        total += sum_exactly(F.cross_entropy(flat[start:start + rows].float(), shifted[start:start + rows],
                                             ignore_index=IGNORE_INDEX, reduction="none"))
    return total


def sum_exactly(values: torch.Tensor) -> torch.Tensor:
    """Sum of fp32 (or narrower) values in float64, so that the order and blocking of the sum do not matter.

    Each addend has a 24-bit significand and float64 keeps 53 bits: every partial sum is exact while
    the total stays below 2^29 times the smallest nonzero addend (token losses of an untrained or
    fine-tuned model, within a few orders of magnitude of each other). Beyond that, order changes the float64
    sum by at most n float64 ulps for n addends, ~n·2^-29 of an fp32 ulp, which the fp32 rounding of
    the step's group losses removes in all but that fraction of cases.
    """
    return values.detach().reshape(-1).double().sum()


@dataclass
class LossSums:
    """The additive record of a step's group losses: what is summed across micro-batches and ranks, then divided once.

    ``sums``: per group, the float64 sum of its fp32 item losses ([G], exact: see ``sum_exactly``).
    ``items``: the items those sums cover, the same for every group (the predicted tokens, or the
    elements of ``loss_fn``'s result). ``rows``: the examples (batch rows) they cover, for the step's
    sample count. Records add (``+``); ``means()`` divides once. A first-order part that must see the
    very loss the ZO part sees accumulates the gradient of ``sums`` and divides it by the step's
    reduced ``items`` (``comm.reduce_and_divide``).
    """

    sums: torch.Tensor
    items: int
    rows: int

    def __add__(self, other: "LossSums") -> "LossSums":
        if other.sums.shape != self.sums.shape:
            raise RuntimeError(f"adding loss sums of {other.sums.numel()} groups to sums of {self.sums.numel()}")
        return LossSums(self.sums + other.sums.to(self.sums.device), self.items + other.items, self.rows + other.rows)

    def state(self) -> dict:
        """JSON-able, exact (float64 values round-trip through JSON): a checkpoint taken inside an accumulation window."""
        return {"sums": self.sums.double().cpu().tolist(), "items": self.items, "rows": self.rows}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "LossSums":
        return cls(torch.tensor(state["sums"], dtype=torch.float64), int(state["items"]), int(state["rows"]))

    def means(self) -> torch.Tensor:
        """Per-group mean item loss (float64): one division of the exact sums by the item count."""
        if self.items <= 0:
            raise BatchError("the step's batches hold no item to average (no label to predict on any rank)")
        return self.sums / self.items

    def step_losses(self) -> torch.Tensor:
        """The group losses a step's update uses: ``means()`` rounded to fp32 once (returned as float64).

        With exact sums the mean is the same float64 however the items were split; where a sum was not
        exact (see ``sum_exactly``) the split moves it by float64 ulps, which this rounding removes in all
        but a vanishing fraction of steps.
        """
        return self.means().float().double()


def group_loss_sums(outputs: Any, batch: Mapping[str, Any], groups: int, rows_per_group: int,
                    loss_fn: Optional[LossFn] = None) -> LossSums:
    """The ``LossSums`` of one grouped forward: per group the float64 sum of its item losses, on the logits' device.

    The default loss: the next-token cross-entropies of the positions whose (shifted) label is not
    ignored, padding (attention_mask 0) masked; every group has the same labels, so the same items.
    With ``loss_fn``: its per-example result, each element one item, or its scalar as the mean of the
    micro-batch's rows (sum = scalar × rows, exact in float64).
    """
    rows = groups * rows_per_group
    sums = []
    if loss_fn is None:
        logits = logits_of(outputs)
        labels = masked_labels(batch["labels"], batch.get("attention_mask"))
        items = predicted_tokens(labels)  # every group has these labels
        if items == 0:
            raise BatchError("labels hold no position to predict (all -100 or padding after the causal shift)")
        for part in logits.chunk(groups, dim=0):
            sums.append(causal_lm_loss_sum(part, labels))
    else:
        items = None
        for g in range(groups):
            loss = loss_fn(group_slice(outputs, g, groups, rows), batch)
            values, count = loss_fn_items(loss, rows_per_group)
            total = sum_exactly(values)
            if items is not None and count != items:
                raise BatchError(f"loss_fn returned {count} values for group {g} but {items} for group 0: every "
                                 f"group must weigh the same items")
            items = count
            sums.append(total)
    return LossSums(torch.stack([v.reshape(()) for v in sums]), int(items), rows_per_group)


def loss_fn_items(loss: Any, rows_per_group: int) -> tuple[torch.Tensor, int]:
    """What a ``loss_fn`` result adds to a group's sum, and how many items it counts: the weighting rule, in one place.

    Each element of a per-example (or any non-scalar) result is one item of weight 1. A 0-dim result is the
    mean over the micro-batch's rows: it adds ``value × rows`` and counts ``rows`` (exact in float64), so a
    short batch weighs by its rows as the per-example form does. The values keep their autograd graph: a
    first-order part sums them with gradients, the ZO part with ``sum_exactly``.
    """
    if not isinstance(loss, torch.Tensor):
        raise BatchError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.dim() == 0:
        return loss.double() * rows_per_group, rows_per_group
    if loss.numel() == 0:
        raise BatchError("loss_fn returned an empty tensor")
    return loss, loss.numel()


def group_losses(outputs: Any, batch: Mapping[str, Any], groups: int, rows_per_group: int,
                 loss_fn: Optional[LossFn] = None) -> torch.Tensor:
    """One scalar loss per group for this forward alone, as a float64 vector (``group_loss_sums(...).means()``)."""
    return group_loss_sums(outputs, batch, groups, rows_per_group, loss_fn).means()


def hf_items_scale(items: int, num_items: Any) -> float:
    """The factor that turns a micro-batch's mean token loss into Hugging Face's ``num_items_in_batch`` form.

    Given ``num_items_in_batch`` (from the HF Trainer: the label tokens of every micro-batch of the
    step, summed over the data-parallel ranks when ``average_tokens_across_devices``), an HF model
    returns its token-loss sum divided by it; the Trainer then neither divides by the accumulation
    steps nor averages over ranks (it multiplies by their number), so what it logs is the step's mean
    over all its tokens. ``items``: this micro-batch's predicted tokens. 1.0 when not given.
    """
    if num_items is None:
        return 1.0
    total = float(num_items)
    return items / total if total > 0 else 1.0


class ZOLoss(torch.Tensor):
    """The step's loss estimate: a 0-dim tensor that also reads like a model output.

    DeepSpeed returns whatever the module returns, so scripts written for Hugging Face models take
    ``engine(**batch).loss`` (and the HF Trainer ``outputs["loss"]`` or ``outputs[0]``), while scripts
    for loss-returning modules use the result itself. Both work: ``.loss``, ``["loss"]`` and ``[0]``
    give the plain tensor, and arithmetic on it gives plain tensors. ``group_losses`` holds the
    per-group losses of this micro-batch.
    """

    group_losses: torch.Tensor

    @classmethod
    def wrap(cls, value: torch.Tensor, group_losses: torch.Tensor) -> "ZOLoss":
        out = value.as_subclass(cls)
        out.group_losses = group_losses
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # results are plain tensors
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @property
    def loss(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)

    def __getitem__(self, key: Any) -> torch.Tensor:
        if self.dim() == 0 and (key == 0 or key == "loss"):
            return self.as_subclass(torch.Tensor)
        return super().__getitem__(key)

    def __format__(self, spec: str) -> str:
        return self.as_subclass(torch.Tensor).__format__(spec)

    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        return self.as_subclass(torch.Tensor).clone()

    def __reduce_ex__(self, protocol: int) -> Any:
        return self.as_subclass(torch.Tensor).clone().__reduce_ex__(protocol)

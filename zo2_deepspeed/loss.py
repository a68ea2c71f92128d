"""Per-group losses from one grouped forward: the group-major rows [g*B, (g+1)*B) are group g."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from .errors import BatchError

LossFn = Callable[[Any, Mapping[str, Any]], torch.Tensor]
"""loss_fn(outputs_of_one_group, batch) -> per-example losses [B] (or a scalar)."""

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
    fp32 rounding. The fp32 token losses are summed in float64, where the sum of values within a loss's
    range is exact whatever the order: the mean then depends only on the tokens, not on how the batch
    was split (rows per rank, micro-batches, slices, threads), which makes data parallelism and
    gradient accumulation reproduce one rank bit for bit (see ``sum_exactly``).
    ``counted``: the positions counted, when the caller knows them (counting reads a device value: a host wait).
    """
    vocab = logits.shape[-1]
    shifted = shifted_labels(labels, logits.device)
    if counted is None:
        counted = int((shifted != IGNORE_INDEX).sum())
    if counted == 0:
        raise BatchError("labels hold no position to predict (all -100 or padding after the causal shift)")
    flat = logits.reshape(-1, vocab)
    # Long sequences × large vocabularies: an fp32 copy (and its log-softmax) of every position's logits
    # would be the largest allocation of the step; reduce slices of positions one at a time.
    rows = flat.shape[0] if flat.numel() <= LOSS_CHUNK_ELEMENTS else max(1, LOSS_CHUNK_ELEMENTS // vocab)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, flat.shape[0], rows):
        total += sum_exactly(F.cross_entropy(flat[start:start + rows].float(), shifted[start:start + rows],
                                             ignore_index=IGNORE_INDEX, reduction="none"))
    return total / counted


def sum_exactly(values: torch.Tensor) -> torch.Tensor:
    """Sum of fp32 (or narrower) values in float64, so that the order and blocking of the sum do not matter.

    Each addend has a 24-bit significand and float64 keeps 53 bits: every partial sum is exact while
    the total stays below 2^29 times the smallest addend (token losses of an untrained or fine-tuned
    model, within a few orders of magnitude of each other). Beyond that, order changes the float64
    sum by at most n float64 ulps for n addends, ~n·2^-29 of an fp32 ulp, which the fp32 rounding of
    the step's group losses removes in all but that fraction of cases.
    """
    return values.detach().reshape(-1).double().sum()


def group_losses(outputs: Any, batch: Mapping[str, Any], groups: int, rows_per_group: int,
                 loss_fn: Optional[LossFn] = None) -> torch.Tensor:
    """One scalar loss per group, as a float64 vector on the logits' device (rounded to fp32 once per step)."""
    rows = groups * rows_per_group
    values = []
    if loss_fn is None:
        logits = logits_of(outputs)
        labels = masked_labels(batch["labels"], batch.get("attention_mask"))
        counted = int((shifted_labels(labels, labels.device) != IGNORE_INDEX).sum())  # every group has these labels
        for g, part in enumerate(logits.chunk(groups, dim=0)):
            values.append(causal_lm_loss(part, labels, counted))
    else:
        for g in range(groups):
            loss = loss_fn(group_slice(outputs, g, groups, rows), batch)
            if not isinstance(loss, torch.Tensor):
                raise BatchError(f"loss_fn must return a tensor, got {type(loss).__name__}")
            values.append(sum_exactly(loss) / loss.numel())
    return torch.stack([v.reshape(()) for v in values])


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

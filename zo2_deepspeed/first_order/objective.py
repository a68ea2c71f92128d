"""The loss the tail's backward starts from: the sum of the token losses of the groups whose gradient counts.

It is the loss the ZO part sees (``loss.group_loss_sums``: the causal-LM cross-entropy over the positions
``loss.predicted_tokens`` counts, or a ``loss_fn``'s items weighed by ``loss.loss_fn_items``) before its
division by the count, which ``gradient.TailGradient.finish`` applies once per step. The backward of a sum gives every token the
gradient 1 whatever the order of the sum, so a chunk's gradient does not depend on the other rows.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from ..loss import IGNORE_INDEX, LossFn, group_slice, logits_of, loss_fn_items, masked_labels, predicted_tokens, \
    shifted_labels


def tail_objective(outputs: Any, batch: Mapping[str, Any], weights: list[float], rows_per_group: int,
                   loss_fn: Optional[LossFn] = None) -> tuple[Optional[torch.Tensor], float]:
    """(Σ over the groups with a weight of their loss sums, or None when this rank runs no such group; the
    micro-batch's count of tokens, or of per-example losses with a ``loss_fn``). The weights themselves are
    applied to each chunk's gradient (``tail.TailRunner``), where they are exact."""
    groups = len(weights)
    rows = groups * rows_per_group
    total: Optional[torch.Tensor] = None
    if loss_fn is None:
        logits = logits_of(outputs)
        labels = masked_labels(batch["labels"], batch.get("attention_mask"))
        shifted = shifted_labels(labels, logits.device)
        count = float(predicted_tokens(labels))
        for g, part in enumerate(logits.chunk(groups, dim=0)):
            if weights[g]:
                loss = F.cross_entropy(part.reshape(-1, part.shape[-1]).float(), shifted, ignore_index=IGNORE_INDEX,
                                       reduction="sum")
                total = loss if total is None else total + loss
        return total, count
    count: Optional[float] = None
    for g in range(groups):
        if not weights[g] and count is not None:
            continue
        with torch.set_grad_enabled(bool(weights[g])):
            values, items = loss_fn_items(loss_fn(group_slice(outputs, g, groups, rows), batch), rows_per_group)
        count = float(items)
        if weights[g]:
            total = values.sum() if total is None else total + values.sum()
    return total, count or 0.0

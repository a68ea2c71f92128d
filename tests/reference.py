"""Naive reference loops, written as the MeZO paper's pseudo-code: full forwards per perturbation.

They share only the noise definition with the engine (z of a parameter = f(step seed, name)), so
agreement checks the pipeline's grouping, fusion, deferral and offload, not the estimator itself.
"""
from __future__ import annotations

import torch

from zo2_deepspeed.noise import NoiseSource, parameter_seed, step_seed


def hf_loss(model, batch) -> float:
    """Loss as Hugging Face computes it (labels with padding masked), in eval mode without cache."""
    labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    use_cache=False)
    return float(out.loss)


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def reference_mezo(model, batches, lr: float, eps: float, seed: int, weight_decay: float = 0.0):
    """MeZO-SGD, one step per batch; returns the list of projected gradients."""
    model.eval()
    noise = NoiseSource("cpu")
    params = trainable(model)
    grads = []
    for t, batch in enumerate(batches):
        s = step_seed(seed, t)
        zs = {n: noise.draw(p.shape, parameter_seed(s, 0, n)) for n, p in params}
        original = {n: p.data.clone() for n, p in params}
        for n, p in params:
            p.data = torch.add(original[n], zs[n], alpha=eps)
        plus = hf_loss(model, batch)
        for n, p in params:
            p.data = torch.add(original[n], zs[n], alpha=-eps)
        minus = hf_loss(model, batch)
        for n, p in params:
            p.data = original[n]
        g = (plus - minus) / (2 * eps)
        grads.append(g)
        for n, p in params:
            wd = weight_decay if p.dim() >= 2 else 0.0
            p.data = p.data - lr * (g * zs[n] + wd * p.data)
    return grads

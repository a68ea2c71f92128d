"""A plain PyTorch loop of hybrid training, written from the definitions: ZO body, first-order tail.

Each step runs one full forward per perturbation group (the MeZO paper's pseudo-code), with autograd on
the tail's parameters only; the tail's gradient is the method's weighted sum of the groups' gradients
(MeZO: ½ each of +εz and −εz; FZOO, HiZOO: the unperturbed group), applied by a torch optimizer; the
body gets the method's ZO update from the same losses. It shares with the engine only the noise
definition (z of a parameter = f(step seed, name)), so agreement checks the engine's grouping, tail
pieces, float64 accumulation, residency and deferred body updates.

A tied input embedding is used detached (the body runs without autograd in the engine): the tied matrix
learns from the head's gradient only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zo2_deepspeed.noise import TorchNoise, parameter_seed, step_seed


def _loss(model, batch, detach_embeddings: bool) -> tuple[torch.Tensor, float, int]:
    """(Differentiable sum of the token losses, the mean as the engine computes it: float64 sum, rounded to fp32,
    the count of tokens)."""
    labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:].reshape(-1)
    embeddings = model.get_input_embeddings()(batch["input_ids"])
    if detach_embeddings:
        embeddings = embeddings.detach()
    logits = model(inputs_embeds=embeddings, attention_mask=batch["attention_mask"], use_cache=False).logits
    tokens = F.cross_entropy(logits[:, :-1].reshape(labels.numel(), -1).float(), labels, ignore_index=-100,
                             reduction="none")
    count = int((labels != -100).sum())
    return tokens.sum(), float((tokens.detach().double().sum() / count).float()), count


def _groups(method: str, eps: float, n: int) -> tuple[list, list[float]]:
    """(direction, scale) per group (None: unperturbed) and the tail's gradient weight of each."""
    if method == "mezo":
        return [(0, eps), (0, -eps)], [0.5, 0.5]
    if method == "fzoo":
        return [None] + [(i, eps) for i in range(n)], [1.0] + [0.0] * n
    if method == "hizoo":
        return [None, (0, eps), (0, -eps)], [1.0, 0.0, 0.0]
    raise ValueError(method)


def reference_hybrid(model, batches, tail: set[str], method: str = "mezo", lr: float = 1e-3, eps: float = 1e-2,
                     seed: int = 1, tail_optimizer: str = "sgd", tail_lr: float = 1e-2, n: int = 3,
                     alpha: float = 0.1, weight_decay: float = 0.0) -> list[list[float]]:
    """Train ``model`` in place, one step per batch; returns each step's group losses.

    ``tail``: names of the first-order parameters (their first qualified name); every other trainable parameter
    is ZO. The tail's optimizer has no weight decay; the body's decay is on matrices only, as the engine's.
    """
    model.eval()
    noise = TorchNoise("cpu")
    named = list(model.named_parameters())
    body = [(name, p) for name, p in named if p.requires_grad and name not in tail]
    first_order = [p for name, p in named if name in tail]
    for _, p in body:
        p.requires_grad_(False)
    optimizer = (torch.optim.SGD(first_order, lr=tail_lr) if tail_optimizer == "sgd"
                 else torch.optim.AdamW(first_order, lr=tail_lr, weight_decay=0.0))
    groups, weights = _groups(method, eps, n)
    kind = "rademacher" if method == "fzoo" else "gaussian"
    hessian = {name: torch.ones_like(p) for name, p in body}
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    history = []
    for t, batch in enumerate(batches):
        s = step_seed(seed, t)
        base = {name: p.data.clone() for name, p in body}
        directions = sorted({g[0] for g in groups if g is not None})
        zs = {d: {name: noise.draw(p.shape, parameter_seed(s, d, name), kind) for name, p in body} for d in directions}
        scale_of = {name: hessian[name].rsqrt() if method == "hizoo" else None for name, _ in body}
        losses = []
        accumulated = [torch.zeros(p.shape, dtype=torch.float64) for p in first_order]
        for group, weight in zip(groups, weights):
            for name, p in body:
                if group is None:
                    p.data = base[name]
                    continue
                z = zs[group[0]][name]
                p.data = torch.add(base[name], z * scale_of[name] if scale_of[name] is not None else z, alpha=group[1])
            with torch.set_grad_enabled(weight != 0):
                total, value, count = _loss(model, batch, detach_embeddings=tied)
            if weight:  # the gradient of the mean loss, Σ_g w_g ∇(sum of token losses) / count, summed in float64
                for acc, grad in zip(accumulated, torch.autograd.grad(total, first_order)):
                    acc.add_(grad, alpha=weight)
            losses.append(value)
        for p, acc in zip(first_order, accumulated):
            p.grad = (acc / count).float()
        for name, p in body:
            p.data = base[name]
        history.append(losses)
        # the body's ZO update, from the same losses
        if method == "mezo":
            terms = [(0, (losses[0] - losses[1]) / (2 * eps))]
        elif method == "fzoo":
            perturbed = torch.tensor(losses[1:], dtype=torch.float64)
            sigma = float(perturbed.std(unbiased=False))
            terms = [(i, (li - losses[0]) / (n * sigma)) for i, li in enumerate(losses[1:])]
        else:
            terms = [(0, (losses[1] - losses[2]) / (2 * eps))]
            curvature = abs(losses[1] + losses[2] - 2 * losses[0])
            for name, _ in body:
                h = hessian[name]
                hessian[name] = (1 - alpha) * h + alpha * curvature * h * zs[0][name] ** 2 / (2 * eps ** 2)
        for name, p in body:
            decay = weight_decay if p.dim() >= 2 else 0.0
            step = sum(c * zs[d][name] for d, c in terms)
            if method == "hizoo":
                step = step / hessian[name].sqrt()
            p.data = p.data - lr * (step + decay * p.data)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return history

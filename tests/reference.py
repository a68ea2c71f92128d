"""Naive reference loops, written as the MeZO paper's pseudo-code: full forwards per perturbation.

They share only the noise definition with the engine (z of a parameter = f(step seed, name)), so
agreement checks the pipeline's grouping, fusion, deferral and offload, not the estimator itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zo2_deepspeed.noise import TorchNoise, derive_seed, parameter_seed, step_seed


def hf_loss(model, batch) -> float:
    """Hugging Face's causal-LM loss (labels with padding masked, shifted by one, mean over the counted
    positions), in eval mode without cache.

    The mean of the fp32 token losses is taken exactly (a float64 sum) and rounded to fp32, as the
    engine's step does, instead of by an fp32 sum whose rounding depends on the kernel: equal losses
    make the first step of the engine and of these loops agree to the bit.
    """
    labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:].reshape(-1)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    tokens = F.cross_entropy(logits[:, :-1].reshape(labels.numel(), -1).float(), labels, ignore_index=-100,
                             reduction="none")
    return float((tokens.double().sum() / int((labels != -100).sum())).float())


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _decay(p: torch.Tensor, weight_decay: float) -> float:
    return weight_decay if p.dim() >= 2 else 0.0


def _loss_at(model, params, base, directions, scale, batch) -> float:
    for n, p in params:
        p.data = torch.add(base[n], directions[n], alpha=scale)
    loss = hf_loss(model, batch)
    for n, p in params:
        p.data = base[n]
    return loss


def reference_mezo(model, batches, lr: float, eps: float, seed: int, weight_decay: float = 0.0, noise=None):
    """MeZO-SGD, one step per batch; returns the list of projected gradients (``noise``: torch's by default)."""
    model.eval()
    noise = noise or TorchNoise("cpu")
    params = trainable(model)
    grads = []
    for t, batch in enumerate(batches):
        s = step_seed(seed, t)
        zs = {n: noise.draw(p.shape, parameter_seed(s, 0, n)) for n, p in params}
        original = {n: p.data.clone() for n, p in params}
        plus = _loss_at(model, params, original, zs, eps, batch)
        minus = _loss_at(model, params, original, zs, -eps, batch)
        g = (plus - minus) / (2 * eps)
        grads.append(g)
        for n, p in params:
            p.data = p.data - lr * (g * zs[n] + _decay(p, weight_decay) * p.data)
    return grads


def reference_fzoo(model, batches, lr: float, eps: float, seed: int, n: int, weight_decay: float = 0.0):
    """FZOO: l_0 at θ, l_i at θ + ε·u_i (Rademacher), c_i = (l_i − l_0)/(N·σ), θ ← θ − lr(Σ c_i u_i + wd θ)."""
    model.eval()
    noise = TorchNoise("cpu")
    params = trainable(model)
    coefficients = []
    for t, batch in enumerate(batches):
        s = step_seed(seed, t)
        base = {name: p.data.clone() for name, p in params}
        l0 = hf_loss(model, batch)
        us = [{name: noise.draw(p.shape, parameter_seed(s, i, name), "rademacher") for name, p in params}
              for i in range(n)]
        losses = [_loss_at(model, params, base, u, eps, batch) for u in us]
        sigma = float(torch.tensor(losses, dtype=torch.float64).std(unbiased=False))
        c = [(li - l0) / (n * sigma) for li in losses]
        coefficients.append(c)
        for name, p in params:
            step = sum(ci * u[name] for ci, u in zip(c, us))
            p.data = p.data - lr * (step + _decay(p, weight_decay) * p.data)
    return coefficients


def reference_hizoo(model, batches, lr: float, eps: float, seed: int, alpha: float, weight_decay: float = 0.0):
    """HiZOO: perturb by ±ε z/√H, update H from the curvature, then θ ← θ − lr(g z/√H + wd θ)."""
    model.eval()
    noise = TorchNoise("cpu")
    params = trainable(model)
    hessian = {name: torch.ones_like(p) for name, p in params}
    grads = []
    for t, batch in enumerate(batches):
        s = step_seed(seed, t)
        base = {name: p.data.clone() for name, p in params}
        zs = {name: noise.draw(p.shape, parameter_seed(s, 0, name)) for name, p in params}
        scaled = {name: zs[name] * hessian[name].rsqrt() for name, _ in params}
        l0 = hf_loss(model, batch)
        plus = _loss_at(model, params, base, scaled, eps, batch)
        minus = _loss_at(model, params, base, scaled, -eps, batch)
        g = (plus - minus) / (2 * eps)
        grads.append(g)
        curvature = abs(plus + minus - 2 * l0)
        for name, p in params:
            h = hessian[name]
            hessian[name] = (1 - alpha) * h + alpha * curvature * h * zs[name] ** 2 / (2 * eps ** 2)
            p.data = p.data - lr * (g * zs[name] / hessian[name].sqrt() + _decay(p, weight_decay) * p.data)
    return grads, hessian


def reference_lozo(model, batches, lr: float, eps: float, seed: int, rank: int, lazy_steps: int,
                   weight_decay: float = 0.0):
    """LOZO as in its paper: each matrix perturbed by ±ε'·U·Vᵀ (U new each step, V per window ⌊t/ν⌋),
    c' = (L+ − L−)/(2ε'), θ ← θ − lr(c'·U·Vᵀ/r + wd θ); vectors as MeZO. ε' = ε/√r on the matrices,
    the radius at which the engine's unit-variance z = U·Vᵀ/√r perturbs by ε (see methods/lozo.py).

    Returns the projected gradients c' and, per step, each matrix's (U, V)."""
    model.eval()
    noise = TorchNoise("cpu")
    params = trainable(model)
    eps_matrix = eps / rank ** 0.5
    grads, factors = [], []
    for t, batch in enumerate(batches):
        s = step_seed(seed, t)
        window_seeds = {n: derive_seed("zo2-lozo-v", seed, t // lazy_steps, 0, n) for n, _ in params}
        directions, uv = {}, {}
        for n, p in params:
            if p.dim() < 2:
                directions[n] = noise.draw(p.shape, parameter_seed(s, 0, n)) * eps  # θ ± ε·z
                continue
            m, k = p.shape[0], p[0].numel()
            u = noise.draw((m, rank), parameter_seed(s, 0, n))
            v = noise.draw((k, rank), window_seeds[n])
            uv[n] = (u, v)
            directions[n] = (u @ v.T).reshape(p.shape) * eps_matrix  # θ ± ε'·U·Vᵀ
        factors.append(uv)
        original = {n: p.data.clone() for n, p in params}
        plus = _loss_at(model, params, original, directions, 1.0, batch)
        minus = _loss_at(model, params, original, directions, -1.0, batch)
        # one loss difference, read against each parameter's own radius: the paper's c' on matrices
        # (along U·Vᵀ), MeZO's c on vectors; both updates are c·(unit-variance z)
        difference = plus - minus
        grads.append(difference / (2 * eps_matrix))
        for n, p in params:
            if n in uv:
                u, v = uv[n]
                step = difference / (2 * eps_matrix) * (u @ v.T).reshape(p.shape) / rank
            else:
                step = difference / (2 * eps) * directions[n] / eps
            p.data = p.data - lr * (step + _decay(p, weight_decay) * p.data)
    return grads, factors

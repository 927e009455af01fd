"""Statistics of the zeroth-order estimator of one parameter block, against the true gradient.

The block is any list of fp32 tensors and the loss any closure, so this module knows nothing about
CLIP (tests call it on a quadratic). For directions d = 0..N-1 the direction of parameter i is
`direction(param_i, direction_seed(seed, d), i, distribution)`: the same generator the training step
uses, so a diagnostic direction is a direction training could draw.

Per epsilon, with one-sided c_d = (L(theta + eps z_d) - L(theta)) / eps (two-sided:
(L(theta + eps z_d) - L(theta - eps z_d)) / (2 eps)) and the per-direction estimate g_d = c_d z_d:

- `mean_sq_norm`        mean_d ||g_d||^2
- `variance`            trace of the covariance of g_d: mean_d ||g_d - gbar||^2, gbar = mean_d g_d
                        (the population form, divisor N)
- `variance_about_true` mean_d ||g_d - g||^2 (around the autograd gradient: no (N-1)/N shrinkage,
                        and it includes the finite-difference bias)
- `normalized_variance` variance / ||g||^2, g the true gradient (None when g = 0). For an exact
                        directional derivative it is P + 1 in expectation (Gaussian z) or P - 1
                        (Rademacher): the variance grows with the block size P, whatever the model.
- `cosine[q]`           the N directions cut into consecutive groups of q (repeats = N // q; a
                        leftover shorter than q is unused); per group the q-average of g_d, its cosine
                        with g; mean and standard deviation over the groups. None when g = 0 or an
                        estimate is exactly 0 (cosine undefined). `cosine_ideal` = sqrt(q / (q + P + 1)),
                        the approximate expected cosine of an exact Gaussian estimator, for reference.
- `sign_agreement`      fraction of directions with sign(c_d) = sign(<g, z_d>): with q = 1 the sign rule
                        (MoZO) moves along -sign(c_d) sign(z_d), so this is what epsilon decides there.
- `loss_diff`           mean |L(theta + eps z_d) - L(theta)|, its first-order prediction
                        eps * mean |<g, z_d>|, `fd_rel_error` = mean |c_d - <g, z_d>| / mean |<g, z_d>|
                        (0 for an exact derivative; large at tiny eps where fp32 rounding of the loss
                        dominates, and at large eps where curvature does), and `zero_fraction` (how often
                        the perturbed loss is bit-identical to L(theta): an estimate of exactly 0).

Parameters are restored by copying a saved clone after every evaluation, not by subtracting the
perturbation, so rounding never drifts the point at which the statistics are taken.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from mozo.zo.directions import direction, mix_seed


def direction_seed(seed: int, d: int) -> int:
    """The seed of direction d of a block whose diagnostic seed is `seed`."""
    return mix_seed(seed, d)


def block_directions(params: Sequence[torch.Tensor], seed: int, d: int, distribution: str) -> list[torch.Tensor]:
    s = direction_seed(seed, d)
    return [direction(p, s, i, distribution) for i, p in enumerate(params)]


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)


def ideal_normalized_variance(num_params: int, distribution: str) -> float:
    """Expected trace(cov)/||g||^2 of c z with c = <g, z> exactly: P + 1 (Gaussian), P - 1 (Rademacher)."""
    return float(num_params + 1 if distribution == "gaussian" else num_params - 1)


def ideal_cosine(num_params: int, q: int) -> float:
    """Approximate expected cosine of the q-average of exact Gaussian estimates: sqrt(q / (q + P + 1))."""
    return math.sqrt(q / (q + num_params + 1))


def _gram(vectors: list[torch.Tensor]) -> torch.Tensor:
    """G[d, e] = <z_d, z_e> in float64."""
    if not vectors:
        return torch.zeros(0, 0, dtype=torch.float64)
    z = torch.stack(vectors)
    return z @ z.T


@torch.no_grad()
def estimator_statistics(params: Sequence[torch.Tensor], loss_fn: Callable[[], float], true_grad: Sequence[torch.Tensor],
                         eps: Sequence[float], q: Sequence[int], directions: int, seed: int,
                         distribution: str = "gaussian", two_sided: bool = False) -> dict:
    """Measure the estimator of the block `params` (see the module docstring for every field).

    `loss_fn()` returns the loss at the current values of `params` (it is evaluated with the block
    perturbed in place); `true_grad` holds dL/dparam for each tensor, from autograd.
    """
    params = list(params)
    if directions < 1:
        raise ValueError(f"directions must be >= 1, got {directions}")
    for p in params:
        if p.dtype != torch.float32:
            raise TypeError(f"ZO diagnostics need fp32 parameters, got {p.dtype}")
    saved = [p.detach().clone() for p in params]
    num_params = sum(p.numel() for p in params)
    g = _flat(true_grad)
    grad_sq = float(g @ g)
    grad_norm = math.sqrt(grad_sq)

    def restore() -> None:
        for p, s in zip(params, saved):
            p.copy_(s)

    loss0 = float(loss_fn())
    zs = [_flat(block_directions(params, seed, d, distribution)) for d in range(directions)]
    gram = _gram(zs)
    gz = torch.stack([z @ g for z in zs]) if zs else torch.zeros(0, dtype=torch.float64)

    by_eps = []
    try:
        for e in eps:
            plus, minus = [], []
            for d in range(directions):
                dirs = block_directions(params, seed, d, distribution)
                for p, z in zip(params, dirs):
                    p.add_(z, alpha=e)
                plus.append(float(loss_fn()))
                restore()
                if two_sided:
                    for p, z in zip(params, dirs):
                        p.add_(z, alpha=-e)
                    minus.append(float(loss_fn()))
                    restore()
            plus_t = torch.tensor(plus, dtype=torch.float64)
            if two_sided:
                c = (plus_t - torch.tensor(minus, dtype=torch.float64)) / (2 * e)
            else:
                c = (plus_t - loss0) / e
            by_eps.append(_eps_row(e, c, plus_t - loss0, gram, gz, grad_sq, num_params, q, distribution))
    finally:
        restore()
    return {
        "params": num_params,
        "grad_norm": grad_norm,
        "loss": loss0,
        "ideal_normalized_variance": ideal_normalized_variance(num_params, distribution),
        "by_eps": by_eps,
    }


def _eps_row(e: float, c: torch.Tensor, diff: torch.Tensor, gram: torch.Tensor, gz: torch.Tensor, grad_sq: float,
             num_params: int, qs: Sequence[int], distribution: str) -> dict:
    n = len(c)
    sq_norms = c * c * torch.diagonal(gram)
    mean_sq = float(sq_norms.mean())
    gbar_sq = float(c @ gram @ c) / (n * n)
    variance = max(mean_sq - gbar_sq, 0.0)
    about_true = max(mean_sq - 2.0 * float((c * gz).mean()) + grad_sq, 0.0)
    cosine = {}
    for q in qs:
        reps = n // q
        vals: list[float] = []
        undefined = grad_sq == 0.0 or reps == 0
        for r in range(reps if not undefined else 0):
            sl = slice(r * q, (r + 1) * q)
            cr = c[sl]
            dot = float(cr @ gz[sl]) / q
            est_sq = float(cr @ gram[sl, sl] @ cr) / (q * q)
            if est_sq <= 0.0:
                undefined = True
                break
            vals.append(dot / math.sqrt(est_sq * grad_sq))
        mean = None if undefined else sum(vals) / len(vals)
        std = None if undefined else math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        cosine[str(q)] = {"mean": mean, "std": std, "repeats": reps,
                          "ideal": ideal_cosine(num_params, q) if distribution == "gaussian" else None}
    abs_gz = gz.abs()
    first_order = float(abs_gz.mean()) * e
    fd_err = float((c - gz).abs().mean()) / float(abs_gz.mean()) if float(abs_gz.mean()) > 0 else None
    agree = None
    if grad_sq > 0:
        agree = float(((torch.sign(c) == torch.sign(gz)) & (gz != 0)).double().mean())
    return {
        "eps": e,
        "mean_sq_norm": mean_sq,
        "variance": variance,
        "normalized_variance": variance / grad_sq if grad_sq > 0 else None,
        "variance_about_true": about_true,
        "cosine": cosine,
        "sign_agreement": agree,
        "loss_diff": {
            "mean_abs": float(diff.abs().mean()),
            "first_order_mean_abs": first_order,
            "fd_rel_error": fd_err,
            "zero_fraction": float((diff == 0).double().mean()),
        },
        "coef_mean_abs": float(c.abs().mean()),
    }

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
                        with g; mean and standard deviation over the groups. None when g = 0 (cosine
                        undefined); a group whose estimate is exactly 0 (all its loss differences
                        rounded to 0) has no cosine either: it is left out and counted in
                        `zero_estimates` (None if every group is). `ideal` = the approximate expected
                        cosine of an exact Gaussian estimator, E sqrt(chi2_q) / sqrt(q + P - 1)
                        (see `ideal_cosine`), for reference.
- `sign_cosine[q]`      mean over the same groups of cos(sign(q-average of g_d), g): the direction of
                        the element-wise sign update (rule `sign` / `mozo`) against the gradient
- `sign_agreement`      fraction of directions with sign(c_d) = sign(<g, z_d>): with q = 1 the sign rule
                        (MoZO) moves along -sign(c_d) sign(z_d), so this is what epsilon decides there.
- `coefs`               the N coefficients c_d themselves (with the block's `directional_derivatives`
                        <g, z_d>, every statistic above can be recomputed from the JSON)
- `loss_diff`           mean |L(theta + eps z_d) - L(theta)|, its first-order prediction
                        eps * mean |<g, z_d>|, `fd_rel_error` = mean |c_d - <g, z_d>| / mean |<g, z_d>|
                        (0 for an exact derivative; large at tiny eps where fp32 rounding of the loss
                        dominates, and at large eps where curvature does), and `zero_fraction` (how often
                        the perturbed loss is bit-identical to L(theta): an estimate of exactly 0).

The loss differences and coefficients come from the training step's estimator (`zo/estimator.py`), one
direction at a time; the block is restored by copying a saved clone after every direction, so rounding
never drifts the point at which the statistics are taken.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from mozo.zo.directions import LawLike, as_law, direction
from mozo.seeds import mix_seed
from mozo.zo.estimator import Estimator, Group


def direction_seed(seed: int, d: int) -> int:
    """The seed of direction d of a block whose diagnostic seed is `seed`."""
    return mix_seed(seed, d)


def block_directions(params: Sequence[torch.Tensor], seed: int, d: int, distribution: LawLike) -> list[torch.Tensor]:
    s = direction_seed(seed, d)
    return [direction(p, s, i, distribution) for i, p in enumerate(params)]


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)


def ideal_normalized_variance(num_params: int, distribution: LawLike) -> float:
    """Expected trace(cov)/||g||^2 of dense c z with c = <g, z> exactly: P + 1 (Gaussian), P - 1 (Rademacher).
    For subspace directions it is still the dense value: the reference a subspace estimate is compared with."""
    return float(num_params + 1 if as_law(distribution).distribution == "gaussian" else num_params - 1)


def ideal_cosine(num_params: int, q: int) -> float:
    """Approximate expected cosine of the q-average of exact Gaussian estimates with the gradient.

    The q-average's component along g is ~ chi2_q / q, its orthogonal part has squared norm
    ~ (P - 1) chi2_q / q^2, so cos ~ sqrt(chi2_q / (chi2_q + P - 1)) and, averaging over chi2_q,
    E cos ~ E[sqrt(chi2_q)] / sqrt(q + P - 1) = sqrt(2) Gamma((q+1)/2) / Gamma(q/2) / sqrt(q + P - 1).
    For q = 1 that is sqrt(2 / (pi P)); for q >> 1 it tends to sqrt(q / (q + P)).
    """
    mean_chi = math.sqrt(2.0) * math.exp(math.lgamma((q + 1) / 2) - math.lgamma(q / 2))
    return mean_chi / math.sqrt(q + max(num_params, 1) - 1)


class DirectionSet:
    """The N flattened directions of a block (float64 rows), their Gram matrix and <g, z_d>."""

    def __init__(self, vectors: list[torch.Tensor], grad: torch.Tensor):
        self.z = torch.stack(vectors) if vectors else torch.zeros(0, grad.numel(), dtype=torch.float64)
        self.gram = self.z @ self.z.T
        self.g = grad
        self.gz = self.z @ grad
        self.grad_sq = float(grad @ grad)


@torch.no_grad()
def estimator_statistics(params: Sequence[torch.Tensor], loss_fn: Callable[[], float], true_grad: Sequence[torch.Tensor],
                         eps: Sequence[float], q: Sequence[int], directions: int, seed: int,
                         distribution: LawLike = "gaussian", two_sided: bool = False) -> dict:
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
    g = flat(true_grad)
    grad_sq = float(g @ g)
    grad_norm = math.sqrt(grad_sq)

    def restore() -> None:
        for p, s in zip(params, saved):
            p.copy_(s)

    loss0 = float(loss_fn())
    ds = DirectionSet([flat(block_directions(params, seed, d, distribution)) for d in range(directions)], g)
    loss0_t = torch.tensor(loss0, dtype=torch.float64)
    evaluate = lambda names: torch.tensor(float(loss_fn()), dtype=torch.float64)  # noqa: E731

    by_eps = []
    try:
        for e in eps:
            # The training estimator, one direction at a time, the block restored by copy after each so
            # rounding never drifts the point the statistics are taken at.
            est = Estimator({"block": Group(params, e)}, distribution, two_sided)
            coefs, plus = [], []
            for d in range(directions):
                out = est.differences([direction_seed(seed, d)], evaluate, loss0_t)
                coefs += est.coefficients([float(x) for x in out.diffs], out.blocks)["block"]
                plus += [float(x) for x in out.plus]
                restore()
            c = torch.tensor(coefs, dtype=torch.float64)
            by_eps.append(eps_row(e, c, torch.tensor(plus, dtype=torch.float64) - loss0, ds, q, distribution))
    finally:
        restore()
    return {
        "params": num_params,
        "grad_norm": grad_norm,
        "loss": loss0,
        "ideal_normalized_variance": ideal_normalized_variance(num_params, distribution),
        "directional_derivatives": [float(x) for x in ds.gz],
        "by_eps": by_eps,
    }


def eps_row(e: float, c: torch.Tensor, diff: torch.Tensor, ds: DirectionSet, qs: Sequence[int], distribution: LawLike) -> dict:
    """Every statistic of one epsilon from the coefficients c_d (float64) and the loss differences."""
    gram, gz, grad_sq, num_params = ds.gram, ds.gz, ds.grad_sq, ds.z.shape[1]
    n = len(c)
    sq_norms = c * c * torch.diagonal(gram)
    mean_sq = float(sq_norms.mean())
    gbar_sq = float(c @ gram @ c) / (n * n)
    variance = max(mean_sq - gbar_sq, 0.0)
    about_true = max(mean_sq - 2.0 * float((c * gz).mean()) + grad_sq, 0.0)
    cosine, sign_cosine = {}, {}
    for q in qs:
        reps = n // q
        vals: list[float] = []
        svals: list[float] = []
        zero_estimates = 0
        for r in range(reps if grad_sq > 0.0 else 0):
            sl = slice(r * q, (r + 1) * q)
            cr = c[sl]
            est_sq = float(cr @ gram[sl, sl] @ cr) / (q * q)
            if est_sq <= 0.0:  # every loss difference of the group was exactly 0: no direction, no cosine
                zero_estimates += 1
                continue
            vals.append(float(cr @ gz[sl]) / q / math.sqrt(est_sq * grad_sq))
            sgn = torch.sign(cr @ ds.z[sl])
            svals.append(float(sgn @ ds.g) / math.sqrt(float(sgn.abs().sum()) * grad_sq))
        sign_cosine[str(q)] = sum(svals) / len(svals) if svals else None
        mean = sum(vals) / len(vals) if vals else None
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)) if vals else None
        cosine[str(q)] = {"mean": mean, "std": std, "repeats": reps, "zero_estimates": zero_estimates,
                          "ideal": ideal_cosine(num_params, q) if as_law(distribution).distribution == "gaussian" else None}
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
        "sign_cosine": sign_cosine,
        "sign_agreement": agree,
        "loss_diff": {
            "mean_abs": float(diff.abs().mean()),
            "first_order_mean_abs": first_order,
            "fd_rel_error": fd_err,
            "zero_fraction": float((diff == 0).double().mean()),
        },
        "coef_mean_abs": float(c.abs().mean()),
        "coefs": [float(x) for x in c],
    }

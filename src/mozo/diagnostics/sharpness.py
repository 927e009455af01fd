"""Sharpness of a finished run's units: loss increase under random perturbations and the top Hessian eigenvalue.

Two measures of how sharp the minimum a run ended in is, for a group of unit parameters theta_G (all
units, one tower, or the units the run's plan trained first-order / zeroth-order / kept frozen), with
every other parameter where the run left it:

- random perturbations: for K directions u_d, Gaussian over the concatenation of theta_G and scaled to
  unit norm, each used with both signs (antithetic pairs, 2K draws u = +-u_d), and radii r, the loss
  increase L(theta + rho u) - L(theta) with rho = r (absolute radii, the default) or rho = r * |theta_G|
  (relative). Mean, max, min and standard error over the draws. For a quadratic,
  E[L(theta + rho u) - L(theta)] = rho^2 / 2 * tr(H) / P (u is uniform on the unit sphere of the
  P-dimensional group; the gradient term rho <g, u> has mean 0 and cancels exactly within each
  antithetic pair), so `curvature` = 2 * mean / rho^2 estimates the mean Hessian eigenvalue tr(H)/P for
  small rho, and its growth or fall with rho tells the landscape is not quadratic at that scale.
  Direction d of a group is drawn from seed mix_seed(seed, 31, d) over that group's parameters in unit
  order, so two runs of the same model (a plan and its frozen control) are probed along the same
  directions: the paired difference has no direction noise.
- power iteration on Hessian-vector products (double backward through autograd) for the eigenvalue of
  largest magnitude of the Hessian of L with respect to theta_G: the Rayleigh quotient v^T H v of the
  iterate, stopped when its relative change drops below a tolerance or after a fixed number of
  iterations. It is a lower bound on the top eigenvalue when H is positive semi-definite; a negative
  value means the dominant curvature is negative (not a minimum along that direction).

The loss is cross-entropy over a fixed set of batches (mean over images). By default the model is in
eval mode (no dropout, no router noise: the sharpness of the function the run's units define, as it is
evaluated); `train_mode=True` measures the training-time function instead, with dropout and router
noise seeded identically (`model.noise.seed`, one seed per batch) in every evaluation, the Hessian's
included, so every evaluation sees the same function.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from mozo.backbone.towers import MODALITIES
from mozo.seeds import mix_seed

DIRECTION_STREAM = 31
NOISE_STREAM = 17


# ----------------------------------------------------------------------------------------- generic
def _flat_norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


def unit_direction(params: Sequence[torch.Tensor], seed: int, d: int) -> list[torch.Tensor]:
    """Direction d: N(0, I) over the concatenation of `params` (drawn on the CPU, in order), scaled to
    norm 1 over all of them together."""
    g = torch.Generator().manual_seed(mix_seed(seed, DIRECTION_STREAM, d))
    z = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    n = math.sqrt(sum(float(t.pow(2).sum()) for t in z))
    return [(t / n).to(device=p.device, dtype=p.dtype) for t, p in zip(z, params)]


def _summary(diffs: list[float], pairs: bool) -> dict:
    """mean/max/min/std over all evaluations; the standard error from the per-direction means when the
    evaluations come in antithetic pairs (the two of a pair are not independent)."""
    t = torch.tensor(diffs, dtype=torch.float64)
    per_dir = t.view(-1, 2).mean(1) if pairs else t
    k = len(per_dir)
    std = float(t.std()) if len(diffs) > 1 else None
    return {"mean": float(t.mean()), "max": float(t.max()), "min": float(t.min()), "std": std,
            "stderr": float(per_dir.std()) / math.sqrt(k) if k > 1 else None}


@torch.no_grad()
def perturbation_sharpness(params: Sequence[torch.Tensor], loss: Callable[[], float], radii: Sequence[float],
                           directions: int, seed: int = 0, relative: bool = False, antithetic: bool = True) -> dict:
    """Loss increase L(theta + rho u) - L(theta) for `directions` unit directions u_d (the same for every
    radius), rho = r or r * |params| (`relative`). `loss()` evaluates the current parameters; they are
    restored exactly afterwards.

    `antithetic` (default): every direction is used with both signs, u = +u_d and u = -u_d (2K
    evaluations per radius, `diffs` in that order). -u_d is as likely a draw as +u_d, so mean and max are
    those of L(theta + rho u) - L(theta) over the 2K draws; in the mean the gradient term rho <g, u>
    cancels exactly, leaving the even part rho^2/2 u^T H u + O(rho^4) (`odd_mean_abs` = mean over
    directions of |L(theta + rho u_d) - L(theta - rho u_d)| / 2 shows how large the cancelled part was).
    Without it (K draws) the mean at a point that is not an exact minimum carries rho <g, u>, whose spread
    rho |g| / sqrt(P) can swamp the curvature term in P dimensions."""
    if directions < 1:
        raise ValueError(f"directions must be >= 1, got {directions}")
    params = list(params)
    base = [p.detach().clone() for p in params]
    norm = _flat_norm(params)
    scale = norm if relative else 1.0
    signs = (1.0, -1.0) if antithetic else (1.0,)
    l0 = loss()
    diffs = {r: [] for r in radii}
    try:
        for d in range(directions):
            u = unit_direction(params, seed, d)
            for r in radii:
                for sign in signs:
                    for p, b, ui in zip(params, base, u):
                        p.copy_(b).add_(ui, alpha=sign * r * scale)
                    diffs[r].append(loss() - l0)
    finally:
        for p, b in zip(params, base):
            p.copy_(b)
    rows = []
    for r in radii:
        rho = r * scale
        s = _summary(diffs[r], antithetic)
        row = {"radius": r, "abs_radius": rho, "rel_radius": rho / norm if norm > 0 else None, **s,
               "curvature": 2.0 * s["mean"] / rho ** 2 if rho > 0 else None,
               "curvature_stderr": 2.0 * s["stderr"] / rho ** 2 if rho > 0 and s["stderr"] is not None else None}
        if antithetic:
            t = torch.tensor(diffs[r], dtype=torch.float64).view(-1, 2)
            row["odd_mean_abs"] = float(((t[:, 0] - t[:, 1]) / 2).abs().mean())
        row["diffs"] = diffs[r]
        rows.append(row)
    return {"loss": l0, "params": sum(p.numel() for p in params), "param_norm": norm, "antithetic": antithetic,
            "radius_scale": "relative" if relative else "absolute", "directions": directions,
            "evaluations_per_radius": directions * len(signs), "by_radius": rows}


def power_iteration(hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]], params: Sequence[torch.Tensor],
                    iters: int = 30, tol: float = 1e-3, seed: int = 0) -> dict:
    """Eigenvalue of largest magnitude of the symmetric operator `hvp` (v -> H v over tensors shaped like
    `params`): Rayleigh quotient of the power iterate. Stops when its relative change is below `tol`
    (converged) or after `iters` products."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    v = unit_direction(params, mix_seed(seed, 7), 0)
    lam, prev, rel, history = 0.0, None, None, []
    converged = False
    k = 0
    for k in range(1, iters + 1):
        w = [x.detach() for x in hvp(v)]
        lam = _dot(v, w)
        history.append(lam)
        wn = _flat_norm(w)
        if prev is not None:
            rel = abs(lam - prev) / abs(lam) if lam != 0 else (0.0 if prev == 0 else math.inf)
            if rel < tol:
                converged = True
                break
        if wn == 0.0:  # H v = 0: v is in the kernel; with a random start, H is (numerically) zero
            rel, converged = 0.0, True
            break
        prev = lam
        v = [x / wn for x in w]
    return {"eigenvalue": lam, "rel_change": rel, "iterations": k, "converged": converged, "tol": tol, "history": history}


# ----------------------------------------------------------------------------------------- a MozoCLIP
def _math_attention():
    """Double backward needs the math kernel of scaled_dot_product_attention (the fused CPU/GPU kernels
    have no derivative of their backward)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # older torch: the math kernel is always allowed
        return contextlib.nullcontext()


class ModelLoss:
    """Cross-entropy of a MozoCLIP over fixed batches (image-weighted mean), as a function of its units.

    `value(towers)` re-encodes only `towers` and takes the other tower's features from the cache of the
    state at construction (`refresh()` recomputes it): perturbing one tower's units needs only that
    tower's forwards. `hvp(params, v)` is the Hessian-vector product of the same loss.
    """

    def __init__(self, model, batches: Sequence, train_mode: bool = False, seed: int = 0):
        self.model, self.batches, self.train_mode = model, list(batches), train_mode
        self.noise_seeds = [mix_seed(seed, NOISE_STREAM, b) for b in range(len(self.batches))]
        self.weights = [len(b.labels) / sum(len(x.labels) for x in self.batches) for b in self.batches]
        self.cache: list[dict] = []
        self.refresh()

    def _encode(self, b: int, modality: str) -> torch.Tensor:
        batch = self.batches[b]
        inputs = {"pixel_values": batch.pixel_values} if modality == "vision" else batch.text_inputs
        self.model.noise.seed = self.noise_seeds[b] if self.train_mode else None
        try:
            return self.model.encode(modality, inputs)[0]
        finally:
            self.model.noise.seed = None

    def _loss(self, b: int, feats: dict) -> torch.Tensor:
        return F.cross_entropy(self.model.logits(feats["vision"], feats["language"]).float(), self.batches[b].labels)

    @torch.no_grad()
    def refresh(self) -> None:
        self.model.train(self.train_mode)
        self.cache = [{m: self._encode(b, m) for m in MODALITIES} for b in range(len(self.batches))]

    @torch.no_grad()
    def value(self, towers: Sequence[str] = MODALITIES) -> float:
        self.model.train(self.train_mode)
        total = 0.0
        for b, w in enumerate(self.weights):
            feats = {m: self._encode(b, m) if m in towers else self.cache[b][m] for m in MODALITIES}
            total += w * float(self._loss(b, feats))
        return total

    def hvp(self, params: Sequence[torch.Tensor], v: Sequence[torch.Tensor], towers: Sequence[str] = MODALITIES) -> list[torch.Tensor]:
        """sum_b w_b H_b v by double backward, one batch at a time (memory of one batch's double graph).
        `params` must live in `towers`; the other tower's features come from the cache."""
        self.model.train(self.train_mode)
        params = list(params)
        flags = [p.requires_grad for p in params]
        out = [torch.zeros_like(p) for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
            for b, w in enumerate(self.weights):
                with torch.enable_grad(), _math_attention():
                    feats = {m: self._encode(b, m) if m in towers else self.cache[b][m] for m in MODALITIES}
                    loss = self._loss(b, feats)
                    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                    # a gradient that does not depend on the parameters (None, or constant) has a zero Hessian row
                    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                    if not live:
                        continue
                    hv = torch.autograd.grad([grads[i] for i in live], params, [v[i] for i in live], allow_unused=True)
                for o, h in zip(out, hv):
                    if h is not None:
                        o.add_(h.detach(), alpha=w)
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        return out


def unit_groups(model, plan=None) -> dict[str, list]:
    """Named unit sets: all, each tower, and with a plan (`mozo.zo.plan.Plan`) its fo / zo / frozen units.
    Empty sets are left out."""
    units = model.unit_list()
    groups = {"all": units}
    for m in MODALITIES:
        groups[m] = [u for u in units if u.info.modality == m]
    if plan is not None:
        for mode in ("fo", "zo", "frozen"):
            groups[mode] = [u for u in units if plan.mode(u.info.modality, u.info.layer) == mode]
    return {k: v for k, v in groups.items() if v}


def measure_sharpness(model, batches: Sequence, radii: Sequence[float], directions: int, groups: dict[str, list],
                      hessian_groups: Sequence[str], power_iters: int = 30, power_tol: float = 1e-3, seed: int = 0,
                      relative: bool = False, train_mode: bool = False, antithetic: bool = True,
                      perturb_groups: Optional[Sequence[str]] = None,
                      progress: Optional[Callable[[str], None]] = None) -> dict:
    """Perturbations for the groups in `perturb_groups` (default: all of `groups`), power iteration for
    those in `hessian_groups`. A group holding exactly the units of an earlier one is not measured again:
    it gets `same_as` and that group's results."""
    perturb = set(groups if perturb_groups is None else perturb_groups)
    was_training = model.training
    lf = ModelLoss(model, batches, train_mode=train_mode, seed=seed)
    loss0 = lf.value()
    out_groups: dict[str, dict] = {}
    done: dict[tuple, dict] = {}  # unit names -> {"first": group name, "perturbation": ..., "hessian": ...}
    try:
        for name, units in groups.items():
            key = tuple(u.info.name for u in units)
            params = [p for u in units for p in u.parameters()]
            towers = sorted({u.info.modality for u in units}, key=MODALITIES.index)
            entry = {"units": list(key), "towers": towers, "params": sum(p.numel() for p in params), "param_norm": _flat_norm(params)}
            res = done.setdefault(key, {"first": name})
            if res["first"] != name:
                entry["same_as"] = res["first"]
            if name in perturb and "perturbation" not in res:
                if progress:
                    progress(f"{name}: {len(units)} units, P {entry['params']}: {directions} directions x {len(radii)} radii")
                res["perturbation"] = perturbation_sharpness(params, lambda: lf.value(towers), radii, directions, seed, relative, antithetic)
            if name in hessian_groups and "hessian" not in res:
                res["hessian"] = _hessian(lf, params, towers, power_iters, power_tol, seed, progress, name)
            for k in ("perturbation", "hessian"):
                if k in res and name in (perturb if k == "perturbation" else hessian_groups):
                    entry[k] = res[k]
            out_groups[name] = entry
    finally:
        model.noise.seed = None
        model.train(was_training)
    return {"loss": loss0, "mode": "train" if train_mode else "eval", "images": sum(len(b.labels) for b in batches),
            "radius_scale": "relative" if relative else "absolute", "radii": list(radii), "directions": directions, "antithetic": antithetic,
            "power_iters": power_iters, "power_tol": power_tol, "seed": seed, "groups": out_groups}


def _hessian(lf: ModelLoss, params, towers, iters, tol, seed, progress, name) -> dict:
    if progress:
        progress(f"{name}: Hessian power iteration (up to {iters} products)")
    return power_iteration(lambda v: lf.hvp(params, v, towers), params, iters, tol, seed)


# ----------------------------------------------------------------------------------------- a run's data
def run_task_batches(run_cfg, run_dir, backbone, task: Optional[int], images: int, batch_size: int, seed: int = 0,
                     device="cpu") -> tuple[list, dict]:
    """Batches of the training images of one task of the run's own stream (1-based `task`, default the
    last task the run trains), eval transform, first `images` of a seeded order, prompts of that task's
    classes as the run trained them (its template and padding). Returns (batches, description)."""
    import numpy as np

    from mozo.data.loader import TransformedDataset
    from mozo.data.transforms import make_transform
    from mozo.diagnostics.measure import Batch
    from mozo.engine.rundir import read_run_info
    from mozo.engine.scenarios import build_scenario

    scenario = build_scenario(run_cfg, read_run_info(run_dir).get("data_root"))
    tasks = scenario.tasks[: run_cfg.num_tasks] if run_cfg.num_tasks else scenario.tasks
    t = len(tasks) if task is None else task
    if not 1 <= t <= len(tasks):
        raise ValueError(f"--task {t} is outside the run's tasks 1..{len(tasks)}")
    tk = tasks[t - 1]
    tf = make_transform(False, backbone.image_size, backbone.mean, backbone.std)
    ds = TransformedDataset(tk.train, tf, seed=seed, label_map={lab: lab - tk.label_offset for lab in tk.labels})
    n = min(images, len(ds))
    order = np.random.default_rng(seed).permutation(len(ds))[:n]
    prompts = [run_cfg.data.template.format(c) for c in tk.classnames]
    tokens = backbone.tokenize(prompts, device, run_cfg.data.prompt_padding)
    note = f"task {t}/{len(tasks)} ({tk.name}) of the run's {run_cfg.data.protocol} stream: {n} training images, eval transform, {len(prompts)} prompts"
    out = []
    for s in range(0, n, batch_size):
        items = [ds[int(i)] for i in order[s:s + batch_size]]
        out.append(Batch(torch.stack([x for x, _ in items]).to(device), torch.tensor([y for _, y in items], device=device),
                         tokens, prompts, "run", note))
    return out, {"task": t, "task_name": tk.name, "tasks": len(tasks), "note": note}

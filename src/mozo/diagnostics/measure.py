"""ZO estimator diagnostics of a MozoCLIP: per unit (modality, layer), per epsilon and q.

What is measured (the paper's per-unit estimator): each training unit's parameters alone form the ZO
block; every other unit stays where it is. For a unit of tower m at layer k, the loss closure re-runs
only tower m from the cached hidden state entering layer k and reuses the other tower's features,
exactly as the training step's perturbed forwards do. Dropout and router noise are seeded identically
in every evaluation (autograd forward included), so the function whose gradient autograd computes is
the function the finite differences probe.

With `block="tower"` all units of one tower form one block (what a training step with a whole tower
zeroth-order does: one direction over the tower's units).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mozo.backbone.towers import MODALITIES, TOWER_STREAMS
from mozo.diagnostics.stats import DirectionSet, eps_row, estimator_statistics, flat
from mozo.peft.inject import MozoCLIP
from mozo.zo.directions import LawLike, direction
from mozo.seeds import mix_seed
from mozo.zo.estimator import Estimator, Group
from mozo.zo.config import in_parts

MODALITY_ID = {"vision": 1, "language": 2}


@dataclass
class Batch:
    """One diagnostic batch: images, labels indexing the prompts, tokenized prompts, and where it came from."""

    pixel_values: torch.Tensor
    labels: torch.Tensor
    text_inputs: dict
    prompts: list[str]
    source: str  # "demo" | "random"
    note: str = ""
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- batches
def demo_batches(backbone, batch_size: int, count: int, seed: int = 0, template: str = "a bad photo of a {}.",
                 device: torch.device | str = "cpu") -> list[Batch]:
    """`count` batches from task 0 of the demo stream (eval transform, seeded order, cycling if needed)."""
    from mozo.data.loader import TransformedDataset
    from mozo.data.transforms import make_transform
    from mozo.data.demo_stream import build_demo_scenario

    task = build_demo_scenario(seed=seed, num_tasks=1).tasks[0]
    tf = make_transform(False, backbone.image_size, backbone.mean, backbone.std)
    ds = TransformedDataset(task.train, tf, seed=seed, label_map={lab: lab - task.label_offset for lab in set(task.train.labels.tolist())})
    order = np.random.default_rng(seed).permutation(len(ds))
    prompts = [template.format(c) for c in task.classnames]
    tokens = backbone.tokenize(prompts, device, padding="longest")
    out = []
    for b in range(count):
        idx = [int(order[(b * batch_size + i) % len(ds)]) for i in range(batch_size)]
        items = [ds[i] for i in idx]
        out.append(Batch(torch.stack([x for x, _ in items]).to(device), torch.tensor([y for _, y in items], device=device),
                         tokens, prompts, "demo", f"demo stream task 0 ({task.name}), train images, eval transform"))
    return out


RANDOM_PROMPTS = ("red circle", "green square", "blue triangle", "yellow star", "purple ring")


def random_batches(backbone, batch_size: int, count: int, seed: int = 0, template: str = "a bad photo of a {}.",
                   device: torch.device | str = "cpu") -> list[Batch]:
    """Gaussian-noise images with random labels over 5 fixed prompts: structure-free data."""
    g = torch.Generator().manual_seed(seed)
    prompts = [template.format(c) for c in RANDOM_PROMPTS]
    tokens = backbone.tokenize(prompts, device, padding="longest")
    s = backbone.image_size
    return [Batch(torch.randn(batch_size, 3, s, s, generator=g).to(device),
                  torch.randint(0, len(prompts), (batch_size,), generator=g).to(device), tokens, prompts, "random",
                  "random data: N(0,1) pixels, uniformly random labels over 5 prompts (no structure to learn)")
            for _ in range(count)]


def make_batches(source: str, backbone, batch_size: int, count: int, seed: int = 0, device="cpu") -> list[Batch]:
    """`demo` (task 0 of the demo stream that ships with mozo) or `random`."""
    if source == "demo":
        return demo_batches(backbone, batch_size, count, seed, device=device)
    if source == "random":
        return random_batches(backbone, batch_size, count, seed, device=device)
    raise ValueError(f"unknown batch source {source!r}; choose demo or random")


# ----------------------------------------------------------------------------------------- model state
def warmup(model: MozoCLIP, batches: Sequence[Batch], steps: int, lr: float = 1e-3, seed: int = 0) -> list[float]:
    """`steps` first-order steps (HybridStep, plan fo) cycling over `batches`; returns the losses."""
    from mozo.engine.step import HybridStep

    if steps <= 0:
        return []
    step = HybridStep(model, "fo", fo_lr=lr, seed=seed)
    losses = []
    for i in range(steps):
        b = batches[i % len(batches)]
        losses.append(step(b.pixel_values, b.labels, b.text_inputs).loss)
    return losses


def load_units(model: MozoCLIP, run_dir: str | Path) -> Path:
    """Load a run's trained units (RUN_DIR/checkpoint/units.safetensors, or that file itself)."""
    from safetensors.torch import load_file

    path = Path(run_dir)
    if path.is_dir():
        from mozo.engine.checkpoint import find_checkpoint

        ck = find_checkpoint(path)
        if ck is None:
            raise FileNotFoundError(f"no complete checkpoint in {path}; expected {path / 'checkpoint' / 'units.safetensors'} written by `mozo run`")
        path = ck / "units.safetensors"
    device = next(model.units.parameters()).device
    state = {k: v.to(device) for k, v in load_file(str(path)).items()}
    model.units.load_state_dict(state)
    return path


# ----------------------------------------------------------------------------------------- measurement
def true_gradients(model: MozoCLIP, batch: Batch, noise_seed: int, loss_fn=F.cross_entropy) -> tuple[float, dict]:
    """Autograd loss and the gradient of every unit parameter (diagnostic only)."""
    flags = {id(p): p.requires_grad for p in model.units.parameters()}
    model.train()
    model.units.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    try:
        model.noise.seed = noise_seed
        img = model.encode("vision", {"pixel_values": batch.pixel_values})[0]
        txt = model.encode("language", batch.text_inputs)[0]
        loss = loss_fn(model.logits(img, txt).float(), batch.labels)
        loss.backward()
        grads = {id(p): (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for p in model.units.parameters()}
    finally:
        model.noise.seed = None
        model.zero_grad(set_to_none=True)
        for p in model.units.parameters():
            p.requires_grad_(flags[id(p)])
    return float(loss.detach()), grads


@torch.no_grad()
def tower_loss_fn(model: MozoCLIP, batch: Batch, starts: dict[str, int], noise_seed: int,
                  loss_fn=F.cross_entropy) -> Callable[[Sequence[str]], torch.Tensor]:
    """`evaluate(towers)` for the estimator: the loss at the current units with each tower in `towers`
    re-run from the hidden state entering its layer `starts[tower]` (1-based), the other towers' features
    cached at the starting point, noise seeded with `noise_seed` in every evaluation: what the training
    step's perturbed forwards compute."""
    model.train()
    model.noise.seed = noise_seed
    inputs = {"vision": {"pixel_values": batch.pixel_values}, "language": batch.text_inputs}
    feats, cache = {}, {}
    for m in MODALITIES:
        feats[m], cache[m] = model.encode(m, inputs[m], capture_at=starts[m] - 1 if m in starts else None)
    model.noise.seed = None

    def evaluate(towers: Sequence[str]) -> torch.Tensor:
        with torch.no_grad():
            model.noise.seed = noise_seed
            try:
                f = dict(feats)
                for m in towers:
                    f[m] = model.encode(m, start=cache[m])[0]
                return loss_fn(model.logits(f["vision"], f["language"]).float(), batch.labels)
            finally:
                model.noise.seed = None

    return evaluate


def block_loss_fn(model: MozoCLIP, batch: Batch, modality: str, layer: int, noise_seed: int, loss_fn=F.cross_entropy) -> Callable[[], float]:
    """Closure L(current units): tower `modality` re-run from the input of `layer` (1-based)."""
    evaluate = tower_loss_fn(model, batch, {modality: layer}, noise_seed, loss_fn)
    return lambda: float(evaluate([modality]))


def check_parts(model: MozoCLIP, parts: str) -> None:
    """A ValueError naming the units' parameter names unless the zo.parts patterns `parts` match one of them."""
    names = sorted({n for u in model.unit_list() for n, _ in u.named_parameters()})
    if not any(in_parts(n, parts) for n in names):
        raise ValueError(f"--parts {parts!r} matches no unit parameter; they are named {', '.join(names)}")


def diagnose(model: MozoCLIP, batch: Batch, eps: Sequence[float], q: Sequence[int], directions: int, seed: int = 0,
             distribution: LawLike = "gaussian", two_sided: bool = False, block: str = "unit",
             units: Optional[Sequence[tuple[str, int]]] = None, progress: Optional[Callable[[str], None]] = None,
             parts: str = "*") -> dict:
    """Per-block statistics (rows) and per-modality aggregates. `units` restricts to some (modality, layer);
    `parts` (zo.parts' patterns) to some parameters of each unit, the block the step then perturbs."""
    if block not in ("unit", "tower"):
        raise ValueError(f"block must be unit or tower, got {block!r}")
    check_parts(model, parts)
    noise_seed = mix_seed(seed, 17)
    loss_autograd, grads = true_gradients(model, batch, noise_seed)
    chosen = [u for u in model.unit_list() if units is None or (u.info.modality, u.info.layer) in set(units)]
    if block == "unit":
        blocks = [(u.info.modality, u.info.layer, [u]) for u in chosen]
    else:
        blocks = []
        for m in MODALITIES:
            us = [u for u in chosen if u.info.modality == m]
            if us:
                blocks.append((m, min(u.info.layer for u in us), us))
    rows = []
    was_training = model.training
    for m, layer, us in blocks:
        if progress:
            progress(f"{m} layer {layer}" if block == "unit" else f"{m} tower")
        params = [p for u in us for n, p in u.named_parameters() if in_parts(n, parts)]
        closure = block_loss_fn(model, batch, m, layer, noise_seed)
        stats = estimator_statistics(params, closure, [grads[id(p)] for p in params], eps, q, directions,
                                     mix_seed(seed, MODALITY_ID[m], layer if block == "unit" else 0), distribution, two_sided)
        row = {"modality": m, "layer": layer if block == "unit" else None, "units": [u.info.name for u in us], **stats}
        rows.append(row)
    model.train(was_training)
    return {"loss_autograd": loss_autograd, "rows": rows, "modalities": aggregate(rows, eps, q)}


def _mean(values: list) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def aggregate(rows: list[dict], eps: Sequence[float], q: Sequence[int]) -> dict:
    """Per modality: totals (params, gradient norm, summed variance = variance of the concatenated per-unit
    estimators) and means over units (normalised variance, cosine, sign agreement, fd error)."""
    out = {}
    for m in MODALITIES:
        rs = [r for r in rows if r["modality"] == m]
        if not rs:
            continue
        agg = {"units": len(rs), "params": sum(r["params"] for r in rs), "params_per_unit": _mean([r["params"] for r in rs]),
               "grad_norm": math.sqrt(sum(r["grad_norm"] ** 2 for r in rs)),
               "mean_unit_grad_norm": _mean([r["grad_norm"] for r in rs]),
               "zero_grad_units": sum(1 for r in rs if r["grad_norm"] == 0.0), "by_eps": []}
        for i, e in enumerate(eps):
            er = [r["by_eps"][i] for r in rs]
            total_var = sum(x["variance"] for x in er)
            gsq = sum(r["grad_norm"] ** 2 for r in rs)
            agg["by_eps"].append({
                "eps": e,
                "variance_sum": total_var,
                "mean_sq_norm_sum": sum(x["mean_sq_norm"] for x in er),
                "normalized_variance_of_sum": total_var / gsq if gsq > 0 else None,
                "mean_unit_variance": total_var / len(er),
                "mean_unit_normalized_variance": _mean([x["normalized_variance"] for x in er]),
                "mean_unit_normalized_variance_per_param": _mean([x["normalized_variance"] / r["params"] if x["normalized_variance"] is not None else None for x, r in zip(er, rs)]),
                "cosine": {str(qq): _mean([x["cosine"][str(qq)]["mean"] for x in er]) for qq in q},
                "sign_agreement": _mean([x["sign_agreement"] for x in er]),
                "fd_rel_error": _mean([x["loss_diff"]["fd_rel_error"] for x in er]),
                "loss_diff_mean_abs": _mean([x["loss_diff"]["mean_abs"] for x in er]),
                "zero_fraction": _mean([x["loss_diff"]["zero_fraction"] for x in er]),
            })
        out[m] = agg
    return out


# ----------------------------------------------------------------------------------------- joint (as trained)
def plan_groups(model: MozoCLIP, plan_text: str) -> dict[str, list]:
    """The ZO units of a plan per tower (the step's parameter groups), in the step's order."""
    
    plan = model.plan(plan_text)
    units = {m: [u for u in model.unit_list() if u.info.modality == m and plan.mode(m, u.info.layer) == "zo"] for m in MODALITIES}
    if not any(units.values()):
        raise ValueError(f"plan {plan_text!r} has no zeroth-order unit")
    return {m: us for m, us in units.items() if us}


@torch.no_grad()
def plan_estimate(model: MozoCLIP, batch: Batch, plan_text: str, eps: dict[str, float], seeds: Sequence[int], noise_seed: int,
                  distribution: LawLike = "gaussian", two_sided: bool = False, blocks: str = "joint"):
    """The estimate `HybridStep` forms for `plan_text` on `batch` with these direction seeds, epsilons and noise
    seed (zo.granularity=tower: blocks="group"): (Differences, coefficients per tower, L(theta)). Tested equal to the
    step's own coefficients. Perturbations are undone by copy, so repeated calls start at the same point."""
    units = plan_groups(model, plan_text)
    est = Estimator({m: Group([p for u in us for p in u.parameters()], eps[m], TOWER_STREAMS[m]) for m, us in units.items()},
                    distribution, two_sided, blocks)
    evaluate = tower_loss_fn(model, batch, {m: min(u.info.layer for u in us) for m, us in units.items()}, noise_seed)
    saved = {m: [p.detach().clone() for p in g.params] for m, g in est.groups.items()}
    loss0 = evaluate([])
    try:
        out = est.differences(seeds, evaluate, loss0)
    finally:
        for m, g in est.groups.items():
            for p, v in zip(g.params, saved[m]):
                p.copy_(v)
    return out, est.coefficients([float(x) for x in out.diffs], out.blocks), loss0


@torch.no_grad()
def diagnose_joint(model: MozoCLIP, batch: Batch, plan_text: str, eps_vision: Sequence[float], eps_language: Sequence[float],
                   q: Sequence[int], directions: int, seed: int = 0, distribution: LawLike = "gaussian", two_sided: bool = False,
                   progress: Optional[Callable[[str], None]] = None) -> dict:
    """The estimator exactly as `HybridStep` forms it (`plan_estimate`): all ZO units of a plan perturbed at
    once, each tower with its own epsilon, ONE loss difference, and c_m = diff / eps_m for tower m.

    Per (eps_vision, eps_language) and tower: the statistics of c_m z_m against that tower's gradient.
    With both towers ZO the difference mixes eps_v <g_v, z_v> + eps_l <g_l, z_l>, so the ratio of the
    epsilons decides how much of each tower's estimate is the other tower's noise; this measures it.
    """
    units = plan_groups(model, plan_text)
    params = {m: [p for u in us for p in u.parameters()] for m, us in units.items()}
    noise_seed = mix_seed(seed, 17)
    with torch.enable_grad():
        loss_autograd, grads = true_gradients(model, batch, noise_seed)
    dseeds = [mix_seed(seed, 99, d) for d in range(directions)]

    def dirs(m: str, d: int) -> list[torch.Tensor]:
        s = mix_seed(dseeds[d], TOWER_STREAMS[m])  # as the step's estimator: one seed per direction, one stream per tower
        return [direction(p, s, i, distribution) for i, p in enumerate(params[m])]

    sets = {m: DirectionSet([flat(dirs(m, d)) for d in range(directions)], flat([grads[id(p)] for p in params[m]])) for m in units}
    pairs, loss0 = [], None
    for ev in eps_vision:
        for el in eps_language:
            eps = {"vision": ev, "language": el}
            if progress:
                progress(f"eps_vision {ev:g} eps_language {el:g}")
            out, coefs, loss0_t = plan_estimate(model, batch, plan_text, eps, dseeds, noise_seed, distribution, two_sided)
            loss0 = float(loss0_t)
            diff = torch.tensor([float(x) for x in out.plus], dtype=torch.float64) - loss0
            entry = {"eps_vision": ev, "eps_language": el}
            for m in units:
                entry[m] = eps_row(eps[m], torch.tensor(coefs[m], dtype=torch.float64), diff, sets[m], q, distribution)
            pairs.append(entry)
    return {
        "plan": plan_text, "loss_autograd": loss_autograd, "loss": loss0,
        "towers": {m: {"units": [u.info.name for u in units[m]], "params": sets[m].z.shape[1],
                       "grad_norm": math.sqrt(sets[m].grad_sq)} for m in units},
        "pairs": pairs,
    }

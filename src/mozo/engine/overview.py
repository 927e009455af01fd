"""The one-screen plan of a run, printed before training: what will be trained how, and what it costs.

Everything here is read from the objects the run will use (backbone, units, plan, configuration), so the
screen cannot disagree with the run.
"""
from __future__ import annotations

from mozo.data.loader import describe_workers, workers_summary
from mozo.engine.step import forwards_per_step


def _modes_line(plan, modality: str) -> str:
    layers = sorted(layer for (m, layer) in plan.modes if m == modality)
    return " ".join(f"{layer}:{plan.mode(modality, layer)}" for layer in layers) or "(no units)"


def run_overview(runner) -> str:
    """A short, aligned text: backbone, units per tower and layer with their mode, ZO rule and epsilons,
    trainable parameters per part, steps per task and forwards per step."""
    cfg, model, plan = runner.cfg, runner.model, runner.plan
    by_part: dict[str, int] = {}
    for u in model.unit_list():
        key = f"{u.info.modality} {plan.mode(u.info.modality, u.info.layer)}"
        by_part[key] = by_part.get(key, 0) + sum(p.numel() for p in u.parameters())
    zo_towers = [m for m in ("vision", "language") if plan.has("zo", m)]
    steps = [runner.steps_for_task(t) for t in range(len(runner.tasks))]
    p = cfg.peft
    section = p.section()  # the kind's own config section tells its sizes
    unit = f"{p.kind}, {section.summary()}" if hasattr(section, "summary") else p.kind
    lines = [
        f"run       {cfg.name} -> {runner.out}",
        f"backbone  {cfg.backbone} on {runner.device} ({cfg.train.precision}); {runner.scenario.protocol} "
        f"{runner.scenario.name}, {len(runner.tasks)} tasks",
        f"units     {unit}, towers {','.join(p.towers)}",
        f"plan      {cfg.plan}",
        *(f"  {m:<8}  {_modes_line(plan, m)}" for m in ("vision", "language")),
        "params    " + ", ".join(f"{k} {v:,}" for k, v in sorted(by_part.items())) + f" (trainable: {sum(v for k, v in by_part.items() if not k.endswith('frozen')):,})",
    ]
    if zo_towers:
        z = cfg.zo
        lr = f"{z.lr:g}" if z.lr_relative is None else f"{z.lr_relative:g} x FO's"
        law = z.distribution if not z.subspace_rank else f"{z.distribution} rank-{z.subspace_rank} subspaces redrawn every {z.subspace_every} steps"
        lines.append(f"ZO        rule {z.rule}, lr {lr}, q {z.q}, {'two' if z.two_sided else 'one'}-sided, {law}, "
                     + ", ".join(f"eps {m} {z.eps(m):g}" for m in zo_towers) + ("" if z.granularity == "joint" else f", one estimate per {z.granularity}"))
    if plan.has("fo"):
        lr = f"{cfg.train.lr:g}" if cfg.train.lr_per_task is None else "per task " + ", ".join(f"{runner.task_lr(t):g}" for t in range(len(runner.tasks)))
        lines.append(f"FO        AdamW lr {lr}, weight decay {cfg.train.weight_decay:g}, {cfg.train.schedule}, "
                     f"{cfg.train.warmup_iters} warm-up steps")
    lines += [
        f"steps     batch {cfg.train.batch_size}, {cfg.train.epochs} epoch(s); per task {', '.join(map(str, steps))} (total {sum(steps)})",
        f"per step  {forwards_per_step(cfg.zo, len(zo_towers), len(plan.layers('vision', 'zo')) + len(plan.layers('language', 'zo')))} forward(s) of the loss, "
        f"{1 if plan.has('fo') else 0} backward; world size {runner.dist.world_size}",
        "loader    " + workers_summary(describe_workers(cfg.data.num_workers, runner.device, {t.name: t.train for t in runner.tasks},
                                                    cfg.train.batch_size, runner.backbone.image_size)),
    ]
    return "\n".join(lines)

"""`mozo diagnose`: variance, norm and cosine of the ZO estimate per unit, across epsilon and q.

Examples:
    mozo diagnose --backbone tiny --data random --json diag.json
    mozo diagnose --backbone mozo-tiny --data demo --rank 16 --warmup-steps 20 --json d.json --plots docs/img
    mozo diagnose --checkpoint runs/demo-fo --data demo --json d.json
    mozo diagnose --backbone vit-b-16 --batch 2 --directions 16 --eps 1e-3 --q 1,4,16 --json vitb.json
    mozo diagnose --sharpness runs/demo-fo --radii 0.5,2,8 --directions 16 --power-iters 30 --json sharp.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from mozo.peft.registry import kind_names
from mozo.seeds import mix_seed
from mozo.zo.directions import Law


def parse_floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return vals


def parse_ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "\n".join(__doc__.split("\n")[2:]) + "\nFields and their definitions: docs/diagnostics.md"
    p.add_argument("--backbone", default=None, help="tiny | vit-b-16 (random init) | mozo-tiny (shipped demo model) | hub id | "
                   "save_pretrained folder (default: the checkpoint's run config, else tiny)")
    p.add_argument("--checkpoint", default=None, metavar="RUN_DIR", help="load units from RUN_DIR/checkpoint/units.safetensors "
                   "(backbone and PEFT settings from RUN_DIR/config.json unless given)")
    p.add_argument("--peft", default=None, choices=kind_names(), help="unit kind (default moe)")
    p.add_argument("--rank", type=int, default=None, help="peft.<kind>.rank of the chosen kind: expert/adapter bottleneck width "
                   "(default 64, the paper's) or LoRA rank (default 8)")
    p.add_argument("--data", default=None, choices=("demo", "random", "run"), help="batch source: demo stream task 0 "
                   "(it ships with mozo), random images/prompts, or "
                   "run (--sharpness only): training images of a task of the run's own stream (default: demo; "
                   "with --sharpness: run)")
    p.add_argument("--batch", type=int, default=None, help="images in the diagnostic batch (default 4; with --sharpness: "
                   "images per batch, default 64)")
    p.add_argument("--eps", type=parse_floats, default=[1e-4, 1e-3, 1e-2], help="comma-separated epsilons")
    p.add_argument("--q", type=parse_ints, default=[1, 4, 16], help="comma-separated numbers of averaged directions for the cosine")
    p.add_argument("--directions", type=int, default=None, help="directions N per unit (cosine repeats = N // q; default 32); "
                   "with --sharpness: random directions K per group (default 16)")
    p.add_argument("--distribution", default="gaussian", choices=("gaussian", "rademacher"))
    p.add_argument("--two-sided", action="store_true", help="central differences instead of the one-sided Eq. 2")
    p.add_argument("--subspace-rank", type=int, default=0, help="zo.subspace_rank: matrices' directions U V^T / sqrt(r) in "
                   "one random rank-r subspace (its basis from --seed), as a window of training steps draws them; "
                   "the exact-derivative references stay the dense ones (default 0: dense)")
    p.add_argument("--parts", default="*", help="zo.parts: only the unit parameters matching these comma-separated shell "
                   "patterns form the block (e.g. '*.up.*', 'w_gate'), as the step perturbs them (default '*'; --block unit|tower)")
    p.add_argument("--block", default="unit", choices=("unit", "tower", "joint"), help="ZO block: one unit (the paper's), a whole "
                   "tower, or joint: all ZO units of --plan at once with per-tower epsilons and one loss difference, "
                   "exactly as the training step forms the estimate")
    p.add_argument("--plan", default="dual:hop-odd", help="--block joint: the plan whose ZO units are perturbed together")
    p.add_argument("--eps-vision", type=parse_floats, default=None, help="--block joint: vision epsilons (default: --eps)")
    p.add_argument("--eps-language", type=parse_floats, default=None, help="--block joint: language epsilons (default: --eps)")
    p.add_argument("--layers", type=parse_ints, default=None, help="only these layers (both towers), e.g. 1,6,12")
    p.add_argument("--modalities", default="vision,language", help="towers to measure")
    p.add_argument("--warmup-steps", type=int, default=0, help="first-order steps (plan fo) on the batch source before measuring; "
                   "fresh MoE adapters have zero `up` weights, so at init every `down` gradient is exactly 0")
    p.add_argument("--warmup-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full report here")
    p.add_argument("--plots", default=None, metavar="DIR", help="write diag_*.png figures here")
    p.add_argument("--plot-prefix", default="diag")
    p.add_argument("--ref-eps", type=float, default=None, help="epsilon of the per-layer and per-q figures and the printed table (default: nearest 1e-3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--from-json", default=None, metavar="REPORT", help="measure nothing: print and plot an existing report "
                   "(reference values recomputed with this version)")
    s = p.add_argument_group("sharpness (--sharpness RUN_DIR; docs/diagnostics.md, `mozo diagnose --sharpness`)")
    s.add_argument("--sharpness", default=None, metavar="RUN_DIR", help="measure the sharpness of a run's final units "
                   "instead of the ZO estimator: loss increase under random perturbations and the top Hessian eigenvalue")
    s.add_argument("--radii", type=parse_floats, default=[0.5, 2.0, 8.0], help="comma-separated perturbation radii (absolute "
                   "Euclidean norms over the group's parameters unless --relative)")
    s.add_argument("--relative", action="store_true", help="radii are fractions of the norm of the group's parameters")
    s.add_argument("--one-sided", action="store_true", help="K draws +u_d only, instead of the antithetic pairs +-u_d "
                   "(2K draws) whose mean cancels the gradient term")
    s.add_argument("--groups", default="all,vision,language,fo,zo,frozen", help="unit groups to perturb: all, vision, "
                   "language, and fo / zo / frozen as the run's plan trained them (absent groups are skipped)")
    s.add_argument("--hessian-groups", default="fo,all", help="groups whose top Hessian eigenvalue is estimated ('' for none)")
    s.add_argument("--power-iters", type=int, default=30, help="most Hessian-vector products of the power iteration")
    s.add_argument("--power-tol", type=float, default=1e-3, help="stop when the eigenvalue's relative change is below this")
    s.add_argument("--task", type=int, default=None, help="--data run: 1-based task whose training images form the loss "
                   "(default: the run's last task, the objective its final units minimised)")
    s.add_argument("--images", type=int, default=256, help="--data run/demo/random: images in the loss")
    s.add_argument("--train-mode", action="store_true", help="measure the training-time function (dropout and router "
                   "noise on, seeded identically in every evaluation) instead of eval mode")


def build_model(args):
    """(model, backbone, description of where the units come from, run config or None)."""
    from mozo.backbone.clip import load_backbone
    from mozo.peft.inject import MozoCLIP, PeftConfig

    run_cfg = None
    if args.checkpoint:
        cfg_path = Path(args.checkpoint) / "config.json"
        if cfg_path.exists():
            from mozo.engine.config import from_dict

            run_cfg = from_dict(json.loads(cfg_path.read_text()))
    spec = args.backbone or (run_cfg.backbone if run_cfg else "tiny")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    bb = load_backbone(spec, device, seed=args.seed)
    peft = run_cfg.peft if run_cfg else PeftConfig()
    if args.peft:
        peft.kind = args.peft
    if args.rank:
        section = peft.section()
        if not hasattr(section, "rank"):
            raise SystemExit(f"--rank: peft kind {peft.kind!r} has no rank (its keys: {', '.join(vars(section))})")
        section.rank = args.rank
        peft.validate()
    torch.manual_seed(args.seed)
    model = MozoCLIP(bb, peft)
    return model, bb, spec, run_cfg


def refresh_reference_values(report: dict) -> dict:
    """Recompute the exact-derivative reference values (pure functions of P, q, distribution)."""
    from mozo.diagnostics.stats import ideal_cosine, ideal_normalized_variance

    dist = report["estimator"]["distribution"]
    for r in report["rows"]:
        r["ideal_normalized_variance"] = ideal_normalized_variance(r["params"], dist)
        for e in r["by_eps"]:
            for q, c in e["cosine"].items():
                c["ideal"] = ideal_cosine(r["params"], int(q)) if dist == "gaussian" else None
    return report


def _fp32_ulp(x: float) -> float:
    """Spacing of fp32 numbers at |x|: the smallest loss difference fp32 can represent there."""
    if x == 0:
        return float(torch.finfo(torch.float32).tiny)
    return 2.0 ** (math.floor(math.log2(abs(x))) - 23)


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def print_summary(report: dict, ref: int, out=None) -> None:
    out = out or sys.stdout  # looked up at call time (a default would keep the stdout of import time)
    eps = report["estimator"]["eps"][ref]
    qs = report["estimator"]["q"]
    print(f"\nbackbone {report['backbone']} | {report['state']['description']} | data: {report['data']['note']}", file=out)
    print(f"loss {report['loss_autograd']:.4f} | eps {eps:g} | {report['estimator']['directions']} directions "
          f"({report['estimator']['distribution']}"
          + (f", rank-{report['estimator']['subspace_rank']} subspace" if report["estimator"].get("subspace_rank") else "")
          + f", {'two' if report['estimator']['two_sided'] else 'one'}-sided)", file=out)
    head = f"{'block':<14}{'P':>9}{'|grad|':>10}{'E|g_d|^2':>11}{'variance':>11}{'var/|g|^2':>11}{'/ideal':>8}" + "".join(f"{'cos q=' + str(q):>10}" for q in qs) + f"{'sgncos' + str(qs[0]):>9}{'sign ok':>9}{'fd err':>8}"
    print(head, file=out)
    for r in report["rows"]:
        e = r["by_eps"][ref]
        name = f"{r['modality']}.{r['layer']}" if r["layer"] is not None else f"{r['modality']}.all"
        nv = e["normalized_variance"]
        ratio = None if nv is None else nv / r["ideal_normalized_variance"]
        print(f"{name:<14}{r['params']:>9}{r['grad_norm']:>10.3g}{e['mean_sq_norm']:>11.3g}{e['variance']:>11.3g}{_fmt(nv):>11}{_fmt(ratio, '.2f'):>8}"
              + "".join(f"{_fmt(e['cosine'][str(q)]['mean'], '.3f'):>10}" for q in qs)
              + f"{_fmt((e.get('sign_cosine') or {}).get(str(qs[0])), '.3f'):>9}"
              + f"{_fmt(e['sign_agreement'], '.2f'):>9}{_fmt(e['loss_diff']['fd_rel_error'], '.2g'):>8}", file=out)
    print("per modality (sums over units; means of per-unit normalised values):", file=out)
    for m, a in report["modalities"].items():
        e = a["by_eps"][ref]
        print(f"  {m:<9} units {a['units']:>2}  P/unit {a['params_per_unit']:>9.0f}  |grad| {a['grad_norm']:.3g}  variance sum {e['variance_sum']:.3g}"
              f"  mean var/|g|^2 {_fmt(e['mean_unit_normalized_variance'])}  per param {_fmt(e['mean_unit_normalized_variance_per_param'], '.3f')}"
              f"  cos " + " ".join(f"q{q}={_fmt(e['cosine'][str(q)], '.3f')}" for q in qs), file=out)
    print("loss difference vs eps (mean over units of mean |L(theta+eps z)-L(theta)|; fd err; exact zeros):", file=out)
    for m, a in report["modalities"].items():
        print(f"  {m:<9} " + "  ".join(f"eps={x['eps']:g}: {x['loss_diff_mean_abs']:.2e} err {_fmt(x['fd_rel_error'], '.2g')} zeros {x['zero_fraction']:.2f}" for x in a["by_eps"]), file=out)


def main(args) -> int:
    from mozo.diagnostics.measure import check_parts, diagnose, load_units, make_batches, warmup
    from mozo.diagnostics.plots import reference_index, write_plots

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sharpness:
        return _main_sharpness(args)
    if args.data == "run":
        print("mozo diagnose: --data run needs --sharpness RUN_DIR", file=sys.stderr)
        return 2
    args.data = "demo" if args.data is None else args.data
    args.batch = 4 if args.batch is None else args.batch
    args.directions = 32 if args.directions is None else args.directions
    if args.from_json:
        report = refresh_reference_values(json.loads(Path(args.from_json).read_text()))
        print_summary(report, reference_index(report["estimator"]["eps"], args.ref_eps))
        if args.plots:
            for p in write_plots(report, args.plots, args.plot_prefix, args.ref_eps):
                print(f"wrote {p}")
        return 0
    if args.subspace_rank < 0:
        print(f"mozo diagnose: --subspace-rank must be >= 0 (0: dense directions), got {args.subspace_rank}", file=sys.stderr)
        return 2
    if args.directions < max(args.q):
        print(f"mozo diagnose: --directions {args.directions} < max q {max(args.q)}: the cosine for that q needs at least q directions", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    state = {"warmup_steps": args.warmup_steps, "checkpoint": None, "warmup_losses": []}
    parts = []
    try:
        model, bb, spec, run_cfg = build_model(args)
        check_parts(model, args.parts)  # before any warm-up step
        if args.checkpoint:
            state["checkpoint"] = str(load_units(model, args.checkpoint))
            parts.append(f"units from {args.checkpoint}")
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"mozo diagnose: {exc}", file=sys.stderr)
        return 2
    batches = make_batches(args.data, bb, args.batch, 1 + max(0, args.warmup_steps), seed=args.seed, device=args.device)
    diag_batch, warm_batches = batches[0], batches[1:]
    if args.warmup_steps > 0:
        state["warmup_losses"] = warmup(model, warm_batches, args.warmup_steps, args.warmup_lr, seed=args.seed)
        parts.append(f"{args.warmup_steps} FO warm-up steps (lr {args.warmup_lr:g})")
    state["description"] = ", ".join(parts) if parts else "fresh units (MoE `up` = 0: `down` gradients are exactly 0)"
    mods = [m.strip() for m in args.modalities.split(",") if m.strip()]
    units = [(u.info.modality, u.info.layer) for u in model.unit_list()
             if u.info.modality in mods and (args.layers is None or u.info.layer in args.layers)]
    if not units:
        print("mozo diagnose: no unit matches --layers/--modalities", file=sys.stderr)
        return 2

    def progress(text: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {text}", file=sys.stderr, flush=True)

    if args.block == "joint":
        return _main_joint(args, model, spec, diag_batch, state, progress, t0)
    result = diagnose(model, diag_batch, args.eps, args.q, args.directions, seed=args.seed, distribution=_law(args),
                      two_sided=args.two_sided, block=args.block, units=units, progress=progress, parts=args.parts)
    loss = result["loss_autograd"]
    report = {
        **_header(model, spec, diag_batch, args, state),
        "estimator": {"block": args.block, "distribution": args.distribution, "subspace_rank": args.subspace_rank, "parts": args.parts,
                      "two_sided": args.two_sided, "directions": args.directions, "eps": args.eps, "q": args.q, "seed": args.seed,
                      "seed_scheme": "direction d of unit (m, k): direction(p_i, mix_seed(mix_seed(seed, {vision:1, language:2}[m], k), d), i), k = 0 for --block tower"},
        "loss_autograd": loss,
        "loss_ulp": _fp32_ulp(loss),
        "rows": result["rows"],
        "modalities": result["modalities"],
        "wall_time_s": None,
    }
    report["wall_time_s"] = time.perf_counter() - t0
    ref = reference_index(args.eps, args.ref_eps)
    print_summary(report, ref)
    _write_json(args.json, report)
    if args.plots:
        for p in write_plots(report, args.plots, args.plot_prefix, args.ref_eps):
            print(f"wrote {p}")
    return 0


def _law(args):
    """The directions' law of --distribution and --subspace-rank (the basis seeded from --seed)."""
    return Law(args.distribution, args.subspace_rank, mix_seed(args.seed, "subspace")) if args.subspace_rank else args.distribution


def _header(model, spec: str, batch, args, state: dict) -> dict:
    return {
        "backbone": spec,
        "peft": {"kind": model.peft.kind, **dataclasses.asdict(model.peft.section())},
        "trainable_params": model.trainable_parameter_counts(),
        "widths": {m: model.towers[m].width for m in ("vision", "language")},
        "data": {"source": batch.source, "requested": args.data, "note": batch.note, "batch": args.batch,
                 "prompts": batch.prompts, "labels": batch.labels.tolist()},
        "state": state,
    }


def _main_joint(args, model, spec, batch, state, progress, t0) -> int:
    from mozo.diagnostics.measure import diagnose_joint

    ev, el = args.eps_vision or args.eps, args.eps_language or args.eps
    try:
        result = diagnose_joint(model, batch, args.plan, ev, el, args.q, args.directions, seed=args.seed,
                                distribution=_law(args), two_sided=args.two_sided, progress=progress)
    except ValueError as exc:
        print(f"mozo diagnose: {exc}", file=sys.stderr)
        return 2
    report = {**_header(model, spec, batch, args, state),
              "estimator": {"block": "joint", "plan": args.plan, "distribution": args.distribution, "subspace_rank": args.subspace_rank,
                            "two_sided": args.two_sided,
                            "directions": args.directions, "eps_vision": ev, "eps_language": el, "q": args.q, "seed": args.seed},
              **result, "wall_time_s": time.perf_counter() - t0}
    print_joint(report)
    return _write_json(args.json, report)


def _write_json(path: str | None, report: dict) -> int:
    """--json: the report as JSON (folders made as needed); the command's exit status."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=1))
        print(f"wrote {path}")
    return 0


def print_joint(report: dict, out=None) -> None:
    out = out or sys.stdout  # looked up at call time (a default would keep the stdout of import time)
    qs = report["estimator"]["q"]
    towers = list(report["towers"])
    print(f"\nbackbone {report['backbone']} | {report['state']['description']} | plan {report['plan']} (joint estimate, as trained)", file=out)
    for m, t in report["towers"].items():
        print(f"  {m}: {len(t['units'])} ZO units, P {t['params']}, |grad| {t['grad_norm']:.3g}", file=out)
    head = f"{'eps_v':>8}{'eps_l':>8}" + "".join(f"  | {m[:4]} {'sign ok':>7}{'fd err':>8}" + "".join(f"{'cos' + str(q):>8}" for q in qs)
                                               + f"{'sgncos1':>8}" for m in towers)
    print(head, file=out)
    for pr in report["pairs"]:
        line = f"{pr['eps_vision']:>8g}{pr['eps_language']:>8g}"
        for m in towers:
            e = pr[m]
            line += (f"  | {'':4} {_fmt(e['sign_agreement'], '.2f'):>7}{_fmt(e['loss_diff']['fd_rel_error'], '.2g'):>8}"
                     + "".join(f"{_fmt(e['cosine'][str(q)]['mean'], '.3f'):>8}" for q in qs)
                     + f"{_fmt(e['sign_cosine'][str(qs[0])], '.3f'):>8}")
        print(line, file=out)


# ----------------------------------------------------------------------------------------- sharpness
def _main_sharpness(args) -> int:
    """`--sharpness RUN_DIR`: the sharpness of a run's final units (mozo.diagnostics.sharpness)."""
    from mozo.diagnostics.measure import load_units, make_batches
    from mozo.diagnostics.sharpness import measure_sharpness, run_task_batches, unit_groups
    
    def fail(msg: str) -> int:
        print(f"mozo diagnose: {msg}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    run_dir = Path(args.sharpness)
    if not run_dir.is_dir():
        return fail(f"--sharpness {run_dir}: no such run directory")
    if not (run_dir / "config.json").is_file():
        return fail(f"--sharpness {run_dir}: not a mozo run directory (no config.json); give the --out folder of `mozo run`")
    if args.checkpoint and Path(args.checkpoint) != run_dir:
        return fail("give either --sharpness RUN_DIR or --checkpoint, not both")
    directions = 16 if args.directions is None else args.directions
    batch_size = 64 if args.batch is None else args.batch
    data = "run" if args.data is None else args.data
    for flag, v in (("--directions", directions), ("--batch", batch_size), ("--images", args.images), ("--power-iters", args.power_iters)):
        if v < 1:
            return fail(f"{flag} must be >= 1, got {v}")
    args.checkpoint = str(run_dir)
    try:
        model, bb, spec, run_cfg = build_model(args)
        ck = load_units(model, run_dir)
        plan = model.plan(run_cfg.plan)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        return fail(str(exc))
    finished = (run_dir / "results.json").is_file()
    if not finished:
        print(f"mozo diagnose: {run_dir} has no results.json (unfinished run): measuring the units of its last checkpoint", file=sys.stderr)
    try:
        if data == "run":
            batches, data_info = run_task_batches(run_cfg, run_dir, bb, args.task, args.images, batch_size, args.seed, args.device)
        else:
            batches = make_batches(data, bb, batch_size, math.ceil(args.images / batch_size), seed=args.seed, device=args.device)
            data_info = {"note": batches[0].note}
    except (FileNotFoundError, OSError, ValueError) as exc:
        return fail(str(exc))
    all_groups = unit_groups(model, plan)
    wanted = [g.strip() for g in args.groups.split(",") if g.strip()]
    hessian = [g.strip() for g in args.hessian_groups.split(",") if g.strip()]
    unknown = sorted(set(wanted + hessian) - {"all", "vision", "language", "fo", "zo", "frozen"})
    if unknown:
        return fail(f"unknown group(s) {', '.join(unknown)}; choose from all, vision, language, fo, zo, frozen")
    groups = {g: all_groups[g] for g in dict.fromkeys(wanted + hessian) if g in all_groups}
    if not groups:
        return fail(f"none of the groups {', '.join(wanted + hessian)} has units in this run (plan {run_cfg.plan})")

    def progress(text: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {text}", file=sys.stderr, flush=True)

    result = measure_sharpness(model, batches, args.radii, directions, groups, hessian, args.power_iters, args.power_tol,
                               seed=args.seed, relative=args.relative, train_mode=args.train_mode,
                               antithetic=not args.one_sided, perturb_groups=[g for g in wanted if g in groups], progress=progress)
    report = {"run": str(run_dir), "checkpoint": str(ck), "finished": finished, "plan": run_cfg.plan, "backbone": spec,
              "peft": {"kind": model.peft.kind, **dataclasses.asdict(model.peft.section())},
              "data": {"source": data, "images": result["images"], "batch": batch_size, **data_info},
              "loss_ulp": _fp32_ulp(result["loss"]), **result, "wall_time_s": time.perf_counter() - t0}
    print_sharpness(report)
    return _write_json(args.json, report)


def print_sharpness(report: dict, out=None) -> None:
    out = out or sys.stdout  # looked up at call time (a default would keep the stdout of import time)
    radii = report["radii"]
    print(f"\nrun {report['run']} | plan {report['plan']} | {report['mode']} mode | loss {report['loss']:.4f} "
          f"(fp32 ulp {report['loss_ulp']:.1e}) | {report['data']['note']}", file=out)
    draws = f"+-u_d for {report['directions']} random unit directions u_d" if report["antithetic"] else f"{report['directions']} random unit directions u"
    print(f"loss increase L(theta + rho u) - L(theta), u = {draws}, {report['radius_scale']} radii; "
          f"curv = 2 mean / rho^2 (mean curvature tr(H)/P); lambda_max: power iteration on Hessian-vector products "
          f"(iters! = not converged to --power-tol)", file=out)
    head = f"{'group':<10}{'P':>8} {'|theta|':>8}" + "".join(f" {'r=' + format(r, 'g') + ' mean':>14} {'max':>9} {'curv':>9}" for r in radii) \
        + f" {'lambda_max':>11} {'rel chg':>8} {'iters':>5}"
    print(head, file=out)
    for name, g in report["groups"].items():
        line = f"{name:<10}{g['params']:>8} {g['param_norm']:>8.3g}"
        for row in (g["perturbation"]["by_radius"] if "perturbation" in g else [None] * len(radii)):
            line += f" {'-':>14} {'-':>9} {'-':>9}" if row is None else f" {row['mean']:>14.3g} {row['max']:>9.3g} {_fmt(row['curvature']):>9}"
        h = g.get("hessian")
        line += f" {_fmt(h and h['eigenvalue'], '.4g'):>11} {_fmt(h and h['rel_change'], '.1g'):>8} {(str(h['iterations']) + ('' if h['converged'] else '!') if h else '-'):>5}"
        if "same_as" in g:
            line += f"  (= {g['same_as']})"
        print(line, file=out)

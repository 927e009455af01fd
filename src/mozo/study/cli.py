"""`mozo study PRESET --plans P1,P2 --seeds N [--controls frozen,noise]`: does the ZO part of a plan help?

Every (plan, variant, seed) is an ordinary `mozo run` directory under --out: finished ones are reused,
interrupted ones resumed, so a study can be stopped and continued. Variants:
  zo      the plan as given;
  frozen  the same plan with its ZO units frozen (`zo.plan.frozen_control`: e.g. dual:hop-odd becomes
          dual:hop-odd+vision:1,3=frozen+language:1,3=frozen; no perturbation, no ZO forward);
  noise   the same plan with zo.rule=noise: MoZO's perturbations and step size without loss information
          (matched to the sign rules, mozo and sign; for sgd the step sizes differ).
It writes study.json, study.md (Last, Avg, forgetting as mean and 95% CI over seeds; per plan the
paired difference against each control with its 95% CI and p-value) and study.png.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

CONTROLS = ("frozen", "noise")
METRICS = ("last", "avg", "forgetting")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", help="preset or YAML file, as for mozo run (e.g. demo)")
    p.add_argument("--plans", required=True, help="comma-separated plans; a plan may carry overrides after '@', "
                                                     "e.g. dual:hop-odd@zo.rule=mozo")
    p.add_argument("--seeds", type=int, default=5, help="how many seeds: --first-seed .. --first-seed + N - 1 (default 5)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0); a replication on fresh seeds "
                   "uses e.g. --first-seed 5")
    p.add_argument("--controls", default="frozen,noise", help=f"comma-separated, of {', '.join(CONTROLS)} (default both)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--data-root", help="as for mozo run")
    p.add_argument("--out", default="runs/study", help="study folder (default runs/study)")


def parse_plans(text: str) -> list[tuple[str, list[str]]]:
    """(label, overrides) per plan, split at commas that do not continue a layer list (`vision:1,3,dual-zo` is two
    plans). The label is the whole item, options included, so one plan under two options is two entries."""
    out = []
    for item in filter(None, (s.strip() for s in re.split(r",(?!\d)", text))):
        plan, *extra = item.split("@")
        out.append((item, [f"plan={plan}", *extra]))
    return out


def control_overrides(preset: str, overrides: list[str], control: str) -> list[str]:
    """The overrides that turn a plan's run into its control run."""
    if control == "noise":
        return ["zo.rule=noise"]
    from mozo.backbone.clip import load_backbone
    from mozo.engine.config import load_config
    from mozo.peft.inject import MozoCLIP
    from mozo.zo.plan import frozen_control

    cfg = load_config(preset, overrides)  # the plan resolved on the model's own depths and units
    model = MozoCLIP(load_backbone(cfg.backbone), cfg.peft)
    return [f"plan={frozen_control(model.plan(cfg.plan))}"]


def _run_dir(out: Path, plan: str, variant: str, seed: int) -> Path:
    return out / re.sub(r"[:+,=@*]", "_", plan) / variant / f"seed{seed}"


def run_one(preset: str, overrides: list[str], run_dir: Path, data_root) -> dict:
    """Reuse a finished run with the same configuration, resume an interrupted one, or start it."""
    from mozo.engine.config import load_config, to_dict
    from mozo.engine.loop import run_experiment

    cfg = load_config(preset, overrides)
    done = run_dir / "results.json"
    if done.exists():
        res = json.loads(done.read_text())
        if res.get("config") == to_dict(cfg):
            return res
    resume = (run_dir / "checkpoint").exists() and json.loads((run_dir / "config.json").read_text()) == to_dict(cfg)
    return run_experiment(cfg, run_dir, data_root=data_root, resume=resume, overwrite=not resume, progress=False)


def summarize_study(results: dict, controls: list[str], signals: dict | None = None) -> dict:
    """results[plan][variant] = list of summaries (one per seed, same seed order in every variant); signals[plan] =
    the plan's per-seed results.json `zo_signal` (engine/signal.py), summarised when the runs measured it."""
    from mozo.study.stats import mean_ci, paired_difference

    table = {}
    for plan, variants in results.items():
        row = {v: {m: mean_ci([s[m] for s in sums]) for m in METRICS} for v, sums in variants.items()}
        row["vs"] = {c: {m: paired_difference([s[m] for s in variants["zo"]], [s[m] for s in variants[c]]) for m in METRICS}
                     for c in controls}
        signal = signal_summary((signals or {}).get(plan, []))
        if signal:
            row["signal"] = signal
        table[plan] = row
    return table


def signal_summary(per_seed: list[dict]) -> dict:
    """Over seeds: the ZO step size relative to FO's, and the held-out ZO gain against the noise gain of the same
    runs (paired by seed; each seed's values are means over its tasks). Empty without zo.gain_every."""
    from mozo.study.stats import mean_ci, paired_difference

    def task_mean(signal: dict, key: str, per_tower: bool = False) -> float | None:
        vals = [(t.get(key) or {}).values() if per_tower else [t.get(key)] for t in signal.values()]
        vals = [v for vs in vals for v in vs if v is not None]
        return sum(vals) / len(vals) if vals else None

    ratio = [task_mean(s, "zo_to_fo_step_ratio", per_tower=True) for s in per_seed]
    zo, noise = [task_mean(s, "mean_zo_gain") for s in per_seed], [task_mean(s, "mean_noise_gain") for s in per_seed]
    out = {}
    if ratio and None not in ratio:
        out["zo_to_fo_step_ratio"] = mean_ci(ratio)
    if len(zo) >= 2 and None not in zo and None not in noise:
        out["zo_gain"], out["noise_gain"] = mean_ci(zo), mean_ci(noise)
        out["gain_vs_noise"] = paired_difference(zo, noise)
    return out


def _fmt(stat: dict) -> str:
    if stat["ci"] is None:
        return f"{stat['mean']:.1f}"
    return f"{stat['mean']:.1f} [{stat['ci'][0]:.1f}, {stat['ci'][1]:.1f}]"


def markdown(table: dict, controls: list[str], seeds: int) -> str:
    head = ["plan", "variant", "Last", "Avg", "Forgetting"]
    lines = [f"Mean [95% CI] over {seeds} seeds.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for plan, row in table.items():
        for v in ["zo", *controls]:
            lines.append(f"| {plan} | {v} | " + " | ".join(_fmt(row[v][m]) for m in METRICS) + " |")
    signals = [(plan, row["signal"]) for plan, row in table.items() if row.get("signal")]
    if signals:
        lines += ["", "ZO signal of the plan's runs (zo.gain_every): ZO step size / FO step size, and held-out loss decrease "
                  "of the ZO update minus that of a random update of the same size, paired by seed.", "",
                  "| plan | ZO/FO step | ZO gain | noise gain | ZO - noise [95% CI] | p | reading |", "|---|---|---|---|---|---|---|"]
        for plan, sig in signals:
            r = sig.get("zo_to_fo_step_ratio")
            g = sig.get("gain_vs_noise")
            ratio = "-" if r is None else f"{r['mean']:.3g}"
            lines.append(f"| {plan} | {ratio} | "
                         + (f"{sig['zo_gain']['mean']:.2e} | {sig['noise_gain']['mean']:.2e} | {g['mean']:.2e} [{g['ci'][0]:.2e}, "
                            f"{g['ci'][1]:.2e}] | {g['p']:.2g} | {g['verdict']} |" if g else "- | - | - | - | - |"))
    lines += ["", "Paired difference, plan minus control, seed by seed (Last): mean [95% CI], p, reading.", "",
              "| plan | control | Last diff | p | reading | Avg diff | Forgetting diff |", "|---|---|---|---|---|---|---|"]
    for plan, row in table.items():
        for c in controls:
            d = row["vs"][c]
            p = "-" if d["last"]["p"] is None else f"{d['last']['p']:.2g}"
            lines.append(f"| {plan} | {c} | {_fmt(d['last'])} | {p} | {d['last']['verdict']} | {_fmt(d['avg'])} | {_fmt(d['forgetting'])} |")
    return "\n".join(lines)


def plot(table: dict, controls: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, means, errs = [], [], []
    for plan, row in table.items():
        for c in controls:
            d = row["vs"][c]["last"]
            labels.append(f"{plan}\nvs {c}")
            means.append(d["mean"])
            errs.append(0.0 if d["ci"] is None else (d["ci"][1] - d["ci"][0]) / 2)
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(labels)), 3.2))
    ax.bar(range(len(labels)), means, yerr=errs, capsize=4, color="#4C72B0")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("Last: plan - control (points)")
    ax.set_title("ZO contribution, paired by seed (95% CI)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    from mozo.engine.config import ConfigError, load_config

    controls = [c for c in (s.strip() for s in args.controls.split(",")) if c]
    unknown = [c for c in controls if c not in CONTROLS]
    plans = parse_plans(args.plans)
    try:
        if unknown:
            raise ConfigError(f"unknown control(s) {unknown}; choose from {', '.join(CONTROLS)}")
        if args.seeds < 2:
            raise ConfigError(f"--seeds must be >= 2 for a confidence interval, got {args.seeds}")
        if args.first_seed < 0:
            raise ConfigError(f"--first-seed must be >= 0, got {args.first_seed}")
        if not plans:
            raise ConfigError("--plans is empty; give e.g. --plans vision-zo,dual:hop-odd@zo.rule=mozo")
        variants = {}
        for plan, overrides in plans:  # every configuration is checked before the first run starts
            variants[plan] = [("zo", [])] + [(c, control_overrides(args.preset, overrides + args.set, c)) for c in controls]
            for _, extra in variants[plan]:
                load_config(args.preset, overrides + args.set + extra)
    except (ConfigError, ValueError) as exc:
        print(f"mozo study: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    results: dict = {}
    signals: dict = {}
    for plan, overrides in plans:
        results[plan] = {}
        for variant, extra in variants[plan]:
            sums = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                run_dir = _run_dir(out, plan, variant, seed)
                print(f"mozo study: {plan} {variant} seed {seed} -> {run_dir}", flush=True)
                res = run_one(args.preset, overrides + args.set + extra + [f"seed={seed}"], run_dir, args.data_root)
                sums.append(res["summary"])
                if variant == "zo" and res.get("zo_signal"):
                    signals.setdefault(plan, []).append(res["zo_signal"])
            results[plan][variant] = sums
    table = summarize_study(results, controls, signals)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps({"preset": args.preset, "plans": args.plans, "seeds": args.seeds,
                                                "first_seed": args.first_seed,
                                                "controls": controls, "set": args.set, "table": table}, indent=1))
    text = markdown(table, controls, args.seeds)
    (out / "study.md").write_text(text + "\n")
    plot(table, controls, out / "study.png")
    print("\n" + text)
    print(f"\nstudy: {out / 'study.json'}, {out / 'study.md'}, {out / 'study.png'}")
    return 0

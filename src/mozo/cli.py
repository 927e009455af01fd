"""The `mozo` command line: one subcommand per module, imported lazily so `mozo --help` is instant.

Each subcommand module exposes `add_arguments(parser)` and `main(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "run": ("mozo.engine.run_cli", "train a continual-learning protocol (preset or YAML) and write results.json"),
    "eval": ("mozo.engine.eval_cli", "evaluation only: a run's units or the zero-shot backbone on any protocol's test sets"),
    "demo": ("mozo.demo.cli", "offline demo: shipped tiny CLIP, bundled images, plans side by side"),
    "bench": ("mozo.bench.cli", "peak memory and step time of plans side by side; --data: input-pipeline images/s"),
    "metrics": ("mozo.metrics.cli", "recompute the summary (Last, Avg, Transfer, BWT, forgetting) of a results.json"),
    "report": ("mozo.report.cli", "comparison table and plots of run directories"),
    "diagnose": ("mozo.diagnostics.cli", "ZO estimate variance and cosine with autograd per modality and layer"),
    "study": ("mozo.study.cli", "plans against their controls (ZO frozen, null rule) over seeds: paired differences with CIs"),
    "sweep": ("mozo.diagnostics.sweep", "grid over MoZO epsilons and learning rate on the demo stream"),
    "data": ("mozo.data.data_cli", "list, check (with the real readers) and fetch the datasets"),
    "pretrain-tiny": ("mozo.demo.pretrain", "pretrain the shipped tiny CLIP from bundled/generated data"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mozo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_help(sys.stderr)
            print(f"\nmozo: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"mozo {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_intermixed_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

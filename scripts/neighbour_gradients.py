"""How much does a unit's gradient tell about the gradient of the same parameter one layer up? The measurement
behind `zo.guide_weight` (docs/findings.md, "Guided directions").

After a few FO steps on the demo stream (units off their zero initialisation), the autograd gradient of every
unit on held-out demo batches; per tower and parameter name, the cosine between layer k and layer k+1, and for
whole units. Usage: python scripts/neighbour_gradients.py [--warmup 30] [--batches 2]
"""
from __future__ import annotations

import argparse
import collections

import torch

from mozo.backbone.clip import load_backbone
from mozo.diagnostics.measure import make_batches, true_gradients, warmup
from mozo.engine.config import load_config
from mozo.peft.inject import MozoCLIP


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return None if a.norm() == 0 or b.norm() == 0 else float(a @ b / (a.norm() * b.norm()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=30, help="FO steps (plan fo, lr 1e-2) before measuring")
    p.add_argument("--batches", type=int, default=2, help="held-out batches of 32 demo images")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = load_config("demo")
    backbone = load_backbone(cfg.backbone, torch.device("cpu"), seed=0)
    model = MozoCLIP(backbone, cfg.peft)
    batches = make_batches("demo", backbone, 32, 4 + args.batches, seed=0)
    warmup(model, batches[:4], args.warmup, lr=1e-2)
    table = collections.defaultdict(list)
    for b in batches[4:]:
        _, grads = true_gradients(model, b, noise_seed=1)
        for m in ("vision", "language"):
            units = sorted((u for u in model.unit_list() if u.info.modality == m), key=lambda u: u.info.layer)
            for lo, hi in zip(units, units[1:]):
                upper = dict(hi.named_parameters())
                for name, param in lo.named_parameters():
                    c = cosine(grads[id(param)], grads[id(upper[name])])
                    if c is not None:  # experts that no example routed to have no gradient
                        table[(m, name.split(".", 2)[-1] if name.startswith("experts.") else name)].append(c)
                c = cosine(torch.cat([grads[id(q)].reshape(-1) for q in lo.parameters()]),
                           torch.cat([grads[id(q)].reshape(-1) for q in hi.parameters()]))
                if c is not None:
                    table[(m, "whole unit")].append(c)
    print(f"{'tower':<9}{'parameter':<14}{'pairs':>6}{'mean cos':>10}{'mean |cos|':>12}")
    for (m, name), values in sorted(table.items()):
        print(f"{m:<9}{name:<14}{len(values):>6}{sum(values) / len(values):>10.2f}{sum(map(abs, values)) / len(values):>12.2f}")


if __name__ == "__main__":
    main()

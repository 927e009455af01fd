"""The registry of zeroth-order update rules. Adding a rule: one file in this package with a `Rule`
subclass, one line in `RULES` below, and its test (docs/architecture.md)."""
from __future__ import annotations

from mozo.zo.rules.adamw import AdamW
from mozo.zo.rules.base import Groups, Rule, UpdateContext, ZORecord, estimate_
from mozo.zo.rules.conservative import Conservative
from mozo.zo.rules.mozo import MOZO_EPS, MoZO
from mozo.zo.rules.noise import Noise
from mozo.zo.rules.sgd import SGD
from mozo.zo.rules.sign import Sign
from mozo.zo.rules.sign_scalar import SignScalar

RULES: dict[str, type[Rule]] = {r.name: r for r in (SGD, Sign, SignScalar, Conservative, AdamW, MoZO, Noise)}


class UnknownRuleError(ValueError):
    pass


def get_rule(name: str) -> type[Rule]:
    """The rule class registered under `name`; an unknown name lists the registered ones."""
    try:
        return RULES[name]
    except KeyError:
        raise UnknownRuleError(f"unknown zo.rule {name!r}; registered rules: {', '.join(RULES)}") from None


def replay(estimator, records: list[ZORecord]) -> None:
    """Re-apply a logged trajectory of ZO steps to the groups of `estimator` (a `zo.estimator.Estimator` over
    fresh parameters with the trained groups' streams), for rules with `replayable`."""
    for r in records:
        rule = get_rule(r.rule)
        if not rule.replayable:
            raise ValueError(f"rule {r.rule!r} cannot be replayed from its record (its update depends on more than the record)")
        for group, coefs in r.coefs.items():
            seeds = [estimator.group_seed(s, group) for s in r.seeds]
            rule.update_group(estimator.groups[group].params, seeds, coefs, r.lr, r.distribution)


__all__ = ["RULES", "Rule", "UpdateContext", "ZORecord", "estimate_", "get_rule", "replay", "MOZO_EPS", "UnknownRuleError"]

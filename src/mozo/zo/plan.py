"""Plans: which training units are optimized first-order (`fo`), zeroth-order (`zo`) or not at all.

Grammar (layers are numbered 1..N from the input side, as in the paper):

    PLAN    := PART ('+' PART)*                     PART := PRESET | CLAUSE
    PRESET  := fo | dual-zo | vision-zo | language-zo
    CLAUSE  := TOWER ':' PATTERN ['=' MODE]
    TOWER   := vision | language | dual            (dual = both towers)
    PATTERN := hop-odd | hop-even | prefix-K | suffix-K | zo | fo | frozen | L1,L2,...
    MODE    := fo | zo | frozen

Within a clause, the layers named by PATTERN are `zo` and the other layers of that tower stay `fo`
(`zo`, `fo` and `frozen` set the whole tower). With `=MODE` the named layers get MODE and the other
layers keep what earlier clauses gave them (`vision-zo+vision:hop-odd=frozen`: ZO on even layers,
odd layers frozen). Towers no clause mentions stay `fo`. Later clauses override earlier ones.

- hop-odd:  ZO on odd layers 1, 3, 5, ... (FO on 2, 4, 6, ...)
- hop-even: ZO on even layers 2, 4, 6, ...
- prefix-K: ZO on the first K layers 1..K (nearest the input)
- suffix-K: ZO on the last K layers N-K+1..N
- 1,5,9:    ZO on exactly these layers

Examples: `vision-zo` (= vision:zo), `vision:hop-even`, `dual:suffix-6`, `vision:prefix-6+language:hop-odd`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MODES = ("fo", "zo", "frozen")
PRESETS = {
    "fo": "dual:fo",
    "dual-zo": "dual:zo",
    "vision-zo": "vision:zo",
    "language-zo": "language:zo",
}
GRAMMAR = __doc__.split("Grammar")[1].split("- hop-odd")[0].strip()


class PlanError(ValueError):
    def __init__(self, text: str, problem: str):
        super().__init__(f"malformed plan {text!r}: {problem}.\nPlan grammar {GRAMMAR}")


@dataclass(frozen=True)
class Plan:
    """A resolved plan: mode of every (modality, layer). Built by `parse_plan` for a given model depth."""

    text: str
    modes: dict  # (modality, layer) -> "fo" | "zo" | "frozen"

    def mode(self, modality: str, layer: int) -> str:
        return self.modes[(modality, layer)]

    def layers(self, modality: str, mode: str) -> list[int]:
        return sorted(layer for (m, layer), md in self.modes.items() if m == modality and md == mode)

    def has(self, mode: str, modality: str | None = None) -> bool:
        return any(md == mode and (modality is None or m == modality) for (m, _), md in self.modes.items())

    @property
    def towers(self) -> list[str]:
        """The towers with units, in the order the plan was resolved."""
        return list(dict.fromkeys(m for m, _ in self.modes))

    def describe(self) -> str:
        parts = []
        for m in self.towers:
            parts.append(f"{m}: " + " ".join(f"{layer}:{self.modes[(m, layer)]}" for layer in sorted(l for (mm, l) in self.modes if mm == m)))
        return "; ".join(parts)


# One alternative per PATTERN form: a whole-tower mode | hop-odd/even | prefix/suffix-K | L1,L2,...
_PATTERN = re.compile(r"(fo|zo|frozen)|hop-(odd|even)|(prefix|suffix)-(\d+)|(\d+(?:,\d+)*)")


def parse_clauses(text: str, towers: tuple[str, ...]) -> list[tuple[tuple[str, ...], re.Match, str | None]]:
    """Check the grammar of `text` and split it into (towers, pattern match, explicit mode) clauses, without
    layer depths.

    `towers`: the towers that have PEFT units (a clause naming another one is an error; `dual` means all
    of them). Layer numbers beyond a tower's depth are checked by `parse_plan`, which knows the depths.
    """
    source = text.strip()
    spec = "+".join(PRESETS.get(c.strip(), c.strip()) for c in source.split("+")) if source else ""
    if not spec:
        raise PlanError(text, "empty plan")
    clauses = []
    for clause in spec.split("+"):
        if ":" not in clause:
            raise PlanError(text, f"clause {clause!r} has no ':' (expected TOWER:PATTERN) and is not a preset {sorted(PRESETS)}")
        tower, pattern = (s.strip() for s in clause.split(":", 1))
        if tower != "dual" and tower not in towers:
            raise PlanError(text, f"the model has no PEFT units in the {tower} tower (towers with units: {', '.join(towers)})")
        pattern, has_mode, mode = (s.strip() for s in pattern.partition("="))
        match = _PATTERN.fullmatch(pattern)
        if not match:
            raise PlanError(text, f"unknown pattern {pattern!r}")
        if has_mode and mode not in MODES:
            raise PlanError(text, f"unknown mode {mode!r} after '='; choose one of {', '.join(MODES)}")
        if has_mode and match.group(1):
            raise PlanError(text, f"{pattern!r} already sets the whole tower; '={mode}' applies to layer patterns")
        if match.group(5) and 0 in {int(x) for x in pattern.split(",")}:
            raise PlanError(text, "layers are numbered from 1")
        clauses.append((tuple(towers) if tower == "dual" else (tower,), match, mode or None))
    return clauses


def _pattern_layers(match: re.Match, n: int, text: str) -> list[int] | str:
    """Layers named by a pattern of `parse_clauses` in a tower of `n` layers, or a whole-tower mode."""
    mode, hop, end, k, listed = match.groups()
    if mode:
        return mode
    if hop:
        return list(range(1 if hop == "odd" else 2, n + 1, 2))
    if end:
        k = int(k)
        if k > n:
            raise PlanError(text, f"{match.group(0)} needs 0 <= K <= {n} (the tower has {n} layers)")
        return list(range(1, k + 1)) if end == "prefix" else list(range(n - k + 1, n + 1))
    layers = sorted({int(x) for x in listed.split(",")})
    bad = [x for x in layers if x > n]
    if bad:
        raise PlanError(text, f"layers {bad} are outside 1..{n}")
    return layers


def parse_plan(text: str, num_layers: dict[str, int]) -> Plan:
    """Resolve `text` for towers of the given depths, e.g. {'vision': 12, 'language': 12}.

    Units that do not exist (a tower without PEFT units) simply get no entry in `Plan.modes`.
    """
    modes = {(m, layer): "fo" for m, n in num_layers.items() for layer in range(1, n + 1)}
    for towers, match, mode in parse_clauses(text, tuple(num_layers)):
        for m in towers:
            n = num_layers[m]
            chosen = _pattern_layers(match, n, text)
            for layer in range(1, n + 1):
                if isinstance(chosen, str):
                    modes[(m, layer)] = chosen
                elif mode is not None:
                    if layer in chosen:
                        modes[(m, layer)] = mode
                else:
                    modes[(m, layer)] = "zo" if layer in chosen else "fo"
    return Plan(text.strip(), modes)


def frozen_control(plan: Plan) -> str:
    """The plan text of `plan` with every ZO unit frozen and everything else as it was: the control that
    tells what the ZO units contribute (`mozo study`)."""
    extra = [f"{m}:{','.join(map(str, plan.layers(m, 'zo')))}=frozen" for m in plan.towers if plan.layers(m, "zo")]
    return "+".join([plan.text, *extra])

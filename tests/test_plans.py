"""Plans: every preset and pattern assigns exactly the documented units; malformed plans name the grammar."""
from __future__ import annotations

import pytest

from mozo.zo.plan import GRAMMAR, PlanError, parse_plan

pytestmark = pytest.mark.usefixtures("one_thread")

TOWERS = ("vision", "language")


def expected(n: int, **zo_layers) -> dict:
    """modes for towers of depth n: `vision=[1, 3]` -> ZO there, FO elsewhere; a string sets the whole tower."""
    modes = {}
    for m in TOWERS:
        spec = zo_layers.get(m, [])
        for layer in range(1, n + 1):
            modes[(m, layer)] = spec if isinstance(spec, str) else ("zo" if layer in spec else "fo")
    return modes


def odd(n):
    return list(range(1, n + 1, 2))


def even(n):
    return list(range(2, n + 1, 2))


CASES = {
    "fo": lambda n: expected(n),
    "dual-zo": lambda n: expected(n, vision="zo", language="zo"),
    "vision-zo": lambda n: expected(n, vision="zo"),
    "language-zo": lambda n: expected(n, language="zo"),
    "vision:hop-odd": lambda n: expected(n, vision=odd(n)),
    "vision:hop-even": lambda n: expected(n, vision=even(n)),
    "dual:hop-odd": lambda n: expected(n, vision=odd(n), language=odd(n)),
    "dual:prefix-2": lambda n: expected(n, vision=[1, 2], language=[1, 2]),
    "language:suffix-2": lambda n: expected(n, language=[n - 1, n]),
    "vision:1,3": lambda n: expected(n, vision=[1, 3]),
    "vision:3,1,3": lambda n: expected(n, vision=[1, 3]),
    "vision:prefix-2+language:hop-even": lambda n: expected(n, vision=[1, 2], language=even(n)),
    "dual:zo+vision:hop-odd": lambda n: expected(n, vision=odd(n), language="zo"),  # later clauses win
    "vision:frozen": lambda n: expected(n, vision="frozen"),
    "vision:frozen+language:zo": lambda n: expected(n, vision="frozen", language="zo"),
    "dual:suffix-0": lambda n: expected(n),
    "vision:prefix-4": lambda n: expected(n, vision=[1, 2, 3, 4]),
}


@pytest.mark.parametrize("n", [4, 12])
@pytest.mark.parametrize("text", list(CASES))
def test_plan_assigns_documented_units(text, n):
    plan = parse_plan(text, {"vision": n, "language": n})
    assert plan.modes == CASES[text](n)
    for m in TOWERS:
        for mode in ("fo", "zo", "frozen"):
            assert plan.layers(m, mode) == sorted(layer for (mm, layer), md in CASES[text](n).items() if mm == m and md == mode)


def test_hop_patterns_on_12_layers_are_the_papers():
    plan = parse_plan("vision:hop-odd+language:hop-even", {"vision": 12, "language": 12})
    assert plan.layers("vision", "zo") == [1, 3, 5, 7, 9, 11]
    assert plan.layers("vision", "fo") == [2, 4, 6, 8, 10, 12]
    assert plan.layers("language", "zo") == [2, 4, 6, 8, 10, 12]
    assert parse_plan("dual:suffix-6", {"vision": 12, "language": 12}).layers("language", "zo") == list(range(7, 13))


@pytest.mark.parametrize("text,n", [
    ("vision:hop-three", 4),
    ("foo", 4),
    ("vision:prefix-13", 12),
    ("language:suffix-5", 4),
    ("visual:zo", 4),
    ("vision:0,2", 4),
    ("vision:1,13", 12),
    ("vision:", 4),
    ("", 4),
    ("fo+visoin-zo", 4),
])
def test_malformed_plans_raise_with_the_grammar(text, n):
    with pytest.raises(PlanError) as err:
        parse_plan(text, {"vision": n, "language": n})
    msg = str(err.value)
    assert GRAMMAR in msg
    assert "PATTERN := hop-odd | hop-even | prefix-K | suffix-K" in msg
    assert repr(text) in msg
    assert isinstance(err.value, ValueError)


def test_plan_for_model_keeps_only_existing_units(make_model):
    model = make_model(kind="moe", towers=("vision",), layers=[2, 4])
    plan = model.plan("vision:hop-even")
    assert plan.modes == {("vision", 2): "zo", ("vision", 4): "zo"}
    with pytest.raises(PlanError, match="no PEFT units in the language tower"):
        model.plan("language-zo")


# ------------------------------------------------------------------------------ =MODE and controls
def test_mode_suffix_sets_only_the_named_layers():
    from mozo.zo.plan import parse_plan

    depths = {"vision": 6, "language": 4}
    p = parse_plan("vision-zo+vision:hop-odd=frozen", depths)
    assert p.layers("vision", "zo") == [2, 4, 6] and p.layers("vision", "frozen") == [1, 3, 5]
    assert p.layers("language", "fo") == [1, 2, 3, 4]
    q = parse_plan("dual:suffix-2=zo", depths)  # the other layers keep their default, fo
    assert q.layers("vision", "zo") == [5, 6] and q.layers("language", "zo") == [3, 4] and q.layers("vision", "fo") == [1, 2, 3, 4]
    for bad, why in (("vision:hop-odd=ice", "unknown mode"), ("vision:zo=frozen", "whole tower")):
        with pytest.raises(ValueError, match=why):
            parse_plan(bad, depths)


@pytest.mark.parametrize("text", ["vision-zo", "language-zo", "dual:hop-odd", "vision:prefix-2+language:suffix-1", "fo"])
def test_the_derived_control_freezes_exactly_the_zo_units(text):
    from mozo.zo.plan import frozen_control, parse_plan

    depths = {"vision": 6, "language": 4}
    plan = parse_plan(text, depths)
    control = parse_plan(frozen_control(plan), depths)
    for key, mode in plan.modes.items():
        assert control.modes[key] == ("frozen" if mode == "zo" else mode)


def test_presets_combine_with_clauses():
    assert parse_plan("fo+vision:zo", {"vision": 4, "language": 4}).modes == parse_plan("vision-zo", {"vision": 4, "language": 4}).modes

"""The one-screen plan `mozo run` prints: its forward count is the step's, its lines are the run's."""
from __future__ import annotations

import pytest

from mozo.engine.step import HybridStep, forwards_per_step
from mozo.zo.config import ZOConfig


@pytest.mark.parametrize("plan,zo", [
    ("fo", {}), ("vision-zo", {}), ("dual-zo", {}), ("dual-zo", {"granularity": "tower"}),
    ("dual-zo", {"q": 2, "two_sided": True}), ("vision-zo", {"two_sided": True, "fo_at_perturbed": True}),
    ("language-zo", {"rule": "conservative"}), ("dual:hop-odd", {"q": 3, "granularity": "tower", "two_sided": True}),
    ("vision-zo", {"steps_per_batch": 3}), ("dual-zo", {"steps_per_batch": 2, "two_sided": True, "q": 2}),
    ("vision-zo", {"steps_per_batch": 2, "rule": "conservative"}), ("dual:hop-odd", {"granularity": "unit"}),
    ("vision-zo", {"granularity": "unit", "two_sided": True, "q": 2}),
    ("vision:hop-even", {"guide_weight": 1.0, "subspace_rank": 2, "q": 2}),
])
def test_forwards_per_step_is_what_a_step_runs(make_model, batch, plan, zo):
    cfg = ZOConfig(**zo)
    step = HybridStep(make_model(), plan, cfg)
    stats = step(*batch)
    assert forwards_per_step(cfg, len(step.zo_towers), len(step.estimator.groups) if cfg.granularity == "unit" else 0) == stats.forward_passes


def test_mozo_run_prints_the_plan_before_training(tmp_path, capsys):
    from mozo.cli import main as cli

    assert cli(["run", "demo", "plan=vision:hop-even", "zo.rule=mozo", "max_steps_per_task=1", "num_tasks=1",
                "eval_max_samples=4", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.index("per step") < out.index("results:")
    assert "vision    1:fo 2:zo 3:fo 4:zo" in out and "language  1:fo 2:fo 3:fo 4:fo" in out
    assert "rule mozo" in out and "eps vision 0.0005" in out and "per task 1 (total 1)" in out
    assert "per step  2 forward(s) of the loss, 1 backward" in out


def test_the_overview_names_the_relative_rate_and_the_subspace(tmp_path, capsys):
    from mozo.cli import main as cli

    assert cli(["run", "demo", "plan=vision-zo", "zo.rule=mozo", "zo.lr_relative=0.5", "zo.subspace_rank=2",
                "max_steps_per_task=1", "num_tasks=1", "eval_max_samples=4", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "lr 0.5 x FO's" in out and "gaussian rank-2 subspaces redrawn every 50 steps" in out

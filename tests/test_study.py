"""`mozo study`: statistics on known numbers, and runs reused rather than repeated."""
from __future__ import annotations

import json

import pytest

from mozo.study.stats import mean_ci, paired_difference


def test_mean_and_t_interval_on_known_numbers():
    s = mean_ci([1, 2, 3, 4, 5])
    assert s["mean"] == 3 and s["ci"] == pytest.approx([3 - 1.9632, 3 + 1.9632], abs=1e-4)  # t(0.975, 4) * 1.5811 / sqrt 5
    assert mean_ci([7.0])["ci"] is None


def test_paired_difference_on_known_numbers():
    d = paired_difference([1, 2, 3], [0, 0, 0])
    assert d["mean"] == 2 and d["ci"] == pytest.approx([2 - 2.4841, 2 + 2.4841], abs=1e-4)  # t(0.975, 2) / sqrt 3
    assert d["p"] == pytest.approx(0.0742, abs=1e-4) and d["verdict"] == "no difference"
    assert paired_difference([5, 6, 7, 8], [1, 2, 3, 4.5])["verdict"] == "higher"
    assert paired_difference([1, 2], [1, 2])["p"] == 1.0
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1, 2], [1])


def test_study_runs_plans_and_controls_and_reuses_finished_runs(tmp_path, capsys):
    from mozo.cli import main as cli

    args = ["study", "demo", "--plans", "vision-zo", "--seeds", "2", "--controls", "frozen", "--out", str(tmp_path),
            "--set", "max_steps_per_task=1", "--set", "num_tasks=2", "--set", "eval_max_samples=8"]
    assert cli(args) == 0
    study = json.loads((tmp_path / "study.json").read_text())
    row = study["table"]["vision-zo"]
    assert set(row) == {"zo", "frozen", "vs"} and row["zo"]["last"]["n"] == 2
    frozen = json.loads((tmp_path / "vision-zo" / "frozen" / "seed1" / "results.json").read_text())
    assert frozen["config"]["plan"] == "vision-zo+vision:1,2,3,4=frozen" and frozen["config"]["seed"] == 1
    assert frozen["cost"]["trainable_params"]["by_part"] == {"vision.frozen": 27008, "language.fo": 27008}
    assert (tmp_path / "study.png").stat().st_size > 0 and "| vision-zo | frozen |" in (tmp_path / "study.md").read_text()
    stamp = (tmp_path / "vision-zo" / "zo" / "seed0" / "results.json").stat().st_mtime_ns
    assert cli(args) == 0  # finished runs are reused, not repeated
    assert (tmp_path / "vision-zo" / "zo" / "seed0" / "results.json").stat().st_mtime_ns == stamp
    assert cli([*args, "--first-seed", "1"]) == 0  # seeds 1 and 2: seed 1 reused, seed 2 new, seed 0 left out
    study = json.loads((tmp_path / "study.json").read_text())
    assert study["first_seed"] == 1 and study["table"]["vision-zo"]["zo"]["last"]["n"] == 2
    assert json.loads((tmp_path / "vision-zo" / "zo" / "seed2" / "results.json").read_text())["config"]["seed"] == 2
    capsys.readouterr()
    assert cli(["study", "demo", "--plans", "vision-zo", "--seeds", "2", "--controls", "frozn", "--out", str(tmp_path)]) == 2
    assert "unknown control" in capsys.readouterr().err


def test_plans_with_layer_lists_are_not_split_at_their_commas():
    from mozo.study.cli import parse_plans

    assert parse_plans("vision:1,3,dual-zo@zo.rule=mozo") == [("vision:1,3", ["plan=vision:1,3"]),
                                                              ("dual-zo@zo.rule=mozo", ["plan=dual-zo", "zo.rule=mozo"])]
    # one plan under two options: two entries, two labels (and two run folders)
    assert [label for label, _ in parse_plans("vision-zo@zo.q=2,vision-zo@zo.q=4")] == ["vision-zo@zo.q=2", "vision-zo@zo.q=4"]


def test_signal_summary_pairs_zo_gain_with_noise_gain_by_seed():
    from mozo.study.cli import signal_summary

    per_seed = [{"0": {"zo_to_fo_step_ratio": {"zo.vision": r}, "mean_zo_gain": z, "mean_noise_gain": n},
                 "1": {"zo_to_fo_step_ratio": {"zo.vision": r}, "mean_zo_gain": z, "mean_noise_gain": n}}
                for r, z, n in [(0.1, 3.0, 1.0), (0.2, 4.0, 1.0), (0.3, 5.0, 2.0)]]
    s = signal_summary(per_seed)
    assert s["zo_to_fo_step_ratio"]["mean"] == pytest.approx(0.2)
    assert s["gain_vs_noise"]["differences"] == pytest.approx([2.0, 3.0, 3.0])
    assert s["gain_vs_noise"]["verdict"] == "higher"
    assert signal_summary([{"0": {"zo_to_fo_step_ratio": {}, "mean_zo_gain": None, "mean_noise_gain": None}}]) == {}

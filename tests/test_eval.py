"""`mozo eval`: a run's units and the zero-shot backbone re-evaluated, as `mozo run` evaluates them.

The runs train on the demo protocol with a smaller stream (`small_demo`: the demo's first two tasks, a
few images per class) so that the module stays within seconds; `mozo run` and `mozo eval` both build it.
"""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest

from mozo.cli import main as cli

RUN = ["train.max_steps_per_task=2", "eval_max_samples=20", "num_tasks=2"]
TRAIN = ["train.warmup_iters=0", "train.lr=0.05"]  # two steps that change the accuracy (units not loaded would show)


@functools.lru_cache(maxsize=None)
def small_demo(seed: int):
    from mozo.data.demo_stream import build_demo_scenario

    return build_demo_scenario(seed=seed, train_per_class=5, test_per_class=6, num_tasks=2)


def small_build_scenario(real):
    """build_scenario with the demo protocol's stream made small (other protocols unchanged)."""
    return lambda cfg, data_root: small_demo(cfg.seed) if cfg.data.protocol == "demo" else real(cfg, data_root)


@pytest.fixture(autouse=True)
def small_stream(monkeypatch):
    import mozo.engine.scenarios as scenarios

    monkeypatch.setattr(scenarios, "build_scenario", small_build_scenario(scenarios.build_scenario))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained run and one with max_steps_per_task=0 (the zero-shot matrix), by `mozo run`."""
    import mozo.engine.scenarios as scenarios

    root = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scenarios, "build_scenario", small_build_scenario(scenarios.build_scenario))
        assert cli(["run", "demo", *RUN, *TRAIN, "--out", str(root / "trained"), "--no-progress"]) == 0
        assert cli(["run", "demo", *RUN, "train.max_steps_per_task=0", "log.tensorboard=false",
                    "--out", str(root / "zero"), "--no-progress"]) == 0
    return root


def results(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


def test_eval_of_a_run_reproduces_the_row_of_its_units(runs, tmp_path):
    run = results(runs / "trained")
    assert cli(["eval", str(runs / "trained"), "--no-progress"]) == 0
    ev = results(runs / "trained" / "eval" / "demo-seen")  # the default --out
    for key in ("protocol", "scenario", "tasks", "task_test_sizes", "config", "plan", "cost"):
        assert ev[key] == run[key] or key in ("config", "cost"), key
    assert len(ev["acc_matrix"]) == len(run["acc_matrix"]) == 2
    assert ev["acc_matrix"][-1] == run["acc_matrix"][-1]  # the units after task 2, on the same 20-image subsets
    assert ev["acc_matrix"][-1] != results(runs / "zero")["acc_matrix"][-1]  # ... which are not the zero-shot ones
    assert ev["summary"]["last"] == run["summary"]["last"]
    info = ev["evaluation"]
    assert info["only"] is True and info["kind"] == "units" and info["mode"] == "seen"
    assert info["checkpoint"] == str(runs / "trained" / "checkpoint") and info["same_data_as_run"] is True
    assert info["units_trained_through"] == {"tasks": 2, "partial_task": False, "steps": 4}
    # the checkpoint folder and its units file name the same units
    for source in (runs / "trained" / "checkpoint", runs / "trained" / "checkpoint" / "units.safetensors"):
        assert cli(["eval", str(source), "--out", str(tmp_path / source.name), "--no-progress"]) == 0
        assert results(tmp_path / source.name)["acc_matrix"] == ev["acc_matrix"]


def test_zero_shot_eval_is_the_matrix_of_a_run_without_training(runs, tmp_path):
    zero = results(runs / "zero")
    assert not (runs / "zero" / "tb").exists()  # log.tensorboard=false
    assert cli(["eval", "--zero-shot", "demo", "eval_max_samples=20", "num_tasks=2", "--out", str(tmp_path / "zs"), "--no-progress"]) == 0
    zs = results(tmp_path / "zs")
    assert zs["acc_matrix"] == zero["acc_matrix"] and zs["summary"] == zero["summary"]
    assert zs["evaluation"]["kind"] == "zero-shot" and zs["evaluation"]["checkpoint"] is None
    # the untrained run's own units reproduce its whole matrix
    assert cli(["eval", str(runs / "zero"), "--out", str(tmp_path / "units"), "--no-progress"]) == 0
    assert results(tmp_path / "units")["acc_matrix"] == zero["acc_matrix"]


def test_all_classes_at_once_is_one_row(runs, tmp_path):
    assert cli(["eval", str(runs / "trained"), "--all", "--out", str(tmp_path / "all"), "--no-progress"]) == 0
    res = results(tmp_path / "all")
    assert "acc_matrix" not in res and res["evaluation"]["mode"] == "all"
    row, sizes = res["acc_all_classes"], res["task_test_sizes"]
    assert row == results(runs / "trained")["acc_matrix"][-1]  # cil: all classes of 2 tasks = those seen after task 2
    assert res["summary"]["accuracy"] == pytest.approx(sum(a * n for a, n in zip(row, sizes)) / sum(sizes))


def test_bad_input_is_exit_2_without_traceback(runs, tmp_path, capsys):
    def refused(*argv: str) -> str:
        capsys.readouterr()
        assert cli(["eval", *argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.splitlines()[-1].startswith("mozo eval: ")  # (after transformers' load bar)
        return err

    assert "does not exist" in refused(str(tmp_path / "nowhere"))
    empty = tmp_path / "stopped"
    empty.mkdir()
    shutil.copy(runs / "trained" / "config.json", empty / "config.json")
    assert "holds no complete checkpoint" in refused(str(empty))
    assert "neither a run directory" in refused(str(tmp_path))
    assert "drop --zero-shot" in refused("--zero-shot", str(runs / "trained"))
    err = refused(str(runs / "trained"), "peft.kind=lora")  # the model the units were trained in cannot change
    assert "peft.kind=moe" in err and "drop peft.kind" in err
    assert "holds a training run" in refused(str(runs / "trained"), "--out", str(runs / "zero"))
    bare = tmp_path / "units.safetensors"  # units alone: the preset says the model, which must fit them
    shutil.copy(runs / "trained" / "checkpoint" / "units.safetensors", bare)
    assert "without a configuration" in refused(str(bare))
    assert "do not fit the model" in refused(str(bare), "demo", "peft.kind=lora", "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()

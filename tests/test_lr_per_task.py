"""train.lr_per_task: one FO learning rate per task (list) or per MTCL dataset (mapping), checked before anything
loads, used by the schedule, fixed for a run (a resume compares it); and the mtcl-order1-reference preset."""
from __future__ import annotations

import json

import pytest
import torch

from mozo.engine.config import ConfigError, from_dict, load_config, task_lr, to_dict
from mozo.engine.loop import RESUME_OVERRIDES, _fixed_part, _flat, run_experiment
from test_data_cil import make_cifar100
from test_run import cfg_for


def refused(preset: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(preset, list(overrides))
    return str(err.value)


def test_lists_and_mappings_are_checked_before_anything_loads():
    assert load_config("demo", ["train.lr_per_task=[1e-3,0,2e-3,1]"]).train.lr_per_task == [1e-3, 0.0, 2e-3, 1.0]
    assert load_config("demo", ["num_tasks=2", "train.lr_per_task=[1e-3,0]"]).train.lr_per_task == [1e-3, 0.0]
    assert "has 2 learning rate(s) but the run has 4 tasks" in refused("demo", "train.lr_per_task=[1e-3,0]")
    assert "has 5 learning rate(s) but the run has 10 tasks" in refused("cifar100-10-10", "train.lr_per_task=[1,1,1,1,1]")
    assert "entries must be a finite number >= 0, got -1" in refused("demo", "train.lr_per_task=[1,-1,1,1]")
    assert "only read under the mtcl protocols" in refused("demo", "train.lr_per_task={dtd: 1e-3}")
    assert "unknown MTCL dataset 'foo'" in refused("mtcl-order1", "train.lr_per_task={foo: 1e-3}")
    assert "names 'eurosat', which is not a task of this run" in refused(
        "mtcl-order1", "data.datasets=[dtd,mnist]", "train.lr_per_task={eurosat: 1e-3}")
    cfg = load_config("mtcl-order1", ["lr=2e-3", "train.lr_per_task={DTD: 1e-3, eurosat: 0}"])
    assert cfg.train.lr_per_task == {"dtd": 1e-3, "eurosat": 0.0} and from_dict(to_dict(cfg)) == cfg
    assert (task_lr(cfg.train, 3, "DTD"), task_lr(cfg.train, 4, "EuroSAT"), task_lr(cfg.train, 0, "Aircraft")) == (1e-3, 0.0, 2e-3)


def _units(runner) -> dict:
    return {k: v.detach().clone() for k, v in runner.model.units.state_dict().items()}


def test_a_task_with_lr_zero_leaves_the_fo_units_unchanged_and_resume_keeps_the_key_fixed(tmp_path):
    root = make_cifar100(tmp_path / "data", n_train=2)
    cfg = cfg_for("cifar100-10-10", "num_tasks=2", "eval_max_samples=8", "train.lr_per_task=[1e-2,0]")
    after = []  # (task, units) after every training step
    res = run_experiment(cfg, tmp_path / "run", data_root=root, progress=False,
                         on_step=lambda r: after.append((r.state.task, _units(r))))
    assert [t for t, _ in after] == [0, 0, 1, 1]
    first, end_of_task1 = after[0][1], after[1][1]
    assert any(not torch.equal(first[k], end_of_task1[k]) for k in first)  # task 1 trained
    for _, units in after[2:]:  # task 2, lr 0: every unit exactly as task 1 left it
        assert all(torch.equal(units[k], end_of_task1[k]) for k in units)
    steps = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    lrs = [(e["task"], e["lr"]) for e in steps if e["event"] == "step"]
    assert [t for t, _ in lrs] == [0, 0, 1, 1] and all(lr > 0 for t, lr in lrs if t == 0) and all(lr == 0 for t, lr in lrs if t == 1)
    assert res["config"]["train"]["lr_per_task"] == [1e-2, 0.0]

    # Fixed for a run: part of what a resume compares (not a resume override), so other per-task rates are refused.
    other = cfg_for("cifar100-10-10", "num_tasks=2", "eval_max_samples=8", "train.lr_per_task=[1e-2,1e-2]")
    assert "train.lr_per_task" not in RESUME_OVERRIDES
    assert _fixed_part(_flat(to_dict(other))) != _fixed_part(_flat(res["config"]))
    assert _fixed_part(_flat(to_dict(cfg))) == _fixed_part(_flat(res["config"]))


def test_the_reference_preset_loads_and_smoke_overrides_fit():
    cfg = load_config("mtcl-order1-reference")
    assert cfg.data.protocol == "mtcl-order1" and cfg.train.label_smoothing == pytest.approx(0.2)
    small = load_config("mtcl-order1-reference", ["backbone=tiny", "max_steps_per_task=5", "num_tasks=2", "eval_max_samples=200"])
    assert small.num_tasks == 2 and from_dict(to_dict(small)) == small

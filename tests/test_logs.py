"""The run's log mirrors (engine/logs.py): TensorBoard read back from a tiny run, W&B offline, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mozo.cli import main as cli
from mozo.engine import logs
from mozo.engine.config import ConfigError, load_config
from test_eval import RUN, small_build_scenario


def tiny_run(out: Path, *extra: str) -> dict:
    """`mozo run demo` on the small demo stream (test_eval.small_demo), 2 tasks of 2 steps."""
    import mozo.engine.scenarios as scenarios

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scenarios, "build_scenario", small_build_scenario(scenarios.build_scenario))
        assert cli(["run", "demo", *RUN, *extra, "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "results.json").read_text())


def events(out: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (out / "events.jsonl").read_text().splitlines()) if e["event"] == kind]


def test_tensorboard_holds_the_losses_and_accuracies_of_a_run(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = tiny_run(tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    scalars = {tag: [(s.step, s.value) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    losses = [e["loss"] for e in events(tmp_path / "run", "step")]
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]  # the global step
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(losses, rel=1e-6)
    assert [s for s, _ in scalars["train/lr"]] == [1, 2, 3, 4]
    for j in range(2):  # after each task (its last global step), the accuracy on every task
        assert scalars[f"eval/task{j + 1}"] == [(2, pytest.approx(res["acc_matrix"][0][j])), (4, pytest.approx(res["acc_matrix"][1][j]))]
    assert scalars["summary/last"] == [(4, pytest.approx(res["summary"]["last"]))]
    assert [v for _, v in scalars["summary/step_acc"]] == pytest.approx(res["summary"]["step_acc"])


def test_a_resumed_run_replaces_what_was_logged_past_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = logs.RunLog(tmp_path)
    for step in (1, 2, 3):  # a crash after step 3, the checkpoint holding 2 steps
        first.write("step", {"loss": float(step), "lr": 0.1}, step)
    first.close()
    again = logs.RunLog(tmp_path)
    again.write("resumed", {}, 2)
    again.write("step", {"loss": 30.0, "lr": 0.1}, 3)
    again.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(s.step, s.value) for s in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_runlog_writes_nothing_until_used_and_only_on_the_main_process(tmp_path):
    log = logs.RunLog(tmp_path / "a", is_main=False, tensorboard=True, wandb=True)  # rank > 0: no check, no file
    log.write("start", {}, 0)
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    log = logs.RunLog(tmp_path / "b", tensorboard=False)
    assert list((tmp_path / "b").iterdir()) == []
    log.write("step", {"loss": 1.5, "lr": 0.1}, 1)
    log.write("done", {"summary": {"last": 50.0}}, 1)  # closes; a later write opens again
    log.write("resumed", {}, 1)
    assert [json.loads(line)["event"] for line in (tmp_path / "b" / "events.jsonl").read_text().splitlines()] == ["step", "done", "resumed"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["events.jsonl"]  # log.tensorboard=false: no tb/


def test_log_keys_are_checked():
    assert load_config("demo", ["log.wandb=true", "log.tensorboard=false"]).log.wandb is True
    with pytest.raises(ConfigError, match="expects true/false"):
        load_config("demo", ["log.wandb=maybe"])
    with pytest.raises(ConfigError, match="log.tensorboard"):
        load_config("demo", ["log.tensorbord=false"])


def test_wandb_requested_but_not_installed_is_refused_before_anything_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(logs, "wandb_installed", lambda: False)
    assert cli(["run", "demo", "log.wandb=true", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pip install wandb" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(logs.LogSetupError, match="pip install wandb"):  # the Python API: at the run's first event
        logs.RunLog(tmp_path, wandb=True)


def test_wandb_offline_writes_the_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # not in the test extra (a heavy stack); see docs/experiments.md, Logging
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_CONFIG_DIR": tmp_path / "cfg", "WANDB_CACHE_DIR": tmp_path / "cache",
                       "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(key, str(value))
    out = tmp_path / "run"
    tiny_run(out, "log.wandb=true", "log.tensorboard=false")
    run_id = (out / "wandb" / logs.WANDB_ID_FILE).read_text()
    [record] = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = record.read_bytes()
    assert b"train/loss" in data and b"eval/task2" in data and b"demo" in data
    assert len(events(out, "step")) == 4 and not (out / "tb").exists()

"""End-to-end runs of the protocols on tiny generated datasets: results, resume, checkpoints, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from mozo.cli import main as cli
from mozo.engine.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from mozo.engine.config import ConfigError, load_config
from mozo.engine.loop import RunFailed, RunInterrupted, run_experiment
from mozo.metrics.summary import summarize
from test_data_cil import make_cifar100, make_imagefolder, make_imagenet_r, make_tinyimagenet
from test_data_mtcl import make_dtd, make_eurosat, make_mnist

TINY = ["backbone=tiny", "batch_size=4", "max_steps_per_task=2", "data.eval_batch_size=64"]


def stop_after(steps: int):
    """A run's on_step callback that stops it as Ctrl-C would after `steps` training steps."""
    return lambda runner: runner.request_stop() if runner.state.steps >= steps else None


def cfg_for(preset: str, *extra: str):
    return load_config(preset, TINY + list(extra))


# ---------------------------------------------------------------------------------------- configs
def test_unknown_key_names_key_and_nearest():
    with pytest.raises(ConfigError) as e:
        load_config("cifar100-10-10", ["zo.rulez=sign"])
    assert "'zo.rulez'" in str(e.value) and "zo.rule" in str(e.value)
    with pytest.raises(ConfigError, match="batch_size"):
        load_config("cifar100-10-10", ["batchsize=3"])


def test_every_preset_loads_with_the_documented_overrides():
    from mozo.engine.config import preset_names

    names = preset_names()
    for expected in ["cifar100-10-10", "cifar100-5-5", "cifar100-2-2", "tinyimagenet-100-5", "tinyimagenet-100-10",
                     "tinyimagenet-100-20", "tinyimagenet-inc10", "tinyimagenet-inc20", "imagenet-r-inc20",
                     "mtcl-order1", "mtcl-order2", "mtcl-order1-5shot"]:
        assert expected in names
    cfg = load_config("imagenet-r-inc20", ["plan=vision:hop-even", "peft=lora", "seed=3", "batch_size=8", "device=cpu",
                                           "max_steps_per_task=5", "num_tasks=2", "eval_max_samples=10", "backbone=tiny"])
    assert (cfg.plan, cfg.peft.kind, cfg.seed, cfg.train.batch_size, cfg.num_tasks) == ("vision:hop-even", "lora", 3, 8, 2)
    with pytest.raises(ConfigError, match="integer"):
        load_config("cifar100-10-10", ["batch_size=big"])
    with pytest.raises(ConfigError, match="zo.rule"):
        load_config("cifar100-10-10", ["zo.rule=adam"])


# ------------------------------------------------------------------------------------ protocols
@pytest.mark.parametrize("layout", ["cifar100", "tinyimagenet", "imagenet-r", "imagefolder"])
def test_three_task_cil_run_on_each_layout(tmp_path, layout):
    maker = {"cifar100": make_cifar100, "tinyimagenet": make_tinyimagenet, "imagenet-r": make_imagenet_r, "imagefolder": make_imagefolder}[layout]
    root = maker(tmp_path / "data")
    if layout == "imagefolder":  # the shared fake folder has no test image of 'dog'
        Image.new("RGB", (12, 10), (9, 9, 9)).save(root / "test" / "dog" / "t0.jpg") if (root / "test" / "dog").mkdir() is None else None
    if layout == "cifar100":
        cfg = cfg_for("cifar100-10-10", "num_tasks=3", "eval_max_samples=8")
    else:
        cfg = cfg_for("cifar100-10-10", "protocol=cil", f"data.dataset={layout}", "data.increment=1", "num_tasks=3")
    res = run_experiment(cfg, tmp_path / "run", data_root=root, progress=False)
    A = res["acc_matrix"]
    assert res["protocol"] == "cil" and len(A) == 3
    assert all(A[i][j] is None for i in range(3) for j in range(len(A[i])) if j > i)
    assert all(A[i][j] is not None for i in range(3) for j in range(i + 1))
    assert res["summary"] == summarize(A, "cil", res["task_test_sizes"])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("protocol", "tasks", "task_test_sizes", "acc_matrix", "summary", "config", "cost"):
        assert key in saved
    cost = saved["cost"]
    assert cost["trainable_params"]["total"] > 0 and cost["steps"] >= 3 and cost["forward_passes"] == cost["steps"]  # fo: one forward a step


def test_mtcl_run_of_three_datasets_gives_transfer(tmp_path):
    root = tmp_path / "data"
    for make in (make_dtd, make_eurosat, make_mnist):
        make(root)
    cfg = cfg_for("mtcl-order1", "data.datasets=[dtd,eurosat,mnist]")
    res = run_experiment(cfg, tmp_path / "run", data_root=root, progress=False)
    A = res["acc_matrix"]
    assert res["tasks"] == ["DTD", "EuroSAT", "MNIST"]
    assert len(A) == 3 and all(len(r) == 3 and None not in r for r in A)  # future tasks evaluated zero-shot
    assert res["summary"]["transfer"] is not None
    expected = ((A[0][1]) + (A[0][2] + A[1][2]) / 2) / 2
    assert res["summary"]["transfer"] == pytest.approx(expected)


def test_metrics_cli_recomputes_a_run(tmp_path, capsys):
    root = make_cifar100(tmp_path / "data")
    cfg = cfg_for("cifar100-10-10", "num_tasks=2", "eval_max_samples=8")
    res = run_experiment(cfg, tmp_path / "run", data_root=root, progress=False)
    capsys.readouterr()
    assert cli(["metrics", str(tmp_path / "run"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["last"] == pytest.approx(res["summary"]["last"]) and out["avg"] == pytest.approx(res["summary"]["avg"])


# --------------------------------------------------------------------------------- reliability
def _units(run_dir: Path) -> dict:
    return load_checkpoint(run_dir)[0]


@pytest.mark.parametrize("plan,rule", [("vision:hop-even", "sgd"), ("dual-zo", "adamw")])
def test_resume_mid_task_ends_where_an_uninterrupted_run_ends(tmp_path, plan, rule):
    root = make_cifar100(tmp_path / "data", n_train=2)
    # 20 train images/task, batch 4 -> 5 steps per task; stop after 7 steps = in the middle of task 2.
    cfg = load_config("cifar100-10-10", ["backbone=tiny", "batch_size=4", f"plan={plan}", f"zo.rule={rule}",
                                         "num_tasks=3", "eval_max_samples=8", "train.warmup_iters=2"])
    full = run_experiment(cfg, tmp_path / "full", data_root=root, progress=False)
    with pytest.raises(RunInterrupted):
        run_experiment(cfg, tmp_path / "cut", data_root=root, progress=False, on_step=stop_after(7))
    assert not (tmp_path / "cut" / "results.json").exists()
    _, state = load_checkpoint(tmp_path / "cut")
    assert state["task"] == 1 and state["batch"] == 2
    resumed = run_experiment(cfg, tmp_path / "cut", data_root=root, progress=False, resume=True)
    assert resumed["acc_matrix"] == full["acc_matrix"]
    assert resumed["summary"] == full["summary"]
    a, b = _units(tmp_path / "full"), _units(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_config(tmp_path):
    root = make_cifar100(tmp_path / "data", n_train=2)
    cfg = cfg_for("cifar100-10-10", "num_tasks=2", "eval_max_samples=8")
    with pytest.raises(RunInterrupted):
        run_experiment(cfg, tmp_path / "run", data_root=root, progress=False, on_step=stop_after(1))
    other = cfg_for("cifar100-10-10", "num_tasks=2", "eval_max_samples=8", "seed=5")
    with pytest.raises(ValueError, match="configuration differs"):
        run_experiment(other, tmp_path / "run", data_root=root, progress=False, resume=True)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"w": torch.ones(3)}, {"task": 1})

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(CheckpointError, match="disk full"):
        save_checkpoint(tmp_path, {"w": torch.zeros(3)}, {"task": 2})
    units, state = load_checkpoint(tmp_path)
    assert state["task"] == 1 and torch.equal(units["w"], torch.ones(3))
    # a crash between the two renames leaves checkpoint.old complete: it is found
    monkeypatch.undo()
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    root = make_cifar100(tmp_path / "data", n_train=2)
    cfg = cfg_for("cifar100-10-10", "num_tasks=2", "eval_max_samples=8")
    import mozo.engine.step as step_mod

    real = step_mod.HybridStep._loss
    calls = {"n": 0}

    def poisoned(self, feats, labels):
        calls["n"] += 1
        loss = real(self, feats, labels)
        return loss * float("nan") if calls["n"] > 2 else loss  # task 1 fine, task 2 NaN

    monkeypatch.setattr(step_mod.HybridStep, "_loss", poisoned)
    with pytest.raises(RunFailed, match=r"last good checkpoint.*mozo run --resume .*train.lr=0.0001"):
        run_experiment(cfg, tmp_path / "run", data_root=root, progress=False)
    _, state = load_checkpoint(tmp_path / "run")
    assert state["task"] == 1 and len(state["acc_matrix"]) == 1
    # skipping is bounded: task 2 skipped 2 of its 2 steps, above the default fraction
    calls["n"] = 0
    skip = cfg_for("cifar100-10-10", "num_tasks=2", "eval_max_samples=8", "train.skip_nonfinite=true")
    with pytest.raises(RunFailed, match="2 of task 2's 2 steps"):
        run_experiment(skip, tmp_path / "skip", data_root=root, progress=False)
    calls["n"] = 0
    tolerant = cfg_for("cifar100-10-10", "num_tasks=2", "eval_max_samples=8", "train.skip_nonfinite=true", "train.max_nonfinite_fraction=1")
    res = run_experiment(tolerant, tmp_path / "tolerant", data_root=root, progress=False)
    assert res["cost"]["skipped_nonfinite_steps"] == 2


def test_missing_dataset_folder_is_a_clear_error(tmp_path, capsys):
    code = cli(["run", "cifar100-10-10", "backbone=tiny", "--data-root", str(tmp_path), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "cifar-100-python" in err and "docs/datasets.md" in err


def test_corrupt_image_names_the_file_or_is_skipped_and_counted(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "data")
    bad = root / "test" / "cat" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    args = ["run", "cifar100-10-10", *TINY, "protocol=cil", "data.dataset=imagefolder", "data.increment=3", "--data-root", str(root), "--no-progress"]
    assert cli(args + ["--out", str(tmp_path / "a")]) == 1
    assert "broken.jpg" in capsys.readouterr().err
    assert cli(args + ["data.skip_corrupt=true", "--out", str(tmp_path / "b")]) == 0
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["cost"]["skipped_images"] == 1


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    root = make_cifar100(tmp_path / "data", n_train=20)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mozo", "run", "cifar100-10-10", "backbone=tiny", "batch_size=2", "num_tasks=1", "max_steps_per_task=60",
           "eval_max_samples=4", "--data-root", str(root), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        log = out / "events.jsonl"
        if log.exists() and '"step"' in log.read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and find_checkpoint(out) is not None
    _, state = load_checkpoint(out)
    assert state["batch"] >= 1
    done = subprocess.run([sys.executable, "-m", "mozo", "run", "--resume", str(out), "--data-root", str(root), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "results.json").read_text())["cost"]["steps"] == 60


def test_every_run_records_the_step_peak_per_task_which_separates_plans(tmp_path):
    """The process RSS is the same for every plan on a CPU; one step's live tensors are not."""
    root = make_cifar100(tmp_path / "data", n_train=2)
    peaks = {}
    for plan in ("fo", "vision-zo"):
        res = run_experiment(cfg_for("cifar100-10-10", "num_tasks=2", "eval_max_samples=8", f"plan={plan}"),
                             tmp_path / plan, data_root=root, progress=False)
        peaks[plan] = res["cost"]["step_peak_bytes"]
        assert res["cost"]["step_peak_kind"] == "cpu_live_tensors" and len(peaks[plan]) == 2
    assert all(f > 1.2 * v > 0 for f, v in zip(peaks["fo"], peaks["vision-zo"]))  # measured: 3.78 vs 2.45 MB
    from mozo.report.cli import write_report

    paths = write_report([tmp_path / "fo", tmp_path / "vision-zo"], tmp_path / "report")
    text = paths["report.md"].read_text() if "report.md" in paths else (tmp_path / "report" / "report.md").read_text()
    assert "step peak (MiB, tensors)" in text and f"{max(peaks['fo']) / 2**20:.2f}" in text

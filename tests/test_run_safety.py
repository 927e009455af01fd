"""Nothing lost, nothing executed: checkpoints, run directories, signals, resume (issue 13)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mozo.cli import main as cli
from mozo.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mozo.engine.config import load_config
from mozo.engine.loop import Runner, RunInterrupted, run_experiment
from mozo.engine.rundir import RunDirError, RunLock
from test_data_cil import make_cifar100, make_imagefolder
from test_run import TINY, stop_after

RUN = ["run", "cifar100-10-10", *TINY, "num_tasks=2", "eval_max_samples=8", "--no-progress"]


def _cfg(*extra: str):
    return load_config("cifar100-10-10", TINY + ["num_tasks=2", "eval_max_samples=8", *extra])


@pytest.fixture
def cifar(tmp_path):
    return make_cifar100(tmp_path / "data", n_train=2)


# ----------------------------------------------------------------------------------- checkpoints
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_checkpoint_is_refused_and_runs_nothing(tmp_path, cifar, capsys):
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        run_experiment(_cfg(), out, data_root=cifar, progress=False, on_step=stop_after(1))
    marker = tmp_path / "PWNED"
    state = out / "checkpoint" / "state.pt"
    saved = torch.load(state, weights_only=True)  # what mozo writes loads under weights_only
    torch.save({**saved, "evil": _Payload(marker)}, state)
    (out / "checkpoint.old").mkdir(exist_ok=True)  # no fallback to hide behind
    code = cli(["run", "--resume", str(out), "--no-progress"])
    assert not marker.exists()
    err = capsys.readouterr().err
    assert code == 1 and "state.pt" in err and "do not trust this file" in err


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    save_checkpoint(tmp_path, {"w": torch.ones(3)}, {"task": 1})
    save_checkpoint(tmp_path, {"w": torch.zeros(3)}, {"task": 2})
    assert (tmp_path / "checkpoint.old" / "COMPLETE").exists()  # the previous one is kept
    (tmp_path / "checkpoint" / "units.safetensors").write_bytes(b"\x00" * 10)
    with pytest.warns(RuntimeWarning, match="previous checkpoint"):
        units, state = load_checkpoint(tmp_path)
    assert state["task"] == 1 and torch.equal(units["w"], torch.ones(3))
    (tmp_path / "checkpoint.old" / "state.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="units.safetensors.*state.pt"):
        load_checkpoint(tmp_path)


def test_non_finite_units_are_never_written(tmp_path):
    save_checkpoint(tmp_path, {"w": torch.ones(3)}, {"task": 1})
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        save_checkpoint(tmp_path, {"w": torch.tensor([1.0, float("nan"), 2.0])}, {"task": 2})
    assert load_checkpoint(tmp_path)[1]["task"] == 1


def test_units_file_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path, {"w": torch.ones(3)}, {"task": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "checkpoint" / "units.safetensors").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------- run directories
def test_an_existing_run_is_never_replaced_silently(tmp_path, cifar, capsys):
    out = tmp_path / "run"
    assert cli([*RUN, "--data-root", str(cifar), "--out", str(out)]) == 0
    before = (out / "results.json").read_text()
    capsys.readouterr()
    assert cli([*RUN, "seed=1", "--data-root", str(cifar), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "results.json").read_text() == before
    assert cli([*RUN, "seed=1", "--data-root", str(cifar), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 1
    assert len([line for line in (out / "events.jsonl").read_text().splitlines() if '"start"' in line]) == 1


def test_default_out_tells_runs_apart():
    from mozo.engine.run_cli import default_out

    a, b, c = _cfg("seed=0"), _cfg("seed=1"), _cfg("seed=1", "lr=5e-4")
    assert len({default_out(a), default_out(b), default_out(c)}) == 3 and default_out(a) == default_out(_cfg("seed=0"))


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_an_unwritable_out_is_named_before_anything_loads(tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker if where == "file" else blocker / "run"
    start = time.perf_counter()
    assert cli([*RUN, "--data-root", str(tmp_path), "--out", str(out)]) == 2
    assert str(out) in capsys.readouterr().err and time.perf_counter() - start < 2


def test_a_run_directory_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid()}))
    with pytest.raises(RunDirError, match=f"pid {os.getppid()}"):
        RunLock(tmp_path).__enter__()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


# ----------------------------------------------------------------------------------------- resume
def test_resume_accepts_only_the_documented_overrides_and_records_them(tmp_path, cifar, capsys):
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        run_experiment(_cfg(), out, data_root=cifar, progress=False, on_step=stop_after(1))
    assert cli(["run", "--resume", str(out), "plan=dual-zo", "--no-progress"]) == 2
    assert "cannot change on resume" in capsys.readouterr().err
    assert cli(["run", "--resume", str(out), "--out", str(tmp_path / "elsewhere"), "--no-progress"]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()
    # no --data-root: the run recorded it
    assert cli(["run", "--resume", str(out), "train.lr=5e-4", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 5e-4
    resumed = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if '"resumed"' in line]
    assert resumed[-1]["overrides"] == {"train.lr": 5e-4}


def test_resume_refuses_different_data(tmp_path, cifar, capsys):
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        run_experiment(_cfg(), out, data_root=cifar, progress=False, on_step=stop_after(1))
    other = make_cifar100(tmp_path / "other", n_train=3)
    assert cli(["run", "--resume", str(out), "--data-root", str(other), "--no-progress"]) == 1
    assert "differs from the data" in capsys.readouterr().err


def test_a_failed_evaluation_keeps_the_training_and_resume_only_evaluates(tmp_path, cifar, monkeypatch):
    full = run_experiment(_cfg(), tmp_path / "full", data_root=cifar, progress=False)
    real = Runner.evaluate_after
    monkeypatch.setattr(Runner, "evaluate_after", lambda self, t: (_ for _ in ()).throw(OSError("test image vanished")))
    with pytest.raises(OSError):
        run_experiment(_cfg(), tmp_path / "cut", data_root=cifar, progress=False)
    _, state = load_checkpoint(tmp_path / "cut")
    assert state["task"] == 0 and state["trained"] and state["steps"] == 2
    monkeypatch.setattr(Runner, "evaluate_after", real)
    resumed = run_experiment(_cfg(), tmp_path / "cut", data_root=cifar, progress=False, resume=True)
    assert resumed["acc_matrix"] == full["acc_matrix"] and resumed["cost"]["steps"] == full["cost"]["steps"]


def test_ctrl_c_while_evaluating_stops_there(tmp_path, cifar, monkeypatch):
    full = run_experiment(_cfg(), tmp_path / "full", data_root=cifar, progress=False)
    real = Runner.text_features

    def interrupted(self, names):  # Ctrl-C while the first test set after task 2 is evaluated
        if self.state.task == 1:
            self.request_stop()
        return real(self, names)

    monkeypatch.setattr(Runner, "text_features", interrupted)
    with pytest.raises(RunInterrupted, match="while evaluating"):
        run_experiment(_cfg(), tmp_path / "cut", data_root=cifar, progress=False)
    state = load_checkpoint(tmp_path / "cut")[1]
    assert state["task"] == 1 and state["trained"]  # stopped at the next test set, training kept
    monkeypatch.setattr(Runner, "text_features", real)
    resumed = run_experiment(_cfg(), tmp_path / "cut", data_root=cifar, progress=False, resume=True)
    assert resumed["acc_matrix"] == full["acc_matrix"]


def test_an_unreadable_image_counts_once(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    (root / "test" / "dog").mkdir()
    (root / "test" / "cat" / "t0.jpg").rename(root / "test" / "dog" / "t0.jpg")
    (root / "test" / "cat" / "t1.jpg").write_bytes((root / "test" / "red_panda" / "t0.jpg").read_bytes())
    (root / "test" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    cfg = load_config("cifar100-10-10", TINY + ["protocol=cil", "data.dataset=imagefolder", "data.increment=1", "num_tasks=3",
                                                "data.skip_corrupt=true", "train.epochs=2", "max_steps_per_task=4"])
    res = run_experiment(cfg, tmp_path / "run", data_root=root, progress=False)
    assert res["cost"]["skipped_images"] == 1  # cat's test set (task 1) was evaluated after each of 3 tasks


# ---------------------------------------------------------------------------------------- signals
def _wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        log = out / "events.jsonl"
        if log.exists() and log.read_text().count('"step"') >= n:
            return
        time.sleep(0.05)


def test_sigterm_to_the_whole_job_checkpoints_and_exits_143(tmp_path, cifar):
    """As SLURM does: SIGTERM to every process of the job, loader workers included."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mozo", *RUN, "num_tasks=1", "batch_size=2", "max_steps_per_task=40", "data.num_workers=1",
           "--data-root", str(cifar), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_steps(out, 1, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert f"mozo run --resume {out}" in err
    assert load_checkpoint(out)[1]["batch"] >= 1


def test_kill_9_at_random_moments_resumes_bitwise(tmp_path, cifar):
    """Fault injection: SIGKILL at random points (mid-step, mid-checkpoint, mid-evaluation); every resume ends
    where the uninterrupted run ends, bitwise."""
    args = [*RUN, "num_tasks=2", "train.checkpoint_every=1", "max_steps_per_task=5", "--data-root", str(cifar)]
    ref = tmp_path / "ref"
    assert cli(args + ["--out", str(ref)]) == 0
    expected_units, _ = load_checkpoint(ref)
    expected = json.loads((ref / "results.json").read_text())
    rng = random.Random(13)
    for attempt in range(3):
        out = tmp_path / f"cut{attempt}"
        proc = subprocess.Popen([sys.executable, "-m", "mozo", *args, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_for_steps(out, rng.randint(1, 9), proc)
        time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        proc.communicate()
        if (out / "checkpoint").exists() or (out / "checkpoint.old").exists():
            done = subprocess.run([sys.executable, "-m", "mozo", "run", "--resume", str(out), "--no-progress"],
                                  capture_output=True, text=True, timeout=120)
        else:  # killed before the first checkpoint: a fresh start into the same folder
            done = subprocess.run([sys.executable, "-m", "mozo", *args, "--out", str(out), "--overwrite"],
                                  capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        got = json.loads((out / "results.json").read_text())
        assert got["acc_matrix"] == expected["acc_matrix"] and got["summary"] == expected["summary"]
        units, _ = load_checkpoint(out)
        assert all(torch.equal(units[k], expected_units[k]) for k in expected_units)


# ------------------------------------------------------------------------------------ distributed
def _stalling_rank(rank: int, port: int, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    from mozo.engine.distributed import init_distributed, shutdown

    ctx = init_distributed("gloo", "cpu", timeout_s=2)
    if rank == 1:  # stalls: never joins the collective
        time.sleep(12)
        return
    start = time.perf_counter()
    try:
        ctx.any(True)
        Path(result).write_text(json.dumps({"raised": False}))
    except RuntimeError as exc:
        Path(result).write_text(json.dumps({"raised": True, "after_s": time.perf_counter() - start, "message": str(exc)}))
    finally:
        shutdown()


def test_a_stalled_rank_fails_the_others_after_the_collective_timeout(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from mozo.engine.run_cli import _explain_runtime

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "rank0.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_stalling_rank, args=(r, port, str(result))) for r in range(2)]
    for p in procs:
        p.start()
    procs[0].join(timeout=60)
    for p in procs:
        p.kill()
    got = json.loads(result.read_text())
    assert got["raised"] and got["after_s"] < 10  # the backend default would wait 30 minutes
    cfg = _cfg("distributed_timeout_s=2")
    assert "distributed_timeout_s=2" in _explain_runtime(RuntimeError(got["message"]), cfg)


def test_non_finite_training_is_a_message_with_a_command_that_works(tmp_path, cifar, monkeypatch, capsys):
    import mozo.engine.step as step_mod

    real = step_mod.HybridStep._loss
    monkeypatch.setattr(step_mod.HybridStep, "_loss", lambda self, f, y: real(self, f, y) * float("nan"))
    out = tmp_path / "run"
    assert cli([*RUN, "--data-root", str(cifar), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No checkpoint was written" in err and "--overwrite" in err
    assert "checkpoint" not in {p.name for p in out.iterdir()}


def test_one_signal_asks_to_stop_a_second_stops_at_once():
    from mozo.engine.loop import _Interrupt

    with _Interrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.requested and interrupt.exit_code == 143
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; never reached
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_num_tasks_beyond_the_scenario_is_refused(tmp_path, cifar):
    with pytest.raises(ValueError, match="num_tasks=11 but scenario"):
        run_experiment(_cfg("num_tasks=11"), tmp_path / "run", data_root=cifar, progress=False)

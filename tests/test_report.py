"""`mozo report` and `write_report` on fake run directories."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mozo.cli import main as mozo_main
from mozo.report import build_row, default_out_dir, format_table, load_runs, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(path: Path, protocol: str, plan: str, cost: dict) -> Path:
    if protocol == "cil":
        matrix = [[90.0, None, None], [80.0, 70.0, None], [70.0, 60.0, 80.0]]
    else:
        matrix = [[80.0, 30.0, 20.0], [70.0, 90.0, 40.0], [60.0, 85.0, 95.0]]
    data = {
        "protocol": protocol,
        "tasks": ["a", "b", "c"],
        "task_test_sizes": [100, 100, 100],
        "acc_matrix": matrix,
        "summary": {},
        "config": {"plan": plan, "peft": {"kind": "lora", "lora": {"rank": 4}}},
        "cost": cost,
    }
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(data))
    return path


@pytest.fixture
def runs(tmp_path):
    full = {"trainable_params": {"total": 123456, "by_part": {"vision": 123456}},
            "peak_mem_bytes": 512 * 2**20, "wall_time_s": 12.34, "forward_passes": 9,
            "backward_passes": 3, "step_time_s": 0.1}
    partial = {"trainable_params": {"total": 42, "by_part": {}}}  # optional cost keys missing
    return [fake_run(tmp_path / "runs" / "fo", "cil", "fo", full),
            fake_run(tmp_path / "runs" / "mozo", "mtcl", "mozo", partial)]


def test_rows_and_markdown(runs):
    rows = [build_row(r) for r in load_runs(runs)]
    assert rows[0]["run"] == "fo" and rows[0]["peft"] == "lora" and rows[0]["plan"] == "fo"
    assert rows[0]["last"] == pytest.approx(70.0) and rows[0]["peak_mem_mib"] == pytest.approx(512.0)
    assert rows[1]["transfer"] == pytest.approx(30.0) and rows[1]["wall_time_s"] is None
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| run") and "Forgetting" in lines[0] and "process peak (MiB)" in lines[0] and "step peak (MiB, tensors)" in lines[0]
    assert len(lines) == 4 and "123,456" in table and "512.0" in table and "12.3" in table
    assert [c.strip() for c in lines[3].split("|")][-3:-1] == ["-", "-"]  # mozo run: no peak memory, no wall time


def test_write_report_files(runs, tmp_path):
    out = tmp_path / "out"
    paths = write_report(runs, out)
    expected = {"report.md", "report.csv", "acc_matrix_fo.png", "acc_matrix_mozo.png", "acc_per_step.png", "cost.png"}
    assert set(paths) == expected
    for name in expected:
        assert (out / name).stat().st_size > 0
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["run"] for r in rows] == ["fo", "mozo"]
    assert float(rows[0]["Last"]) == pytest.approx(70.0) and rows[1]["wall time (s)"] == ""


def test_cli_report_default_out(runs, capsys):
    assert mozo_main(["report", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "| run" in out and "mozo" in out
    report_dir = runs[0].parent / "report"
    assert default_out_dir(runs) == report_dir
    assert (report_dir / "report.md").read_text().startswith("| run")
    assert (report_dir / "cost.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_report_bad_run(tmp_path, runs, capsys):
    (tmp_path / "empty").mkdir()
    assert mozo_main(["report", str(runs[0]), str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) != 0
    assert "empty" in capsys.readouterr().err


def test_zo_signal_columns_and_plot(tmp_path):
    """A run's results.json zo_signal (engine/signal.py) becomes the report's ZO columns and zo_signal.png."""
    run = fake_run(tmp_path / "runs" / "vz", "cil", "vision-zo", {"trainable_params": {"total": 1, "by_part": {}}})
    data = json.loads((run / "results.json").read_text())
    data["zo_signal"] = {"0": {"zo_to_fo_step_ratio": {"zo.vision": 0.02}, "mean_zo_gain": 3e-6, "mean_noise_gain": 1e-6},
                         "1": {"zo_to_fo_step_ratio": {"zo.vision": 0.04}, "mean_zo_gain": None, "mean_noise_gain": None}}
    (run / "results.json").write_text(json.dumps(data))
    row = build_row(load_runs([run])[0])
    assert row["zo_step_ratio"] == pytest.approx(0.03) and row["zo_gain_excess"] == pytest.approx(2e-6)
    assert "zo_signal.png" in write_report([run], tmp_path / "rep")

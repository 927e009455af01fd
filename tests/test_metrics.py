"""Metrics: the published CIL anchor, a hand-computed MTCL matrix, validation, and `mozo metrics`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import mozo
from mozo.cli import main as mozo_main
from mozo.metrics import REQUIRED_KEYS, ResultsError, load_results, summarize
from mozo.metrics.summary import backward_transfer_continuum, forgetting_continuum, validate_matrix

REFERENCE = Path(mozo.__path__[0]) / "configs" / "reference_results.json"

# MTCL, 3 tasks. Row i = after training task i; entries above the diagonal are zero-shot.
MTCL = [
    [80.0, 30.0, 20.0],
    [70.0, 90.0, 40.0],
    [60.0, 85.0, 95.0],
]


def write_results(path: Path, **overrides) -> Path:
    """A minimal valid results.json (CIL, 3 tasks of 100 test images) in `path`."""
    data = {
        "protocol": "cil",
        "tasks": ["t0", "t1", "t2"],
        "task_test_sizes": [100, 100, 100],
        "acc_matrix": [[90.0, None, None], [80.0, 70.0, None], [70.0, 60.0, 80.0]],
        "summary": {"last": 70.0, "avg": 235 / 3, "transfer": None, "bwt": -15.0, "forgetting": 15.0},
        "config": {"plan": "fo", "peft": "moe"},
        "cost": {"trainable_params": {"total": 1000, "by_part": {}}, "peak_mem_bytes": 2**20,
                 "wall_time_s": 1.5, "forward_passes": 10, "backward_passes": 5},
    }
    data.update(overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(data))
    return path


def test_reference_cifar100_anchor():
    ref = json.loads(REFERENCE.read_text())["cifar100_10-10"]
    s = summarize(ref["acc_per_task"], "cil", ref["test_samples_per_task"])
    assert s["last"] == pytest.approx(ref["expected"]["last"], abs=0.01)
    assert s["avg"] == pytest.approx(ref["expected"]["avg"], abs=0.01)
    assert s["last"] == pytest.approx(77.52, abs=0.01) and s["avg"] == pytest.approx(85.21, abs=0.01)
    assert s["transfer"] is None
    assert len(s["step_acc"]) == 10 and s["step_acc"][0] == pytest.approx(98.4)


def test_cil_step_accuracy_is_sample_weighted():
    # Task 1 has 3x the test images of task 0: acc_1 = (1*90 + 3*50) / 4 = 60, not the plain mean 70.
    s = summarize([[100.0, None], [90.0, 50.0]], "cil", [100, 300])
    assert s["step_acc"] == pytest.approx([100.0, 60.0])
    assert s["last"] == pytest.approx(60.0) and s["avg"] == pytest.approx(80.0)
    plain = summarize([[100.0, None], [90.0, 50.0]], "cil")  # no sizes: plain mean
    assert plain["last"] == pytest.approx(70.0)


def test_mtcl_hand_computed():
    s = summarize(MTCL, "mtcl", [50, 50, 50])
    # Transfer: j=1 -> A[0][1]=30; j=2 -> mean(20, 40)=30; mean = 30.
    assert s["transfer"] == pytest.approx(30.0)
    # Avg: column means 70, 205/3, 155/3 -> (210 + 205 + 155) / 9 = 570/9.
    assert s["avg"] == pytest.approx(570 / 9)
    # Last: mean(60, 85, 95) = 80.
    assert s["last"] == pytest.approx(80.0)
    # BWT: ((60-80) + (85-90)) / 2 = -12.5; forgetting: ((80-60) + (90-85)) / 2 = 12.5.
    assert s["bwt"] == pytest.approx(-12.5) and s["bwt"] < 0
    assert s["forgetting"] == pytest.approx(12.5) and s["forgetting"] > 0
    assert s["step_acc"] == pytest.approx([130 / 3, 200 / 3, 80.0])


def test_forgetting_uses_best_earlier_accuracy_not_the_diagonal():
    # Task 0 improves after task 1 (80 -> 90) then drops to 70: forgetting 20, BWT -10.
    s = summarize([[80.0, None, None], [90.0, 60.0, None], [70.0, 60.0, 50.0]], "cil")
    assert s["forgetting"] == pytest.approx((20.0 + 0.0) / 2)
    assert s["bwt"] == pytest.approx((-10.0 + 0.0) / 2)


def test_partial_run_uses_rows_present():
    # 2 of 3 tasks trained (num_tasks limit): T is the last row.
    s = summarize([[90.0, None, None], [80.0, 70.0, None]], "cil", [100, 100, 100])
    assert s["last"] == pytest.approx(75.0) and s["avg"] == pytest.approx(82.5)
    assert s["bwt"] == pytest.approx(-10.0) and s["forgetting"] == pytest.approx(10.0)
    m = summarize(MTCL[:2], "mtcl")
    assert m["last"] == pytest.approx(200 / 3)
    assert m["transfer"] == pytest.approx((30.0 + 30.0) / 2)  # column 2: both rows are before it


def test_single_task_has_no_bwt_or_forgetting():
    s = summarize([[88.0]], "cil", [10])
    assert s["last"] == s["avg"] == pytest.approx(88.0)
    assert s["bwt"] is None and s["forgetting"] is None and s["transfer"] is None
    assert summarize([[88.0]], "mtcl")["transfer"] is None


def test_triangular_and_padded_layouts_agree():
    tri = summarize([[90.0], [80.0, 70.0]], "cil")
    padded = summarize([[90.0, None], [80.0, 70.0]], "cil")
    assert tri == padded


@pytest.mark.parametrize(
    "matrix, where",
    [
        ([[90.0, None], [80.0, float("nan")]], "row 1, column 1"),
        ([[90.0, None], [float("inf"), 70.0]], "row 1, column 0"),
        ([[90.0, None], [80.0, 101.0]], "row 1, column 1"),
        ([[-1.0, None], [80.0, 70.0]], "row 0, column 0"),
        ([[90.0, None], [80.0, "x"]], "row 1, column 1"),
        ([[90.0, None, None], [80.0, 70.0, None], [70.0, 60.0]], "row 2"),  # ragged
        ([[90.0, None], [None, 70.0]], "row 1, column 0"),  # CIL needs every seen task
    ],
)
def test_bad_values_raise_naming_position(matrix, where):
    with pytest.raises(ValueError, match=where):
        summarize(matrix, "cil")


def test_mtcl_requires_full_matrix_and_valid_protocol():
    with pytest.raises(ValueError, match="row 0, column 2"):
        summarize([[80.0, 30.0, None], [70.0, 90.0, 40.0]], "mtcl")
    with pytest.raises(ValueError, match="protocol"):
        summarize(MTCL, "til")
    with pytest.raises(ValueError, match="task_test_sizes"):
        summarize(MTCL, "cil", [100, 100])
    with pytest.raises(ValueError, match="3 rows but only 2 tasks"):
        summarize([[1.0], [1.0, 1.0], [1.0, 1.0]], "cil", [1, 1])


def test_load_results_run_dir_and_missing_key(tmp_path):
    run = write_results(tmp_path / "run")
    assert load_results(run)["protocol"] == "cil"
    assert load_results(run / "results.json")["tasks"] == ["t0", "t1", "t2"]
    for key in REQUIRED_KEYS:
        data = json.loads((run / "results.json").read_text())
        del data[key]
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(ResultsError, match=repr(key)):
            load_results(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "nowhere")


def test_cli_metrics_table(tmp_path, capsys):
    run = write_results(tmp_path / "run")
    assert mozo_main(["metrics", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "Last" in out and "70.00" in out and "Avg" in out and "78.33" in out
    assert "Forgetting" in out and "t2" in out
    assert "warning" not in err


def test_cli_metrics_json(tmp_path, capsys):
    run = write_results(tmp_path / "run")
    assert mozo_main(["metrics", str(run / "results.json"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"last", "avg", "transfer", "bwt", "forgetting", "bwt_continuum", "forgetting_continuum",
                         "step_acc"}
    assert data["last"] == pytest.approx(70.0) and data["transfer"] is None


def test_cli_metrics_warns_on_stale_summary(tmp_path, capsys):
    run = write_results(tmp_path / "run", summary={"last": 71.0, "avg": 78.333, "bwt": -15.0, "forgetting": 15.0})
    assert mozo_main(["metrics", str(run), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "warning" in err and "'last'" in err and "'avg'" not in err
    assert json.loads(out)["last"] == pytest.approx(70.0)


def test_cli_metrics_missing_key_fails(tmp_path, capsys):
    run = write_results(tmp_path / "run")
    data = json.loads((run / "results.json").read_text())
    del data["task_test_sizes"]
    (run / "results.json").write_text(json.dumps(data))
    assert mozo_main(["metrics", str(run)]) != 0
    assert "task_test_sizes" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# both BWT / forgetting definitions (issue 14), published matrices from JSON and CSV
# --------------------------------------------------------------------------------------------------

# MoE-Adapters4CL, CIFAR-100 10-10 (reference_results.json): GEM / Chaudhry against continuum's variants,
# the latter being what the reference code logs.
PUBLISHED = {"bwt": -11.99, "forgetting": 11.99, "bwt_continuum": -9.80, "forgetting_continuum": 11.79}


def _reference():
    return json.loads(REFERENCE.read_text())["cifar100_10-10"]


def test_published_matrix_gives_both_definitions():
    ref = _reference()
    s = summarize(ref["acc_per_task"], "cil", ref["test_samples_per_task"])
    for key, value in PUBLISHED.items():
        assert s[key] == pytest.approx(value, abs=0.01), key


def test_continuum_variants_hand_computed():
    # 4 tasks. continuum BWT: pairs (i, j<i-1) = (2,0), (3,0), (3,1) over 4*3/2 = 6 pairs;
    # continuum forgetting: tasks j < 2, best over rows j..1, divided by 3.
    m = validate_matrix([[90.0], [80.0, 70.0], [60.0, 65.0, 80.0], [50.0, 40.0, 70.0, 60.0]])
    assert backward_transfer_continuum(m) == pytest.approx(((60 - 90) + (50 - 90) + (40 - 70)) / 6)
    assert forgetting_continuum(m) == pytest.approx(((90 - 50) + (70 - 40)) / 3)
    assert backward_transfer_continuum(m[:1]) is None and forgetting_continuum(m[:1]) is None


def test_new_keys_leave_existing_values_unchanged(tmp_path, capsys):
    s = summarize(MTCL, "mtcl", [50, 50, 50])
    assert s["bwt"] == pytest.approx(-12.5) and s["forgetting"] == pytest.approx(12.5)
    run = write_results(tmp_path / "run")
    assert mozo_main(["metrics", str(run)]) == 0
    out = capsys.readouterr().out
    assert "BWT (GEM)" in out and "Forgetting (Chaudhry)" in out
    assert "BWT (continuum, as MoE-Adapters4CL logs)" in out
    assert "Forgetting (continuum, as MoE-Adapters4CL logs)" in out


def test_cli_metrics_published_json_without_optional_keys(tmp_path, capsys):
    ref = _reference()
    path = tmp_path / "moe_adapters.json"
    path.write_text(json.dumps({"protocol": "CIL", "tasks": list(range(10)),
                                "task_test_sizes": ref["test_samples_per_task"], "acc_matrix": ref["acc_per_task"]}))
    assert mozo_main(["metrics", str(path), "--json"]) == 0
    out, err = capsys.readouterr()
    s = json.loads(out)
    assert err == ""  # no summary stored: nothing to warn about
    assert s["last"] == pytest.approx(77.52, abs=0.01) and s["avg"] == pytest.approx(85.21, abs=0.01)
    for key, value in PUBLISHED.items():
        assert s[key] == pytest.approx(value, abs=0.01), key


def test_cli_metrics_csv_matrix(tmp_path, capsys):
    ref = _reference()
    path = tmp_path / "matrix.csv"
    width = len(ref["acc_per_task"])
    path.write_text("".join(",".join(map(str, row)) + "," * (width - len(row)) + "\n" for row in ref["acc_per_task"]))
    sizes = ",".join(map(str, ref["test_samples_per_task"]))
    assert mozo_main(["metrics", "--matrix", str(path), "--sizes", sizes, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["last"] == pytest.approx(77.52, abs=0.01) and s["avg"] == pytest.approx(85.21, abs=0.01)
    assert s["bwt_continuum"] == pytest.approx(-9.80, abs=0.01)
    assert mozo_main(["metrics", "--matrix", str(path), "--sizes", sizes]) == 0
    assert "task 10" in capsys.readouterr().out


def test_cli_metrics_csv_mtcl_and_triangular(tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("\n".join(",".join(map(str, row)) for row in MTCL) + "\n")
    assert mozo_main(["metrics", "--matrix", str(path), "--sizes", "50,50,50", "--protocol", "mtcl", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["transfer"] == pytest.approx(30.0)
    path.write_text("90\n80,70\n")  # lower-triangular rows, as published
    assert mozo_main(["metrics", "--matrix", str(path), "--sizes", "100,100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["last"] == pytest.approx(75.0)


@pytest.mark.parametrize(
    "text, argv_tail, message",
    [
        ("90\n80,x\n", ["--sizes", "100,100"], "'x' is not a number (row 1, column 1"),
        ("90\n80,nan\n", ["--sizes", "100,100"], "not finite"),
        ("90\n80,70\n", ["--sizes", "100"], "task_test_sizes"),
        ("90\n80,70\n", ["--sizes", "100,a"], "--sizes must be comma-separated integers"),
        ("90\n80,70\n", [], "needs --sizes"),
        ("90\n80," + "9" * 200_000 + "\n", ["--sizes", "100,100"], "not a readable CSV"),  # csv field limit
        ("90\n80,70\n", ["--sizes", "100,100", "PATH"], "no PATH"),
    ],
    ids=["text", "nan", "sizes-short", "sizes-text", "no-sizes", "field-limit", "path-too"],
)
def test_cli_metrics_csv_errors(tmp_path, capsys, text, argv_tail, message):
    path = tmp_path / "m.csv"
    path.write_text(text)
    argv_tail = [str(tmp_path) if a == "PATH" else a for a in argv_tail]
    assert mozo_main(["metrics", "--matrix", str(path), *argv_tail]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1

"""Results files are data, never trusted: `mozo metrics` and `mozo report` on malformed files give one
message naming the file and the problem (exit 2), never a traceback; names are escaped (issue 13).

Each malformed case runs through the CLI entry (`mozo.cli.main`) of both commands: an exception
escaping it would fail the test, as a traceback would show to a user.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from mozo.cli import main as mozo_main
from mozo.report.tables import csv_cell

GOOD = {"protocol": "cil", "tasks": ["a", "b"], "task_test_sizes": [100, 100], "acc_matrix": [[90.0], [80.0, 70.0]]}


def _json(**overrides) -> str:
    return json.dumps({**GOOD, **overrides})


def _with_number(key_path: str, digits: str) -> str:
    """GOOD with a raw number literal (json.dumps cannot write a 5000-digit int: str() refuses it)."""
    text = _json(**{key_path: "@@"})
    return text.replace('"@@"', digits)


MALFORMED = {
    "deep-nesting": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "not-utf8": (b'{"protocol": "\xff\xfe"}', "not UTF-8"),
    "int-digit-limit": (_with_number("acc_matrix", "[[" + "9" * 5000 + "]]"), "number too large to read"),
    "int-overflows-float": (_with_number("acc_matrix", "[[1" + "0" * 400 + "], [1, 2]]"), "outside [0, 100]"),
    "size-overflows-float": (_with_number("task_test_sizes", "[1" + "0" * 400 + ", 1]"), "task_test_sizes[0]"),
    "invalid-json": ('{"protocol": ', "not valid JSON"),
    "empty-file": ("", "not valid JSON"),
    "not-a-mapping": ("[1, 2]", "expected a JSON object, got a list"),
    "missing-keys": ('{"protocol": "cil"}', "missing required keys 'tasks', 'task_test_sizes', 'acc_matrix'"),
    "protocol-not-str": (_json(protocol=["cil"]), "protocol must be a string"),
    "protocol-unknown": (_json(protocol="til"), "unknown protocol 'til'"),
    "tasks-not-list": (_json(tasks=3), "tasks must be a list"),
    "sizes-not-list": (_json(task_test_sizes={"a": 1}), "task_test_sizes must be a list"),
    "tasks-vs-sizes": (_json(tasks=["a"]), "task_test_sizes has 2 entries"),
    "matrix-not-list": (_json(acc_matrix="90"), "acc_matrix must be a list of rows"),
    "row-not-list": (_json(acc_matrix=[90, 80]), "acc_matrix row 0 must be a list"),
    "entry-text": (_json(acc_matrix=[[90.0], [80.0, "70"]]), "acc_matrix[1][1] = '70' is not a number"),
    "entry-nested": (_json(acc_matrix=[[[90.0]], [80.0, 70.0]]), "acc_matrix[0][0] = a list is not a number"),
    "entry-bool": (_json(acc_matrix=[[True], [80.0, 70.0]]), "is not a number"),
    "row-length": (_json(acc_matrix=[[90.0, None, None], [80.0, 70.0]]), "row 0 has 3 entries"),
    "nan": ('{"protocol": "cil", "tasks": ["a"], "task_test_sizes": [1], "acc_matrix": [[NaN]]}', "not finite"),
    "infinity": ('{"protocol": "cil", "tasks": ["a"], "task_test_sizes": [1], "acc_matrix": [[1e999]]}', "not finite"),
    "nan-size": ('{"protocol": "cil", "tasks": ["a"], "task_test_sizes": [NaN], "acc_matrix": [[1]]}',
                 "task_test_sizes[0] = nan must be a positive integer"),
    "null-needed": (_json(acc_matrix=[[90.0, None], [None, 70.0]]), "acc_matrix[1][0] is None"),
}


@pytest.fixture(params=["metrics", "report"])
def command(request):
    return request.param


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_results_one_message_exit_2(tmp_path, capsys, command, case):
    content, problem = MALFORMED[case]
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    argv = [command, str(run)] + (["--out", str(tmp_path / "out")] if command == "report" else [])
    assert mozo_main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"mozo {command}: error: {run / 'results.json'}: ") and err.count("\n") == 1, err
    assert problem in err, err
    assert out == "" and not (tmp_path / "out").exists()  # nothing written for a bad input


def test_missing_or_unreadable_path_exit_2(tmp_path, capsys, command):
    assert mozo_main([command, str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert mozo_main([command, str(tmp_path / ("a" * 5000))]) == 2  # stat() itself fails: name too long
    assert "cannot be read (File name too long)" in capsys.readouterr().err
    if command == "metrics":
        assert mozo_main(["metrics", "--matrix", str(tmp_path / "m.csv"), "--sizes", "1"]) == 2
        assert "m.csv: cannot be read" in capsys.readouterr().err


def test_odd_optional_values_do_not_break_either_command(tmp_path, capsys):
    # Optional keys are shown as missing ("-", or a warning), never trusted: huge ints, NaN, deep lists.
    text = _json(summary={"last": "@@", "avg": float("nan"), "step_acc": [[1]]},
                 config={"plan": [[["x"]]], "peft": {"kind": {"a": 1}}},
                 cost={"peak_mem_bytes": "@@", "wall_time_s": float("nan"), "trainable_params": {"total": "@@"}})
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(text.replace('"@@"', "1" + "0" * 400))
    assert mozo_main(["metrics", str(run)]) == 0
    assert "warning: stored summary 'last'" in capsys.readouterr().err
    assert mozo_main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    rows = list(csv.reader((tmp_path / "out" / "report.csv").open(encoding="utf-8")))
    assert rows[1][1:3] == ["", ""] and rows[1][-3:] == ["", "", ""]


def test_csv_cell_escapes_formulas_only_in_text():
    for text in ("=1+1", "+cmd", "-cmd|' /C calc'!A0", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(text).startswith("'")
    assert csv_cell("=1+1") == "'=1+1" and csv_cell("\t=1") == "'\\x09=1"
    for number in (-9.5, -11.99, 0, 12):
        assert csv_cell(number) == number  # numbers stay numbers, never quoted
    assert csv_cell("-9.5") == "-9.5" and csv_cell("+3") == "+3"  # text that reads as a number: no formula
    assert csv_cell("fo") == "fo" and csv_cell(None) == ""


def _named_run(parent: Path, name: str, **overrides) -> Path:
    run = parent / name
    run.mkdir(parents=True)
    data = {**GOOD, "summary": {}, "config": {"plan": "=HYPERLINK(\"http://x\",\"y\")", "peft": "@SUM(A1)"},
            "cost": {"trainable_params": {"total": 7}}, **overrides}
    (run / "results.json").write_text(json.dumps(data))
    return run


def test_report_escapes_names_in_csv_markdown_and_terminal(tmp_path, capsys):
    runs = tmp_path / "runs"
    evil = _named_run(runs, "=evil\x1b[31mred\x1b]0;title\x07", tasks=["t$\\frac$", "b\x1b[2J"])
    undecodable = _named_run(runs, os.fsdecode(b"run-\xff$x^{$"))  # a non-UTF-8 name, and mathtext
    out = tmp_path / "out"
    assert mozo_main(["report", str(evil), str(undecodable), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    markdown = (out / "report.md").read_text(encoding="utf-8")
    for text in (stdout, markdown):
        assert "\x1b" not in text and "\x07" not in text
        assert "=evil\\x1b[31mred\\x1b]0;title\\x07" in text and "run-\\udcff$x^{$" in text
    rows = list(csv.reader((out / "report.csv").open(encoding="utf-8")))
    header, first = rows[0], rows[1]
    assert first[0] == "'=evil\\x1b[31mred\\x1b]0;title\\x07"
    assert first[header.index("plan")] == "'=HYPERLINK(\"http://x\",\"y\")"
    assert first[header.index("peft")] == "'@SUM(A1)"
    assert float(first[header.index("BWT")]) == pytest.approx(-10.0)  # a negative number stays numeric
    assert first[header.index("BWT")] == "-10.0"
    assert (out / "acc_per_step.png").stat().st_size > 0  # '$' in names did not reach mathtext


def test_metrics_escapes_task_names_and_paths(tmp_path, capsys):
    run = _named_run(tmp_path, "r\x1b[1m", tasks=["\x1b[31mred", "b\u202eevil"])
    assert mozo_main(["metrics", str(run)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    assert "r\\x1b[1m" in out and "\\x1b[31mred" in out and "b\\u202eevil" in out
    (run / "results.json").write_text("{")
    assert mozo_main(["metrics", str(run)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "r\\x1b[1m" in err

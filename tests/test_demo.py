"""The shortened demo runs end to end: every plan's results.json, the report, the table."""
from __future__ import annotations

import json

from mozo.cli import main as cli
from mozo.demo.cli import DEMO_PLANS


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name, _ in DEMO_PLANS:
        res = json.loads((out / name.replace(":", "_") / "results.json").read_text())
        assert len(res["acc_matrix"]) == 4 and res["summary"]["transfer"] is not None
        assert f"| {name} |" in printed
    assert (out / "report" / "report.md").exists() and (out / "report" / "acc_per_step.png").stat().st_size > 0
    assert (out / "demo_table.md").read_text().startswith("| plan |")

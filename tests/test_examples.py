"""examples/: each example runs, and the README's copy of its lines cannot drift from the tested file."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hybrid_step_loop.py"


def readme_block(example: str) -> list[str]:
    """The lines of the code block that follows `<!-- example: PATH -->` in README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"<!-- example: {re.escape(example)} -->\n```python\n(.*?)\n```", text, re.S)
    assert m, f"README.md has no ```python block after <!-- example: {example} -->"
    return m.group(1).splitlines()


def test_readme_block_lines_are_in_the_example_in_order():
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    block = [line for line in readme_block("examples/hybrid_step_loop.py") if line.strip()]
    assert len(block) >= 5
    at = 0
    for line in block:  # each README line verbatim (indentation and comment included), in the file's order
        assert line in lines[at:], f"README line not in {EXAMPLE.name} (after line {at}): {line!r}"
        at = lines.index(line, at) + 1


def test_hybrid_step_example_runs_and_prints_a_loss():
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    losses = [float(x) for x in re.findall(r"^step \d+: loss ([0-9.]+)", done.stdout, re.M)]
    assert len(losses) >= 2 and all(x > 0 for x in losses), done.stdout

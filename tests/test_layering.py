"""The package layering docs/architecture.md promises, checked on the source: a violation fails here,
naming the file, the line and the import."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "mozo"

# package -> packages it must never import
FORBIDDEN = {
    "zo": ("mozo.backbone", "mozo.peft", "mozo.engine", "mozo.data"),
    "engine": ("mozo.demo",),
    "diagnostics": ("mozo.demo",),
    "data": ("mozo.demo",),
    "metrics": ("mozo.engine",),
    "report": ("mozo.engine",),
}


def modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def imported(tree: ast.AST):
    """(line, module, names) for every import of a mozo module, at any depth (lazy imports included)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mozo"):
                    yield node.lineno, alias.name, [], alias.asname or alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mozo") and node.level == 0:
            yield node.lineno, node.module, [a.name for a in node.names], None


def test_packages_import_only_downwards():
    bad = []
    for path, tree in modules():
        package = path.relative_to(SRC).parts[0]
        for line, module, names, _ in imported(tree):
            targets = [module] + [f"{module}.{n}" for n in names]
            for forbidden in FORBIDDEN.get(package, ()):
                if any(t == forbidden or t.startswith(forbidden + ".") for t in targets):
                    bad.append(f"{path.relative_to(SRC)}:{line} imports {module} ({package}/ must not import {forbidden})")
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_a_module():
    bad = []
    for path, tree in modules():
        mozo_modules = set()
        for line, module, names, _ in imported(tree):
            bad += [f"{path.relative_to(SRC)}:{line} imports private {n} from {module}" for n in names
                    if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(tree):  # `import mozo.x.y as m` / `from mozo.x import y` (a module) then m._private
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mozo"):
                mozo_modules.update(a.asname or a.name for a in node.names)
            if isinstance(node, ast.Import):
                mozo_modules.update(a.asname for a in node.names if a.name.startswith("mozo") and a.asname)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in mozo_modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(SRC)}:{node.lineno} uses private {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_the_checks_catch_a_violation(tmp_path, monkeypatch):
    """The layering checks above can fail: a planted zo module importing the engine and a private name."""
    global SRC
    (tmp_path / "zo").mkdir()
    (tmp_path / "zo" / "bad.py").write_text("from mozo.engine.loop import _flat\nimport mozo.report.plots as plots\nplots._figure()\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    import pytest

    with pytest.raises(AssertionError, match="zo/ must not import mozo.engine"):
        test_packages_import_only_downwards()
    with pytest.raises(AssertionError, match="private _flat") as e:
        test_no_private_name_crosses_a_module()
    assert "plots._figure" in str(e.value)

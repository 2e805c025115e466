"""The dependency rule of docs/architecture.md, enforced on the source (an AST walk of every import,
function-level imports included):

    model/                      imports nothing of the service
    core/                       imports nothing above it (no eo, monitor, workers, devtools)
    eo/                         imports core only
    monitor/  |  workers/       import core and eo, never each other (they meet in the database and broker)
    web/                        the web app/API: core, eo and monitor (control plane), never workers
    devtools/                   test/demo harness: anything may be imported by it, production never imports it
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICE = {"core", "eo", "monitor", "workers", "devtools", "model", "web"}
FORBIDDEN = {
    "model": SERVICE - {"model"},
    "core": {"eo", "monitor", "workers", "devtools", "model", "web"},
    "eo": {"monitor", "workers", "devtools", "model", "web"},
    "monitor": {"workers", "devtools"},
    "workers": {"monitor", "devtools", "web"},
    "web": {"workers", "devtools"},
}
# The one sanctioned exception: the operator CLI offers `unirs-monitor demo` when the dev tools are installed.
ALLOWED = {("monitor/cli.py", "devtools.demo")}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def violations(package: str) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top in FORBIDDEN[package] and (rel, module) not in ALLOWED:
                out.append(f"{rel}:{line} imports {module}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_rule(package):
    assert violations(package) == []


def test_the_rule_catches_a_violation(tmp_path, monkeypatch):
    """The checker itself can fail: a planted monitor → workers import is reported with its line."""
    (tmp_path / "monitor").mkdir()
    planted = "import os\n\ndef f():\n    from workers.pipeline import run_analysis\n"
    (tmp_path / "monitor" / "bad.py").write_text(planted)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("monitor") == ["monitor/bad.py:4 imports workers.pipeline"]


MODEL_ORDER = {
    "configuration_unirs": 0,
    "modeling_change": 1,  # the change-extraction module, a part of the network
    "modeling_unirs": 2,
    "inference": 3,
    "checkpoint": 3,
    "unirs": 4,
}


def model_order_violations(root: Path) -> list[str]:
    """Relative imports inside model/ that point sideways or back up the order (lazy ones included)."""
    bad = []
    for name, rank in MODEL_ORDER.items():
        tree = ast.parse((root / "model" / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module in MODEL_ORDER:
                if MODEL_ORDER[node.module] >= rank and node.module != name:
                    bad.append(f"model/{name}.py:{node.lineno} imports .{node.module}")
    return bad


def test_model_imports_point_one_way():
    """Inside model/: configuration → modeling → inference / checkpoint → unirs (the public class), never back."""
    assert model_order_violations(ROOT) == []


def test_model_order_check_catches_a_lazy_back_import(tmp_path):
    """A function-level `from .inference import …` in modeling_unirs (the old cycle) is reported."""
    (tmp_path / "model").mkdir()
    for name in MODEL_ORDER:
        (tmp_path / "model" / f"{name}.py").write_text((ROOT / "model" / f"{name}.py").read_text(encoding="utf-8"))
    planted = "\n\ndef f():\n    from .checkpoint import load_unirs\n"
    modeling = tmp_path / "model" / "modeling_unirs.py"
    n_lines = len(modeling.read_text(encoding="utf-8").splitlines())
    modeling.write_text(modeling.read_text(encoding="utf-8") + planted)
    assert model_order_violations(tmp_path) == [f"model/modeling_unirs.py:{n_lines + 4} imports .checkpoint"]


def test_no_module_over_the_size_limit():
    limit = 550  # "modules under ~500 lines"
    big = [f"{p.relative_to(ROOT)}: {n}" for pkg in ("core", "eo", "monitor", "workers", "web")
           for p in (ROOT / pkg).rglob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > limit]
    assert big == []


# Entry points read the settings (once) and hand them down; nothing below them calls get_settings().
SETTINGS_ENTRY_POINTS = {"monitor/cli.py", "workers/celery_app.py", "devtools/demo.py", "core/config.py"}


def settings_reads(paths: list[Path]) -> list[str]:
    """Calls of ``get_settings()`` outside the entry points, and ``session_scope()`` without a target."""
    out = []
    for path in paths:
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name == "get_settings" and rel not in SETTINGS_ENTRY_POINTS:
                out.append(f"{rel}:{node.lineno} calls get_settings()")
            elif name == "session_scope" and not node.args and not node.keywords:
                out.append(f"{rel}:{node.lineno} calls session_scope() without settings")
    return out


def test_settings_are_handed_down_not_read():
    paths = sorted(p for pkg in ("core", "eo", "monitor", "workers", "devtools") for p in (ROOT / pkg).rglob("*.py"))
    assert settings_reads(paths) == []


def test_the_settings_rule_catches_a_violation(tmp_path, monkeypatch):
    (tmp_path / "monitor").mkdir()
    planted = tmp_path / "monitor" / "bad.py"
    planted.write_text("def f(settings):\n    with session_scope() as s:\n        return get_settings()\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert settings_reads([planted]) == ["monitor/bad.py:2 calls session_scope() without settings",
                                         "monitor/bad.py:3 calls get_settings()"]

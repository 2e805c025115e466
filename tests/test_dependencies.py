"""Every third-party package the service imports is installed by ``pip install -e .`` (the Dockerfile):
[project.dependencies] and what they require, not the ``dev`` extra the test venv also holds. 9332b3a
imported scikit-image (dev only) in workers/coregistration.py: green suite, ModuleNotFoundError in
production. An AST walk of every import under the service's packages, function-level imports included,
import names mapped to distributions with importlib.metadata.packages_distributions().

Allowed besides: an import inside ``try: … except ImportError`` (optional by construction, e.g. PyAV in
model/training/data.py, planetary-computer in eo/security.py), and the ``train`` extra under
model/training/ and model/evaluation/ (peft, pycocoevalcap: ``unirs-train``/``unirs-eval`` only)."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "eo", "monitor", "workers", "web", "model")
EXTRAS = {"train": ("model/training/", "model/evaluation/")}


def closure(requirements: list[str]) -> set[str]:
    """Canonical names of the distributions ``requirements`` install, transitively (markers evaluated for
    this interpreter, requested extras followed)."""
    seen: set[tuple[str, str]] = set()
    names: set[str] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        names.add(name)
        for wanted in {"", *req.extras}:
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            try:
                todo += [(Requirement(r), wanted) for r in requires(req.name) or []]
            except PackageNotFoundError:
                pass  # not installed here: the import check reports what it cannot map
    return names


def installed_by(extra: str | None = None) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return closure(project["dependencies"] + (project["optional-dependencies"][extra] if extra else []))


def third_party_imports(paths: list[Path], root: Path = ROOT) -> list[tuple[str, int, str, bool]]:
    """(file relative to ``root``, line, top-level import name, guarded by ``except ImportError``) of every
    import that is neither the standard library's nor the repository's."""
    own = {p.name for p in root.iterdir() if p.is_dir()} | set(PACKAGES) | {"__future__"}
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
                guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - own - set(sys.stdlib_module_names):
                found.append((path.relative_to(root).as_posix(), node.lineno, top, id(node) in guarded))
    return found


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in types)


def undeclared(imports: list[tuple[str, int, str, bool]]) -> list[str]:
    runtime = installed_by()
    extras = {extra: installed_by(extra) for extra in EXTRAS}
    distributions = packages_distributions()
    problems = []
    for rel, line, top, guarded in imports:
        if guarded:
            continue
        dists = {canonicalize_name(d) for d in distributions.get(top, [])}
        allowed = runtime.union(*(extras[e] for e, prefixes in EXTRAS.items() if rel.startswith(prefixes)))
        if not dists & allowed:
            problems.append(f"{rel}:{line} imports {top} ({', '.join(sorted(dists)) or 'not installed'}), "
                            "which `pip install .` does not install")
    return problems


def direct_pins(extra: str | None = None) -> set[str]:
    """Canonical names pinned exactly (``==``) in [project.dependencies] (and the ``extra``)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])
    reqs = [Requirement(r) for r in declared]
    return {canonicalize_name(r.name) for r in reqs
            if len(r.specifier) == 1 and next(iter(r.specifier)).operator == "=="}


def not_pinned(imports: list[tuple[str, int, str, bool]]) -> list[str]:
    """Imports installed only as another package's requirement: their version is whatever that package
    allows, and they vanish when it stops requiring them."""
    runtime = direct_pins()
    extras = {extra: direct_pins(extra) for extra in EXTRAS}
    distributions = packages_distributions()
    problems = []
    for rel, line, top, guarded in imports:
        dists = {canonicalize_name(d) for d in distributions.get(top, [])}
        allowed = runtime.union(*(extras[e] for e, prefixes in EXTRAS.items() if rel.startswith(prefixes)))
        if not guarded and dists and not dists & allowed:
            problems.append(f"{rel}:{line} imports {top} ({', '.join(sorted(dists))}), not pinned in pyproject.toml")
    return problems


def test_every_import_of_the_service_is_installed_by_its_runtime_dependencies():
    paths = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    imports = third_party_imports(paths)
    assert len(paths) > 100 and {"numpy", "sqlalchemy", "rasterio", "skimage"} <= {top for *_, top, _ in imports}
    assert undeclared(imports) == []
    assert not_pinned(imports) == []


def test_the_check_catches_a_dev_only_import_and_spares_a_guarded_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import numpy\n\ndef f():\n    import pytest\n    try:\n        import av\n"
                     "    except ImportError:\n        pass\n")
    imports = third_party_imports([probe], tmp_path)
    assert sorted(imports) == [("probe.py", 1, "numpy", False), ("probe.py", 4, "pytest", False),
                               ("probe.py", 6, "av", True)]
    # pytest is installed (the dev extra) but `pip install .` does not bring it: what scikit-image was.
    assert undeclared(imports) == ["probe.py:4 imports pytest (pytest), which `pip install .` does not install"]
    assert "pytest" not in installed_by() and "pytest" in installed_by("dev")


def test_the_check_catches_an_import_installed_only_transitively(tmp_path):
    probe = tmp_path / "probe.py"
    # idna comes only with requests (and httpx): installed by `pip install .`, pinned by nobody here.
    probe.write_text("import numpy\nimport idna\n")
    imports = third_party_imports([probe], tmp_path)
    assert undeclared(imports) == []
    assert "idna" in installed_by() and "idna" not in direct_pins()
    assert not_pinned(imports) == ["probe.py:2 imports idna (idna), not pinned in pyproject.toml"]

"""`unirs-monitor --help` and every `-h` answer without loading the service (monitor/cli.py's lazy
commands and the function-level imports of the *_cli modules), say the same as the commands themselves,
and work when the configuration is broken. Real `python -m monitor.cli` processes; no timing: what is
checked is which modules a help run imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from monitor.cli import LAZY_COMMANDS, cli, help_requested

ROOT = Path(__file__).resolve().parents[1]
# What made `--help` take seconds: the settings (pydantic), the database layer, geometry, alembic, argon2...
HEAVY = {"pydantic", "pydantic_settings", "sqlalchemy", "geoalchemy2", "psycopg", "alembic", "shapely", "numpy",
         "pyproj", "prometheus_client", "pwdlib", "rich", "uvicorn", "fastapi", "core.config", "core.db",
         "core.models"}
HELP_RUNS = ["--help", "areas", "areas -h", "areas add -h", "areas show -h", "areas pause -h", "findings -h",
             "findings show -h", "users -h", "users token -h", "webhooks -h", "deliveries -h", "metrics -h",
             "doctor -h", "health -h", "scheduler -h", "poll -h", "backfill -h", "db -h", "db upgrade -h",
             "demo -h", "serve --help"]
PROBE = """
import json, runpy, sys
sys.argv = ["unirs-monitor", *sys.argv[1:]]
try:
    runpy.run_module("monitor.cli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY or m in HEAVY)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def _help_run(args: str, env: dict[str, str] | None = None) -> tuple[str, dict]:
    proc = subprocess.run([sys.executable, "-c", f"HEAVY = {sorted(HEAVY)!r}\n" + PROBE, *args.split()],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    *err, probe = proc.stderr.strip().splitlines()
    return proc.stdout or "\n".join(err), json.loads(probe)  # click shows a bare group's help on stderr


@pytest.mark.parametrize("args", HELP_RUNS)
def test_help_imports_nothing_heavy(args):
    out, probe = _help_run(args)
    assert probe["heavy"] == []
    assert probe["code"] in (0, 2, None), out  # 2: a group named without a subcommand (click shows its help)
    assert out.startswith("Usage: unirs-monitor")


def test_the_probe_sees_heavy_imports():
    """The check can fail: a command that runs (not its help) loads the settings and is reported."""
    _, probe = _help_run("areas add x --name -h", env={"UNIRS_CONFIG": "/nonexistent.toml"})
    assert "core.config" in probe["heavy"]


def test_the_listing_says_what_each_command_says():
    """LAZY_COMMANDS' lines are the first paragraph of each command's own help (so the listing is the same
    as if every module were imported)."""
    for name, (load, line) in LAZY_COMMANDS.items():
        command = load()
        assert command.name == name
        assert click.Command(name, help=line).get_short_help_str(500) == command.get_short_help_str(500), name


def test_help_with_a_broken_configuration():
    """The help does not read the settings: it is shown even when UNIRS_CONFIG names no file, while the
    command itself still reports the configuration error."""
    env = {**os.environ, "UNIRS_CONFIG": "/nonexistent.toml", "PYTHONPATH": str(ROOT)}
    shown = subprocess.run([sys.executable, "-m", "monitor.cli", "areas", "list", "-h"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert (shown.returncode, shown.stdout.splitlines()[0]) == (0, "Usage: unirs-monitor areas list [OPTIONS]")
    ran = subprocess.run([sys.executable, "-m", "monitor.cli", "areas", "list"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert ran.returncode == 1
    assert "UNIRS_CONFIG points to '/nonexistent.toml', which is not a file" in ran.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (["areas", "add", "-h"], True),
    (["areas", "add", "forest.geojson", "--name", "-h"], False),  # an area named "-h"
    (["areas"], True),  # a group without a subcommand shows its help
    (["areas", "list"], False),
    (["findings"], False),  # runs a search (invoke_without_command)
    (["findings", "show", "--help"], True),
    (["serve", "--help"], True),  # passed on to web/cli.py, which shows it
    (["worker", "--", "-h"], False),
    (["no-such-command", "-h"], False),  # click reports the unknown command
    (["areas", "add", "--no-such-option", "-h"], False),
])
def test_help_requested_parses_like_click(args, expected):
    ctx = click.Context(cli, info_name="unirs-monitor", **cli.context_settings)
    assert help_requested(ctx, args) is expected

"""What a new operator meets first: settings errors, a database without the schema, log levels, doctor.

Every command runs as a real ``unirs-monitor`` process (``python -m monitor.cli``), so what is asserted is
what a person sees on the terminal: exit status, stdout, stderr, and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from monitor.cli import hoist_log_options
from tests.conftest import create_database, drop_database

FOREST_WKT = "POLYGON((23.1 46.5, 23.2 46.5, 23.2 46.6, 23.1 46.6, 23.1 46.5))"


def unirs(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("UNIRS_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "monitor.cli", *args], env=full_env, input=input,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """A new PostGIS database without the UniRS schema (what `createdb` gives a new operator)."""
    from devtools.dbadmin import sqlalchemy_url

    libpq = create_database("unirs_fresh")
    yield sqlalchemy_url(libpq)
    drop_database(libpq)


def test_log_options_are_accepted_anywhere():
    assert hoist_log_options(["areas", "list", "-v"]) == ["-v", "areas", "list"]
    assert hoist_log_options(["areas", "--log-level", "DEBUG", "list"]) == ["--log-level", "DEBUG", "areas", "list"]
    assert hoist_log_options(["findings", "--log-level=INFO"]) == ["--log-level=INFO", "findings"]
    # After `--` everything is an argument.
    assert hoist_log_options(["areas", "add", "--", "-v"]) == ["areas", "add", "--", "-v"]
    # A long option that merely starts with -v is not verbosity.
    assert hoist_log_options(["areas", "--version-x"]) == ["areas", "--version-x"]


@pytest.mark.parametrize(("env", "needles"), [
    ({"UNIRS_POLL__INTERVAL_MINUTES": "fifteen"}, ["UNIRS_POLL__INTERVAL_MINUTES='fifteen'", "valid number",
                                                   "fix or unset UNIRS_POLL__INTERVAL_MINUTES"]),
    ({"UNIRS_LOG_FORMAT": "xml"}, ["UNIRS_LOG_FORMAT='xml'", "'text' or 'json'"]),
    ({"UNIRS_CATALOGUES": "[{"}, ["UNIRS_CATALOGUES is not valid JSON"]),
    ({"UNIRS_CATALOGUES": '[{"name": "x"}]'}, ["UNIRS_CATALOGUES: catalogues[0].url", "required"]),
    ({"UNIRS_CONFIG": "/nonexistent/unirs.toml"}, ["UNIRS_CONFIG", "not a file"]),
])
def test_invalid_settings_are_one_line_naming_the_variable(env, needles):
    assert_one_line_error(unirs("areas", "list", env=env), "invalid configuration", *needles)


def test_invalid_toml_value_names_the_key_and_the_file(tmp_path):
    cfg = tmp_path / "unirs.toml"
    cfg.write_text('[poll]\ninterval_minutes = "often"\n')
    assert_one_line_error(unirs("doctor", env={"UNIRS_CONFIG": str(cfg)}),
                          "poll.interval_minutes='often'", str(cfg), "UNIRS_POLL__INTERVAL_MINUTES")


def test_unknown_log_level_is_one_line(database_url):
    assert_one_line_error(unirs("areas", "list", "--log-level", "LOUD"), "unknown log level 'LOUD'")


def test_fresh_database_says_what_to_run_then_works(fresh_database):
    env = {"UNIRS_DATABASE_URL": fresh_database}
    for args in (["areas", "add", FOREST_WKT, "--name", "forest"], ["areas", "list"], ["findings"],
                 ["poll", "--once"], ["scheduler"]):
        assert_one_line_error(unirs(*args, env=env), "no UniRS schema yet", "unirs-monitor db upgrade")
    upgraded = unirs("db", "upgrade", env=env)
    assert upgraded.returncode == 0 and upgraded.stderr == "", upgraded.stderr
    added = unirs("areas", "add", FOREST_WKT, "--name", "forest", "--recipient", "ops@example.org", env=env)
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("added area 1 'forest'")


def test_unreachable_database_is_one_line():
    proc = unirs("areas", "list", env={"UNIRS_DATABASE_URL": "postgresql+psycopg://unirs:secret@127.0.0.1:1/x"})
    line = assert_one_line_error(proc, "cannot use the database 127.0.0.1:1/x", "Connection refused",
                                 "UNIRS_DATABASE_URL")
    assert "secret" not in line  # the password never reaches a terminal or a log


def test_commands_log_warnings_only_unless_asked(db):
    quiet = unirs("areas", "add", FOREST_WKT, "--name", "quiet", "--recipient", "ops@example.org")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    # -v after the subcommand's own arguments; JSON lines from python-json-logger when configured.
    loud = unirs("areas", "pause", "quiet", "-v", env={"UNIRS_LOG_FORMAT": "json"})
    assert loud.returncode == 0, loud.stderr
    records = [json.loads(line) for line in loud.stderr.splitlines()]
    paused = [r for r in records if r["logger"] == "monitor.areas"]
    assert [r["msg"] for r in paused] == ["area 'quiet' is now paused"]
    assert paused[0]["level"] == "INFO" and paused[0]["ts"].endswith("+00:00")
    debug = unirs("--log-level", "WARNING", "areas", "resume", "quiet", env={"UNIRS_LOG_LEVEL": "INFO"})
    assert debug.stderr == ""  # the option beats the environment


def test_json_log_lines_keep_extra_fields_and_exceptions(capsys):
    import logging

    from core.logging import setup_logging

    setup_logging("INFO", "json")
    try:
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            logging.getLogger("unirs.test").exception("analysis %d failed", 7, extra={"analysis_id": 7})
        record = json.loads(capsys.readouterr().err.strip())
    finally:
        logging.getLogger().handlers.clear()
    assert record["msg"] == "analysis 7 failed" and record["level"] == "ERROR" and record["logger"] == "unirs.test"
    assert record["analysis_id"] == 7
    assert "ZeroDivisionError: division by zero" in record["exc_info"]


def test_doctor_fails_fast_on_an_unreachable_catalogue(database_url, tmp_path):
    # 127.0.0.1:1 refuses; nothing listens there. The check must not retry (five urllib3 warnings, ~30 s).
    proc = unirs("doctor", env={
        "UNIRS_CATALOGUES": '[{"name": "local", "url": "http://127.0.0.1:1/stac"}]',
        "UNIRS_BROKER_URL": "redis://127.0.0.1:1/0",
        "UNIRS_SMTP__OUTBOX_DIR": str(tmp_path / "outbox"),
    })
    assert proc.returncode == 1
    assert proc.stderr == "", proc.stderr  # no retry warnings, no traceback
    line = next(x for x in proc.stdout.splitlines() if "catalogue local" in x)
    assert line.split() == ["FAIL", "catalogue", "local", "cannot", "reach", "http://127.0.0.1:1/stac:", "Connection",
                            "refused"]


def test_serve_and_worker_take_h_for_help_like_every_other_command():
    for command, option in (("serve", "--port"), ("worker", "--queues")):
        proc = unirs(command, "-h")
        assert proc.returncode == 0 and option in proc.stdout, (command, proc.stderr)

"""`unirs-monitor doctor` reports what works and exactly what does not."""

import json

from click.testing import CliRunner

from core.config import get_settings
from monitor.cli import cli


def _doctor(monkeypatch, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["doctor", "--json"], catch_exceptions=False)
    finally:
        get_settings.cache_clear()
    return result.exit_code, {c["name"]: c for c in json.loads(result.stdout)}


def test_doctor_healthy_database_and_broken_pieces(database_url, monkeypatch, tmp_path):
    code, checks = _doctor(
        monkeypatch,
        UNIRS_DATABASE_URL=database_url,
        UNIRS_BROKER_URL="redis://127.0.0.1:1/0",  # nothing listens on port 1
        UNIRS_CATALOGUES='[{"name": "local", "url": "http://127.0.0.1:1/stac"}]',
        UNIRS_SMTP__OUTBOX_DIR=str(tmp_path / "outbox"),
        UNIRS_MODEL__WEIGHTS_PATH=str(tmp_path / "no-weights"),
    )
    assert code == 1
    assert checks["database"]["ok"] and "PostGIS 3" in checks["database"]["detail"]
    assert not checks["broker"]["ok"]
    assert not checks["catalogue local"]["ok"] and "127.0.0.1" in checks["catalogue local"]["detail"]
    assert checks["email"]["ok"] and "outbox" in checks["email"]["detail"]
    assert not checks["model"]["ok"] and "config.json is missing" in checks["model"]["detail"]
    assert checks["email links"]["ok"] and "no List-Unsubscribe header" in checks["email links"]["detail"]


def test_doctor_warns_when_email_links_cannot_be_signed(database_url, monkeypatch, tmp_path):
    base = {"UNIRS_DATABASE_URL": database_url, "UNIRS_SMTP__OUTBOX_DIR": str(tmp_path / "outbox"),
            "UNIRS_WEB__PUBLIC_URL": "https://monitor.example.org/"}
    _, checks = _doctor(monkeypatch, **base)
    links = checks["email links"]
    assert links["ok"] and links["warning"] and "UNIRS_WEB__SECRET" in links["detail"]
    _, checks = _doctor(monkeypatch, **base, UNIRS_WEB__SECRET="shared")
    assert not checks["email links"]["warning"]
    assert checks["email links"]["detail"].startswith("emails link to https://monitor.example.org (")


def test_doctor_unmigrated_database(monkeypatch):
    code, checks = _doctor(monkeypatch, UNIRS_DATABASE_URL="postgresql+psycopg://unirs:unirs@127.0.0.1:5432/postgres")
    assert code == 1
    assert not checks["database"]["ok"]
    assert "PostGIS is not installed" in checks["database"]["detail"] or "db upgrade" in checks["database"]["detail"]

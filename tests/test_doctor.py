"""`unirs-monitor doctor` reports what works and exactly what does not."""

import json
import uuid

from alembic.script import ScriptDirectory
from click.testing import CliRunner

from core.config import get_settings
from core.migrate import alembic_config
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
    assert checks["email sender"]["ok"] and checks["email sender"]["warning"]  # the demo sender
    assert checks["email sender"]["detail"].startswith(
        "emails are From UniRS Monitor <alerts@localhost>, the demo default (no smtp.sender configured): an "
        "@localhost sender is refused or junked by most mail servers")
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


def test_doctor_names_a_missing_postgis_and_an_unmigrated_schema(monkeypatch):
    """Two throw-away databases: one without PostGIS, one with PostGIS but no schema."""
    from devtools import dbadmin
    from tests.conftest import ADMIN_URL

    plain = dbadmin.with_dbname(ADMIN_URL, f"unirs_doctor_plain_{uuid.uuid4().hex[:8]}")
    dbadmin.create_database(plain)
    empty = dbadmin.create_scratch_database(ADMIN_URL, "unirs_doctor_empty")
    try:
        code, checks = _doctor(monkeypatch, UNIRS_DATABASE_URL=dbadmin.sqlalchemy_url(plain))
        assert code == 1 and not checks["database"]["ok"]
        assert "PostGIS is not installed in this database" in checks["database"]["detail"]
        code, checks = _doctor(monkeypatch, UNIRS_DATABASE_URL=dbadmin.sqlalchemy_url(empty))
        assert code == 1 and not checks["database"]["ok"]
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()  # the chain's end, not a file name
        assert f"schema at revision none, code expects {head}: run `unirs-monitor db upgrade`" in \
            checks["database"]["detail"]
    finally:
        dbadmin.drop_database(plain)
        dbadmin.drop_database(empty)


def test_doctor_requires_a_sender_to_send_and_warns_on_localhost(database_url, monkeypatch):
    base = {"UNIRS_DATABASE_URL": database_url, "UNIRS_SMTP__HOST": "127.0.0.1", "UNIRS_SMTP__PORT": "1"}
    monkeypatch.delenv("UNIRS_SMTP__SENDER", raising=False)
    code, checks = _doctor(monkeypatch, **base)
    assert code == 1 and not checks["email sender"]["ok"]
    assert checks["email sender"]["detail"] == (
        "SenderMissing: smtp.sender (UNIRS_SMTP__SENDER) is not set: no email is sent through 127.0.0.1 without a "
        "From address your mail server accepts; deliveries stay pending")
    _, checks = _doctor(monkeypatch, **base, UNIRS_SMTP__SENDER="Ops <ops@LOCALHOST>")
    assert checks["email sender"]["ok"] and checks["email sender"]["warning"]
    assert checks["email sender"]["detail"].startswith("emails are From Ops <ops@LOCALHOST>, configured: an @localhost")
    _, checks = _doctor(monkeypatch, **base, UNIRS_SMTP__SENDER="Forest watch <alerts@forest.example.org>")
    assert checks["email sender"] == {"name": "email sender", "ok": True, "warning": False,
                                      "detail": "emails are From Forest watch <alerts@forest.example.org>"}


def test_doctor_shows_a_broker_url_as_given_and_masks_only_a_real_password(worker_redis):
    from core.config import Settings
    from monitor.doctor import check_broker, masked_url

    # worker_redis has no password: the URL is shown as configured, with no made-up ':**@'.
    detail = check_broker(Settings(broker_url=worker_redis.url))
    assert detail.endswith(f" broker reachable at {worker_redis.url}")
    assert masked_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert masked_url("redis://bob@127.0.0.1:6379/0") == "redis://bob@127.0.0.1:6379/0"
    assert masked_url("redis://:s3cret@127.0.0.1:6379/0") == "redis://:**@127.0.0.1:6379/0"
    assert masked_url("amqp://guest:s3:cr@t@127.0.0.1:5672//") == "amqp://guest:**@127.0.0.1:5672//"

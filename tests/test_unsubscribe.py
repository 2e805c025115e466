"""Email links end to end: a real SMTP server (aiosmtpd) on loopback receives the alert, the test follows its
RFC 8058 one-click ``List-Unsubscribe`` link into the real web app (``unirs-monitor serve`` on 127.0.0.1),
and the next alert of the area reaches the other recipient only, the ledger saying why."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from datetime import UTC, datetime

import psycopg
import pytest
from shapely.geometry import box

from core.config import Settings
from core.db import session_scope
from core.models import Area
from monitor.reports import links, run_deliveries
from tests import factories as f
from tests.fixtures_mail import free_port, parts_of, start_smtp

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _settings(database_url: str, smtp_port: int, public_url: str, secret: str = "test-secret") -> Settings:
    return Settings(database_url=database_url,
                    smtp={"host": "127.0.0.1", "port": smtp_port, "timeout_seconds": 5,
                          "sender": "UniRS Monitor <alerts@monitor.example.org>"},
                    web={"public_url": public_url, "secret": secret, "basemap_url": ""})


def _http(url: str, data: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with OPENER.open(request, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _second_analysis(database_url: str, area_id: int) -> int:
    with session_scope(database_url) as session:
        area = session.get(Area, area_id)
        cat = f.catalogue(session)
        before = f.scene(session, cat, datetime(2020, 8, 29, 9, 40, tzinfo=UTC))
        after = f.scene(session, cat, datetime(2021, 8, 24, 9, 40, tzinfo=UTC))
        an = f.analysis(session, area, after, before)
        f.findings(session, an, regions=[(box(23.16, 46.56, 23.17, 46.565), "vegetation_loss", 2.5)])
        return an.id


@pytest.fixture
def smtp_server():
    port = free_port()
    controller, handler = start_smtp(port)
    handler.port = port
    yield handler
    controller.stop()


def test_one_click_unsubscribe_stops_alerts_to_that_recipient_only(served_app, smtp_server):
    settings = _settings(served_app.database_url, smtp_server.port, served_app.url)
    with session_scope(settings) as session:
        an = f.world(session, recipients=["Ana@example.org", "bob@example.org"])
        area_id, first = an.area_id, an.id

    assert run_deliveries(settings)["sent"] == 2
    mails = {rcpt[0]: msg for rcpt, msg in smtp_server.parsed()}
    ana = mails["Ana@example.org"]
    header = ana["List-Unsubscribe"]
    assert ana["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    (url,) = re.fullmatch(r"<([^>]+)>", header).groups()
    assert url.startswith(f"{served_app.url}/unsubscribe?token=")
    assert "ana" not in header.lower() and "example.org" not in header  # no address in the header or link
    assert mails["bob@example.org"]["List-Unsubscribe"] != header  # per recipient

    p = parts_of(ana)
    assert f'href="{served_app.url}/analyses/{first}"' in p["html"]  # the map button opens the analysis page
    assert f'href="{served_app.url}/areas/{area_id}"' in p["html"] and ">Manage alerts<" in p["html"]
    assert f'href="{url}"' in p["html"]
    assert f"Unsubscribe from this area: {url}" in p["text"]
    assert f"Map: {served_app.url}/analyses/{first}" in p["text"]
    assert "openstreetmap" not in p["html"]

    status, page = _http(url)  # GET: a confirmation page, nothing changed yet
    assert status == 200 and "Apuseni forest" in page and "a•••@example.org" in page
    assert "Ana@example.org" not in page and "Unsubscribe from this area" in page
    with psycopg.connect(served_app.database_url.replace("+psycopg", "")) as conn:
        assert conn.execute("SELECT count(*) FROM unsubscribes").fetchone()[0] == 0

    forged = url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB")
    assert _http(forged, b"List-Unsubscribe=One-Click")[0] == 400
    status, page = _http(url, b"List-Unsubscribe=One-Click")  # what a mail provider POSTs (RFC 8058 §3.2)
    assert status == 200 and "receives no more emails about this area" in page
    assert _http(url, b"List-Unsubscribe=One-Click")[0] == 200  # a repeated click is harmless
    with psycopg.connect(served_app.database_url.replace("+psycopg", "")) as conn:
        assert conn.execute("SELECT area_id, recipient FROM unsubscribes").fetchall() == [(area_id, "ana@example.org")]

    second = _second_analysis(served_app.database_url, area_id)
    counts = run_deliveries(settings)
    assert (counts["alerts_queued"], counts["sent"], counts["unsubscribed"]) == (2, 1, 1)
    assert [rcpt for rcpt, _ in smtp_server.messages] == [["Ana@example.org"], ["bob@example.org"],
                                                          ["bob@example.org"]]
    with psycopg.connect(served_app.database_url.replace("+psycopg", "")) as conn:
        rows = conn.execute("SELECT recipient, status::text, skip_reason, attempts FROM deliveries "
                            "WHERE analysis_id = %s ORDER BY recipient", (second,)).fetchall()
    assert rows == [("Ana@example.org", "skipped", "unsubscribed", 0), ("bob@example.org", "sent", None, 1)]
    assert run_deliveries(settings)["sent"] == 0  # skipped stays skipped

    status, page = _http(url.replace("/unsubscribe?", "/unsubscribe/undo?"), b"")
    assert status == 200 and "Subscribed again" in page
    with psycopg.connect(served_app.database_url.replace("+psycopg", "")) as conn:
        assert conn.execute("SELECT count(*) FROM unsubscribes").fetchone()[0] == 0


def test_tokens_are_bound_to_the_secret_the_area_and_the_recipient(db):
    with session_scope(db) as session:
        area = f.area(session, recipients=["ana@example.org", "bob@example.org"])
        other = f.area(session, name="Other", recipients=["ana@example.org"])
        token = links.unsubscribe_token("s3cret", area.id, "ANA@example.org ")
        assert links.resolve_token(session, "s3cret", token)[1] == "ana@example.org"
        assert links.resolve_token(session, "s3cret", token)[0].id == area.id
        with pytest.raises(links.InvalidToken, match="not valid"):
            links.resolve_token(session, "another secret", token)
        with pytest.raises(links.InvalidToken, match="no longer exists"):  # recipient not on that area
            links.resolve_token(session, "s3cret", links.unsubscribe_token("s3cret", other.id, "bob@example.org"))
        area.recipients = ["bob@example.org"]
        session.flush()
        with pytest.raises(links.InvalidToken, match="no longer exists"):  # removed since the email was sent
            links.resolve_token(session, "s3cret", token)
    web = Settings(web={"public_url": "https://monitor.example.org/", "secret": None}).web
    assert links.email_links(web, 1, "ana@example.org") is None  # no shared secret: no links at all
    assert links.analysis_page_url(web, 7) == "https://monitor.example.org/analyses/7"


def test_without_a_public_url_emails_keep_the_cli_footer_and_no_header(db, smtp_server):
    settings = Settings(database_url=db, smtp={"host": "127.0.0.1", "port": smtp_server.port, "timeout_seconds": 5,
                                               "sender": "UniRS Monitor <alerts@monitor.example.org>"})
    with session_scope(settings) as session:
        f.world(session, recipients=["ana@example.org"])
    assert run_deliveries(settings)["sent"] == 1
    ((_, msg),) = smtp_server.parsed()
    assert msg["List-Unsubscribe"] is None
    p = parts_of(msg)
    assert "unirs-monitor areas update" in p["html"] and "https://www.openstreetmap.org/?mlat=" in p["html"]

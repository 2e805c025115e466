"""Webhooks end to end: a real HTTPS receiver on 127.0.0.1 (a throw-away certificate from openssl) verifies
every request with the `standardwebhooks` library and keeps what it got; endpoints are added through the real
REST API and CLI, refused by the URL policy where they must be, and an event reaches its receiver exactly once
per alert — across retries and across a sender process killed (by PID) in the middle of the request."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from standardwebhooks import Webhook, WebhookVerificationError

from core.config import Settings, get_settings
from core.db import session_scope
from monitor.cli import cli
from monitor.reports import run_deliveries
from monitor.reports.webhooks import add_endpoint
from tests import factories as f
from tests.fixtures_web import web_settings

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Receiver:
    """What the HTTPS receiver saw: every request (verified or not) and the events it accepted, once per id."""

    url: str
    ca_file: Path
    secret: str | None = None
    requests: list[dict] = field(default_factory=list)
    events: dict[str, dict] = field(default_factory=dict)  # webhook-id → payload (receivers deduplicate)
    replies: list[int] = field(default_factory=list)  # statuses to answer first (then 200)
    hold: threading.Event | None = None  # set: the next request waits for it before answering
    got_request: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)


def _certificate(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


@pytest.fixture
def receiver(tmp_path):
    key, cert = _certificate(tmp_path)
    state = Receiver(url="", ca_file=cert)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                payload = Webhook(state.secret).verify(body, headers)
                verified = True
            except WebhookVerificationError:
                payload, verified = None, False
            state.requests.append({"path": self.path, "headers": headers, "body": body, "verified": verified})
            state.got_request.set()
            hold, state.hold = state.hold, None
            if hold is not None:
                hold.wait(120)
            status = 401 if not verified else state.replies.pop(0) if state.replies else 200
            if status == 200:
                state.events.setdefault(headers["webhook-id"], payload)
            try:
                self.send_response(status)
                if 300 <= status < 400:  # somewhere else on this receiver: a follow would show up as a request
                    self.send_header("Location", state.url.replace("/hooks/unirs", "/elsewhere"))
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:
                pass  # the sender is gone (killed by the test)
            state.answered.set()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.url = f"https://127.0.0.1:{server.server_address[1]}/hooks/unirs"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    if state.hold is not None:
        state.hold.set()
    server.shutdown()
    server.server_close()


def _settings(database_url: str, receiver: Receiver, **webhooks) -> Settings:
    return Settings(database_url=database_url, web={"public_url": "https://monitor.example.org", "secret": "s"},
                    webhooks={"allowed_private_hosts": ["127.0.0.1"], "ca_file": str(receiver.ca_file),
                              **webhooks})


def _rows(database_url: str) -> list[tuple]:
    with psycopg.connect(database_url.replace("+psycopg", "")) as conn:
        return conn.execute("SELECT recipient, status::text, attempts, last_error FROM deliveries "
                            "WHERE webhook_id IS NOT NULL ORDER BY id").fetchall()


def _alert_area(database_url: str, owner_id: int | None = None) -> tuple[int, int]:
    """An area without email recipients (webhooks only) and one alerting analysis: (area id, analysis id)."""
    with session_scope(database_url) as session:
        an = f.world(session, recipients=())
        if owner_id is not None:
            an.area.owner_id = owner_id
        return an.area_id, an.id


def test_endpoints_through_the_api_with_the_url_policy(web_db, alice, bob, receiver):
    area_id, _ = _alert_area(web_db, alice.id)
    from web.app import create_app

    settings = web_settings(web_db, secret="s")
    settings.webhooks.allowed_private_hosts = ["127.0.0.1"]
    with TestClient(create_app(settings)) as client:
        def post(url, headers=None):
            return client.post(f"/api/areas/{area_id}/webhooks", json={"url": url}, headers=headers or alice.auth())

        made = post(receiver.url)
        assert made.status_code == 201 and made.json()["secret"].startswith("whsec_")
        assert made.json()["url"] == receiver.url
        refused = {
            "https://127.0.0.2/hook": "loopback",  # not allow-listed: loopback is refused
            "https://169.254.169.254/latest/meta-data": "link-local",
            "https://10.1.2.3/hook": "private",
            "http://127.0.0.1/hook": "scheme 'http' is not allowed",
            "https://user:pw@127.0.0.1/hook": "credentials",
            receiver.url: "already has the webhook",
        }
        for url, reason in refused.items():
            answer = post(url)
            assert answer.status_code == 422 and reason in answer.json()["detail"], (url, answer.json())
        assert post(receiver.url, bob.auth()).status_code == 404  # not bob's area
        assert client.post(f"/api/areas/{area_id}/webhooks", json={"url": receiver.url}).status_code == 401
        assert post("https://hooks.example.org/x", alice.auth(read_only=True)).status_code == 403
        listed = client.get(f"/api/areas/{area_id}/webhooks", headers=alice.auth(read_only=True)).json()
        assert [(w["id"], w["url"]) for w in listed] == [(made.json()["id"], receiver.url)]
        assert "secret" not in listed[0]
        assert client.get(f"/api/areas/{area_id}/webhooks", headers=bob.auth()).status_code == 404
        hook = f"/api/areas/{area_id}/webhooks/{made.json()['id']}"
        assert client.patch(hook, json={"enabled": False}, headers=bob.auth()).status_code == 404
        assert client.patch(hook, json={"enabled": False}, headers=alice.auth(read_only=True)).status_code == 403
        assert client.patch(hook, json={"enabled": "nope"}, headers=alice.auth()).status_code == 422
        off = client.patch(hook, json={"enabled": False}, headers=alice.auth())
        assert off.status_code == 200 and off.json()["enabled"] is False and "secret" not in off.json()
        assert [w["enabled"] for w in client.get(f"/api/areas/{area_id}/webhooks", headers=alice.auth()).json()] \
            == [False]
        assert client.patch(hook, json={"enabled": True}, headers=alice.auth()).json()["enabled"] is True
        assert client.delete(f"/api/areas/{area_id}/webhooks/{made.json()['id']}", headers=bob.auth()).status_code \
            == 404
        assert client.delete(f"/api/areas/{area_id}/webhooks/{made.json()['id']}", headers=alice.auth()).status_code \
            == 204
        assert client.get(f"/api/areas/{area_id}/webhooks", headers=alice.auth()).json() == []


def test_endpoints_through_the_cli(db, receiver, monkeypatch):
    area_id, _ = _alert_area(db)
    monkeypatch.setenv("UNIRS_WEBHOOKS__ALLOWED_PRIVATE_HOSTS", '["127.0.0.1"]')
    get_settings.cache_clear()
    runner = CliRunner()
    added = runner.invoke(cli, ["webhooks", "add", "Apuseni forest", receiver.url], catch_exceptions=False)
    assert added.exit_code == 0 and "signing secret (shown only now): whsec_" in added.output
    refused = runner.invoke(cli, ["webhooks", "add", str(area_id), "https://127.0.0.2/hook"])
    assert refused.exit_code == 1 and "loopback address" in refused.output and "allowed_private_hosts" in refused.output
    listed = runner.invoke(cli, ["webhooks", "list", "--json"], catch_exceptions=False)
    (row,) = json.loads(listed.output)
    assert (row["area_id"], row["url"], row["enabled"]) == (area_id, receiver.url, True) and "secret" not in row
    off = runner.invoke(cli, ["webhooks", "disable", str(row["id"])], catch_exceptions=False)
    assert off.exit_code == 0 and off.output == f"webhook {row['id']} disabled\n"
    assert runner.invoke(cli, ["webhooks", "disable", str(row["id"])]).output.endswith("was already disabled\n")
    assert f"{row['id']}\tarea {area_id}\tdisabled\t" in runner.invoke(cli, ["webhooks", "list"]).output
    assert runner.invoke(cli, ["webhooks", "enable", str(row["id"])]).output == f"webhook {row['id']} enabled\n"
    missing = runner.invoke(cli, ["webhooks", "enable", "999999"])
    assert missing.exit_code == 1 and "no webhook 999999" in missing.output
    assert runner.invoke(cli, ["webhooks", "remove", str(row["id"])]).exit_code == 0
    assert "no webhook endpoints" in runner.invoke(cli, ["webhooks", "list"]).output
    get_settings.cache_clear()


def test_one_signed_event_per_alert_with_retries(db, receiver):
    area_id, analysis_id = _alert_area(db)
    settings = _settings(db, receiver)
    with session_scope(settings) as session:
        from core.models import Area

        receiver.secret = add_endpoint(session, session.get(Area, area_id), receiver.url, settings.webhooks).secret
    receiver.replies = [503]
    t0 = datetime.now(UTC)
    counts = run_deliveries(settings, now=t0)
    assert (counts["webhooks_queued"], counts["webhooks_retry"], counts["sent"]) == (1, 1, 0)
    ((recipient, status, attempts, error),) = _rows(db)
    assert (status, attempts, error) == ("pending", 1, "HTTP 503 Service Unavailable")
    assert run_deliveries(settings, now=t0 + timedelta(seconds=30))["webhooks_sent"] == 0  # backoff: 60 s
    assert run_deliveries(settings, now=t0 + timedelta(seconds=61))["webhooks_sent"] == 1
    assert run_deliveries(settings, now=t0 + timedelta(days=1))["webhooks_sent"] == 0

    assert len(receiver.requests) == 2 and all(r["verified"] for r in receiver.requests)
    assert receiver.requests[0]["headers"]["webhook-id"] == receiver.requests[1]["headers"]["webhook-id"]
    assert receiver.requests[0]["body"] == receiver.requests[1]["body"]
    ((event_id, event),) = receiver.events.items()
    assert event_id.startswith("msg_") and event["type"] == "alert.created"
    data = event["data"]
    assert (data["analysis_id"], data["area"]) == (analysis_id, {"id": area_id, "name": "Apuseni forest"})
    assert data["headline"] == "Forest loss 4.30 ha" and data["alert_hectares"] == pytest.approx(4.3)
    assert data["url"] == f"https://monitor.example.org/analyses/{analysis_id}"
    assert [ft["properties"]["change_class"] for ft in data["regions"]["features"]] == [
        "vegetation_loss", "new_built_up_or_bare"]
    assert _rows(db)[0][1:3] == ("sent", 2) and recipient.startswith("webhook:")

    # A request that does not carry a valid signature is refused by the receiver: prove the check is real.
    forged = receiver.requests[0]["headers"] | {"webhook-signature": "v1,AAAA"}
    with pytest.raises(WebhookVerificationError):
        Webhook(receiver.secret).verify(receiver.requests[0]["body"], forged)


def test_a_disabled_endpoint_gets_no_requests(db, receiver):
    """Events of a disabled endpoint end skipped with the reason (like emails to unsubscribed recipients), also
    one queued while it was enabled; enabling it again sends new alerts only, never the skipped ones."""
    area_id, first = _alert_area(db)
    settings = _settings(db, receiver)
    from core.models import Area, Delivery, WebhookEndpoint
    from monitor.reports.webhooks import create_webhook_deliveries, set_enabled

    with session_scope(settings) as session:
        area = session.get(Area, area_id)
        endpoint = add_endpoint(session, area, receiver.url, settings.webhooks)
        receiver.secret, endpoint_id = endpoint.secret, endpoint.id
        assert create_webhook_deliveries(session, datetime.now(UTC), settings) == 1  # queued while enabled
        assert set_enabled(session, endpoint, False) and not set_enabled(session, endpoint, False)
        an = f.analysis(session, area, f.scene(session, f.catalogue(session), datetime(2021, 8, 3, 9, 40, tzinfo=UTC)),
                        None)
        f.findings(session, an)
        second = an.id
    counts = run_deliveries(settings)
    assert (counts["webhooks_queued"], counts["webhooks_disabled"], counts["webhooks_sent"]) == (1, 2, 0)
    assert receiver.requests == []

    def ledger() -> dict[int, tuple]:
        with session_scope(settings) as session:
            return {d.analysis_id: (d.status.value, d.skip_reason, d.attempts)
                    for d in session.query(Delivery).filter(Delivery.webhook_id == endpoint_id)}

    assert ledger() == {first: ("skipped", "webhook disabled", 0), second: ("skipped", "webhook disabled", 0)}
    with session_scope(settings) as session:
        set_enabled(session, session.get(WebhookEndpoint, endpoint_id), True)
        third = f.analysis(session, session.get(Area, area_id),
                           f.scene(session, f.catalogue(session), datetime(2021, 9, 2, 9, 40, tzinfo=UTC)), None)
        f.findings(session, third)
        third = third.id
    counts = run_deliveries(settings)
    assert (counts["webhooks_queued"], counts["webhooks_sent"], counts["webhooks_disabled"]) == (1, 1, 0)
    assert [e["data"]["analysis_id"] for e in receiver.events.values()] == [third]
    assert ledger()[first] == ("skipped", "webhook disabled", 0) and ledger()[third][0] == "sent"


@pytest.mark.parametrize(("reply", "error"), [
    (410, "HTTP 410 Gone"),
    (302, "HTTP 302 Found (redirects are not followed; register the final URL)"),
])
def test_4xx_and_redirects_give_up_at_once(db, receiver, reply, error):
    area_id, _ = _alert_area(db)
    settings = _settings(db, receiver)
    with session_scope(settings) as session:
        from core.models import Area

        receiver.secret = add_endpoint(session, session.get(Area, area_id), receiver.url, settings.webhooks).secret
    receiver.replies = [reply]
    assert run_deliveries(settings)["webhooks_failed"] == 1
    assert _rows(db)[0][1:] == ("failed", 1, error)
    assert [r["path"] for r in receiver.requests] == ["/hooks/unirs"]  # the redirect was not followed


def test_the_certificate_is_checked_against_the_url_host(db, receiver):
    """``localhost`` is allowed here but the receiver's certificate names only 127.0.0.1: refused, retried."""
    area_id, _ = _alert_area(db)
    settings = _settings(db, receiver, allowed_private_hosts=["localhost", "127.0.0.1"])
    url = receiver.url.replace("127.0.0.1", "localhost")
    with session_scope(settings) as session:
        from core.models import Area

        add_endpoint(session, session.get(Area, area_id), url, settings.webhooks)
    assert run_deliveries(settings)["webhooks_retry"] == 1
    ((_, status, attempts, error),) = _rows(db)
    assert (status, attempts) == ("pending", 1) and "CERTIFICATE_VERIFY_FAILED" in error and "localhost" in error
    assert receiver.requests == []


def test_a_sender_killed_mid_request_delivers_the_event_exactly_once(db, receiver, tmp_path):
    area_id, analysis_id = _alert_area(db)
    settings = _settings(db, receiver, timeout_seconds=120)
    with session_scope(settings) as session:
        from core.models import Area

        receiver.secret = add_endpoint(session, session.get(Area, area_id), receiver.url, settings.webhooks).secret
    receiver.hold = held = threading.Event()  # the receiver reads the request, then keeps the sender waiting
    env = {**os.environ, "UNIRS_DATABASE_URL": db, "UNIRS_WEBHOOKS__ALLOWED_PRIVATE_HOSTS": '["127.0.0.1"]',
           "UNIRS_WEBHOOKS__CA_FILE": str(receiver.ca_file), "UNIRS_WEBHOOKS__TIMEOUT_SECONDS": "120",
           "UNIRS_WEB__PUBLIC_URL": settings.web.public_url, "UNIRS_WEB__SECRET": settings.web.secret,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = "from core.config import get_settings\nfrom monitor.reports import run_deliveries\n" \
           "run_deliveries(get_settings())\n"
    with open(tmp_path / "sender.log", "wb") as log:
        sender = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not receiver.got_request.wait(0.5):
            assert sender.poll() is None, (tmp_path / "sender.log").read_text()
        os.kill(sender.pid, signal.SIGKILL)  # the process this test started, by its PID
        sender.wait(30)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    assert sender.returncode == -signal.SIGKILL
    held.set()  # the receiver processes the event and answers into a closed connection
    receiver.answered.wait(60)
    assert _rows(db)[0][1] == "sending" and list(receiver.events) == [receiver.requests[0]["headers"]["webhook-id"]]

    assert run_deliveries(settings)["webhooks_sent"] == 0  # the claim's lease has not expired
    later = datetime.now(UTC) + timedelta(seconds=settings.webhooks.lease_seconds + 1)
    counts = run_deliveries(settings, now=later)
    assert counts["webhooks_recovered_resent"] == 1 and counts["webhooks_sent"] == 1
    assert run_deliveries(settings, now=later + timedelta(days=1))["webhooks_sent"] == 0
    first, second = receiver.requests
    assert first["verified"] and second["verified"]
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] and first["body"] == second["body"]
    ((event_id, event),) = receiver.events.items()  # one event: the receiver dropped the repeat by its id
    assert event["data"]["analysis_id"] == analysis_id and event_id == first["headers"]["webhook-id"]
    assert _rows(db)[0][1:3] == ("sent", 2)


@pytest.mark.parametrize(("url", "reason"), [
    ("https://[::1]/hook", "loopback"),
    ("https://2130706433/hook", "loopback"),  # 127.0.0.1 as curl reads a bare number
    ("https://127.1/hook", "loopback"),
    ("https://localhost/hook", "loopback"),  # resolved: every address it names is checked
    ("https://[::ffff:169.254.169.254]/hook", "link-local"),
    ("https://192.168.1.20/hook", "private"),
    ("https://0.0.0.0/hook", "unspecified"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("https://127.0.0.1/a b", "whitespace"),
])
def test_webhook_url_policy_refuses_non_public_targets(url, reason):
    from eo.security import HrefRefused, check_webhook_url

    policy = Settings(webhooks={"allowed_private_hosts": ["127.0.0.1"]}).webhooks
    with pytest.raises(HrefRefused, match=reason):
        check_webhook_url(url, policy)
    assert check_webhook_url("https://127.0.0.1:8443/hook", policy) == "https://127.0.0.1:8443/hook"
    assert check_webhook_url("https://93.184.215.14/hook", policy, resolve=False) == "https://93.184.215.14/hook"


def test_the_digest_words_a_failed_webhook_as_a_webhook_with_its_host_only(db, receiver):
    """A webhook event that failed for good is in the area's digest as WEBHOOK FAILED to the endpoint's host:
    never its URL (the path holds a token here) nor its secret; a failed email keeps the email wording."""
    from core.models import Area, Delivery, DeliveryStatus, Digest
    from monitor.reports.digest import load_digest_report
    from monitor.reports.render import render_digest

    token_url = receiver.url + "/T0KEN-b3arer"
    settings = _settings(db, receiver)
    with session_scope(settings) as session:
        an = f.world(session, recipients=("ana@example.org",), frequency="daily")
        endpoint = add_endpoint(session, session.get(Area, an.area_id), token_url, settings.webhooks)
        area_id, secret = an.area_id, endpoint.secret
    # Sent without the allow-list entry, the event is refused by the URL policy, whose message names the URL.
    refused = _settings(db, receiver)
    refused.webhooks.allowed_private_hosts = []
    assert run_deliveries(refused)["webhooks_failed"] == 1
    ((_, status, _, error),) = _rows(db)
    assert status == "failed" and "T0KEN" in error  # the ledger keeps the whole error for the operator
    with session_scope(settings) as session:
        session.add(Delivery(delivery_key=f"analysis:{an.id}", recipient="bo@example.org", analysis_id=an.id,
                             message_id="<delivery-x@unirs>", status=DeliveryStatus.FAILED, attempts=3,
                             last_error="550 mailbox unavailable"))
        now = datetime.now(UTC)
        digest = Digest(area_id=area_id, period_start=now - timedelta(days=1), period_end=now)
        session.add(digest)
        session.flush()
        email = render_digest(load_digest_report(session, digest.id, settings), "ana@example.org")
    text, html = email.text, email.html
    (line,) = [ln for ln in text.splitlines() if "WEBHOOK FAILED" in ln]
    endpoint_ref = f"to webhook {endpoint.id} at 127.0.0.1: refused by the webhook URL policy"
    assert endpoint_ref in line and "https://127.0.0.1/…" in line, line
    assert "EMAIL FAILED: delivery" in text and "to bo@example.org: 550 mailbox unavailable" in text
    assert "EMAIL FAILED" not in line and "to webhook:" not in text
    for body in (text, html):
        assert "T0KEN" not in body and secret not in body and receiver.url not in body and "/hooks/unirs" not in body
    assert "Emails and webhook events not delivered" in html and f"webhook {endpoint.id} at 127.0.0.1" in html
    assert "1 email not delivered; 1 webhook event not delivered" in html

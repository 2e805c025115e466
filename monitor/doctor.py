"""`unirs-monitor doctor`: check configuration and connectivity and say exactly what is wrong."""

from __future__ import annotations

import json
import smtplib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # annotations only: importing the settings module is slow, and `-h` needs none
    from core.config import Settings


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False  # works, but probably not as intended (exit status stays 0)


class DoctorWarning(Exception):
    """A check's finding that is not a failure."""


def _check(name: str, fn: Callable[[], str]) -> Check:
    try:
        return Check(name, True, fn())
    except DoctorWarning as warn:
        return Check(name, True, str(warn), warning=True)
    except Exception as exc:  # every failure becomes a line of the report, never a traceback
        # The checks raise RuntimeError with a sentence of their own; a class name is noise there, but it
        # is the useful part of anything unexpected (OperationalError, SMTPAuthenticationError …).
        text = str(exc) if type(exc) is RuntimeError and str(exc) else f"{type(exc).__name__}: {exc}"
        return Check(name, False, text.strip())


def check_database(settings: Settings) -> str:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import text

    from core.db import get_engine
    from core.migrate import alembic_config

    with get_engine(settings).connect() as conn:
        pg = conn.execute(text("SHOW server_version")).scalar()
        try:
            postgis = conn.execute(text("SELECT postgis_lib_version()")).scalar()
        except Exception:
            raise RuntimeError(f"PostgreSQL {pg} reachable but PostGIS is not installed in this database "
                               "(CREATE EXTENSION postgis; or run scripts/setup-services)") from None
        conn.rollback()
        current = MigrationContext.configure(conn).get_current_revision()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if current != head:
        raise RuntimeError(
            f"schema at revision {current or 'none'}, code expects {head}: run `unirs-monitor db upgrade`"
        )
    return f"PostgreSQL {pg}, PostGIS {postgis}, schema at {head}"


def masked_url(url: str) -> str:
    """``url`` as given, its password (if it has one) replaced by ``**``; the user name is kept
    (kombu's ``maybe_sanitize_url``). Not ``Connection.as_uri()``: that writes ``:**@`` into every URL, so a
    broker without a password looked like one with a password (``redis://:**@127.0.0.1:6379/0``)."""
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url)


def check_broker(settings: Settings) -> str:
    from kombu import Connection

    with Connection(settings.broker_url, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=1, timeout=5)
        return f"{conn.transport_cls} broker reachable at {masked_url(settings.broker_url)}"


# A reachability check answers in seconds: no retries (polling has its own), a short connect timeout.
CONNECT_TIMEOUT_SECONDS = 5.0


def unreachable_reason(exc: BaseException) -> str:
    """The innermost cause of a failed HTTP request, in a few words ("Connection refused", "timed out")."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    reason = str(exc)
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.strerror:
            return cur.strerror
        if isinstance(cur, TimeoutError) or "timed out" in str(cur).lower():
            reason = "timed out"
        linked = (cur.__cause__, cur.__context__, getattr(cur, "reason", None))
        stack += [e for e in linked if isinstance(e, BaseException)]
        stack += [a for a in getattr(cur, "args", ()) if isinstance(a, BaseException)]
    return reason.splitlines()[0] if reason else type(exc).__name__


def check_catalogue(cat) -> str:
    import requests
    from pystac_client import Client
    from pystac_client.exceptions import APIError
    from pystac_client.stac_api_io import StacApiIO

    timeout = (min(CONNECT_TIMEOUT_SECONDS, cat.timeout_seconds), cat.timeout_seconds)
    try:
        client = Client.open(cat.url, stac_io=StacApiIO(timeout=timeout, max_retries=0), timeout=timeout)
    except (requests.RequestException, APIError) as exc:
        raise RuntimeError(f"cannot reach {cat.url}: {unreachable_reason(exc)}") from None
    missing = [c for c in cat.collections if client.get_collection(c) is None]
    if missing:
        raise RuntimeError(f"collections {missing} not found at {cat.url}")
    if not client.conforms_to("ITEM_SEARCH"):
        raise RuntimeError(f"{cat.url} does not conform to STAC API item search")
    return f"{cat.url}: search OK, collections {cat.collections}"


def check_smtp(settings: Settings) -> str:
    smtp = settings.smtp
    if not smtp.host:
        outbox = Path(smtp.outbox_dir)
        outbox.mkdir(parents=True, exist_ok=True)
        probe = outbox / ".doctor-write-test"
        probe.write_text("ok")
        probe.unlink()
        return f"no SMTP host configured: emails are written to {outbox.resolve()} (UNIRS_SMTP__HOST to send)"
    cls = smtplib.SMTP_SSL if smtp.ssl else smtplib.SMTP
    with cls(smtp.host, smtp.port, timeout=smtp.timeout_seconds) as server:
        server.ehlo()
        if smtp.starttls:
            server.starttls()
            server.ehlo()
        if smtp.username:
            server.login(smtp.username, smtp.password or "")
        return f"SMTP {smtp.host}:{smtp.port} accepted EHLO{' + STARTTLS' if smtp.starttls else ''}"


def check_web_links(settings: Settings) -> str:
    """Links in emails (analysis page, manage alerts, RFC 8058 one-click unsubscribe) need the web app's
    public URL and a secret shared by the scheduler and every web replica."""
    web = settings.web
    if not web.public_url:
        return ("no web.public_url: emails carry no web links and no List-Unsubscribe header "
                "(UNIRS_WEB__PUBLIC_URL and UNIRS_WEB__SECRET when the web app runs)")
    if not web.secret:
        raise DoctorWarning(f"web.public_url is {web.public_url} but web.secret is unset: emails carry no unsubscribe "
                            "links and each process signs sessions with its own random key (set UNIRS_WEB__SECRET, "
                            "the same for the scheduler and every web replica)")
    return f"emails link to {web.public_url.rstrip('/')} (analysis pages, manage alerts, one-click unsubscribe)"


def check_model(settings: Settings, load: bool) -> str:
    path = settings.model.weights_path
    if path is None:
        return "no UniRS weights configured: analyses use the spectral analyser only (UNIRS_MODEL__WEIGHTS_PATH)"
    path = Path(path)
    for sub in ("config.json", "llm", "vision_tower", "mm_projector"):
        if not (path / sub).exists():
            raise FileNotFoundError(f"{path / sub} is missing: expected a UniRS/VILA checkpoint directory")
    json.loads((path / "config.json").read_text())
    if not load:
        return f"checkpoint layout OK at {path} (use --load-model to load it)"
    from model import UniRS

    model = UniRS.from_pretrained(path, device=settings.model.device)
    n = sum(p.numel() for p in model.parameters())
    return f"loaded {path} ({n / 1e6:.1f} M parameters)"


def check_sender(settings: Settings) -> str:
    """The From address: required with an SMTP host; an @localhost one is a warning (mail servers refuse or
    junk it, and replies go nowhere)."""
    from email.utils import parseaddr

    sender = settings.smtp.from_address()  # SenderMissing with a host and no sender: a failure
    address = parseaddr(sender)[1] or sender
    if address.rpartition("@")[2].lower() in ("localhost", "localhost.localdomain"):
        configured = "configured" if settings.smtp.sender else "the demo default (no smtp.sender configured)"
        raise DoctorWarning(f"emails are From {sender}, {configured}: an @localhost sender is refused or junked by "
                            "most mail servers; set UNIRS_SMTP__SENDER to an address of your domain")
    return f"emails are From {sender}"


def check_areas(settings: Settings) -> str:
    """Active areas, and the ones that alert nobody (a warning: they are watched, their findings stored)."""
    from core.db import session_scope
    from monitor import areas as svc

    with session_scope(settings) as session:
        active = svc.list_areas(session, "active")
        silent = [a.name for a in active if svc.alerts_nobody(a)]
    if not active:
        return "no active areas yet: add one with `unirs-monitor areas add FILE --name NAME --recipient EMAIL`"
    if silent:
        raise DoctorWarning(f"{len(silent)} of {len(active)} active area(s) send alerts to nobody: "
                       f"{', '.join(map(repr, silent))} (`unirs-monitor areas update NAME --recipient EMAIL`)")
    return f"{len(active)} active area(s), each with a recipient"


#: Failed observations this recent are reported by ``doctor`` (older ones are history).
FAILED_OBSERVATIONS_DAYS = 7


def check_observations(settings: Settings) -> str:
    """Observations waiting on a worker that never takes their task (sent
    :data:`core.observations.UNSTARTED_WARN_SENDS` times or more, none started: is a ``cpu`` worker running?),
    then failed observations of active areas in the last week (a warning: those acquisitions are never
    paired) with the newest one's acquisition, area and reason."""
    from sqlalchemy import text

    from core.db import session_scope
    from core.observations import QUEUE, UNSTARTED_WARN_SENDS

    with session_scope(settings) as session:
        unstarted = session.execute(text("""
            SELECT count(*) AS n, max(o.dispatches) AS sends FROM observations o JOIN areas a ON a.id = o.area_id
             WHERE o.status = 'pending' AND o.computed_at IS NULL AND a.status = 'active'
               AND o.dispatches >= :warn"""), {"warn": UNSTARTED_WARN_SENDS}).one()
        rows = session.execute(text("""
            SELECT q.key, a.name, o.reason, count(*) OVER () AS n FROM observations o
              JOIN areas a ON a.id = o.area_id JOIN acquisitions q ON q.id = o.acquisition_id
             WHERE o.status = 'failed' AND a.status = 'active' AND o.computed_at > now() - make_interval(days => :d)
             ORDER BY o.computed_at DESC, q.key, a.name LIMIT 1"""), {"d": FAILED_OBSERVATIONS_DAYS}).all()
    if unstarted.n:
        raise DoctorWarning(f"{unstarted.n} observation(s) sent up to {unstarted.sends} times, never started by a "
                            f"worker: is a worker consuming the '{QUEUE.value}' queue? (re-sent with a doubling "
                            "delay; nothing is lost)")
    if not rows:
        return f"no failed observations in the last {FAILED_OBSERVATIONS_DAYS} days"
    r = rows[0]
    raise DoctorWarning(f"{r.n} failed observation(s) in the last {FAILED_OBSERVATIONS_DAYS} days (not paired); "
                        f"newest: acquisition {r.key} over {r.name!r}: {r.reason}")


def check_analyses(settings: Settings) -> str:
    """Queued analyses whose task was published :data:`core.observations.UNSTARTED_WARN_SENDS` times or more
    since their last claim, none claimed (a warning naming the queue: a ``gpu`` queue without a GPU worker is
    the usual cause; they are re-sent with a doubling delay and run once a worker takes the queue)."""
    from sqlalchemy import text

    from core.db import session_scope
    from core.jobs import queue_for
    from core.observations import UNSTARTED_WARN_SENDS

    with session_scope(settings) as session:
        rows = session.execute(text("""
            SELECT analyser, count(*) AS n, max(dispatches) AS sends FROM analyses
             WHERE status = 'queued' AND dispatches >= :warn GROUP BY analyser"""),
            {"warn": UNSTARTED_WARN_SENDS}).all()
    if not rows:
        return "no queued analysis waiting on a worker"
    by_queue: dict[str, tuple[int, int]] = {}
    for r in rows:
        n, sends = by_queue.get(queue_for(r.analyser).value, (0, 0))
        by_queue[queue_for(r.analyser).value] = (n + r.n, max(sends, r.sends))
    raise DoctorWarning("; ".join(
        f"{n} analysis(es) sent up to {sends} times, never claimed by a worker: is a worker consuming the "
        f"'{queue}' queue? (re-sent with a doubling delay; nothing is lost)" for queue, (n, sends) in sorted(
            by_queue.items())))


def run_checks(settings: Settings, *, load_model: bool = False) -> list[Check]:
    database = _check("database", lambda: check_database(settings))
    checks = [
        database,
        _check("areas", lambda: check_areas(settings)) if database.ok
        else Check("areas", False, "not checked: the database is not usable"),
        _check("observations", lambda: check_observations(settings)) if database.ok
        else Check("observations", False, "not checked: the database is not usable"),
        _check("analyses", lambda: check_analyses(settings)) if database.ok
        else Check("analyses", False, "not checked: the database is not usable"),
        _check("broker", lambda: check_broker(settings)),
    ]
    checks += [_check(f"catalogue {c.name}", lambda c=c: check_catalogue(c)) for c in settings.catalogues]
    checks += [
        _check("email", lambda: check_smtp(settings)),
        _check("email links", lambda: check_web_links(settings)),
        _check("email sender", lambda: check_sender(settings)),
        _check("model", lambda: check_model(settings, load_model)),
    ]
    return checks


@click.command("doctor")
@click.option("--load-model", is_flag=True, help="Also load the UniRS weights (slow; needs the memory).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def doctor(settings: Settings, load_model: bool, as_json: bool) -> None:
    """Check configuration and connectivity: database + PostGIS + schema revision, broker, each STAC
    catalogue, SMTP (or the outbox directory), email links (WARN: a public URL without a shared secret), model
    weights, areas that alert nobody (WARN) and failed observations of the last week (WARN).
    Exit status 1 if anything is wrong (FAIL)."""
    checks = run_checks(settings, load_model=load_model)
    if as_json:
        click.echo(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        for c in checks:
            mark = (click.style("WARN", fg="yellow") if c.warning else click.style("ok  ", fg="green")) if c.ok \
                else click.style("FAIL", fg="red")
            click.echo(f"{mark} {c.name:<24} {c.detail}")
    if not all(c.ok for c in checks):
        raise SystemExit(1)

"""The end-to-end demo: real Sentinel-2 acquisitions published one by one into a local STAC API while the
scheduler and a Celery worker run as real processes; ends with findings in PostGIS and alert emails.

Run through ``scripts/demo`` (which sets up the venv and services first). Every run starts from fresh
demo databases (``<db>_demo`` and ``<db>_demo_stac``) and an emptied ``var/demo``, so running it again
is safe and gives the same result.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from core.config import Settings

# psycopg, shapely and the STAC harness are imported where used: `unirs-monitor demo -h` needs none of them.

REPO = Path(__file__).resolve().parent.parent
VAR = REPO / "var" / "demo"
AREA_NAME = "Romanian forest (demo)"
RECIPIENT = "forest-watch@example.org"
COLLECTION = "sentinel-2-l2a"
# The sample ends in 2021: the first poll must look back far enough to see it.
LOOKBACK_DAYS = 5000
# Nothing in flight for this long = the acquisition is fully processed (reports run every second here).
QUIET_SECONDS = 2.5


@dataclass
class DemoEnv:
    app_url: str  # SQLAlchemy URL of the demo database
    stac_dsn: str
    broker_url: str

    def environ(self, stac_url: str, var_dir: Path) -> dict[str, str]:
        catalogue = {
            "name": "local-demo",
            "url": stac_url,
            "collections": [COLLECTION],
            # The demo serves COGs on loopback; production catalogues never allow private hosts.
            "allowed_schemes": ["http"],
            "allowed_hosts": ["127.0.0.1"],
            "allow_private_hosts": True,
            "page_size": 50,
        }
        return {
            **os.environ,
            "UNIRS_DATABASE_URL": self.app_url,
            "UNIRS_BROKER_URL": self.broker_url,
            "UNIRS_CATALOGUES": json.dumps([catalogue]),
            "UNIRS_POLL__INTERVAL_MINUTES": "0.05",
            "UNIRS_POLL__LOOKBACK_DAYS": str(LOOKBACK_DAYS),
            "UNIRS_ANALYSIS__DISPATCH_INTERVAL_SECONDS": "1",
            "UNIRS_SMTP__OUTBOX_DIR": str(var_dir / "outbox"),
            "UNIRS_LOG_LEVEL": os.environ.get("UNIRS_LOG_LEVEL", "INFO"),
        }


def _fresh_databases(base_url: str, broker_url: str) -> DemoEnv:
    from sqlalchemy.engine import make_url

    from core import migrate
    from devtools import dbadmin, localstac

    base = make_url(base_url)
    app_url = base.set(database=f"{base.database}_demo")
    libpq = {
        name: url.set(drivername="postgresql").render_as_string(hide_password=False)
        for name, url in (("app", app_url), ("stac", base.set(database=f"{base.database}_demo_stac")))
    }
    for dsn in libpq.values():
        dbadmin.drop_database(dsn)
        dbadmin.create_database(dsn, postgis=True)
    app = app_url.render_as_string(hide_password=False)
    migrate.upgrade(app)
    localstac.prepare_database(libpq["stac"], create=False)
    return DemoEnv(app_url=app, stac_dsn=libpq["stac"], broker_url=broker_url)


def _area_geometry(items: list[dict]) -> dict:
    """The sample's footprint shrunk by 50 m on each side: the area lies inside every scene."""
    from shapely.geometry import mapping, shape

    footprint = shape(items[0]["geometry"])
    return mapping(footprint.buffer(-0.0006))


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = log.open("w")
    return subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _libpq(app_url: str) -> str:
    return app_url.replace("postgresql+psycopg://", "postgresql://", 1)


def _wait_settled(app_url: str, scene_count: int, deadline_s: float, var_dir: Path) -> None:
    """Wait until the poller has seen `scene_count` scenes and nothing (analysis, email) is in flight."""
    import psycopg

    end = time.monotonic() + deadline_s
    status: dict[str, int] = {}
    quiet_since: float | None = None
    while time.monotonic() < end:
        with psycopg.connect(_libpq(app_url)) as conn:
            scenes = conn.execute("SELECT count(*) FROM scenes").fetchone()[0]
            pending_obs = conn.execute("SELECT count(*) FROM observations WHERE status = 'pending'").fetchone()[0]
            status = dict(conn.execute("SELECT status::text, count(*) FROM analyses GROUP BY 1").fetchall())
            sending = conn.execute(
                "SELECT count(*) FROM deliveries WHERE status IN ('pending', 'sending')"
            ).fetchone()[0]
        in_flight = sum(status.get(s, 0) for s in ("pending", "queued", "running"))
        if scenes >= scene_count and pending_obs == 0 and in_flight == 0 and sending == 0:
            # A finished analysis gets its alert rows a moment later (reports job): stay quiet for a while.
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= QUIET_SECONDS:
                return
        else:
            quiet_since = None
        time.sleep(0.3)
    raise click.ClickException(
        f"timed out waiting for {scene_count} scenes to be analysed (analyses: {status}); see logs in {var_dir}"
    )


@dataclass
class DateOutcome:
    """What happened to one published acquisition."""

    item_id: str
    date: str
    observation: str | None  # clear | cloudy | failed
    clear_fraction: float | None
    reason: str | None  # why no analysis, when there is none
    analysis_status: str | None
    pair_reason: str | None
    last_error: str | None
    findings: int  # change regions (the answers to the questions are findings too, not counted)
    changed_hectares: float | None
    seconds_to_settle: float
    seconds_to_email: float | None  # publish → alert accepted (None: no alert for this date)
    headline: str = ""  # the alert's subject figure ("Forest loss 0.25 ha"): what alerts, not all change

    def describe(self) -> str:
        text = f"{self.observation} ({(self.clear_fraction or 0) * 100:.0f}% clear)"
        if self.analysis_status is None:
            return f"{text}; no analysis: {self.reason or 'no earlier clear acquisition'}"
        text += f"; analysis {self.analysis_status}"
        if self.analysis_status == "done":
            text += f", {self.findings} change region(s), {self.changed_hectares or 0:.2f} ha changed"
        elif self.last_error:
            text += f": {self.last_error}"
        if self.seconds_to_email is not None:
            alert = f"alert {self.headline!r}" if self.headline else "alert"
            text += f"; {alert} emailed {self.seconds_to_email:.1f}s after publication"
        return f"{text}\n        pair: {self.pair_reason}" if self.pair_reason else text


@dataclass
class DemoResult:
    app_url: str
    outbox: Path
    dates: list[DateOutcome]


def _outcome(app_url: str, item: dict, published_at: datetime, settled_s: float) -> DateOutcome:
    import psycopg

    with psycopg.connect(_libpq(app_url)) as conn:
        row = conn.execute(
            """SELECT o.status::text, o.clear_fraction, o.reason, a.status::text, a.pair_reason, a.last_error,
                      (SELECT count(*) FROM findings f WHERE f.analysis_id = a.id AND f.kind = 'region'),
                      (SELECT f.hectares FROM findings f WHERE f.analysis_id = a.id AND f.kind = 'summary'),
                      (SELECT min(d.sent_at) FROM deliveries d WHERE d.analysis_id = a.id AND d.status = 'sent')
               FROM scenes s JOIN observations o ON o.scene_id = s.id
               LEFT JOIN analyses a ON a.after_scene_id = s.id
               WHERE s.item_id = %s OR s.item->>'id' = %s ORDER BY a.id DESC NULLS LAST LIMIT 1""",
            (item["id"], item["id"]),
        ).fetchone()
    date = item["properties"]["datetime"][:10]
    if row is None:
        return DateOutcome(item["id"], date, None, None, "not seen by the poller", None, None, None, 0, None,
                           settled_s, None)
    obs, clear, reason, ana, pair_reason, err, nfind, hectares, sent_at = row
    to_email = (sent_at - published_at).total_seconds() if sent_at else None
    return DateOutcome(item["id"], date, obs, clear, reason, ana, pair_reason, err, nfind, hectares, settled_s,
                       to_email, _headline(app_url, item["id"]) if sent_at else "")


def _headline(app_url: str, item_id: str) -> str:
    """The emailed alert's headline, built by the report code itself (so the demo's line and the subject
    cannot disagree): "1.55 ha changed" counts gain too, the alert counts only what the area alerts on."""
    from sqlalchemy import or_, select

    from core.db import session_scope
    from core.models import Analysis, Scene
    from monitor.reports.context import load_analysis_report

    with session_scope(app_url) as session:
        of_item = or_(Scene.item_id == item_id, Scene.item["id"].astext == item_id)
        analysis_id = session.scalar(select(Analysis.id).join(Scene, Scene.id == Analysis.after_scene_id)
                                     .where(of_item).order_by(Analysis.id.desc()).limit(1))
        if analysis_id is None:
            return ""
        return load_analysis_report(session, analysis_id, "http://127.0.0.1", with_images=False).headline


NEWEST = 5  # summary findings shown at the end of the demo; the command to list all is printed with them


def findings_summary(app_url: str, area_name: str) -> list[str]:
    """What the demo found, in a few lines instead of every finding (the sample gives ~90): the count per
    kind, then the changed regions per class (eo/change_classes order) with their hectares and alert
    states (workers/confirmation.py: probable, confirmed, dismissed, redetected; "unsettled" when none)."""
    import psycopg

    from eo.change_classes import CLASS_ORDER

    with psycopg.connect(_libpq(app_url)) as conn:
        kinds = conn.execute(
            """SELECT f.kind, count(*) FROM findings f JOIN areas a ON a.id = f.area_id WHERE a.name = %s
               GROUP BY f.kind ORDER BY count(*) DESC, f.kind""", (area_name,)).fetchall()
        regions = conn.execute(
            """SELECT f.change_class, coalesce(f.alert_state, 'unsettled'), count(*), coalesce(sum(f.hectares), 0)
               FROM findings f JOIN areas a ON a.id = f.area_id WHERE a.name = %s AND f.kind = 'region'
               GROUP BY 1, 2 ORDER BY 3 DESC, 2""", (area_name,)).fetchall()
    total = sum(n for _, n in kinds)
    if not total:
        return ["no findings"]
    lines = [f"{total} findings: " + ", ".join(f"{n} {kind}" for kind, n in kinds)]
    by_class: dict[str, list[tuple[str, int, float]]] = {}
    for cls, state, n, ha in regions:
        by_class.setdefault(cls or "unclassified", []).append((state, n, ha))
    order = [*CLASS_ORDER, *sorted(set(by_class) - set(CLASS_ORDER))]
    if by_class:
        lines.append("changed regions by class: regions, hectares (alert states)")
        width = max(map(len, by_class))
    for cls in (c for c in order if c in by_class):
        rows = by_class[cls]
        states = ", ".join(f"{n} {state}" for state, n, _ in rows)
        lines.append(f"  {cls:<{width}} {sum(n for _, n, _ in rows):>4} {sum(ha for *_, ha in rows):>9.2f} ha"
                     f"   ({states})")
    return lines


def run_demo(base_url: str, *, var_dir: Path = VAR, dates: list[str] | None = None,
             per_date_timeout: float = 300.0, echo=click.echo) -> DemoResult:
    """Run the loop; ``dates`` (YYYY-MM-DD) restricts the acquisitions published (the whole-loop test)."""
    from devtools import localstac
    from devtools.redis_server import RedisServer

    if var_dir.exists():
        shutil.rmtree(var_dir)
    (var_dir / "outbox").mkdir(parents=True)

    def step(msg: str) -> None:
        echo(click.style("==> ", fg="cyan", bold=True) + msg)

    step("fresh demo databases (application + pgstac) and migrations, a private broker")
    # Its own redis-server: on the shared one, another run's workers (a second demo, the test suite) consume
    # the same 'cpu' queue and find "nothing due" in their own databases, and this run waits for ever.
    broker = RedisServer(var_dir / "redis")
    broker.start()
    try:
        env_cfg = _fresh_databases(base_url, broker.url)

        items = sorted(localstac.read_sample_items(), key=lambda i: i["properties"]["datetime"])
        if dates is not None:
            items = [i for i in items if i["properties"]["datetime"][:10] in set(dates)]
        localstac.load_collection(env_cfg.stac_dsn, localstac.read_sample_collection())

        procs: list[subprocess.Popen] = []
        outcomes: list[DateOutcome] = []
        with localstac.CogServer(log_path=var_dir / "cog-server.log") as cogs, localstac.StacApiServer(
            dsn=env_cfg.stac_dsn, log_path=var_dir / "stac-api.log", asset_base_url=cogs.url
        ) as stac:
            step(f"local STAC API at {stac.url}, COGs served with HTTP Range at {cogs.url}")
            env = env_cfg.environ(stac.url, var_dir)

            step(f"register watched area {AREA_NAME!r} (alerts to {RECIPIENT})")
            cli = [sys.executable, "-m", "monitor.cli"]
            subprocess.run(
                # --max-cloud 100: let cloudy acquisitions through so the report shows why they were skipped.
                [*cli, "areas", "add", json.dumps(_area_geometry(items)), "--name", AREA_NAME, "--recipient", RECIPIENT,
                 "--max-cloud", "100", "--min-clear", "0.7", "--frequency", "immediate"],
                env=env, check=True, stdout=subprocess.DEVNULL,
            )

            step(f"start the scheduler and a Celery worker (real processes; logs in {var_dir})")
            procs.append(_spawn([*cli, "scheduler", "--reports-interval", "1"], env, var_dir / "scheduler.log"))
            procs.append(_spawn(
                [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--queues", "cpu,gpu",
                 "--pool", "solo", "--loglevel", "INFO", "--hostname", f"demo-{os.getpid()}@%h"],
                env, var_dir / "worker.log",
            ))
            try:
                step(f"publish {len(items)} real Sentinel-2 acquisitions, one date at a time")
                for n, item in enumerate(items, start=1):
                    published_at, t0 = datetime.now(UTC), time.monotonic()
                    stac.publish_item(item, asset_base_url=cogs.url)
                    _wait_settled(env_cfg.app_url, n, per_date_timeout, var_dir)
                    outcome = _outcome(env_cfg.app_url, item, published_at, time.monotonic() - t0)
                    outcomes.append(outcome)
                    echo(f"  {outcome.date}  {item['id']:<28} {outcome.describe()}  [{outcome.seconds_to_settle:.1f}s]")
            finally:
                for p in procs:
                    _stop(p)
        return DemoResult(app_url=env_cfg.app_url, outbox=var_dir / "outbox", dates=outcomes)
    finally:
        broker.stop()  # the workers are stopped: nothing uses it after the run


@click.command("demo")
@click.option("--per-date-timeout", type=float, default=300.0, show_default=True,
              help="Give up if one acquisition takes longer than this to be analysed (seconds).")
@click.option("--web-port", type=int, default=8080, show_default=True,
              help="Port of the web app left running at the end (a free one if it is taken).")
@click.option("--web/--no-web", default=True, show_default=True,
              help="Leave the web app running over the demo database when the demo ends.")
@click.pass_obj
def demo(settings: Settings, per_date_timeout: float, web_port: int, web: bool) -> None:
    """Run the whole loop on the bundled real Sentinel-2 sample (see scripts/demo).

    Fresh demo databases, a local STAC API and COG server on loopback, a watched area, the scheduler and a
    Celery worker as real processes; the 16 acquisitions are published one date at a time. Ends with
    findings in PostGIS and alert emails (.eml + HTML preview) in var/demo/outbox, and the web app
    (``unirs-monitor serve`` on 127.0.0.1) running over the demo database with a demo login; the command
    prints its URL, the login and how to stop it. Safe to run again (it stops the previous run's app).
    """
    from devtools import demo_web

    stopped = demo_web.stop_previous(VAR)
    if stopped:
        click.echo(f"stopped the web app of the previous demo run (PID {stopped})")
    result = run_demo(settings.database_url, per_date_timeout=per_date_timeout)
    env = {**os.environ, "UNIRS_DATABASE_URL": result.app_url}
    click.echo(click.style("==> ", fg="cyan", bold=True) + "findings")
    for line in findings_summary(result.app_url, AREA_NAME):
        click.echo(f"  {line}")
    click.echo(f"  the newest {NEWEST} summaries (one per analysed acquisition):")
    subprocess.run([sys.executable, "-m", "monitor.cli", "findings", "--area", AREA_NAME, "--kind", "summary",
                    "--limit", str(NEWEST)], env=env, check=False,
                   stderr=subprocess.DEVNULL)  # its "--all for every one" hint: the line below says it
    click.echo(f"  all of them: UNIRS_DATABASE_URL={result.app_url} unirs-monitor findings --area "
               f"{shlex.quote(AREA_NAME)} --all   (--format geojson | csv to export)")
    emails = sorted(result.outbox.glob("**/*.eml"))
    latencies = [d.seconds_to_email for d in result.dates if d.seconds_to_email is not None]
    click.echo(click.style("==> ", fg="cyan", bold=True) + f"{len(emails)} alert email(s) in {result.outbox}"
               + (f" (publication → email: median {statistics.median(latencies):.1f}s)" if latencies else ""))
    for path in emails + sorted(result.outbox.glob("**/*.html")):
        click.echo(f"  {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    click.echo(f"\nDatabase: {result.app_url}\nQuery:    UNIRS_DATABASE_URL={result.app_url} "
               f"unirs-monitor findings --format geojson\nLogs:     {VAR}")
    if web:
        app = demo_web.start_web(result.app_url, VAR, port=web_port, cwd=REPO)
        click.echo(click.style("==> ", fg="cyan", bold=True) + f"web app running at {app.url}/ (PID {app.pid})")
        click.echo(f"  log in as {app.email} with password {app.password} (also in {VAR / demo_web.LOGINFILE})")
        for what, link in (("the demo area", app.area_url),
                           ("its latest analysis with changed regions", app.analysis_url)):
            if link:
                click.echo(f"  {what}: {link}")
        click.echo(f"  stop it with: kill {app.pid}    (the next scripts/demo run stops it too)")
    else:
        click.echo(f"Web app:  UNIRS_DATABASE_URL={result.app_url} unirs-monitor serve  (then open "
                   f"http://127.0.0.1:{web_port}/ and log in; create a login with `unirs-monitor users add`)")


if __name__ == "__main__":
    from core.config import get_settings

    demo.main(obj=get_settings())

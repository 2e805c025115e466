"""The end-to-end demo: real Sentinel-2 acquisitions published one by one into a local STAC API while the
scheduler and a Celery worker run as real processes; ends with findings in PostGIS and alert emails.

Run through ``scripts/demo`` (which sets up the venv and services first). Every run starts from fresh
demo databases (``<db>_demo`` and ``<db>_demo_stac``) and an emptied ``var/demo``, so running it again
is safe and gives the same result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
from shapely.geometry import mapping, shape

from monitor import dbadmin, localstac

REPO = Path(__file__).resolve().parent.parent
VAR = REPO / "var" / "demo"
AREA_NAME = "Romanian forest (demo)"
RECIPIENT = "forest-watch@example.org"
COLLECTION = "sentinel-2-l2a"
# The sample ends in 2021: the first poll must look back far enough to see it.
LOOKBACK_DAYS = 5000


@dataclass
class DemoEnv:
    app_url: str  # SQLAlchemy URL of the demo database
    stac_dsn: str
    broker_url: str

    def environ(self, stac_url: str) -> dict[str, str]:
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
            "UNIRS_SMTP__OUTBOX_DIR": str(VAR / "outbox"),
            "UNIRS_LOG_LEVEL": os.environ.get("UNIRS_LOG_LEVEL", "INFO"),
        }


def _step(msg: str) -> None:
    click.echo(click.style("==> ", fg="cyan", bold=True) + msg)


def _fresh_databases(base_url: str) -> DemoEnv:
    from sqlalchemy.engine import make_url

    from monitor import migrate

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
    return DemoEnv(app_url=app, stac_dsn=libpq["stac"], broker_url="redis://127.0.0.1:6379/7")


def _purge_broker(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


def _area_geometry(items: list[dict]) -> dict:
    """The sample's footprint shrunk by 50 m on each side: the area lies inside every scene."""
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


def _wait_settled(app_url: str, scene_count: int, deadline_s: float) -> dict[str, int]:
    """Wait until the poller has seen `scene_count` scenes and no analysis is still in flight."""
    import psycopg

    dsn = app_url.replace("postgresql+psycopg://", "postgresql://", 1)
    end = time.monotonic() + deadline_s
    status: dict[str, int] = {}
    while time.monotonic() < end:
        with psycopg.connect(dsn) as conn:
            scenes = conn.execute("SELECT count(*) FROM scenes").fetchone()[0]
            pending_obs = conn.execute("SELECT count(*) FROM observations WHERE status = 'pending'").fetchone()[0]
            status = dict(conn.execute("SELECT status::text, count(*) FROM analyses GROUP BY 1").fetchall())
        in_flight = sum(status.get(s, 0) for s in ("pending", "queued", "running"))
        if scenes >= scene_count and pending_obs == 0 and in_flight == 0:
            return status
        time.sleep(0.5)
    raise click.ClickException(
        f"timed out waiting for {scene_count} scenes to be analysed (analyses: {status}); see logs in {VAR}"
    )


def _date_report(app_url: str, item: dict) -> str:
    import psycopg

    dsn = app_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            """SELECT o.status::text, o.clear_fraction, o.reason, a.status::text, a.pair_reason, a.last_error,
                      (SELECT count(*) FROM findings f WHERE f.analysis_id = a.id)
               FROM scenes s JOIN observations o ON o.scene_id = s.id
               LEFT JOIN analyses a ON a.after_scene_id = s.id
               WHERE s.item_id = %s OR s.item->>'id' = %s ORDER BY a.id DESC NULLS LAST LIMIT 1""",
            (item["id"], item["id"]),
        ).fetchone()
    if row is None:
        return "not seen yet"
    obs, clear, reason, ana, pair_reason, err, nfind = row
    text = f"{obs} ({(clear or 0) * 100:.0f}% clear)"
    if ana is None:
        return f"{text}; no analysis: {reason or 'no earlier clear acquisition'}"
    text += f"; analysis {ana}"
    if ana == "done":
        text += f", {nfind} finding(s)"
    elif err:
        text += f": {err}"
    return f"{text}\n        pair: {pair_reason}" if pair_reason else text


def run_demo(base_url: str, *, per_date_timeout: float = 300.0) -> None:
    if VAR.exists():
        shutil.rmtree(VAR)
    (VAR / "outbox").mkdir(parents=True)

    _step("fresh demo databases (application + pgstac) and migrations")
    env_cfg = _fresh_databases(base_url)
    _purge_broker(env_cfg.broker_url)

    items = sorted(localstac.read_sample_items(), key=lambda i: i["properties"]["datetime"])
    collection = localstac.read_sample_collection()
    localstac.load_collection(env_cfg.stac_dsn, collection)

    procs: list[subprocess.Popen] = []
    with localstac.CogServer(log_path=VAR / "cog-server.log") as cogs, localstac.StacApiServer(
        dsn=env_cfg.stac_dsn, log_path=VAR / "stac-api.log", asset_base_url=cogs.url
    ) as stac:
        _step(f"local STAC API at {stac.url}, COGs served with HTTP Range at {cogs.url}")
        env = env_cfg.environ(stac.url)
        os.environ.update({k: v for k, v in env.items() if k.startswith("UNIRS_")})
        from monitor.config import get_settings

        get_settings.cache_clear()

        _step(f"register watched area {AREA_NAME!r} (alerts to {RECIPIENT})")
        cli = [str(REPO / ".venv" / "bin" / "unirs-monitor")]
        if not Path(cli[0]).exists():
            cli = [sys.executable, "-m", "monitor.cli"]
        subprocess.run(
            # --max-cloud 100: let cloudy acquisitions through so the report shows why they were skipped.
            [*cli, "areas", "add", json.dumps(_area_geometry(items)), "--name", AREA_NAME, "--recipient", RECIPIENT,
             "--max-cloud", "100", "--min-clear", "0.7", "--min-hectares", "0.5", "--frequency", "immediate"],
            env=env, check=True,
        )

        _step("start the scheduler and a Celery worker (real processes; logs in var/demo/)")
        procs.append(_spawn([*cli, "scheduler"], env, VAR / "scheduler.log"))
        procs.append(_spawn(
            [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--queues", "cpu,gpu",
             "--pool", "solo", "--loglevel", "INFO", "--hostname", "demo@%h"],
            env, VAR / "worker.log",
        ))
        try:
            _step(f"publish {len(items)} real Sentinel-2 acquisitions, one date at a time")
            for n, item in enumerate(items, start=1):
                t0 = time.monotonic()
                stac.publish_item(item, asset_base_url=cogs.url)
                _wait_settled(env_cfg.app_url, n, per_date_timeout)
                click.echo(f"  {item['properties']['datetime'][:10]}  {item['id']:<28} "
                           f"{_date_report(env_cfg.app_url, item)}  [{time.monotonic() - t0:.1f}s]")
            _step("deliver alerts")
            from monitor.reports import run_deliveries

            click.echo(f"  {run_deliveries()}")
        finally:
            for p in procs:
                _stop(p)

    _step("findings")
    subprocess.run([*cli, "findings", "--area", AREA_NAME], env=env, check=False)
    emails = sorted((VAR / "outbox").glob("**/*.eml"))
    previews = sorted((VAR / "outbox").glob("**/*.html"))
    _step(f"{len(emails)} alert email(s) in {VAR / 'outbox'}")
    for path in emails + previews:
        click.echo(f"  {path.relative_to(REPO)}")
    click.echo(f"\nDatabase: {env_cfg.app_url}\nQuery:    UNIRS_DATABASE_URL={env_cfg.app_url} "
               f"unirs-monitor findings --format geojson\nLogs:     {VAR}")


@click.command("demo")
@click.option("--per-date-timeout", type=float, default=300.0, show_default=True,
              help="Give up if one acquisition takes longer than this to be analysed (seconds).")
def demo(per_date_timeout: float) -> None:
    """Run the whole loop on the bundled real Sentinel-2 sample (see scripts/demo)."""
    from monitor.config import get_settings

    run_demo(get_settings().database_url, per_date_timeout=per_date_timeout)


if __name__ == "__main__":
    demo()

"""`unirs-monitor scheduler | poll --once | backfill`: running the ingest loop."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # annotations only: importing the settings module is slow, and `-h` needs none
    from core.config import Settings


def _parse_when(value: str, param: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date or ISO 8601 date-time (e.g. 2024-05-01)",
                                 param_hint=param) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@click.command("scheduler")
@click.option("--jobs", default="poll,pair,dispatch,reports,health", show_default=True,
              help="Comma-separated jobs this scheduler runs when it is the leader.")
@click.option("--retry-seconds", type=float, default=5.0, show_default=True,
              help="How often a stand-by scheduler tries to become the leader.")
@click.option("--pair-interval", type=float, default=300.0, show_default=True,
              help="Seconds between sweeps for observations still pending (pairing also runs after each poll).")
@click.option("--reports-interval", type=float, default=60.0, show_default=True,
              help="Seconds between report delivery runs.")
@click.pass_obj
def scheduler(settings: Settings, jobs: str, retry_seconds: float, pair_interval: float,
              reports_interval: float) -> None:
    """Run the service loop: poll catalogues, pair new scenes, dispatch analyses, send reports.

    Start as many schedulers as you like (several hosts for availability): exactly one is the leader,
    chosen with a PostgreSQL advisory lock; the others stand by and take over within --retry-seconds
    when the leader dies. Intervals come from the settings (poll.interval_minutes,
    analysis.dispatch_interval_seconds). Stop with SIGTERM or Ctrl-C.
    """
    from core.migrate import require_current
    from monitor.scheduler import run_scheduler

    require_current(settings.database_url)  # one line now, not a traceback from every job later
    chosen = [j.strip() for j in jobs.split(",") if j.strip()]
    try:
        run_scheduler(settings, jobs=chosen, retry_seconds=retry_seconds, pair_interval_seconds=pair_interval,
                      reports_interval_seconds=reports_interval)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("poll")
@click.option("--once", is_flag=True, help="Poll, pair and dispatch once, print a summary and exit (for cron).")
@click.option("--now", "now_text", default=None, metavar="DATETIME",
              help="Pretend the current time is DATETIME (replaying an archive, demos). Default: now.")
@click.option("--no-dispatch", is_flag=True, help="Do not hand new analyses to the workers.")
@click.pass_obj
def poll(settings: Settings, once: bool, now_text: str | None, no_dispatch: bool) -> None:
    """Poll the configured STAC catalogues once (cron-style).

    Searches each catalogue × collection for scenes over the active areas (nearby areas share one
    search) since the last successful poll minus the look-back (poll.lookback_days), stores new and
    better versions of scenes, quarantines malformed items, computes each area's clear fraction, picks
    the before scene and creates the analyses; then dispatches pending analyses to the workers.

    Exits 1 when a catalogue could not be polled (its cursor is kept, nothing is lost: the next poll
    re-reads the window). For continuous operation use `unirs-monitor scheduler`.
    """
    if not once:
        raise click.UsageError("use `poll --once` (one cycle), or `unirs-monitor scheduler` to keep polling")
    from core.migrate import require_current
    from monitor.scheduler import dispatch_once, poll_and_pair

    now = _parse_when(now_text, "--now") if now_text else None
    require_current(settings.database_url)  # each catalogue's failure would otherwise log a traceback
    summary = poll_and_pair(settings, now=now)
    dispatched = None if no_dispatch else dispatch_once(settings)
    click.echo(f"items seen: {summary.items_seen}")
    click.echo(f"new scenes: {summary.new_scenes}")
    click.echo(f"upgraded scenes: {summary.upgraded_scenes}")
    click.echo(f"quarantined: {summary.quarantined}")
    click.echo(f"observations settled: {summary.observations}")
    click.echo(f"analyses created: {summary.analyses_created}")
    click.echo(f"search requests: {summary.search_requests}")
    click.echo(f"late items: {summary.late_items}")
    if dispatched is not None:
        click.echo(f"dispatched: {dispatched}")
    for error in summary.errors:
        click.echo(f"error: {error}", err=True)
    if not summary.ok:
        sys.exit(1)


@click.command("backfill")
@click.argument("area")
@click.option("--since", "since_text", required=True, metavar="DATE", help="Start of the period (e.g. 2019-01-01).")
@click.option("--until", "until_text", default=None, metavar="DATE", help="End of the period (default: now).")
@click.pass_obj
def backfill(settings: Settings, area: str, since_text: str, until_text: str | None) -> None:
    """Search the archive for AREA (name or id) since DATE, store the scenes and create the analyses.

    A one-off historical run: it searches the area's own footprint (no grouping), leaves the poll cursor
    alone and is safe to repeat or to run while the scheduler runs (nothing is duplicated).
    Analyses are dispatched by the scheduler (or the next `poll --once`).
    """
    from tqdm import tqdm

    from core.migrate import require_current
    from monitor.areas import AreaError
    from monitor.catalogues.backfill import backfill_area

    since = _parse_when(since_text, "--since")
    until = _parse_when(until_text, "--until") if until_text else None
    require_current(settings.database_url)

    def progress(description: str, total: int | None) -> tqdm:
        return tqdm(desc=description, total=total, unit="item" if description != "pairing" else "obs",
                    file=sys.stderr, dynamic_ncols=True)

    try:
        summary = backfill_area(area, since, until, settings=settings, progress=progress)
    except AreaError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"area: {summary.area}")
    click.echo(f"items seen: {summary.ingest.items_seen}")
    click.echo(f"new scenes: {summary.ingest.new_scenes}")
    click.echo(f"quarantined: {summary.ingest.quarantined}")
    click.echo(f"observations settled: {summary.pairing.observations} "
               f"({summary.pairing.clear} clear, {summary.pairing.cloudy} cloudy, {summary.pairing.failed} failed)")
    click.echo(f"analyses created: {summary.pairing.analyses_created}")
    for error in summary.errors:
        click.echo(f"error: {error}", err=True)
    if summary.errors:
        sys.exit(1)

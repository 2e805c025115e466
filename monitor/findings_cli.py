"""`unirs-monitor findings …`: search stored findings; a thin layer over ``monitor.findings``."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import click

from monitor.choices import FINDING_KINDS

if TYPE_CHECKING:
    from core.config import Settings

# monitor.findings (SQLAlchemy, the models) is imported by the commands, so `findings -h` stays fast.


def _parse_time(value: str, option: str, end_of_day: bool) -> datetime:
    """ISO date or date-time; naive means UTC. A bare date as an upper bound includes that whole day."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a date (YYYY-MM-DD) or an ISO date-time", param_hint=option
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    if end_of_day and len(value.strip()) == 10:
        parsed += timedelta(days=1)
    return parsed


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@click.group(invoke_without_command=True)
@click.option("--area", help="Only findings of the watched area with this name.")
@click.option("--since", help="Observed on or after this date (YYYY-MM-DD or ISO date-time, UTC).")
@click.option("--until", help="Observed before the end of this date (or before this ISO date-time).")
@click.option("--kind", type=click.Choice(FINDING_KINDS), help="summary, region, answer or event.")
@click.option("--bbox", help="minx,miny,maxx,maxy in lon/lat: findings whose geometry intersects it.")
@click.option("--min-hectares", type=float, help="Only findings of at least this many hectares.")
@click.option("--text", help="Case-insensitive text in the caption or the answer.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--all", "everything", is_flag=True,
              help="Every match, no --limit (exports: geojson and csv are streamed from the database).")
@click.option("--format", "fmt", type=click.Choice(["table", "geojson", "csv"]), default="table", show_default=True)
@click.pass_context
def findings(ctx: click.Context, area, since, until, kind, bbox, min_hectares, text, limit, everything, fmt) -> None:
    """Search stored findings, newest first: a table, a GeoJSON FeatureCollection, or CSV with WKT.

    \b
    unirs-monitor findings --area "Apuseni" --since 2025-01-01 --all --format geojson > changes.geojson
    unirs-monitor findings --area "Apuseni" --all --format csv > apuseni.csv
    unirs-monitor findings --bbox 23.1,46.5,23.2,46.6 --kind region --min-hectares 1
    unirs-monitor findings show ID
    """
    if ctx.invoked_subcommand is not None:
        return
    from sqlalchemy import select

    from core.db import session_scope
    from core.models import Area
    from monitor import findings as svc

    try:
        flt = svc.FindingFilter(
            area=area,
            since=_parse_time(since, "--since", end_of_day=False) if since else None,
            until=_parse_time(until, "--until", end_of_day=True) if until else None,
            kind=kind,
            bbox=svc.parse_bbox(bbox) if bbox else None,
            min_hectares=min_hectares,
            text=text,
            limit=None if everything else limit,
        )
        with session_scope(ctx.obj) as session:
            if area is not None and session.scalar(select(Area.id).where(Area.name == area)) is None:
                raise svc.QueryError(f"no watched area named {area!r} (`unirs-monitor areas list` shows them)")
            if fmt in ("geojson", "csv"):  # streamed: rows are written as the server-side cursor yields them
                written = [0]

                def counted(it):
                    for row in it:
                        written[0] += 1
                        yield row

                rows = counted(svc.iter_findings(session, flt, geometry_text=fmt == "geojson"))
                if fmt == "geojson":
                    svc.write_geojson(rows, sys.stdout, default=_json_default)
                else:
                    svc.write_csv(rows, sys.stdout)
                _warn_if_cut(written[0], flt.limit)
                return
            rows = svc.query_findings(session, flt)
    except svc.QueryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(svc.format_table(rows) if rows else "no findings match")
    _warn_if_cut(len(rows), flt.limit)


def _warn_if_cut(shown: int, limit: int | None) -> None:
    # On stderr: an export redirected to a file is still complete GeoJSON/CSV, and the person sees it was cut.
    if limit is not None and shown >= limit:
        click.echo(f"the newest {limit} findings only (--limit {limit}); more may match: --all for every one, "
                   "--limit N for more", err=True)


@findings.command("show")
@click.argument("finding_id", type=int)
@click.pass_obj
def show(settings: Settings, finding_id: int) -> None:
    """Print one finding in full (statistics, analysis, scenes, thumbnails) as JSON."""
    from core.db import session_scope
    from monitor import findings as svc

    with session_scope(settings) as session:
        record = svc.get_finding(session, finding_id)
    if record is None:
        raise click.ClickException(f"no finding with id {finding_id}")
    click.echo(json.dumps(record, indent=2, ensure_ascii=False, default=_json_default))

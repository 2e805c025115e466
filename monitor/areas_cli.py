"""`unirs-monitor areas …`: register and manage watched areas."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any

import click

from eo.change_classes import CLASS_ORDER
from monitor.area_options import ALERT_ON, AreaOptions

if TYPE_CHECKING:
    from core.config import Settings

# The service, the database layer and shapely are imported in the commands that use them, so that
# `areas … -h` stays fast (monitor/cli.py).


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn validation errors into one clear line on stderr and exit status 2 (no traceback)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from monitor.areas import AreaError
        from monitor.geometry import AreaGeometryError

        try:
            return fn(*args, **kwargs)
        except (AreaError, AreaGeometryError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def _settings_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--collection", "collections", multiple=True,
                     help="STAC collection to watch (repeatable; default sentinel-2-l2a)."),
        click.option("--max-cloud", "max_cloud_cover", type=float,
                     help="Scene-level cloud cover filter sent to the catalogue, percent (default 80)."),
        click.option("--min-clear", "min_clear_fraction", type=float,
                     help="Minimum clear fraction of the imaged part of the area (SCL / QA_PIXEL), 0–1 "
                          "(default 0.7)."),
        click.option("--min-coverage", "min_covered_fraction", type=float,
                     help="Minimum share of the area an acquisition must image, 0–1 (default 0.5; less is "
                          "'partial', not cloudy)."),
        click.option("--recipient", "recipients", multiple=True, help="Email address for alerts (repeatable)."),
        click.option("--question", "questions", multiple=True,
                     help="Question template id to ask about each change (repeatable; default: all templates)."),
        click.option("--frequency", "alert_frequency", type=click.Choice(["immediate", "daily", "off"]),
                     help="Alert emails: immediate, a daily digest, or off (default immediate)."),
        click.option("--min-hectares", "min_alert_hectares", type=float,
                     help="Alert only when the alerting classes cover at least this many hectares (default 0.2)."),
        click.option("--alert-class", "alert_classes", multiple=True, type=click.Choice(list(CLASS_ORDER)),
                     help="Change class that sends an alert (repeatable; replaces the list; default the loss "
                          "classes vegetation_loss and new_built_up_or_bare). Other classes are still reported."),
        click.option("--alert-on", "alert_on", type=click.Choice(list(ALERT_ON)),
                     help="Alert on the first detection of a change (probable, default) or only once the next "
                          "clear acquisition confirms it (confirmed)."),
        click.option("--policy", "pairing_policy", type=click.Choice(["latest", "seasonal"]),
                     help="Before-scene choice: latest earlier clear scene, or same season in earlier years."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _options(**kw: Any) -> AreaOptions:
    """Click gives repeatable options as tuples, empty when not given; empty means "not set" here."""
    return AreaOptions(**{k: (list(v) or None) if isinstance(v, tuple) else v for k, v in kw.items()})


def _table(rows: list[dict[str, Any]]) -> str:
    from monitor.tables import Column, render_table

    columns = [Column("id", justify="right"), Column("name", 40), Column("status"),
               Column("area_km2", justify="right"), Column("collections", 30), Column("alerts"),
               Column("recipients", 50)]
    return render_table(columns, [
        [r["id"], r["name"], r["status"], f"{r['area_km2']:.2f}", ", ".join(r["collections"]), r["alert_frequency"],
         ", ".join(r["recipients"]) or ("(nobody!)" if r["alert_frequency"] != "off" else "")]
        for r in rows
    ])


def _warn_if_alerting_nobody(areas: list[Any]) -> None:
    from monitor import areas as svc

    for area in areas:
        if svc.alerts_nobody(area):
            click.echo(f"warning: {svc.alerts_nobody_warning(area)}", err=True)


_KEYS_HELP = textwrap.wrap(", ".join(AreaOptions.accepted_keys()), 76, initial_indent="  ", subsequent_indent="  ")
_PROPERTIES_HELP = "\n".join([
    "\b", "Feature properties accepted (others are refused, unless --keep-unknown-properties):", *_KEYS_HELP,
]) + """
  attributes: an object of your own fields, kept and exported as they are;
  id, status and area_km2 (written by `areas export`) are ignored; so are the
  feature ids of GIS exports (fid, ogc_fid, gid, objectid), kept as attributes
  with --keep-unknown-properties. A file with several bad features is reported
  in one run, one line per problem, and nothing is added."""


@click.group()
def areas() -> None:
    """Register and manage watched areas.

    Geometries are GeoJSON (a Geometry, a Feature, or a FeatureCollection with one area per feature),
    WKT, or a path to a file holding either, in WGS84 longitude/latitude (EPSG:4326).
    """


@areas.command("add", epilog=_PROPERTIES_HELP)
@click.argument("source")
@click.option("--name", help="Area name (required unless each feature has a 'name' property).")
@click.option("--name-property", "name_key", default="name", show_default=True, metavar="KEY",
              help="Name each area from this feature property instead (e.g. NAME, or fid for numbered features).")
@click.option("--union", is_flag=True, help="Merge all features of a FeatureCollection into one area.")
@click.option("--fix", is_flag=True, help="Repair invalid polygons (self-intersections…) instead of refusing them.")
@click.option("--keep-unknown-properties", "keep_unknown", is_flag=True,
              help="Store feature properties that are not settings as the area's attributes instead of refusing.")
@_settings_options
@click.option("--json", "as_json", is_flag=True, help="Print the created areas as JSON.")
@_friendly
@click.pass_obj
def add_cmd(settings: Settings, source: str, name: str | None, name_key: str, union: bool, fix: bool,
            keep_unknown: bool, as_json: bool, **kw: Any) -> None:
    """Add watched area(s) from SOURCE (GeoJSON / WKT text, or a file; '-' reads stdin).

    \b
    Examples:
      unirs-monitor areas add forest.geojson --name "Apuseni forest" --recipient me@example.org
      unirs-monitor areas add 'POLYGON((23.1 46.5, 23.2 46.5, 23.2 46.6, 23.1 46.6, 23.1 46.5))' --name test
      unirs-monitor areas add parcels.geojson            # one area per feature, named by properties.name
    """
    from core.db import session_scope
    from monitor import areas as svc
    from monitor.geometry import Problem, parse_areas, read_source, read_stdin

    text = read_stdin(sys.stdin.buffer) if source == "-" else read_source(source)
    problems: list[Problem] = []  # every bad feature, reported together by add_areas
    parsed = parse_areas(text, union=union, fix=fix, max_vertices=settings.max_area_vertices, problems=problems)
    with session_scope(settings) as session:
        created = svc.add_areas(session, parsed, name, _options(**kw), max_area_km2=settings.max_area_km2,
                                keep_unknown=keep_unknown, name_key=name_key, problems=problems, union=union)
        out = [svc.area_properties(a) for a in created]
        _warn_if_alerting_nobody(created)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        for a in out:
            click.echo(f"added area {a['id']} {a['name']!r} ({a['area_km2']:.2f} km²)")


@areas.command("list")
@click.option("--status", type=click.Choice(["active", "paused"]), help="Only areas with this status.")
@click.option("--json", "as_json", is_flag=True, help="JSON array instead of a table.")
@click.pass_obj
def list_cmd(settings: Settings, status: str | None, as_json: bool) -> None:
    """List watched areas."""
    from core.db import session_scope
    from monitor import areas as svc

    with session_scope(settings) as session:
        rows = [svc.area_properties(a) for a in svc.list_areas(session, status)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif rows:
        click.echo(_table(rows))
    else:
        click.echo("no areas yet — add one with `unirs-monitor areas add`")


def _bounds(geometry: dict[str, Any]) -> str:
    """West, south, east, north in degrees; for an area split at ±180° west is the part east of 180°
    (RFC 7946 §5.2), so the box is the small one that crosses the antimeridian, not the whole globe."""
    from shapely.geometry import shape

    from monitor.geometry import crosses_antimeridian

    geom = shape(geometry)
    west, south, east, north = geom.bounds
    crossing = crosses_antimeridian(geom)
    if crossing:
        parts = list(geom.geoms)
        west = min(p.bounds[0] for p in parts if p.centroid.x > 0)
        east = max(p.bounds[2] for p in parts if p.centroid.x < 0)
    note = "; crosses 180°" if crossing else ""
    return f"{west:.5f}, {south:.5f}, {east:.5f}, {north:.5f} (west, south, east, north{note})"


def _text(value: Any) -> str:
    """A property value as a person reads it: lists comma-separated, numbers without float noise."""
    if isinstance(value, list | tuple):
        return ", ".join(map(_text, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _attribute(value: Any) -> str:
    """An attribute of the user's own: text as it is, anything else as JSON (``[3, 4]``, ``true``)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _printable(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``, ``\\n``): names and attributes come from users (the
    web API included), and raw escapes would reach the operator's terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def show_lines(feature: dict[str, Any]) -> list[str]:
    """``areas show`` for people: aligned ``key: value`` lines of the Feature ``areas show --json`` prints
    (``area_km2`` in km², cloud cover in %, hectares in ha; empty lists say what they mean), then one
    ``attributes.KEY`` line per attribute of the area, by key."""
    p = feature["properties"]
    alerting = p["alert_frequency"] != "off"
    rows: list[tuple[str, str]] = [
        ("id", str(feature["id"])),
        ("name", p["name"]),
        ("status", p["status"]),
        ("area", f"{p['area_km2']:.2f} km²"),
        ("bounds", _bounds(feature["geometry"])),
        ("collections", _text(p["collections"])),
        ("max_cloud_cover", f"{p['max_cloud_cover']:g} %"),
        ("min_clear_fraction", _text(p["min_clear_fraction"])),
        ("min_covered_fraction", _text(p["min_covered_fraction"])),
        ("alert_frequency", p["alert_frequency"]),
        ("recipients", _text(p["recipients"]) or ("(nobody!)" if alerting else "(none)")),
        ("alert_classes", _text(p["alert_classes"])),
        ("min_alert_hectares", f"{p['min_alert_hectares']:g} ha"),
        ("alert_on", p["alert_on"]),
        ("questions", _text(p["questions"]) or "(all templates)"),
        ("pairing_policy", p["pairing_policy"]),
    ]
    attributes = p.get("attributes") or {}
    # Sorted: JSONB keeps no key order of its own.
    rows += [(f"attributes.{k}", _attribute(v)) for k, v in sorted(attributes.items())] or [("attributes", "(none)")]
    rows = [(_printable(k), _printable(v)) for k, v in rows]
    width = max(len(k) for k, _ in rows) + 1
    return [f"{k + ':':<{width}} {v}" for k, v in rows]


@areas.command("show")
@click.argument("area")
@click.option("--json", "as_json", is_flag=True, help="Print as an RFC 7946 GeoJSON Feature (the area's id as its id).")
@_friendly
@click.pass_obj
def show_cmd(settings: Settings, area: str, as_json: bool) -> None:
    """Show one area (by name or id): its settings as aligned lines, or a GeoJSON Feature with --json."""
    from core.db import session_scope
    from monitor import areas as svc

    with session_scope(settings) as session:
        feature = svc.area_feature(svc.get_area(session, area))
    if as_json:
        click.echo(json.dumps(feature, indent=2, ensure_ascii=False))
        return
    click.echo("\n".join(show_lines(feature)))


@areas.command("update")
@click.argument("area")
@click.option("--geometry", "geometry_source", help="Replace the geometry (GeoJSON / WKT / file).")
@click.option("--fix", is_flag=True, help="Repair an invalid replacement geometry.")
@click.option("--rename", help="New name.")
@_settings_options
@click.option("--json", "as_json", is_flag=True)
@_friendly
@click.pass_obj
def update_cmd(settings: Settings, area: str, geometry_source: str | None, fix: bool, rename: str | None, as_json: bool,
               **kw: Any) -> None:
    """Change an area's geometry, name or settings (options not given are kept)."""
    from core.db import session_scope
    from monitor import areas as svc
    from monitor.geometry import parse_areas, read_source

    geometry = None
    if geometry_source:
        parsed = parse_areas(read_source(geometry_source), union=True, fix=fix,
                             max_vertices=settings.max_area_vertices)
        geometry = parsed[0]
    with session_scope(settings) as session:
        a = svc.update_area(session, area, _options(**kw), max_area_km2=settings.max_area_km2, geometry=geometry,
                            rename=rename)
        props = svc.area_properties(a)
        _warn_if_alerting_nobody([a])
    click.echo(json.dumps(props, indent=2) if as_json else f"updated area {props['id']} {props['name']!r}")


def _status_command(name: str, status: str, help_text: str) -> None:
    @areas.command(name, help=help_text)
    @click.argument("area")
    @_friendly
    @click.pass_obj
    def cmd(settings: Settings, area: str) -> None:
        from core.db import session_scope
        from core.models import AreaStatus
        from monitor import areas as svc

        with session_scope(settings) as session:
            a = svc.set_status(session, area, AreaStatus(status))
            click.echo(f"area {a.name!r} is {status}")


_status_command("pause", "paused", "Stop polling and alerting for an area (history is kept).")
_status_command("resume", "active", "Resume a paused area.")


@areas.command("remove")
@click.argument("area")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_friendly
@click.pass_obj
def remove_cmd(settings: Settings, area: str, yes: bool) -> None:
    """Delete an area together with its observations, analyses and findings."""
    from core.db import session_scope
    from monitor import areas as svc

    if not yes:
        click.confirm(f"Remove area {area!r} and all its findings?", abort=True)
    with session_scope(settings) as session:
        click.echo(f"removed area {svc.remove_area(session, area)!r}")


@areas.command("export")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), help="File (default stdout).")
@click.option("--status", type=click.Choice(["active", "paused"]))
@click.pass_obj
def export_cmd(settings: Settings, output: str | None, status: str | None) -> None:
    """Write all areas as a GeoJSON FeatureCollection (can be added back with `areas add`)."""
    from core.db import session_scope
    from monitor import areas as svc

    with session_scope(settings) as session:
        fc = svc.export_feature_collection(svc.list_areas(session, status))
    text = json.dumps(fc, indent=2)
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        click.echo(f"wrote {len(fc['features'])} area(s) to {output}", err=True)
    else:
        click.echo(text)

"""Reading and validating watched-area geometries (GeoJSON, WKT, files).

Every refusal is an :class:`AreaGeometryError` whose message says what is wrong and where (the 1-based
feature number and its name, shapely's explanation of an invalid ring, the offending coordinate), so a
user can fix the file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import antimeridian
import numpy as np
import shapely
from pyproj import Geod
from shapely.geometry import MultiPolygon, box, mapping, shape
from shapely.geometry.base import BaseGeometry

_GEOD = Geod(ellps="WGS84")
# Shapely parsing accepts a few more; these are what a watched area can be made of.
_POLYGONAL = ("Polygon", "MultiPolygon")


class AreaGeometryError(ValueError):
    """The input cannot become a watched area; the message says why and where."""


# A refused feature: (its 1-based number in the input, 0 outside a FeatureCollection; one line saying what
# is wrong and how to fix it). parse_areas and monitor.areas.add_areas collect them so that a file with
# several bad features is reported in one run.
Problem = tuple[int, str]


def problem_report(problems: list[Problem]) -> str:
    """One message for ``problems``: the line itself when there is one, else a count and one indented line
    per problem in feature order (a feature's geometry problem before its property problems)."""
    lines = [line for _, line in sorted(problems, key=lambda p: p[0])]
    if len(lines) == 1:
        return lines[0]
    return f"{len(lines)} problems, nothing added:\n" + "\n".join(f"  {line}" for line in lines)


@dataclass
class ParsedArea:
    """One area read from the input: geometry (EPSG:4326) plus the GeoJSON properties it came with."""

    geometry: MultiPolygon
    properties: dict[str, Any] = field(default_factory=dict)
    source: str = "input"  # e.g. "feature 3 ('north')", 1-based — used in error messages
    number: int = 0  # the feature's 1-based number in a FeatureCollection, else 0 (orders problem reports)

    @property
    def area_km2(self) -> float:
        return geodesic_area_km2(self.geometry)


def geodesic_area_km2(geom: BaseGeometry) -> float:
    """Area on the WGS84 ellipsoid (planar area in degrees² would be wrong away from the equator)."""
    area, _ = _GEOD.geometry_area_perimeter(geom)
    return abs(area) / 1e6


_EWKT_SRID = re.compile(r"\s*SRID=(\d+)\s*;", re.IGNORECASE)


def read_source(source: str) -> str:
    """SOURCE is a file path, GeoJSON text or WKT text; return the text."""
    _check_text(source, "the argument")
    stripped = source.strip()
    if stripped.startswith(("{", "[")) or stripped[:20].upper().startswith(("POLYGON", "MULTIPOLYGON")):
        return stripped
    try:
        path = Path(source).expanduser()
    except RuntimeError:  # "~user" whose home directory cannot be determined
        user = source.split("/", 1)[0]
        raise AreaGeometryError(f"{source}: cannot expand {user!r}: no such user or no home directory") from None
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, or holding a NUL: it is text
        is_file = False
    if is_file:
        try:
            return path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is not text
        except UnicodeDecodeError as exc:
            raise AreaGeometryError(f"{path}: not a UTF-8 text file (GeoJSON or WKT expected): {exc}") from None
    # WKT always has a "(" (or is "… EMPTY"); anything else short is meant as a file name, e.g. `parcels`.
    if stripped and len(stripped) < 256 and "(" not in stripped and not stripped.upper().endswith("EMPTY"):
        raise AreaGeometryError(f"{_shown(source)}: no such file (expected a GeoJSON or WKT file, GeoJSON text or WKT)")
    return stripped


def read_stdin(stream: Any) -> str:
    """The whole of a binary stream (``sys.stdin.buffer``) as UTF-8 text, or a one-line error."""
    data = stream.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AreaGeometryError(
            f"stdin: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); GeoJSON or WKT expected"
        ) from None


def parse_areas(text: str, *, max_vertices: int, union: bool = False, fix: bool = False,
                problems: list[Problem] | None = None, fix_hint: str = "--fix") -> list[ParsedArea]:
    """Parse GeoJSON (Geometry, Feature, FeatureCollection) or WKT into validated MultiPolygons.

    A FeatureCollection gives one area per feature, or a single area with ``union=True``.
    ``fix=True`` repairs invalid rings with ``shapely.make_valid`` instead of refusing them; a refusal
    names the option that does so as ``fix_hint`` (the CLI's ``--fix``; the HTTP API passes ``?fix=true``).
    Z and M ordinates are dropped. An input with more than ``max_vertices`` vertices in all (the
    ``max_area_vertices`` setting) is refused with its count before any validation work.

    Every feature is checked: the refused ones are raised together (one AreaGeometryError, one line each,
    :func:`problem_report`), or, when a ``problems`` list is given, appended to it and left out of the
    result, so the caller can add the problems it finds in the properties and report all at once (with
    ``union``, nothing is merged then). Errors of the input as a whole (not JSON, too many vertices) are
    raised at once.
    """
    _check_text(text, "input")
    text = text.lstrip("\ufeff").strip()  # a byte-order mark left by an editor (the web upload's file too)
    if not text:
        raise AreaGeometryError("empty input: expected GeoJSON, WKT or a file path")
    refused: list[Problem] = [] if problems is None else problems
    before = len(refused)
    if text[0] in "{[":
        raw = _parse_geojson(text, refused)
    else:
        raw = [(0, _parse_wkt(text), {}, "WKT")]
    vertices = sum(shapely.get_num_coordinates(g) for _, g, _, _ in raw)
    if vertices > max_vertices:
        raise AreaGeometryError(
            f"input has {vertices:,} vertices, above the maximum of {max_vertices:,} (setting "
            "UNIRS_MAX_AREA_VERTICES); simplify it first (e.g. ogr2ogr -simplify or mapshaper)"
        )

    parsed = []
    for number, geom, props, src in raw:
        try:
            parsed.append(ParsedArea(_validated(geom, src, fix, fix_hint), props, src, number))
        except AreaGeometryError as exc:
            refused.append((number, str(exc)))
    if problems is None and refused:
        raise AreaGeometryError(problem_report(refused))
    if len(refused) > before:
        return parsed if not union else []
    if union and len(raw) > 1:
        merged = shapely.union_all([p.geometry for p in parsed])
        return [ParsedArea(_as_multipolygon(merged, "union of all features"), {}, "union of all features")]
    return parsed


def _parse_geojson(text: str, refused: list[Problem]) -> list[tuple[int, BaseGeometry, dict[str, Any], str]]:
    """(feature number, geometry, properties, label) per feature; a feature that is not one (no geometry,
    a line...) goes to ``refused`` instead."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AreaGeometryError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise AreaGeometryError("invalid GeoJSON: arrays/objects nested too deeply") from None
    if not isinstance(doc, dict):
        raise AreaGeometryError("GeoJSON must be an object with a 'type' member")
    kind = doc.get("type")
    if kind == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list) or not features:
            raise AreaGeometryError("FeatureCollection has no features")
        out = []
        for number, f in enumerate(features, start=1):  # 1-based, as people count (and as QGIS numbers features)
            try:
                out.append((number, *_feature(f, f"feature {number}")))
            except AreaGeometryError as exc:
                refused.append((number, str(exc)))
        return out
    if kind == "Feature":
        return [(0, *_feature(doc, "feature"))]
    if isinstance(kind, str):
        return [(0, _geometry(doc, "geometry"), {}, "geometry")]
    raise AreaGeometryError("GeoJSON object has no 'type' (expected Feature, FeatureCollection or a geometry)")


def _feature(obj: Any, where: str) -> tuple[BaseGeometry, dict[str, Any], str]:
    if not isinstance(obj, dict) or obj.get("type") != "Feature":
        raise AreaGeometryError(f"{where}: not a GeoJSON Feature")
    props = obj.get("properties") or {}
    if not isinstance(props, dict):
        raise AreaGeometryError(f"{where}: 'properties' must be an object or null")
    if obj.get("geometry") is None:
        raise AreaGeometryError(f"{where}: has no geometry")
    name = props.get("name")
    label = f"{where} ({name!r})" if isinstance(name, str) else where
    return _geometry(obj["geometry"], label), props, label


def _geometry(obj: Any, where: str) -> BaseGeometry:
    if not isinstance(obj, dict):
        raise AreaGeometryError(f"{where}: geometry must be an object")
    kind = obj.get("type")
    if kind not in _POLYGONAL:
        raise AreaGeometryError(f"{where}: {kind!r} is not polygonal; a watched area must be a Polygon or MultiPolygon")
    depth = 3 if kind == "Polygon" else 4
    coordinates = _planar(obj.get("coordinates"), depth, f"{where}: coordinates")
    try:
        geom = shape({"type": kind, "coordinates": coordinates})
    except Exception as exc:  # shapely raises several types for malformed coordinate arrays
        raise AreaGeometryError(f"{where}: malformed {kind} coordinates ({exc})") from None
    return geom


def _planar(value: Any, depth: int, where: str) -> list[Any]:
    """Coordinates nested ``depth`` deep (positions at the bottom) with each position cut to [lon, lat].

    Checks the nesting before shapely sees it (no RecursionError on hostile input) and drops Z/M
    ordinates like ``force_2d`` does for WKT.
    """
    if depth == 1:
        if (not isinstance(value, list) or len(value) < 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value[:2])):
            raise AreaGeometryError(f"{where} is not a position [lon, lat]: {str(value)[:60]}")
        return [float(value[0]), float(value[1])]
    if not isinstance(value, list):
        raise AreaGeometryError(f"{where} must be an array, got {type(value).__name__}")
    return [_planar(v, depth - 1, f"{where}[{i}]") for i, v in enumerate(value)]


def _parse_wkt(text: str) -> BaseGeometry:
    """WKT, or PostGIS EWKT in EPSG:4326 (``SRID=4326;POLYGON(...)``, what ``ST_AsEWKT`` prints)."""
    ewkt = _EWKT_SRID.match(text)
    if ewkt:
        if ewkt.group(1) != "4326":
            raise AreaGeometryError(f"EWKT in SRID {ewkt.group(1)}: areas are longitude/latitude in EPSG:4326 (WGS 84, "
                                    "as in GeoJSON, RFC 7946); reproject first, e.g. ST_Transform(geom, 4326)")
        text = text[ewkt.end():]
    try:
        geom = shapely.from_wkt(text)
    except shapely.errors.GEOSException as exc:
        detail = str(exc).strip() or f"cannot parse {text[:40]!r}"
        raise AreaGeometryError(f"invalid WKT: {detail}") from None
    if geom.geom_type not in _POLYGONAL:
        raise AreaGeometryError(f"WKT: {geom.geom_type} is not polygonal; a watched area must be a (MULTI)POLYGON")
    return geom


def _validated(geom: BaseGeometry, where: str, fix: bool, fix_hint: str = "--fix") -> MultiPolygon:
    if geom.is_empty:
        raise AreaGeometryError(f"{where}: geometry is empty")
    if geom.has_z or geom.has_m:  # POLYGON Z / M / ZM: a watched area is planar lon/lat
        geom = shapely.force_2d(geom)
    coords = shapely.get_coordinates(geom)
    if not all(math.isfinite(v) for v in coords.ravel()):
        raise AreaGeometryError(f"{where}: coordinates contain NaN or infinity")
    geom = _split_antimeridian(geom, where)
    minx, miny, maxx, maxy = geom.bounds
    if minx < -180 or maxx > 180 or miny < -90 or maxy > 90:
        bad = next(
            (x, y) for x, y in coords if not (-180 <= x <= 180 and -90 <= y <= 90)
        ) if len(coords) else (minx, miny)
        raise AreaGeometryError(
            f"{where}: coordinate ({bad[0]:g}, {bad[1]:g}) is outside longitude [-180, 180] / latitude [-90, 90]"
            " — coordinates must be WGS84 lon, lat (EPSG:4326), in that order"
        )
    if not geom.is_valid:
        reason = shapely.is_valid_reason(geom)
        if not fix:
            raise AreaGeometryError(f"{where}: invalid geometry: {reason} (use {fix_hint} to repair it)")
        geom = shapely.make_valid(geom)
    return _as_multipolygon(geom, where)


def _as_multipolygon(geom: BaseGeometry, where: str) -> MultiPolygon:
    """Keep only polygonal parts (make_valid may return a GeometryCollection with slivers of lines)."""
    if geom.geom_type == "Polygon":
        parts = [geom]
    elif geom.geom_type == "MultiPolygon":
        parts = list(geom.geoms)
    elif geom.geom_type == "GeometryCollection":
        parts = [p for g in geom.geoms for p in (g.geoms if g.geom_type == "MultiPolygon" else [g])
                 if p.geom_type == "Polygon"]
    else:
        parts = []
    parts = [p for p in parts if not p.is_empty and p.area > 0]
    if not parts:
        raise AreaGeometryError(f"{where}: geometry has no area (degenerate polygon)")
    return MultiPolygon(parts)


def _split_antimeridian(geom: BaseGeometry, where: str) -> BaseGeometry:
    """Split a polygon that crosses ±180° into parts on either side (RFC 7946 §3.1.9).

    Two spellings occur in the wild: longitudes continuing past 180 (179 → 181), and rings that jump from
    179 to -179. Both are normalised by shifting into [0, 360), cutting at 180 and shifting the east part
    back. A polygon that would still span more than 180° of longitude is refused: it is ambiguous.
    """
    minx, _, maxx, _ = geom.bounds
    crosses_unwrapped = maxx > 180 or minx < -180
    jumps = maxx - minx > 180 and minx >= -180 and maxx <= 180
    if not (crosses_unwrapped or jumps):
        return geom
    if maxx - minx > 360:
        return geom  # out-of-range coordinates, reported by the caller
    if jumps:
        shifted = shapely.transform(geom, lambda c: _shift_lon(c, 360.0, only_negative=True))
    elif minx < -180:
        shifted = shapely.transform(geom, lambda c: _shift_lon(c, 360.0))
    else:
        shifted = geom
    sminx, _, smaxx, _ = shifted.bounds
    if smaxx - sminx > 180 or sminx < 0 or smaxx > 360:
        raise AreaGeometryError(
            f"{where}: polygon spans more than 180° of longitude or wraps ambiguously around the antimeridian;"
            " split it into parts on either side of ±180° yourself"
        )
    if not shifted.is_valid:
        return geom  # let validation report the real problem with the user's coordinates
    west = shifted.intersection(box(sminx, -90, 180, 90))
    east = shapely.transform(shifted.intersection(box(180, -90, smaxx, 90)), lambda c: _shift_lon(c, -360.0))
    pieces = [g for g in (west, east) if not g.is_empty and g.area > 0]
    return shapely.union_all(pieces) if len(pieces) > 1 else (pieces[0] if pieces else geom)


def _shift_lon(coords: np.ndarray, delta: float, only_negative: bool = False) -> np.ndarray:
    out = coords.copy()
    sel = out[:, 0] < 0 if only_negative else slice(None)
    out[sel, 0] += delta
    return out


def _shown(text: str) -> str:
    """``text`` as is when it is one printable line, else its repr (an error message stays one line)."""
    return text if text.isprintable() else repr(text)


def _check_text(text: str, what: str) -> None:
    """Refuse text Python decoded with surrogateescape (invalid UTF-8 in argv) or holding lone surrogates."""
    for index, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            hint = f"byte 0x{ord(ch) - 0xDC00:02x}" if "\udc80" <= ch <= "\udcff" else f"U+{ord(ch):04X}"
            raise AreaGeometryError(f"{what} is not valid UTF-8 text ({hint} at character {index})")


def crosses_antimeridian(geom: BaseGeometry) -> bool:
    """True when ``geom`` (lon/lat) has parts on both sides of ±180° — a split area or footprint whose
    planar bounds then span more than 180° of longitude although the shape itself is small."""
    minx, _, maxx, _ = geom.bounds
    return maxx - minx > 180


def antimeridian_safe(geom: BaseGeometry) -> BaseGeometry:
    """``geom`` with every polygon whose ring jumps across ±180° (lon 179.8 → −179.6) cut into parts on
    either side (RFC 7946 §3.1.9), by the ``antimeridian`` package; other polygons are kept as they are.

    A ring written that way is, read planarly, a polygon some 359° wide: it would match areas on the
    other side of the world. Raises ``ValueError`` when the package cannot make a valid shape of it.
    """
    polygons = list(geom.geoms) if geom.geom_type == "MultiPolygon" else [geom]
    if geom.geom_type not in _POLYGONAL or not any(crosses_antimeridian(p) for p in polygons):
        return geom
    parts: list[BaseGeometry] = []
    for polygon in polygons:
        if crosses_antimeridian(polygon):
            # Footprints are drawn as straight lines in lon/lat, so the crossing latitude is planar too.
            fixed = antimeridian.fix_polygon(polygon, fix_winding=True, great_circle=False)
            parts.extend(fixed.geoms if fixed.geom_type == "MultiPolygon" else [fixed])
        else:
            parts.append(polygon)
    return MultiPolygon(parts) if len(parts) > 1 else parts[0]


# RFC 7946 §11.2: 7 decimals of a degree are about 1 cm, more than any satellite pixel resolves.
GEOJSON_DECIMALS = 7


def rfc7946_geometry(geom: BaseGeometry) -> dict[str, Any]:
    """GeoJSON geometry per RFC 7946: exterior rings counter-clockwise, holes clockwise (§3.1.6),
    coordinates rounded to :data:`GEOJSON_DECIMALS` (§11.2). Lon/lat WGS84, as stored."""
    oriented = shapely.orient_polygons(geom, exterior_cw=False)
    return mapping(shapely.transform(oriented, lambda c: np.round(c, GEOJSON_DECIMALS)))


def to_feature(geom: MultiPolygon, properties: dict[str, Any], feature_id: int | str | None = None) -> dict[str, Any]:
    """An RFC 7946 Feature; ``feature_id`` becomes the Feature's ``id`` member (§3.2), not a property."""
    feature: dict[str, Any] = {"type": "Feature"}
    if feature_id is not None:
        feature["id"] = feature_id
    return {**feature, "geometry": rfc7946_geometry(geom), "properties": properties}


__all__ = [
    "AreaGeometryError",
    "ParsedArea",
    "Problem",
    "antimeridian_safe",
    "crosses_antimeridian",
    "geodesic_area_km2",
    "parse_areas",
    "problem_report",
    "read_source",
    "read_stdin",
    "rfc7946_geometry",
    "to_feature",
]

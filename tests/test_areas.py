"""Watched areas through the real CLI against a real PostGIS database."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
import shapely
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import box, mapping, shape

from monitor.cli import cli
from monitor.geometry import AreaGeometryError, parse_areas

# A ~7.7 km × 11 km box over the bundled Romanian forest sample.
FOREST = box(23.10, 46.50, 23.20, 46.60)


def run(*args: str, input: str | None = None, ok: bool = True):
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def feature(geom, **props) -> dict:
    return {"type": "Feature", "geometry": mapping(geom), "properties": props}


def stored_geometry(db_url: str, name: str):
    with psycopg.connect(db_url.replace("+psycopg", "")) as conn:
        wkt, srid, geog_km2 = conn.execute(
            "SELECT ST_AsText(geom), ST_SRID(geom), ST_Area(geom::geography) / 1e6 FROM areas WHERE name = %s",
            (name,),
        ).fetchone()
    return shapely.from_wkt(wkt), srid, geog_km2


def test_add_geojson_file_then_list_show(db, tmp_path):
    path = tmp_path / "forest.geojson"
    path.write_text(json.dumps(feature(FOREST, name="ignored because --name wins")))
    out = run("areas", "add", str(path), "--name", "Apuseni forest", "--recipient", "Ana@Example.org",
              "--max-cloud", "40", "--min-clear", "0.8", "--frequency", "daily", "--json")
    created = json.loads(out.stdout)
    assert [a["name"] for a in created] == ["Apuseni forest"]
    assert created[0]["recipients"] == ["Ana@example.org"]  # domain normalised, local part kept
    assert created[0]["max_cloud_cover"] == 40 and created[0]["alert_frequency"] == "daily"

    geom, srid, geog_km2 = stored_geometry(db, "Apuseni forest")
    assert srid == 4326 and geom.geom_type == "MultiPolygon"
    assert geom.normalize().equals_exact(shapely.MultiPolygon([FOREST]).normalize(), 1e-9)
    # Geodesic area from pyproj agrees with PostGIS geography (an independent implementation).
    assert created[0]["area_km2"] == pytest.approx(geog_km2, rel=1e-3)
    assert 80 < geog_km2 < 90

    listed = json.loads(run("areas", "list", "--json").stdout)
    assert [a["name"] for a in listed] == ["Apuseni forest"]
    shown = json.loads(run("areas", "show", "Apuseni forest", "--json").stdout)
    assert shape(shown["geometry"]).equals(FOREST)
    assert "Apuseni forest" in run("areas", "list").output


def test_feature_collection_one_area_per_feature_or_union(db):
    fc = {"type": "FeatureCollection", "features": [
        feature(box(23.10, 46.50, 23.15, 46.55), name="north"),
        feature(box(23.15, 46.50, 23.20, 46.55), name="south", recipients=["x@example.org"]),
    ]}
    out = json.loads(run("areas", "add", json.dumps(fc), "--json").stdout)
    assert sorted(a["name"] for a in out) == ["north", "south"]
    assert next(a for a in out if a["name"] == "south")["recipients"] == ["x@example.org"]
    merged = json.loads(run("areas", "add", json.dumps(fc), "--union", "--name", "both", "--json").stdout)
    assert len(merged) == 1
    geom, _, _ = stored_geometry(db, "both")
    assert geom.area == pytest.approx(0.1 * 0.05, rel=1e-9)


def test_wkt_and_stdin(db):
    run("areas", "add", FOREST.wkt, "--name", "wkt")
    run("areas", "add", "-", "--name", "stdin", input=json.dumps(mapping(FOREST)))
    assert {a["name"] for a in json.loads(run("areas", "list", "--json").stdout)} == {"wkt", "stdin"}


def test_byte_order_mark_and_ewkt(db, tmp_path):
    """A file saved with a UTF-8 byte-order mark (Windows editors) and PostGIS EWKT in EPSG:4326 are read;
    EWKT in another SRID is refused naming the fix."""
    bom = tmp_path / "bom.geojson"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(feature(FOREST, name="bom")).encode())
    run("areas", "add", str(bom))
    run("areas", "add", "-", "--name", "bom-stdin", input="\ufeff" + FOREST.wkt)
    run("areas", "add", f"SRID=4326;{FOREST.wkt}", "--name", "ewkt")
    assert stored_geometry(db, "ewkt")[0].equals(FOREST) and stored_geometry(db, "bom")[0].equals(FOREST)
    result = run("areas", "add", f"SRID=3035;{FOREST.wkt}", "--name", "laea", ok=False)
    assert result.exit_code == 1
    assert "EWKT in SRID 3035: areas are longitude/latitude in EPSG:4326" in result.output
    assert sorted(a["name"] for a in json.loads(run("areas", "list", "--json").stdout)) == ["bom", "bom-stdin", "ewkt"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("POLYGON((23 46, 23.1 46.1, 23.1 46, 23 46.1, 23 46))", "Self-intersection"),
        ('{"type": "Point", "coordinates": [23, 46]}', "not polygonal"),
        ('{"type": "Polygon", "coordinates": []}', "empty"),
        ("POLYGON((23 46, 23 95, 24 46, 23 46))", "outside longitude"),
        ("POLYGON((0 0, 3 0, 3 3, 0 3, 0 0))", "above the maximum"),
        ('{"type": "Polygon", "coordinates": [[[23, 46], [23.1, 46]', "invalid JSON at line 1"),
        ("POLYGON((23 46, 23.1 46", "invalid WKT"),
        ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": null, "properties": {}}]}',
         "feature 1: has no geometry"),
        ("POLYGON((0 0, 200 0, 200 1, 0 0))", "more than 180°"),
        ("/no/such/file.geojson", "no such file"),
    ],
)
def test_refusals_say_why(db, source, message):
    result = run("areas", "add", source, "--name", "bad", ok=False)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert json.loads(run("areas", "list", "--json").stdout) == []


def test_fix_repairs_self_intersection(db):
    bowtie = "POLYGON((23 46, 23.1 46.1, 23.1 46, 23 46.1, 23 46))"
    run("areas", "add", bowtie, "--name", "bowtie", "--fix")
    geom, _, _ = stored_geometry(db, "bowtie")
    assert geom.is_valid and len(geom.geoms) == 2


def test_antimeridian_polygon_is_split(db):
    # Fiji-like box written with longitudes running past 180.
    run("areas", "add", "POLYGON((179.8 -17, 180.2 -17, 180.2 -16.8, 179.8 -16.8, 179.8 -17))", "--name", "fiji")
    geom, _, km2 = stored_geometry(db, "fiji")
    assert len(geom.geoms) == 2
    minx, _, maxx, _ = geom.bounds
    assert minx == pytest.approx(-180) and maxx == pytest.approx(180)
    assert km2 == pytest.approx(0.4 * 0.2 * 111.3 * 106.5, rel=0.02)


def test_names_recipients_and_settings_validated(db):
    run("areas", "add", FOREST.wkt, "--name", "one")
    assert "already exists" in run("areas", "add", FOREST.wkt, "--name", "one", ok=False).output
    assert "not a valid email" in run("areas", "add", FOREST.wkt, "--name", "two", "--recipient", "nobody",
                                      ok=False).output
    assert "control characters" in run("areas", "add", FOREST.wkt, "--name", "evil\r\nBcc: x@y.z",
                                       ok=False).output
    assert "[0, 1]" in run("areas", "add", FOREST.wkt, "--name", "three", "--min-clear", "7", ok=False).output


def test_update_pause_resume_remove(db):
    run("areas", "add", FOREST.wkt, "--name", "a")
    run("areas", "update", "a", "--rename", "b", "--max-cloud", "20", "--policy", "seasonal",
        "--geometry", box(23.1, 46.5, 23.12, 46.52).wkt)
    shown = json.loads(run("areas", "show", "b", "--json").stdout)["properties"]
    assert shown["max_cloud_cover"] == 20 and shown["pairing_policy"] == "seasonal"
    assert shown["area_km2"] < 10
    run("areas", "pause", "b")
    assert json.loads(run("areas", "list", "--status", "paused", "--json").stdout)[0]["name"] == "b"
    run("areas", "resume", "b")
    assert json.loads(run("areas", "list", "--status", "paused", "--json").stdout) == []
    run("areas", "remove", "b", "--yes")
    assert "no area named" in run("areas", "show", "b", ok=False).output


def test_export_add_round_trip(db, tmp_path):
    fc = {"type": "FeatureCollection", "features": [
        feature(box(23.10, 46.50, 23.15, 46.55), name="n1", recipients=["a@example.org"], max_cloud_cover=30),
        feature(box(179.9, -17, 180.1, -16.9), name="n2", alert_frequency="off"),
    ]}
    run("areas", "add", json.dumps(fc))
    out = tmp_path / "export.geojson"
    run("areas", "export", "-o", str(out))
    before = json.loads(out.read_text())
    for area in json.loads(run("areas", "list", "--json").stdout):
        run("areas", "remove", area["name"], "--yes")
    run("areas", "add", str(out))
    after = json.loads(run("areas", "export").stdout)
    strip = lambda f: {k: v for k, v in f["properties"].items() if k != "id"}  # noqa: E731
    assert [strip(f) for f in after["features"]] == [strip(f) for f in before["features"]]
    for a, b in zip(after["features"], before["features"], strict=True):
        assert shape(a["geometry"]).equals_exact(shape(b["geometry"]), 1e-12)


# --- property-based: whatever the input, either a valid area or a refusal that says why -----------------

_num = st.one_of(st.floats(-200, 200), st.just(float("nan")), st.just(float("inf")))
coord = st.tuples(_num, st.floats(-100, 100))
rings = st.lists(coord, min_size=0, max_size=8).map(lambda pts: [*pts, pts[0]] if pts else pts)
geojson_docs = st.one_of(
    rings.map(lambda r: {"type": "Polygon", "coordinates": [[list(p) for p in r]]}),
    st.lists(rings, max_size=3).map(lambda rs: {"type": "MultiPolygon", "coordinates": [[[list(p) for p in r]]
                                                                                         for r in rs]}),
    rings.map(lambda r: {"type": "LineString", "coordinates": [list(p) for p in r]}),
    st.dictionaries(st.sampled_from(["type", "coordinates", "features", "geometry"]),
                    st.one_of(st.none(), st.text(max_size=5), st.integers(), st.lists(st.integers(), max_size=3))),
)


@settings(max_examples=300, deadline=None)
@given(doc=geojson_docs, fix=st.booleans())
def test_parse_never_crashes_on_geojson(doc, fix):
    text = json.dumps(doc, allow_nan=True)
    try:
        parsed = parse_areas(text, fix=fix, max_vertices=100_000)
    except AreaGeometryError as exc:
        assert str(exc).strip()
        return
    for item in parsed:
        g = item.geometry
        assert g.geom_type == "MultiPolygon" and g.is_valid and not g.is_empty
        minx, miny, maxx, maxy = g.bounds
        assert -180 <= minx and maxx <= 180 and -90 <= miny and maxy <= 90


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(max_size=60), st.from_regex(r"(MULTI)?POLYGON ?\(\([0-9 ,.\-()]{0,40}", fullmatch=True)))
def test_parse_never_crashes_on_text(text):
    try:
        parse_areas(text, max_vertices=100_000)
    except AreaGeometryError as exc:
        assert str(exc).strip()


boxes = st.tuples(st.floats(-179, 178), st.floats(-80, 79), st.floats(0.001, 0.5), st.floats(0.001, 0.5))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=boxes, fmt=st.sampled_from(["wkt", "geojson", "feature"]))
def test_stored_geometry_equals_input(db, b, fmt):
    x, y, w, h = b
    geom = box(x, y, x + w, y + h)
    source = {"wkt": geom.wkt, "geojson": json.dumps(mapping(geom)),
              "feature": json.dumps(feature(geom, name="ignored"))}[fmt]
    name = f"h{uuid.uuid4().hex}"  # examples share one database: names must never repeat
    result = run("areas", "add", source, "--name", name, ok=False)
    if result.exit_code != 0:  # only possible refusal for these inputs: too large near nothing; say so
        assert "above the maximum" in result.output
        return
    stored, _, _ = stored_geometry(db, name)
    assert stored.geoms[0].normalize().equals_exact(geom.normalize(), 1e-9)


def test_question_templates_are_checked(db):
    from eo.questions import load_templates

    known = [t.id for t in load_templates()]
    out = run("areas", "add", FOREST.wkt, "--name", "q", "--question", known[0], "--question", known[1], "--json")
    assert json.loads(out.stdout)[0]["questions"] == known[:2]
    refused = run("areas", "add", FOREST.wkt, "--name", "q2", "--question", "are-there-dragons", ok=False)
    assert "unknown question template" in refused.output and known[0] in refused.output


def test_a_single_string_where_a_list_is_expected_is_refused_not_split_into_characters(db):
    doc = json.dumps(feature(FOREST, name="strings", collections="sentinel-2-l2a"))
    out = run("areas", "add", doc, ok=False).output
    assert "collections must be a non-empty list" in out
    assert "strings" not in run("areas", "list").output


def test_alert_classes_default_validate_and_update(db):
    from core.models import DEFAULT_ALERT_CLASSES
    from eo.change_classes import LOSS_CLASSES

    assert DEFAULT_ALERT_CLASSES == LOSS_CLASSES  # core repeats eo's default (core imports nothing above it)
    run("areas", "add", FOREST.wkt, "--name", "watch")
    shown = json.loads(run("areas", "show", "watch", "--json").stdout)["properties"]
    assert shown["alert_classes"] == ["new_built_up_or_bare", "vegetation_loss"]
    assert shown["min_alert_hectares"] == 0.2
    run("areas", "update", "watch", "--alert-class", "vegetation_gain", "--alert-class", "vegetation_loss")
    shown = json.loads(run("areas", "show", "watch", "--json").stdout)["properties"]
    assert shown["alert_classes"] == ["vegetation_loss", "vegetation_gain"]
    bad = run("areas", "update", "watch", "--alert-class", "clouds", ok=False)
    assert bad.exit_code == 2 and "clouds" in bad.output
    fc = {"type": "FeatureCollection", "features": [feature(box(23.1, 46.5, 23.11, 46.51), name="typo",
                                                            alert_classes=["forest loss"])]}
    typo = run("areas", "add", json.dumps(fc), ok=False)
    assert typo.exit_code == 1 and "alert classes must be a non-empty list" in typo.output


def test_a_number_that_names_one_area_and_numbers_another_is_refused_naming_both(db):
    """Names taken from a GIS feature id (--name-property fid) are numbers: '1' must not silently pick one."""
    first = json.loads(run("areas", "add", FOREST.wkt, "--name", "Parcel A", "--json").stdout)[0]["id"]
    second = json.loads(run("areas", "add", box(23.3, 46.5, 23.4, 46.6).wkt, "--name", str(first),
                            "--json").stdout)[0]["id"]
    result = run("areas", "show", str(first), ok=False)
    assert result.exit_code == 1
    assert (f"'{first}' is the name of area {second} and the id of area {first} ('Parcel A'): "
            f"say id:{second} or id:{first}") in result.output
    assert json.loads(run("areas", "show", f"id:{first}", "--json").stdout)["properties"]["name"] == "Parcel A"
    assert json.loads(run("areas", "show", f"id:{second}", "--json").stdout)["properties"]["name"] == str(first)
    assert json.loads(run("areas", "show", "Parcel A", "--json").stdout)["id"] == first
    assert "no area numbered 999" in run("areas", "show", "id:999", ok=False).output

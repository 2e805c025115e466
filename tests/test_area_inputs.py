"""Hostile area inputs through the real CLI (issue 17 item 5): a one-line error naming the problem, nothing stored."""

from __future__ import annotations

import json
import os

import psycopg
import pytest
from click.testing import CliRunner
from shapely.geometry import box, mapping

from monitor.cli import cli

FOREST = box(23.10, 46.50, 23.20, 46.60)
RING = "23.1 46.5, 23.2 46.5, 23.2 46.6, 23.1 46.6, 23.1 46.5"


def run(*args: str, input: str | bytes | None = None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def stored_names(db: str) -> list[str]:
    with psycopg.connect(db.replace("+psycopg", "")) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM areas ORDER BY id")]


def refused(result, *fragments: str) -> str:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# os.fsdecode is how Python turns argv bytes into str: invalid UTF-8 becomes lone surrogates.
INVALID_UTF8_NAME = os.fsdecode(b"\xff")


@pytest.mark.parametrize(("args", "fragments"), [
    (["--name", INVALID_UTF8_NAME], ["invalid UTF-8 (byte 0xff"]),
    (["--name", "a\ud800b"], ["lone surrogate U+D800"]),
    (["--name", "evil\u202egpj.exe"], ["non-printable character U+202E"]),
    (["--name", "ok", "--collection", INVALID_UTF8_NAME], ["collections", "invalid UTF-8"]),
])
def test_unprintable_names_and_ids_are_refused(db, args, fragments):
    refused(run("areas", "add", FOREST.wkt, *args), *fragments)
    assert stored_names(db) == []


def test_a_name_from_geojson_with_a_lone_surrogate_escape_is_refused(db):
    geometry = json.dumps(mapping(FOREST))
    doc = '{"type": "Feature", "geometry": ' + geometry + ', "properties": {"name": "x\\ud800"}}'
    refused(run("areas", "add", doc), "lone surrogate")
    props = '{"type": "Feature", "geometry": ' + geometry + ', "properties": {"name": "ok", "note": "\\udcff"}}'
    refused(run("areas", "add", props, "--keep-unknown-properties"), "properties cannot be stored")
    assert stored_names(db) == []


@pytest.mark.parametrize("wkt", [f"POLYGON M (({RING.replace(',', ' 7,')} 7))",
                                 f"POLYGON ZM (({RING.replace(',', ' 1 7,')} 1 7))",
                                 f"POLYGON Z (({RING.replace(',', ' 1,')} 1))"])
def test_m_and_zm_dimensions_are_dropped_like_z(db, wkt):
    for fix in ([], ["--fix"]):
        name = f"m{len(stored_names(db))}"
        result = run("areas", "add", wkt, "--name", name, *fix)
        assert result.exit_code == 0, result.output
    with psycopg.connect(db.replace("+psycopg", "")) as conn:
        dims = {r[0] for r in conn.execute("SELECT ST_NDims(geom) FROM areas")}
    assert dims == {2}


def test_geojson_positions_with_extra_ordinates_are_cut_to_lon_lat(db):
    coords = [[[x, y, 100.0, 7.0] for x, y in mapping(FOREST)["coordinates"][0]]]
    result = run("areas", "add", json.dumps({"type": "Polygon", "coordinates": coords}), "--name", "xyzm")
    assert result.exit_code == 0, result.output
    assert stored_names(db) == ["xyzm"]


@pytest.mark.parametrize(("source", "fragments"), [
    ("[" * 1000 + "]" * 1000, ["nested too deeply"]),
    ('{"type": "Polygon", "coordinates": ' + "[" * 1000 + "]" * 1000 + "}", ["nested too deeply"]),
    ('{"type": "Polygon", "coordinates": ' + "[" * 900 + "]" * 900 + "}", ["coordinates"]),
    ('{"type": "Polygon", "coordinates": [[[1, "a"], [2, 3]]]}', ["coordinates[0][0] is not a position"]),
    ("(" * 1000, ["invalid WKT"]),
    ("~no-such-user-unirs/area.geojson", ["cannot expand '~no-such-user-unirs'"]),
    (INVALID_UTF8_NAME + "POLYGON", ["not valid UTF-8", "byte 0xff"]),
])
def test_hostile_sources_get_one_line(db, source, fragments):
    refused(run("areas", "add", source, "--name", "x"), *fragments)
    assert stored_names(db) == []


def test_invalid_utf8_on_stdin_is_named(db):
    refused(run("areas", "add", "-", "--name", "x", input=b"POLYGON((\xff\xfe 1, 2 3))"),
            "stdin: not UTF-8", "byte 0xff at offset 9")
    assert stored_names(db) == []


def test_the_vertex_limit_refuses_with_the_count(db, monkeypatch):
    import numpy as np
    from shapely.geometry import Polygon

    angles = np.linspace(0, 2 * np.pi, 100_500, endpoint=False)
    circle = Polygon(np.c_[23.15 + 0.05 * np.cos(angles), 46.55 + 0.05 * np.sin(angles)])
    refused(run("areas", "add", circle.wkt, "--name", "big"), "100,501 vertices", "maximum of 100,000",
            "UNIRS_MAX_AREA_VERTICES")
    # The limit is a setting: below it, the same polygon is accepted.
    from core.config import get_settings

    monkeypatch.setenv("UNIRS_MAX_AREA_VERTICES", "200000")
    get_settings.cache_clear()
    try:
        assert run("areas", "add", circle.wkt, "--name", "big").exit_code == 0
    finally:
        get_settings.cache_clear()
    assert stored_names(db) == ["big"]


def test_a_lookup_by_an_invalid_utf8_name_says_so(db):
    refused(run("areas", "show", INVALID_UTF8_NAME), "no area named", "invalid UTF-8")


@pytest.mark.parametrize(("item_id", "fragment"), [
    ("S2B_34TER_20200829_0_L2A\r\nBcc: x@example.org", "control or non-printable character U+000D"),
    ("<script>alert(1)</script>", "markup character '<'"),
    ("a\u202eb", "U+202E"),
    ("x" * 300, "300 characters long"),
])
def test_catalogue_item_ids_with_control_characters_or_html_are_quarantined(db, items_by_date, item_id, fragment):
    from sqlalchemy import select

    from core.config import get_settings
    from core.db import session_scope
    from core.models import QuarantinedItem, Scene
    from monitor.catalogues import ingest_items, upsert_catalogue
    from tests.fixtures_ingest import loopback_catalogue

    catalogue = loopback_catalogue("http://127.0.0.1:9", ["sentinel-2-l2a"])
    bad = json.loads(json.dumps(items_by_date["2020-08-04"]))
    bad["id"] = item_id
    good = items_by_date["2020-08-29"]
    from devtools import localstac

    items = [localstac.rewrite_asset_hrefs(i, "http://127.0.0.1:9") for i in (bad, good)]
    with session_scope(get_settings()) as session:
        stats = ingest_items(session, catalogue, upsert_catalogue(session, catalogue), "sentinel-2-l2a", items)
    assert stats.quarantined == 1 and stats.new_scenes == 1
    with session_scope(get_settings()) as session:
        assert session.execute(select(Scene.item_id)).scalars().all() == ["S2B_34TER_20200829_0_L2A"]
        (reason,) = session.execute(select(QuarantinedItem.reason)).scalars().all()
    assert fragment in reason

"""An operator's area files: unknown properties, areas that alert nobody, where an error is, RFC 7946 output,
and the rich tables — through the real CLI on real PostGIS."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner
from shapely.geometry import Polygon, box, mapping, shape

from core.config import get_settings
from core.db import session_scope
from monitor.areas import AreaOptions
from monitor.cli import cli
from monitor.findings import format_table
from tests import factories as f


def run(*args: str, ok: bool = True, input: str | None = None):
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0, result.output
        assert "Traceback" not in result.output
    return result


def feature(geom, **props) -> dict:
    return {"type": "Feature", "geometry": mapping(geom), "properties": props}


def collection(*features) -> str:
    return json.dumps({"type": "FeatureCollection", "features": list(features)})


def names(db) -> list[str]:
    return [a["name"] for a in json.loads(run("areas", "list", "--json").stdout)]


NORTH = box(23.10, 46.50, 23.15, 46.55)
SOUTH = box(23.15, 46.50, 23.20, 46.55)


def test_a_misspelled_property_is_refused_with_the_accepted_keys(db):
    fc = collection(feature(NORTH, name="north", recipients=["a@example.org"]),
                    feature(SOUTH, name="south", recipient="b@example.org"))
    err = run("areas", "add", fc, ok=False).stderr.strip()
    assert err.startswith("Error: feature 2 ('south'): unknown property 'recipient' (did you mean 'recipients'?)")
    assert "accepted: name, collections, max_cloud_cover" in err and "\n" not in err
    assert names(db) == []  # all or nothing: the good feature was not stored either


def test_unknown_properties_kept_as_attributes_on_request_and_round_trip(db, tmp_path):
    fc = collection(feature(NORTH, name="north", recipients=["a@example.org"], fid=7, owner="forestry office"))
    run("areas", "add", fc, "--keep-unknown-properties")
    out = tmp_path / "areas.geojson"
    run("areas", "export", "-o", str(out))
    exported = json.loads(out.read_text())["features"][0]
    assert exported["properties"]["attributes"] == {"fid": 7, "owner": "forestry office"}
    run("areas", "remove", "north", "--yes")
    run("areas", "add", str(out))  # an export is accepted as it is, without the flag
    again = json.loads(run("areas", "export").stdout)["features"][0]
    assert again["properties"]["attributes"] == {"fid": 7, "owner": "forestry office"}


def test_every_accepted_property_key_is_stored_and_exported(db):
    """Each key `accepted_keys()` names (the list `areas add --help` and the refusal print) really takes effect."""
    given = {
        "name": "every key", "collections": ["sentinel-2-l2a"], "max_cloud_cover": 55.0, "min_clear_fraction": 0.6,
        "recipients": ["a@example.org"], "questions": ["vegetation_loss"], "alert_frequency": "daily",
        "min_alert_hectares": 1.5, "pairing_policy": "seasonal", "alert_classes": ["vegetation_loss"],
        "alert_on": "confirmed", "min_covered_fraction": 0.8, "attributes": {"fid": 3},
    }
    assert sorted(given) == sorted(AreaOptions.accepted_keys())
    run("areas", "add", collection(feature(NORTH, **given)))
    exported = json.loads(run("areas", "export").stdout)["features"][0]["properties"]
    assert {k: exported[k] for k in given} == given


def test_an_area_that_alerts_nobody_is_flagged_at_add_list_update_and_by_doctor(db, monkeypatch, tmp_path):
    wkt = NORTH.wkt
    added = run("areas", "add", wkt, "--name", "silent")
    assert added.stderr.strip() == (
        "warning: area 'silent' sends immediate alerts but has no recipient: add one with "
        "`unirs-monitor areas update 'silent' --recipient you@example.org` (or --frequency off)"
    )
    assert run("areas", "add", SOUTH.wkt, "--name", "quiet on purpose", "--frequency", "off").stderr == ""
    listed = run("areas", "list").stdout.splitlines()
    assert "(nobody!)" in next(line for line in listed if "silent" in line)
    assert "(nobody!)" not in next(line for line in listed if "quiet on purpose" in line)

    monkeypatch.setenv("UNIRS_CATALOGUES", '[{"name": "none", "url": "http://127.0.0.1:1/stac"}]')
    monkeypatch.setenv("UNIRS_SMTP__OUTBOX_DIR", str(tmp_path))
    from core.config import get_settings

    get_settings.cache_clear()
    try:
        checks = {c["name"]: c for c in json.loads(run("doctor", "--json", ok=False).stdout)}
        assert checks["areas"]["ok"] and checks["areas"]["warning"]
        assert "1 of 2 active area(s) send alerts to nobody: 'silent'" in checks["areas"]["detail"]
        assert "WARN areas" in " ".join(run("doctor", ok=False).stdout.split())

        assert "daily alerts but has no recipient" in run("areas", "update", "silent", "--frequency", "daily").stderr
        assert run("areas", "update", "silent", "--recipient", "ops@example.org").stderr == ""
        checks = {c["name"]: c for c in json.loads(run("doctor", "--json", ok=False).stdout)}
        assert not checks["areas"]["warning"] and checks["areas"]["detail"] == "2 active area(s), each with a recipient"
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(("source", "message"), [
    (collection(feature(NORTH, name="a"), feature(Polygon([(23, 46), (23.1, 46.1), (23.1, 46), (23, 46.1)]),
                                                       name="bowtie")),
     "Error: feature 2 ('bowtie'): invalid geometry: Self-intersection"),
    (collection(feature(NORTH, name="a"), feature(SOUTH)),
     "Error: feature 2: an area needs a non-empty name"),
    (collection(feature(NORTH, name="a"), {"type": "Feature", "geometry": None, "properties": {"name": "b"}}),
     "Error: feature 2: has no geometry"),
    ("parcels", "Error: parcels: no such file"),
    ("data/parcels", "Error: data/parcels: no such file"),
])
def test_errors_name_the_place_in_one_line(db, source, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file named "parcels" here
    err = run("areas", "add", source, ok=False).stderr.strip()
    assert err.startswith(message) and "\n" not in err


# A clockwise exterior with a counter-clockwise hole and nanodegree coordinates: everything RFC 7946 forbids.
CW_WITH_HOLE = Polygon(
    [(23.100000001, 46.500000004), (23.100000001, 46.6), (23.2, 46.6), (23.2, 46.500000004)],
    [[(23.12, 46.52), (23.14, 46.52), (23.14, 46.54), (23.12, 46.54)]],
)


def assert_rfc7946(feature: dict, expected_id: int) -> None:
    assert feature["type"] == "Feature" and feature["id"] == expected_id and "id" not in feature["properties"]
    geom = shape(feature["geometry"])
    for poly in getattr(geom, "geoms", [geom]):
        assert poly.exterior.is_ccw, "exterior rings counter-clockwise (§3.1.6)"
        assert all(not ring.is_ccw for ring in poly.interiors), "holes clockwise (§3.1.6)"
    coords = json.dumps(feature["geometry"]["coordinates"])
    assert "23.100000001" not in coords and "23.1," in coords  # 7 decimals at most
    assert geom.hausdorff_distance(CW_WITH_HOLE) < 1e-7  # the same place, rounded to ~1 cm


def test_areas_export_and_show_are_rfc7946(db):
    assert not CW_WITH_HOLE.exterior.is_ccw
    created = json.loads(run("areas", "add", json.dumps(mapping(CW_WITH_HOLE)), "--name", "cw", "--recipient",
                             "a@example.org", "--json").stdout)
    fc = json.loads(run("areas", "export").stdout)
    assert "crs" not in fc
    assert_rfc7946(fc["features"][0], created[0]["id"])
    assert_rfc7946(json.loads(run("areas", "show", "cw", "--json").stdout), created[0]["id"])


def test_findings_geojson_is_rfc7946(db):
    with session_scope(get_settings()) as s:
        area = f.area(s, name="forest")
        cat = f.catalogue(s)
        before = f.scene(s, cat, datetime(2020, 6, 1, 9, 40, tzinfo=UTC))
        after = f.scene(s, cat, datetime(2020, 8, 29, 9, 40, tzinfo=UTC))
        f.findings(s, f.analysis(s, area, after, before), regions=[(CW_WITH_HOLE, "forest loss", 3.2)], answers=[])
    fc = json.loads(run("findings", "--kind", "region", "--format", "geojson").stdout)
    [region] = fc["features"]
    with session_scope(get_settings()) as s:
        from sqlalchemy import select

        from core.models import Finding

        region_id = s.scalar(select(Finding.id).where(Finding.kind == "region"))
    assert_rfc7946(region, region_id)


def test_tables_are_rich_and_plain_in_a_pipe():
    rows = [{"id": 12, "observed_at": datetime(2020, 8, 29, tzinfo=UTC), "area": "[bold]forest[/bold]",
             "kind": "answer", "change_class": None, "hectares": None, "caption": None,
             "question": "Is there a new road?", "answer": "Yes,\nclearly " + "very " * 30}]
    plain = format_table(rows, terminal=False).splitlines()
    assert plain[0].split() == ["id", "observed", "area", "kind", "class", "hectares", "state", "screen", "text"]
    assert len(plain) == 2 and "\x1b[" not in plain[1]
    assert "[bold]forest[/bold]" in plain[1]  # user text is never read as rich markup
    assert "Is there a new road? → Yes, clearly very" in plain[1] and plain[1].endswith("…")
    # On a terminal: a rule under the header, bold header (ANSI), same cells.
    styled = format_table(rows, terminal=True)
    assert "\x1b[1m" in styled and "─" in styled


def test_findings_of_an_area_that_does_not_exist_is_an_error_not_an_empty_answer(db):
    """A misspelled --area used to print "no findings match" and exit 0, as if the area were quiet."""
    with session_scope(get_settings()) as s:
        f.area(s, name="forest")
    assert run("findings", "--area", "forest").output == "no findings match\n"
    for fmt in ("table", "geojson", "csv"):
        result = run("findings", "--area", "forets", "--format", fmt, ok=False)
        assert result.output == ("Error: no watched area named 'forets' (`unirs-monitor areas list` shows them)\n")

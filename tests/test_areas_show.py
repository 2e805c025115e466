"""`unirs-monitor areas show`: aligned lines for people, an RFC 7946 Feature with --json (real CLI, real
PostGIS)."""

from __future__ import annotations

import json

from click.testing import CliRunner
from shapely.geometry import box, mapping

from monitor.cli import cli


def run(*args: str, input: str | None = None):
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_show_prints_aligned_lines_not_python_reprs(db, tmp_path):
    path = tmp_path / "forest.geojson"
    path.write_text(json.dumps({"type": "Feature", "geometry": mapping(box(23.10, 46.50, 23.20, 46.60)),
                                "properties": {"name": "Apuseni forest", "max_cloud_cover": 40,
                                               "attributes": {"owner": "Ana", "parcels": [3, 4], "ha": 12.5}}}))
    run("areas", "add", str(path), "--recipient", "ana@example.org", "--recipient", "bo@example.org",
        "--frequency", "daily")
    lines = run("areas", "show", "Apuseni forest").output.splitlines()
    km2 = json.loads(run("areas", "show", "Apuseni forest", "--json").output)["properties"]["area_km2"]
    assert lines == [
        "id:                   1",
        "name:                 Apuseni forest",
        "status:               active",
        f"area:                 {km2:.2f} km²",
        "bounds:               23.10000, 46.50000, 23.20000, 46.60000 (west, south, east, north)",
        "collections:          sentinel-2-l2a",
        "max_cloud_cover:      40 %",
        "min_clear_fraction:   0.7",
        "min_covered_fraction: 0.5",
        "alert_frequency:      daily",
        "recipients:           ana@example.org, bo@example.org",
        "alert_classes:        new_built_up_or_bare, vegetation_loss",
        "min_alert_hectares:   0.2 ha",
        "alert_on:             probable",
        "questions:            (all templates)",
        "pairing_policy:       latest",
        "attributes.ha:        12.5",
        "attributes.owner:     Ana",
        "attributes.parcels:   [3, 4]",
    ]


def test_show_of_an_area_across_the_antimeridian(db):
    """Bounds of the box that crosses 180° (west 179.9 > east -179.9), not -180..180; no recipients and
    alerts off say so instead of printing an empty list."""
    ring = [[179.9, -17.0], [-179.9, -17.0], [-179.9, -16.9], [179.9, -16.9], [179.9, -17.0]]
    run("areas", "add", json.dumps({"type": "Polygon", "coordinates": [ring]}), "--name", "Fiji", "--frequency", "off")
    lines = dict(line.split(": ", 1) for line in run("areas", "show", "Fiji").output.splitlines())
    assert lines["bounds"].strip() == ("179.90000, -17.00000, -179.90000, -16.90000 "
                                       "(west, south, east, north; crosses 180°)")
    assert (lines["recipients"].strip(), lines["attributes"].strip()) == ("(none)", "(none)")
    feature = json.loads(run("areas", "show", "Fiji", "--json").output)
    assert (feature["type"], feature["id"], feature["geometry"]["type"]) == ("Feature", 1, "MultiPolygon")


def test_control_characters_in_attributes_are_escaped_not_sent_to_the_terminal(db, tmp_path):
    """Attributes come from users (the web API too): an ANSI escape or a newline in a key or value is printed
    escaped, one line per attribute."""
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"type": "Feature", "geometry": mapping(box(23.10, 46.50, 23.20, 46.60)),
                                "properties": {"name": "Plot", "attributes": {"note\x1b[2J": "a\nb\x07"}}}))
    run("areas", "add", str(path))
    lines = run("areas", "show", "Plot").output.splitlines()
    assert lines[-1] == "attributes.note\\x1b[2J: a\\nb\\x07"
    assert not any("\x1b" in line or "\x07" in line for line in lines)

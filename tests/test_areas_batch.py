"""An areas file with several bad features: every problem in one run, one line each naming the feature
and the fix, nothing added, a non-zero exit; GIS feature ids (QGIS' fid...) are ids, not typos (real
`python -m monitor.cli` processes against a real PostGIS database)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from shapely.geometry import box, mapping

ROOT = Path(__file__).resolve().parents[1]
BOWTIE = {"type": "Polygon", "coordinates": [[[23.1, 46.5], [23.2, 46.6], [23.2, 46.5], [23.1, 46.6], [23.1, 46.5]]]}


def unirs(db: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "UNIRS_DATABASE_URL": db, "PYTHONPATH": str(ROOT)}
    env.pop("UNIRS_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "monitor.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)


def feature(geometry: dict, **props) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": props}


def write(tmp_path: Path, *features: dict) -> str:
    path = tmp_path / "parcels.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(features)}))
    return str(path)


def area_names(db: str) -> list[str]:
    return [a["name"] for a in json.loads(unirs(db, "areas", "list", "--json").stdout)]


def test_every_bad_feature_in_one_run_and_nothing_added(db, tmp_path):
    unirs(db, "areas", "add", box(23.3, 46.5, 23.4, 46.6).wkt, "--name", "taken")
    path = write(
        tmp_path,
        feature(mapping(box(23.10, 46.50, 23.15, 46.55)), name="good"),
        feature(BOWTIE, name="bowtie"),
        feature(mapping(box(23.15, 46.50, 23.20, 46.55)), name="typo", recipent=["a@example.org"]),
        {"type": "Feature", "geometry": None, "properties": {"name": "empty"}},
        feature(mapping(box(23.2, 46.5, 23.25, 46.55)), name="taken"),
        feature(mapping(box(23.25, 46.5, 23.3, 46.55)), name="good"),
        feature(mapping(box(23.0, 46.5, 23.05, 46.55)), max_cloud_cover=140, name="cloudy"),
        feature(mapping(box(23.0, 46.6, 23.05, 46.65))),
    )
    proc = unirs(db, "areas", "add", path)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "Error: 7 problems, nothing added:",
        "  feature 2 ('bowtie'): invalid geometry: Self-intersection[23.15 46.55] (use --fix to repair it)",
        "  feature 3 ('typo'): unknown property 'recipent' (did you mean 'recipients'?); accepted: name, "
        "collections, max_cloud_cover, min_clear_fraction, min_covered_fraction, recipients, questions, "
        "alert_frequency, min_alert_hectares, pairing_policy, alert_classes, alert_on, attributes "
        "(--keep-unknown-properties stores others as attributes; --name-property KEY names the areas from "
        "another property)",
        "  feature 4: has no geometry",
        "  feature 5 ('taken'): an area named 'taken' already exists (rename the feature, or update or remove "
        "that area)",
        "  feature 6 ('good'): feature 1 ('good') is also named 'good'; area names must be unique",
        "  feature 7 ('cloudy'): max cloud cover must be a percentage in [0, 100], got 140",
        "  feature 8: an area needs a non-empty name (--name, or a 'name' property per feature)",
    ]
    assert area_names(db) == ["taken"]  # not 'good': all or nothing


def test_one_bad_feature_is_one_line(db, tmp_path):
    path = write(tmp_path, feature(mapping(box(23.1, 46.5, 23.2, 46.6)), name="a"), feature(BOWTIE, name="b"))
    proc = unirs(db, "areas", "add", path)
    assert (proc.returncode, proc.stderr) == (
        1, "Error: feature 2 ('b'): invalid geometry: Self-intersection[23.15 46.55] (use --fix to repair it)\n")
    assert area_names(db) == []


def test_qgis_fid_is_an_id_not_a_typo(db, tmp_path):
    """QGIS/GDAL exports number features with a 'fid' property: it is ignored (no 'did you mean id?'),
    and names the areas only with --name-property fid."""
    path = write(tmp_path, feature(mapping(box(23.10, 46.5, 23.15, 46.55)), fid=1, name="north"),
                 feature(mapping(box(23.15, 46.5, 23.20, 46.55)), fid=2, name="south"))
    added = unirs(db, "areas", "add", path, "--frequency", "off", "--json")
    assert (added.returncode, added.stderr) == (0, "")
    assert [(a["name"], a["attributes"]) for a in json.loads(added.stdout)] == [("north", {}), ("south", {})]

    numbered = write(tmp_path, feature(mapping(box(23.2, 46.5, 23.25, 46.55)), fid=7, OBJECTID=70),
                     feature(mapping(box(23.25, 46.5, 23.3, 46.55)), fid=8, OBJECTID=80))
    refused = unirs(db, "areas", "add", numbered)
    assert "did you mean" not in refused.stderr
    assert refused.stderr.splitlines()[1] == (
        "  feature 1: an area needs a non-empty name (--name, or a 'name' property per feature)")
    named = unirs(db, "areas", "add", numbered, "--name-property", "fid", "--frequency", "off", "--json")
    assert named.returncode == 0, named.stderr
    assert [a["name"] for a in json.loads(named.stdout)] == ["7", "8"]


def test_a_misspelled_setting_still_gets_the_right_suggestion(db, tmp_path):
    """Suggestions are settings only, compared without case: 'Recipients' → 'recipients'; 'fids' (close to
    the ignored fid and id) gets none."""
    path = write(tmp_path, feature(mapping(box(23.1, 46.5, 23.2, 46.6)), name="a", Recipients=["a@example.org"],
                                   fids=[1]))
    proc = unirs(db, "areas", "add", path)
    assert proc.stderr.startswith(
        "Error: feature 1 ('a'): unknown properties 'Recipients' (did you mean 'recipients'?), 'fids'; accepted:")


def test_union_with_a_name_reports_the_bad_features_not_the_feature_count(db, tmp_path):
    """--union --name names the merge: bad features are what is wrong (not '--name given but 3 features')."""
    path = write(tmp_path, feature(mapping(box(23.1, 46.5, 23.2, 46.6)), name="a"), feature(BOWTIE, name="b"),
                 feature(BOWTIE, name="c"))
    proc = unirs(db, "areas", "add", path, "--union", "--name", "estate")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "Error: 2 problems, nothing added:",
        "  feature 2 ('b'): invalid geometry: Self-intersection[23.15 46.55] (use --fix to repair it)",
        "  feature 3 ('c'): invalid geometry: Self-intersection[23.15 46.55] (use --fix to repair it)",
    ]
    assert area_names(db) == []
    good = write(tmp_path, feature(mapping(box(23.1, 46.5, 23.2, 46.6)), name="a"),
                 feature(mapping(box(23.2, 46.5, 23.3, 46.6)), name="b"))
    assert unirs(db, "areas", "add", good, "--union", "--name", "estate").returncode == 0
    assert area_names(db) == ["estate"]


def test_areas_list_sorts_names_regardless_of_case_then_by_id(db):
    for i, name in enumerate(["Zebra", "banana", "apple", "Apple"]):
        assert unirs(db, "areas", "add", box(23.0 + i / 10, 46.5, 23.05 + i / 10, 46.55).wkt,
                     "--name", name).returncode == 0
    # Byte order would give Apple, Zebra, apple, banana; "apple" was added before "Apple".
    assert area_names(db) == ["apple", "Apple", "banana", "Zebra"]

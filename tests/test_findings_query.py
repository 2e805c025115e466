"""The findings query (monitor/findings.py), its CLI and the QGIS views, on real PostGIS data."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import shapely
from click.testing import CliRunner
from shapely.geometry import box, shape
from sqlalchemy import update

from core.config import get_settings
from core.db import session_scope
from core.models import Finding
from monitor import findings as svc
from monitor.cli import cli
from tests import factories as f

DELTA = box(28.90, 45.00, 29.10, 45.20)  # a second area far from the forest


def when(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(hour=9, minute=40, tzinfo=UTC)


@pytest.fixture
def data(db):
    """Two areas, three analyses, regions + answers with known text, sizes, places and dates."""
    with session_scope(get_settings()) as s:
        forest = f.area(s, name="Apuseni forest")
        delta = f.area(s, name="Danube delta", geom=DELTA)
        cat = f.catalogue(s)
        s0 = f.scene(s, cat, when("2020-06-01"))
        s1 = f.scene(s, cat, when("2020-08-29"))
        s2 = f.scene(s, cat, when("2021-05-10"))
        d0 = f.scene(s, cat, when("2020-07-01"), footprint=DELTA)
        d1 = f.scene(s, cat, when("2020-09-15"), footprint=DELTA)
        a1 = f.analysis(s, forest, s1, s0)
        f.findings(s, a1, caption="A new forest ROAD appears", regions=[
            (box(23.12, 46.52, 23.13, 46.525), "forest loss", 3.2),
            (box(23.15, 46.55, 23.152, 46.556), "bare soil", 0.4),
        ], answers=[{"question": "Is there a new road?", "answer": "Yes, 100% certain", "confidence": 0.9,
                     "statistics": {"road_px": 812}}])
        a2 = f.analysis(s, forest, s2, s1)
        f.findings(s, a2, caption="Clear-cut expands to the north", regions=[
            (box(23.16, 46.58, 23.18, 46.59), "forest loss", 12.5),
        ], answers=[])
        a3 = f.analysis(s, delta, d1, d0)
        f.findings(s, a3, caption="Water level dropped; sandbanks emerge", regions=[
            (box(28.95, 45.05, 28.97, 45.06), "water loss", 7.0),
        ], answers=[{"question": "Did the water area shrink?", "answer": "yes", "confidence": 0.7,
                     "statistics": {"water_ha_before": 40.0, "water_ha_after": 33.0}}])
    return db


def q(**kw):
    with session_scope(get_settings()) as s:
        return svc.query_findings(s, svc.FindingFilter(**kw))


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(cli, ["findings", *args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_filters_each_and_combined(data):
    everything = q(limit=None)
    assert len(everything) == 3 + 4 + 2  # summaries, regions, answers
    assert [r["observed_at"] for r in everything] == sorted((r["observed_at"] for r in everything), reverse=True)

    assert {r["area"] for r in q(area="Danube delta")} == {"Danube delta"}
    assert len(q(area="Apuseni forest", kind="region")) == 3
    assert q(area="no such area") == []

    window = q(since=when("2020-08-01"), until=when("2021-01-01"))
    assert {r["observed_at"].date().isoformat() for r in window} == {"2020-08-29", "2020-09-15"}

    regions = q(kind="region", bbox=(23.10, 46.50, 23.14, 46.53))
    assert [(r["change_class"], r["hectares"]) for r in regions] == [("forest loss", 3.2)]
    # Everything in the forest's box that has a geometry: no answers/summaries (they have none).
    assert {r["kind"] for r in q(bbox=(23.0, 46.4, 23.3, 46.7))} == {"region"}

    assert sorted(r["hectares"] for r in q(kind="region", min_hectares=5)) == [7.0, 12.5]
    big_recent = q(kind="region", min_hectares=5, since=when("2021-01-01"))
    assert [r["hectares"] for r in big_recent] == [12.5]

    assert len(q(limit=2)) == 2


def test_text_is_case_insensitive_on_caption_and_answer_and_literal(data):
    assert {r["caption"] for r in q(text="road", kind="summary")} == {"A new forest ROAD appears"}
    assert [r["answer"] for r in q(text="YES", kind="answer")] == ["yes", "Yes, 100% certain"]
    # % and _ are the user's characters, not wildcards.
    assert [r["answer"] for r in q(text="100%")] == ["Yes, 100% certain"]
    assert [r["answer"] for r in q(text="yes", kind="answer", limit=1)] == ["yes"]  # newest first, across windows
    assert q(text="0_%") == []
    # Hostile input is just text: no error, no match, the table is still there.
    assert q(text="x'; DROP TABLE findings; --") == []
    assert q(area="x' OR '1'='1") == []
    assert len(q(limit=None)) == 9


def test_bbox_is_validated():
    with pytest.raises(svc.QueryError, match="minx,miny,maxx,maxy"):
        svc.parse_bbox("1,2,3")
    with pytest.raises(svc.QueryError, match="lon/lat order"):
        svc.parse_bbox("23.2,46.5,23.1,46.6")
    assert svc.parse_bbox(" 23.1, 46.5 ,23.2,46.6") == (23.1, 46.5, 23.2, 46.6)


def test_cli_geojson_is_rfc7946(data):
    out = run("--area", "Apuseni forest", "--kind", "region", "--format", "geojson").stdout
    fc = json.loads(out)
    assert fc["type"] == "FeatureCollection" and "crs" not in fc
    assert len(fc["features"]) == 3
    for feature in fc["features"]:
        assert feature["type"] == "Feature" and isinstance(feature["id"], int)
        geom = shape(feature["geometry"])
        assert geom.is_valid and geom.geom_type == "Polygon"
        minx, miny, maxx, maxy = geom.bounds
        assert 23.0 < minx < maxx < 23.3 and 46.4 < miny < maxy < 46.7  # lon first, then lat
        assert geom.exterior.is_ccw  # right-hand rule
        props = feature["properties"]
        assert props["area"] == "Apuseni forest" and props["kind"] == "region"
        datetime.fromisoformat(props["observed_at"])
    # Answers have no place: a null geometry, still a valid Feature.
    answers = json.loads(run("--kind", "answer", "--format", "geojson").stdout)["features"]
    assert answers and all(a["geometry"] is None for a in answers)


def test_cli_csv_has_wkt_and_table_and_show(data):
    rows = list(csv.DictReader(io.StringIO(run("--kind", "region", "--format", "csv").stdout)))
    assert len(rows) == 4
    by_ha = {float(r["hectares"]): r for r in rows}
    geom = shapely.from_wkt(by_ha[7.0]["geometry_wkt"])
    assert geom.equals(box(28.95, 45.05, 28.97, 45.06))
    assert json.loads(by_ha[3.2]["statistics"]) == {"dndvi": -0.3}

    table = run("--since", "2020-08-29", "--until", "2020-08-29").stdout  # a bare --until date includes the day
    lines = table.splitlines()
    assert lines[0].split() == ["id", "observed", "area", "kind", "class", "hectares", "state", "screen", "text"]
    assert len(lines) == 1 + 4 and all("2020-08-29" in line for line in lines[1:])
    assert "Is there a new road? → Yes, 100% certain" in table

    answer_id = q(kind="answer", area="Danube delta")[0]["id"]
    shown = json.loads(run("show", str(answer_id)).stdout)
    assert shown["statistics"] == {"water_ha_before": 40.0, "water_ha_after": 33.0}
    assert shown["question"] == "Did the water area shrink?" and shown["analysis"]["pair_reason"]
    summary_id = q(kind="summary", area="Danube delta")[0]["id"]
    assert {i["role"] for i in json.loads(run("show", str(summary_id)).stdout)["images"]} == {
        "before", "after", "overlay"}

    assert "no finding with id" in run("show", "999999", ok=False).output
    bad = run("--bbox", "nope", ok=False)
    assert bad.exit_code != 0 and "minx,miny,maxx,maxy" in bad.output


def test_alert_state_and_screen_verdict_in_table_show_and_exports(data):
    """A new-user trial: an atmospheric region (a cloud edge) read as a loss because no output said so."""
    with session_scope(get_settings()) as s:
        for ha, state, verdict in ((3.2, "confirmed", "departure"), (0.4, "atmospheric", "atmospheric"),
                                   (12.5, "dismissed", None)):
            s.execute(update(Finding).where(Finding.kind == "region", Finding.hectares == ha)
                      .values(alert_state=state, screen_verdict=verdict))
    expected = {3.2: ("confirmed", "departure"), 0.4: ("atmospheric", "atmospheric"), 12.5: ("dismissed", None),
                7.0: (None, None)}

    rows = list(csv.DictReader(io.StringIO(run("--kind", "region", "--format", "csv").stdout)))
    assert {float(r["hectares"]): (r["alert_state"], r["screen_verdict"]) for r in rows} == {
        ha: tuple(v or "" for v in states) for ha, states in expected.items()}  # CSV: NULL is an empty cell

    for args in ((), ("--all",)):  # a page, and the streamed export (server-side cursor)
        fc = json.loads(run("--kind", "region", "--format", "geojson", *args).stdout)
        assert {feat["properties"]["hectares"]: (feat["properties"]["alert_state"],
                                                 feat["properties"]["screen_verdict"])
                for feat in fc["features"]} == expected

    lines = run("--kind", "region", "--area", "Apuseni forest").stdout.splitlines()
    # Plain text into a pipe: a cell starts at its header's column ("forest loss", "Apuseni forest" have spaces).
    at = {name: lines[0].index(name) for name in ("hectares", "state", "screen", "text")}
    cells = {line[at["hectares"]:at["state"]].strip(): (line[at["state"]:at["screen"]].strip(),
                                                         line[at["screen"]:at["text"]].strip()) for line in lines[1:]}
    assert cells == {"3.20": ("confirmed", "departure"), "0.40": ("atmospheric", "atmospheric"),
                     "12.50": ("dismissed", "")}

    region_id = next(r["id"] for r in q(kind="region") if r["hectares"] == 0.4)
    shown = json.loads(run("show", str(region_id)).stdout)
    assert (shown["alert_state"], shown["screen_verdict"]) == ("atmospheric", "atmospheric")


def test_qgis_views(data):
    with psycopg.connect(data.replace("+psycopg", "")) as conn:
        cols = dict(conn.execute(
            "SELECT f_table_name, type || ':' || srid FROM geometry_columns "
            "WHERE f_table_name IN ('v_findings', 'v_change_regions')"
        ).fetchall())
        assert cols == {"v_findings": "GEOMETRY:4326", "v_change_regions": "MULTIPOLYGON:4326"}
        assert conn.execute("SELECT count(*) FROM v_findings").fetchone()[0] == 9
        rows = conn.execute(
            "SELECT area_name, change_class, hectares, analysis_caption, observed_at, before_observed_at, "
            "ST_GeometryType(geom) FROM v_change_regions ORDER BY hectares"
        ).fetchall()
        assert [(r[0], r[2]) for r in rows] == [
            ("Apuseni forest", 0.4), ("Apuseni forest", 3.2), ("Danube delta", 7.0), ("Apuseni forest", 12.5)]
        assert rows[0][3] == "A new forest ROAD appears" and rows[0][4] > rows[0][5]
        assert {r[6] for r in rows} == {"ST_MultiPolygon"}
        # Revision 0020: the alert state and the screen's verdict, so a cloud edge is not styled as a loss.
        conn.execute("UPDATE findings SET alert_state = 'atmospheric', screen_verdict = 'atmospheric' "
                     "WHERE kind = 'region' AND hectares = 0.4")
        for view, where in (("v_change_regions", "TRUE"), ("v_findings", "kind = 'region'")):
            states = conn.execute(f"SELECT hectares, alert_state, screen_verdict FROM {view} WHERE {where} "
                                  "ORDER BY hectares").fetchall()
            assert states == [(0.4, "atmospheric", "atmospheric"), (3.2, None, None), (7.0, None, None),
                              (12.5, None, None)], view
        # QGIS filters a layer by the canvas extent: that filter must be able to use an index.
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT id FROM v_change_regions WHERE geom && ST_MakeEnvelope(23.1, 46.5, 23.2, 46.6, 4326)"
        ).fetchall())
        assert "ix_findings_region_geom" in plan


def test_streamed_export_and_area_text(data, monkeypatch):
    # A batch of 1 row makes the server-side cursor fetch many times; the export must still be complete.
    monkeypatch.setattr(svc, "STREAM_BATCH", 1)
    fc = json.loads(run("--area", "Apuseni forest", "--all", "--format", "geojson").stdout)
    listed = q(area="Apuseni forest", limit=None)
    assert [feat["id"] for feat in fc["features"]] == [r["id"] for r in listed] and len(listed) >= 5
    rows = list(csv.DictReader(io.StringIO(run("--area", "Danube delta", "--all", "--format", "csv").stdout)))
    assert {int(r["id"]) for r in rows} == {r["id"] for r in q(area="Danube delta", limit=None)}
    # Area + text: only that area's matches.
    assert {r["area"] for r in q(area="Apuseni forest", text="forest")} == {"Apuseni forest"}
    assert q(area="Danube delta", text="forest") == []


@pytest.fixture
def many(db):
    """Two areas with 40 analyses each, one a day; words in captions (every 3rd "quarry", every 7th
    "Burn scar") and answers (every 5th "a quarry road"); one backfilled analysis out of order."""
    with session_scope(get_settings()) as s:
        cat = f.catalogue(s)
        for name, geom in (("Apuseni forest", None), ("Danube delta", DELTA)):
            area_row = f.area(s, name=name, **({"geom": geom} if geom is not None else {}))
            days = [*range(40)]
            days[17] = 45  # appended in the middle, observed after the last one
            for k, day in enumerate(days):
                sc = f.scene(s, cat, datetime(2024, 1, 1, 9, 40, tzinfo=UTC) + (day * (when("2024-01-02")
                                                                                      - when("2024-01-01"))))
                an = f.analysis(s, area_row, sc, None)
                words = " ".join(w for w, every in (("quarry", 3), ("Burn scar", 7)) if k % every == 0)
                f.findings(s, an, caption=f"analysis {k} {words}", regions=[], images=False,
                           answers=[{"question": "What is new?", "answer": "a quarry road" if k % 5 == 0 else "no",
                                     "confidence": 0.5, "statistics": {}}])
    return db


@pytest.mark.parametrize("scan_rows, area_matches", [(30, 10), (1, 10), (1, 1)])
def test_area_text_search_gives_the_newest_matches_whichever_step_answers(many, monkeypatch, scan_rows,
                                                                          area_matches):
    # (30, 10): the newest-rows scan answers common words; (1, 10): the (area, trigram) index lookup of all
    # the area's matches; (1, 1): too many matches for that, the time windows answer.
    monkeypatch.setattr(svc, "SCAN_ROWS_PER_RESULT", scan_rows)
    monkeypatch.setattr(svc, "AREA_MATCHES_PER_RESULT", area_matches)
    for area in ("Apuseni forest", "Danube delta"):
        everything = q(area=area, limit=None)  # newest first, no text filter: the reference order
        for word in ("quarry", "burn scar", "QUARRY ROAD", "analysis 1", "absent"):
            expected = [r["id"] for r in everything
                        if word.lower() in (r["caption"] or "").lower() or word.lower() in (r["answer"] or "").lower()]
            for limit in (1, 3, 10, 100):
                got = q(area=area, text=word, limit=limit)
                assert [r["id"] for r in got] == expected[:limit], (area, word, limit)
                assert all(set(r) == set(everything[0]) for r in got)  # no helper column leaks out
        # A row filter with the text: the newest rows scanned and the GIN matches are of that kind only, so
        # a page of answers is not cut short by the newer summaries that match.
        for kind in ("answer", "summary"):
            expected = [r["id"] for r in everything if r["kind"] == kind and "quarry" in
                        ((r["caption"] or "") + "\n" + (r["answer"] or "")).lower()]
            for limit in (1, 3, 10, 100):
                got = q(area=area, text="quarry", kind=kind, limit=limit)
                assert [r["id"] for r in got] == expected[:limit], (area, kind, limit)
    # Known counts: "quarry" in 14 captions (k = 0, 3, …, 39) and 8 answers (k = 0, 5, …, 35) of each area.
    assert len(q(area="Danube delta", text="quarry", limit=None)) == 22
    assert len(q(area="Danube delta", text="quarry", kind="answer", limit=3)) == 3
    assert [r["id"] for r in q(area="Danube delta", text="quarry", kind="answer", limit=100)] == [
        r["id"] for r in q(area="Danube delta", kind="answer", limit=None) if r["answer"] == "a quarry road"]


def test_geojson_export_copies_the_geometry_text_through(data):
    with session_scope(get_settings()) as s:
        # Text that looks like the members spliced in must stay text.
        s.execute(update(Finding).where(Finding.kind == "summary", Finding.caption.like("Clear-cut%"))
                  .values(caption='Clear-cut: "statistics": null, "geometry": null'))
    with session_scope(get_settings()) as s:
        flt = svc.FindingFilter(area="Apuseni forest", limit=None)
        copied_rows = list(svc.iter_findings(s, flt, geometry_text=True))
        assert {type(r["statistics"]) for r in copied_rows} == {str}  # PostgreSQL's JSON text, not parsed
        parsed, copied = io.StringIO(), io.StringIO()
        n = svc.write_geojson(svc.iter_findings(s, flt), parsed, default=str)
        assert svc.write_geojson(iter(copied_rows), copied, default=str) == n
    assert n == 6 and json.loads(copied.getvalue()) == json.loads(parsed.getvalue())
    features = json.loads(copied.getvalue())["features"]
    assert sum(feat["geometry"] is not None for feat in features) == 3
    with psycopg.connect(data.replace("+psycopg", "")) as conn:
        stored = [r[0] for r in conn.execute(
            "SELECT statistics FROM findings f JOIN areas a ON a.id = f.area_id WHERE a.name = 'Apuseni forest' "
            "ORDER BY observed_at DESC, f.id DESC").fetchall()]
    assert [feat["properties"]["statistics"] for feat in features] == stored
    assert {"road_px": 812} in stored and {"dndvi": -0.3} in stored
    assert [feat["properties"]["caption"] for feat in features if feat["properties"]["kind"] == "summary"] == [
        'Clear-cut: "statistics": null, "geometry": null', "A new forest ROAD appears"]


@pytest.mark.parametrize("windows", [(30, 180, 1080), (1, 1080), (100_000,)])
def test_text_search_without_area_gives_the_newest_matches(many, monkeypatch, windows):
    # (30, …): the (observed_at, trigram) GiST walk over the newest 30 days answers small pages; (1, …): one
    # day holds too few matches, the GIN windows answer; (100_000,): the walk covers every finding. Both
    # areas observe on the same days, so every page boundary falls inside a tie on observed_at (ordered by id).
    monkeypatch.setattr(svc, "TEXT_WINDOWS_DAYS", windows)
    with session_scope(get_settings()) as s:
        # Caption and answer on one row: "quarry no" is in their concatenation (the index's expression) but
        # in neither column, so it must match nothing.
        s.execute(update(Finding).where(Finding.answer == "no").values(caption="then a quarry"))
    everything = q(limit=None)
    # One older real "quarry no" behind the newest concatenation-only candidates (the --since case below).
    since = max(r["observed_at"] for r in everything) - timedelta(days=10)
    older = [r for r in everything if r["observed_at"] >= since and r["answer"] != "no"][-1]
    with session_scope(get_settings()) as s:
        s.execute(update(Finding).where(Finding.id == older["id"]).values(caption="a quarry now visible"))
    everything = q(limit=None)
    for word in ("quarry", "burn scar", "QUARRY ROAD", "analysis 1", "quarry no", "absent", "y_%"):
        expected = [r["id"] for r in everything
                    if word.lower() in (r["caption"] or "").lower() or word.lower() in (r["answer"] or "").lower()]
        for limit in (1, 2, 3, 10, 100):
            got = q(text=word, limit=limit)
            assert [r["id"] for r in got] == expected[:limit], (word, limit)
            assert all(set(r) == set(everything[0]) for r in got)
        assert len(q(text=word, limit=None)) == len(expected)
        # --since inside the first window: that window is the whole query; a short walk (candidates matching
        # the concatenation only, "quarry no") must not end the search early.
        recent = [r["id"] for r in everything if r["observed_at"] >= since and r["id"] in set(expected)]
        for limit in (1, 3, 100):
            assert [r["id"] for r in q(text=word, since=since, limit=limit)] == recent[:limit], (word, limit)
    # Known counts over both areas: "quarry" in 2 × 14 summaries, 2 × 8 answers, the 2 × 32 "no" rows and the
    # one rewritten older caption.
    assert len(q(text="quarry", limit=None)) == 109
    assert [r["id"] for r in q(text="quarry no")] == [older["id"]]


def test_a_result_cut_at_the_limit_says_so_on_stderr(data):
    """4 regions match; --limit 2 gives the newest 2 and a hint on stderr (the export stays valid GeoJSON/CSV);
    --limit 4 or --all gives every one and no hint only when fewer than the limit came back."""
    hint = "the newest 2 findings only (--limit 2); more may match: --all for every one, --limit N for more\n"
    cut = run("--kind", "region", "--format", "geojson", "--limit", "2")
    assert len(json.loads(cut.stdout)["features"]) == 2 and cut.stderr == hint
    cut = run("--kind", "region", "--format", "csv", "--limit", "2")
    assert len(list(csv.DictReader(io.StringIO(cut.stdout)))) == 2 and cut.stderr == hint
    assert run("--kind", "region", "--limit", "2").stderr == hint
    whole = run("--kind", "region", "--format", "geojson", "--limit", "5")
    assert len(json.loads(whole.stdout)["features"]) == 4 and whole.stderr == ""
    assert run("--kind", "region", "--all", "--format", "csv").stderr == ""


def test_a_summary_row_of_the_table_says_its_hectares_are_of_all_classes():
    # 2018-08-25 of the bundled sample: the summary is headed by vegetation loss (the area alerts on loss)
    # but its 1.55 ha are 0.25 ha of loss and 1.30 ha of gain. Shown as "vegetation_loss 1.55" it read as
    # 1.55 ha of loss.
    from monitor.findings import format_table

    day = datetime(2018, 8, 25, 9, 20, tzinfo=UTC)
    row = {"id": 1, "observed_at": day, "area": "Apuseni forest", "caption": "Vegetation loss of 0.25 ha",
           "alert_state": None, "screen_verdict": None}
    table = format_table([{**row, "kind": "summary", "change_class": "vegetation_loss", "hectares": 1.55},
                          {**row, "id": 2, "kind": "region", "change_class": "vegetation_loss", "hectares": 0.25},
                          {**row, "id": 3, "kind": "region", "change_class": "vegetation_gain", "hectares": 1.30}],
                         terminal=False)
    summary, loss, gain = table.splitlines()[1:]
    assert "all classes" in summary and "1.55" in summary and "vegetation_loss" not in summary
    assert "vegetation_loss" in loss and "0.25" in loss and "vegetation_gain" in gain and "1.30" in gain

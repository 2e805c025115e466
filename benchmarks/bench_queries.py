"""Benchmark of the findings queries users run, at 1 M and 5 M findings in PostGIS, before and after.

Per size: a throw-away database migrated with the real Alembic revisions up to the one before
``AFTER_REVISION``, rows generated in SQL (generate_series: no row crosses the client), then

- arm ``before``: the query code of ``--baseline`` (monitor/findings.py exported with ``git show``) on
  that schema;
- the upgrade to head (its time is printed: what the revision costs on a table of that size);
- arm ``after``: this checkout's ``monitor.findings`` on the upgraded schema.

With ``--before-on-head`` (the default while the baseline already has the revision's index) the upgrade
comes first and both arms run on the head schema: the comparison is of query code alone.

Query kinds (through ``query_findings`` / ``iter_findings`` + ``write_geojson``, the code the CLI runs):
area + 90 days, bbox + 180 days, text, area + text, and the GeoJSON export of one whole area (every
finding of it, streamed; written to memory). Each kind runs ``--repeat`` parameter sets; **cold** is the
first run of each set (areas no earlier arm or kind touched, so their pages are not in PostgreSQL's
shared buffers — the operating system's page cache is not dropped: that needs root on a shared host),
**warm** the same set run again. Figures: p50/p95 ms per kind, arm and cache; the export also per
10,000 findings. Last line: ``p95_ms_5m_after: X`` (the slowest p95 of the after arm at the largest size).
``--explain`` prints one EXPLAIN ANALYZE per kind.

    .venv/bin/python benchmarks/bench_queries.py [--sizes 1000000,5000000] [--repeat 20] [--explain]

Goals (issue 13): every p95 < 50 ms at 5 M; the export of an area with 10,000 findings < 1 s.

Data shape: 200 areas of ~0.1° scattered over Europe, 50,000 analyses over three years (one after-scene
each; rows appended roughly in acquisition order as in production, 10 % backfilled out of order), 20
findings per analysis (1 summary with a caption, 15 changed regions with small polygons inside the area,
4 answers).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import migrate
from core.db import get_engine, session_scope
from devtools import dbadmin
from monitor import findings as current_findings
from monitor.findings import FindingFilter

# main at the start of the second round of issue 13 (it has the (observed_at, trigram) GiST index of 0015,
# so both arms run on the head schema). Earlier rounds: --baseline 4e3669f --no-before-on-head (before the
# GiST walk, schema 0014); --baseline b3fdd02 --after-revision 0009 --no-before-on-head (before the
# (area, trigram) GIN indexes).
BASELINE_REV = "7ca2d33"
AFTER_REVISION = "0015"  # the (observed_at, trigram) GiST index, built CONCURRENTLY
ADMIN_URL = os.environ.get("UNIRS_BENCH_ADMIN_URL", "postgresql://unirs:unirs@127.0.0.1:5432/postgres")
AREAS = 200
FINDINGS_PER_ANALYSIS = 20
START = datetime(2022, 1, 1, tzinfo=UTC)
DAYS = 1095
WORDS = ["forest loss near a new road", "clear-cut expands", "flooded fields", "new buildings on farmland",
         "water level dropped", "burn scar", "quarry extension", "greenhouses appear", "crop harvest",
         "snow melt on the slopes"]

# Parameters are bound (%(name)s); the statements are constant text.
LOAD = [
    """INSERT INTO catalogues (id, name, url) VALUES (1, 'bench', 'https://example.org/stac')""",
    """INSERT INTO areas (id, name, geom, area_km2, status, collections, max_cloud_cover, min_clear_fraction,
                          recipients, questions, alert_frequency, min_alert_hectares, pairing_policy, properties,
                          owner_id)
       SELECT i, 'area ' || i, ST_Multi(ST_MakeEnvelope(cx, cy, cx + 0.1, cy + 0.1, 4326)), 80, 'active',
              ARRAY['sentinel-2-l2a'], 80, 0.7, ARRAY[]::text[], ARRAY[]::text[], 'immediate', 0.5, 'latest', '{}',
              (SELECT min(id) FROM users)  -- the operator account revision 0006 creates
       FROM (SELECT i, 5 + random() * 25 AS cx, 40 + random() * 15 AS cy
             FROM generate_series(1, %(areas)s) AS i) AS s""",
    """INSERT INTO acquisitions (id, key, platform, sensed_at)
       SELECT i, 'key-' || i, 'sentinel-2a', %(start)s::timestamptz FROM generate_series(1, %(analyses)s) AS i""",
    """INSERT INTO scenes (id, catalogue_id, collection, acquisition_id, acquisition_key, granule_key, item_id,
                           version_rank, platform, tile,
                           relative_orbit, acquired_at, cloud_cover, processing_baseline, footprint, assets, item,
                           versions_seen)
       SELECT i, 1, 'sentinel-2-l2a', i, 'key-' || i, 'key-' || i || '|T00AAA', 'item-' || i, '[]', 'sentinel-2a',
              'T00AAA', 1,
              -- Analyses finish roughly in acquisition order (scenes arrive over time), so findings are
              -- appended roughly in time order; one in ten is a backfill of an earlier date.
              %(start)s::timestamptz + interval '1 day' * CASE WHEN random() < 0.1 THEN random() * %(days)s
                   ELSE (i::float / %(analyses)s) * %(days)s + random() * 2 END,
              random() * 80, '05.10',
              ST_Envelope(a.geom), '{}', '{}', 1
       FROM generate_series(1, %(analyses)s) AS i JOIN areas a ON a.id = 1 + (i %% %(areas)s)""",
    """INSERT INTO analyses (id, idempotency_key, area_id, after_scene_id, analyser, question_set, pairing_policy,
                             pair_reason, status, attempts, stats, finished_at)
       SELECT i, 'bench-' || i, 1 + (i %% %(areas)s), i, 'unirs@0.3.1', 'q@1', 'latest', 'bench', 'done', 1, '{}',
              now()
       FROM generate_series(1, %(analyses)s) AS i""",
    # One row per (analysis, ordinal): ordinal 0 summary, 1..15 regions, 16..19 answers.
    """INSERT INTO findings (analysis_id, area_id, ordinal, kind, change_class, geom, hectares, caption, question,
                             answer, confidence, statistics, analyser_name, analyser_version, observed_at)
       SELECT an.id, an.area_id, o,
              CASE WHEN o = 0 THEN 'summary' WHEN o <= 15 THEN 'region' ELSE 'answer' END,
              CASE WHEN o BETWEEN 1 AND 15 THEN
                   (ARRAY['forest loss', 'bare soil', 'water', 'built-up'])[1 + o %% 4] END,
              CASE WHEN o BETWEEN 1 AND 15 THEN
                   ST_MakeEnvelope(x, y, x + 0.0005 + random() * 0.003, y + 0.0005 + random() * 0.003, 4326) END,
              CASE WHEN o <= 15 THEN round((random() ^ 3 * 20)::numeric, 2)::float END,
              CASE WHEN o = 0 THEN (%(words)s::text[])[1 + floor(random() * %(nwords)s)::int] || ' #' || an.id
                   WHEN o <= 15 THEN 'changed region ' || o END,
              CASE WHEN o > 15 THEN 'question ' || o END,
              CASE WHEN o > 15 THEN (ARRAY['yes', 'no', 'about 3 ha', 'a new road'])[1 + floor(random() * 4)::int]
                   END,
              random(), '{}', 'unirs', '0.3.1', sc.acquired_at
       FROM analyses an
       JOIN scenes sc ON sc.id = an.after_scene_id
       JOIN areas ar ON ar.id = an.area_id
       CROSS JOIN generate_series(0, %(per)s - 1) AS o
       -- Referencing o makes the lateral re-evaluate per finding: each region gets its own place.
       CROSS JOIN LATERAL (SELECT ST_XMin(ar.geom) + random() * 0.095 + 0 * o AS x,
                                  ST_YMin(ar.geom) + random() * 0.095 AS y) AS p
       WHERE an.id <= %(analyses)s""",
]


def load(url: str, rows: int) -> None:
    analyses = max(1, rows // FINDINGS_PER_ANALYSIS)
    params = {"areas": AREAS, "analyses": analyses, "per": FINDINGS_PER_ANALYSIS, "start": START, "days": DAYS,
              "words": WORDS, "nwords": len(WORDS)}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '256MB'")
        # Secondary indexes are dropped for the bulk load and rebuilt from their own definitions afterwards
        # (building an index once is far cheaper than maintaining it row by row).
        defs = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes i WHERE tablename = 'findings' AND NOT EXISTS "
            "(SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"
        ).fetchall()
        for name, _ in defs:
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
        for statement in LOAD:
            t = time.perf_counter()
            conn.execute(statement, params if "%(" in statement else None)
            print(f"  {statement.split()[2]:<10} {time.perf_counter() - t:6.1f} s", flush=True)
        t = time.perf_counter()
        for _, definition in defs:
            conn.execute(definition)
        print(f"  indexes    {time.perf_counter() - t:6.1f} s ({', '.join(n for n, _ in defs)})", flush=True)
        conn.execute("VACUUM ANALYZE")


def queries(rng: random.Random, url: str, svc, areas: list[int]):
    """(label, make, run) per query kind: ``make()`` a FindingFilter, ``run(session, flt)`` the rows'
    count. Area-bound kinds take their areas from ``areas`` (popped: each area is first touched once)."""
    with psycopg.connect(url) as conn:
        boxes = dict(conn.execute("SELECT id, ARRAY[ST_XMin(geom), ST_YMin(geom)] FROM areas").fetchall())

    def window(days: int) -> tuple[datetime, datetime]:
        since = START + timedelta(days=rng.uniform(0, DAYS - days))
        return since, since + timedelta(days=days)

    def area_time() -> FindingFilter:
        since, until = window(90)
        return FindingFilter(area=f"area {areas.pop()}", since=since, until=until)

    def bbox_time() -> FindingFilter:
        x, y = boxes[areas.pop()]
        x, y = x + rng.uniform(0, 0.05), y + rng.uniform(0, 0.05)
        since, until = window(180)
        return FindingFilter(bbox=(x, y, x + 0.05, y + 0.05), since=since, until=until)

    def text() -> FindingFilter:
        return FindingFilter(text=rng.choice(["quarry", "burn scar", "Greenhouses", "new road", "flooded"]))

    def area_text() -> FindingFilter:
        return FindingFilter(area=f"area {areas.pop()}",
                             text=rng.choice(["quarry", "burn scar", "Greenhouses", "new road", "flooded", "yes"]))

    def export() -> FindingFilter:
        return FindingFilter(area=f"area {areas.pop()}", limit=None)

    def listed(session, flt):
        return len(svc.query_findings(session, flt))

    def exported(session, flt):
        kwargs = {"geometry_text": True} if "geometry_text" in svc.iter_findings.__code__.co_varnames else {}
        return svc.write_geojson(svc.iter_findings(session, flt, **kwargs), io.StringIO(), default=str)

    return [("area + 90 days", area_time, listed), ("bbox + 180 days", bbox_time, listed), ("text", text, listed),
            ("area + text", area_text, listed), ("export area", export, exported)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def explain(sa_url: str, svc, flt: FindingFilter) -> str:
    """EXPLAIN ANALYZE of every statement query_findings runs for ``flt`` (a text search may run several)."""
    captured: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT") or statement.lstrip().upper().startswith("WITH"):
            captured.append((statement, parameters))

    engine = get_engine(sa_url)
    event.listen(engine, "before_cursor_execute", capture)
    try:
        with session_scope(sa_url) as session:
            svc.query_findings(session, flt)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    plans = []
    with session_scope(sa_url) as session:
        for statement, params in captured:
            rows = session.connection().exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)
            plans.append("\n".join(r[0] for r in rows))
    return "\n--\n".join(plans)


def baseline_module(rev: str, tmp: Path):
    """monitor/findings.py of ``rev`` as a module of its own (it imports core.models and monitor.tables
    of this checkout, which declare the same columns)."""
    text = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "show", f"{rev}:monitor/findings.py"],
                          capture_output=True, text=True, check=True).stdout
    path = tmp / "baseline_findings.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("baseline_findings", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def measure(sa_url: str, url: str, svc, areas: list[int], repeat: int, show_plans: bool) -> dict:
    """{kind: {"cold": [ms…], "warm": [ms…], "rows": [n…]}} for one arm."""
    rng = random.Random(7)
    out = {}
    for label, make, run in queries(rng, url, svc, areas):
        filters = [make() for _ in range(repeat)]
        figures = {"cold": [], "warm": [], "rows": []}
        for cache in ("cold", "warm"):
            for flt in filters:
                t = time.perf_counter()
                with session_scope(sa_url) as session:
                    n = run(session, flt)
                figures[cache].append((time.perf_counter() - t) * 1000)
                if cache == "cold":
                    figures["rows"].append(n)
        out[label] = figures
        if show_plans and label != "export area":
            print(f"{label}:\n{explain(sa_url, svc, filters[0])}\n", flush=True)
    return out


def report(size: int, arms: dict[str, dict]) -> float:
    """Side-by-side table for one size; returns the slowest p95 of the after arm."""
    print(f"\n{size:,} findings: p50 / p95 ms (cold = first run of each parameter set, warm = run again)")
    print(f"{'query':<16} {'rows':>7} | {'before cold':>15} {'before warm':>15} | {'after cold':>15} "
          f"{'after warm':>15} | p95 before/after")
    worst = 0.0
    for label in arms["after"]:
        cells, p95s = [], {}
        for arm in ("before", "after"):
            for cache in ("cold", "warm"):
                values = arms[arm][label][cache]
                p50, p95 = percentile(values, 0.5), percentile(values, 0.95)
                p95s[arm] = max(p95s.get(arm, 0.0), p95)
                cells.append(f"{p50:6.1f} / {p95:6.1f}")
        worst = max(worst, p95s["after"])
        rows = statistics.median(arms["after"][label]["rows"])
        print(f"{label:<16} {rows:7.0f} | {cells[0]:>15} {cells[1]:>15} | {cells[2]:>15} {cells[3]:>15} | "
              f"{p95s['before'] / p95s['after']:5.1f}x")
        if label == "export area":
            for arm in ("before", "after"):
                per = [ms * 10_000 / max(n, 1) for ms, n in zip(arms[arm][label]["cold"], arms[arm][label]["rows"],
                                                                strict=True)]
                print(f"  export {arm:<6}: cold p95 {percentile(per, 0.95) / 1000:.2f} s per 10,000 findings")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,5000000", help="findings per database, comma-separated")
    parser.add_argument("--repeat", type=int, default=20, help="parameter sets per query kind and arm")
    parser.add_argument("--baseline", default=BASELINE_REV)
    parser.add_argument("--after-revision", default=AFTER_REVISION,
                        help="the before arm runs on the schema of the revision before this one")
    parser.add_argument("--before-on-head", action=argparse.BooleanOptionalAction, default=True,
                        help="upgrade to head before the before arm (both arms on one schema)")
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of one query per kind")
    parser.add_argument("--keep", action="store_true", help="keep the databases (their URLs are printed)")
    parser.add_argument("--reuse", metavar="URL",
                        help="a database kept by --keep (already at head): both arms on it, no load or upgrade "
                             "(for iterating; its cold figures are only as cold as the buffers left them)")
    args = parser.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    if 5 * args.repeat * 2 > AREAS:
        parser.error(f"--repeat {args.repeat}: at most {AREAS // 10} (each arm touches 5 × repeat fresh areas)")

    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(migrate.alembic_config())
    before_revision = scripts.get_revision(args.after_revision).down_revision
    worst = {}
    with tempfile.TemporaryDirectory(prefix="unirs-bench-queries-") as tmp:
        arms_code = {"before": baseline_module(args.baseline, Path(tmp)), "after": current_findings}
        if args.reuse:
            sa_url = dbadmin.sqlalchemy_url(args.reuse)
            with psycopg.connect(args.reuse) as conn:
                size = conn.execute("SELECT count(*) FROM findings").fetchone()[0]
            print(f"database {dbadmin.dbname(args.reuse)}: {size:,} findings, reused", flush=True)
            pool = random.Random(size).sample(range(1, AREAS + 1), AREAS)
            results = {arm: measure(sa_url, args.reuse, code, pool, args.repeat, args.explain)
                       for arm, code in arms_code.items()}
            worst[size] = report(size, results)
            sizes = []
        for size in sizes:
            url = dbadmin.create_scratch_database(ADMIN_URL, "queries_bench")
            sa_url = dbadmin.sqlalchemy_url(url)
            print(f"database {dbadmin.dbname(url)}: {size:,} findings, schema at {before_revision}", flush=True)
            try:
                migrate.upgrade(sa_url, before_revision)
                t = time.perf_counter()
                load(url, size)
                print(f"loaded in {time.perf_counter() - t:.1f} s", flush=True)
                pool = random.Random(size).sample(range(1, AREAS + 1), AREAS)  # every area once, in random order
                results = {}
                if not args.before_on_head:
                    results["before"] = measure(sa_url, url, arms_code["before"], pool, args.repeat, args.explain)
                t = time.perf_counter()
                migrate.upgrade(sa_url)
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("ANALYZE findings")
                print(f"upgrade {before_revision} -> head (revision {args.after_revision}) on {size:,} findings: "
                      f"{time.perf_counter() - t:.1f} s", flush=True)
                if args.before_on_head:
                    results["before"] = measure(sa_url, url, arms_code["before"], pool, args.repeat, args.explain)
                results["after"] = measure(sa_url, url, arms_code["after"], pool, args.repeat, args.explain)
                worst[size] = report(size, results)
            finally:
                if args.keep:
                    print(f"kept {url}")
                else:
                    dbadmin.drop_database(url)
    for size, value in worst.items():
        print(f"slowest p95 after, {size:,} findings: {value:.2f} ms")
    largest = max(worst)
    print(f"p95_ms_{largest / 1e6:g}m_after: {worst[largest]:.2f}")


if __name__ == "__main__":
    main()

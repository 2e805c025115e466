"""Benchmark of the findings query on a million findings in PostGIS.

Creates a throw-away database (migrated with the real Alembic revisions, so the real indexes), generates
the rows in SQL (generate_series: no row crosses the client), then times the typical queries through
``monitor.findings.query_findings`` — the code the CLI runs — and prints p50/p95 per query, ending with
``p95_ms: X`` for the slowest. ``--explain`` prints one EXPLAIN ANALYZE per query kind.

    .venv/bin/python benchmarks/bench_queries.py [--rows 1000000] [--repeat 40] [--explain] [--keep]

Data shape: 200 areas of ~0.1° scattered over Europe, 50,000 analyses over three years (one after-scene
each; rows appended roughly in acquisition order as in production, 10 % backfilled out of order), 20
findings per analysis (1 summary with a caption, 15 changed regions with small polygons inside the area,
4 answers).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
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
from monitor.findings import FindingFilter, query_findings

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


def queries(rng: random.Random, url: str):
    """(label, FindingFilter) generators for the typical questions people ask."""
    with psycopg.connect(url) as conn:
        boxes = conn.execute("SELECT ST_XMin(geom), ST_YMin(geom) FROM areas ORDER BY id").fetchall()

    def window(days: int) -> tuple[datetime, datetime]:
        since = START + timedelta(days=rng.uniform(0, DAYS - days))
        return since, since + timedelta(days=days)

    def area_time() -> FindingFilter:
        since, until = window(90)
        return FindingFilter(area=f"area {rng.randint(1, AREAS)}", since=since, until=until)

    def bbox_time() -> FindingFilter:
        x, y = rng.choice(boxes)
        x, y = x + rng.uniform(0, 0.05), y + rng.uniform(0, 0.05)
        since, until = window(180)
        return FindingFilter(bbox=(x, y, x + 0.05, y + 0.05), since=since, until=until)

    def text() -> FindingFilter:
        return FindingFilter(text=rng.choice(["quarry", "burn scar", "Greenhouses", "new road", "flooded"]))

    return [("area + 90 days", area_time), ("bbox + 180 days", bbox_time), ("text", text)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def explain(sa_url: str, flt: FindingFilter) -> str:
    """EXPLAIN ANALYZE of every statement query_findings runs for ``flt`` (a text search may run several)."""
    captured: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT") or statement.lstrip().upper().startswith("WITH"):
            captured.append((statement, parameters))

    engine = get_engine(sa_url)
    event.listen(engine, "before_cursor_execute", capture)
    try:
        with session_scope(sa_url) as session:
            query_findings(session, flt)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    plans = []
    with session_scope(sa_url) as session:
        for statement, params in captured:
            rows = session.connection().exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)
            plans.append("\n".join(r[0] for r in rows))
    return "\n--\n".join(plans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of one query per kind")
    parser.add_argument("--keep", action="store_true", help="keep the database (its URL is printed)")
    args = parser.parse_args()

    url = dbadmin.create_scratch_database(ADMIN_URL, "unirs_bench")
    sa_url = dbadmin.sqlalchemy_url(url)
    print(f"database {dbadmin.dbname(url)}", flush=True)
    try:
        migrate.upgrade(sa_url)
        t = time.perf_counter()
        load(url, args.rows)
        with psycopg.connect(url) as conn:
            n = conn.execute("SELECT count(*) FROM findings").fetchone()[0]
        print(f"loaded {n:,} findings in {time.perf_counter() - t:.1f} s", flush=True)

        rng = random.Random(7)
        worst = 0.0
        for label, make in queries(rng, url):
            for _ in range(3):  # warm the cache and the connection pool
                with session_scope(sa_url) as session:
                    query_findings(session, make())
            times, counts = [], []
            for _ in range(args.repeat):
                flt = make()
                t = time.perf_counter()
                with session_scope(sa_url) as session:
                    counts.append(len(query_findings(session, flt)))
                times.append((time.perf_counter() - t) * 1000)
            p50, p95 = percentile(times, 0.5), percentile(times, 0.95)
            worst = max(worst, p95)
            print(f"{label:<16} p50 {p50:7.2f} ms   p95 {p95:7.2f} ms   "
                  f"rows/query median {statistics.median(counts):.0f}")
            if args.explain:
                print(explain(sa_url, make()), "\n", flush=True)
        print(f"p95_ms: {worst:.2f}")
    finally:
        if args.keep:
            print(f"kept {url}")
        else:
            dbadmin.drop_database(url)


if __name__ == "__main__":
    main()

"""Benchmark: grouped polling vs one search per area, against a real local STAC API, packed and spread.

Setup (all on loopback, throw-away databases dropped at the end):
- a pgstac database served by stac-fastapi-pgstac (``devtools.localstac``) holding generated Sentinel-2
  shaped items: a grid of 1° × 1° "tiles" over Europe (lon −10..30, lat 36..60), several acquisitions
  each within the look-back window, random scene cloud cover;
- an application database (the real Alembic schema) holding, per case, N generated watched areas (small
  squares, 0.3–2 km wide), uniform over the case's region:
  - ``packed``: 10,000 areas over 10° × 5° (Romania, about 780 × 555 km), the old headline case;
  - ``spread``: 100, 1,000 and 10,000 areas over the whole of Europe (random, not packed).

Measured per case, from the same empty scene tables:
- grouped: ``monitor.catalogues.poll_all`` — one poll cycle (searches, paging, scene upserts, pending
  observations for every area × scene that intersect), HTTP search requests counted on the wire;
- naive: one search per area with the area's own geometry on a random SAMPLE of areas (requests and
  search time extrapolated linearly to all N: each naive search is independent), and the ingest done
  ONCE for the distinct items those searches returned — a per-area poller would not upsert a scene again
  for every area that sees it, so the naive arm is not charged for ingest the grouped arm does once.
  Its ingest time is scaled to all N by distinct items (ingest cost is linear in items).

With ``--baseline REV`` (e.g. ``4e3669f``) each case is also polled by the code of that git revision
(``git archive`` into a temporary directory, run in a subprocess) against the same STAC API and an
emptied application database, arms alternating ``--repeat`` times: seconds, searches and items side by
side, and the ratio. ``--poll-only`` skips the naive arm. ``--dates 2 --page-size 500`` is the Europe
poll of benchmarks/bench_pairing.py (its items also hold one SCL COG each; the poll never reads them).

Run: ``.venv/bin/python benchmarks/bench_polling.py [--cases packed:10000,spread:100,...] [--naive-sample 200]``.
Prints one row per case, side by side; the last line is ``spread_10000_request_ratio: <naive / grouped>``,
or with ``--baseline``, ``<case>_poll_speedup: <baseline seconds / current seconds>`` (medians).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from geoalchemy2.shape import from_shape
from shapely.geometry import MultiPolygon, box, mapping
from sqlalchemy import insert, text

from core import migrate
from core.config import CatalogueSettings, PollSettings, Settings, get_settings
from devtools import dbadmin, localstac

ADMIN_URL = os.environ.get("UNIRS_BENCH_ADMIN_URL", "postgresql://unirs:unirs@127.0.0.1:5432/postgres")
PACKED = (20.0, 43.5, 30.0, 48.5)  # lon/lat box (Romania, about 780 km × 555 km)
EUROPE = (-10.0, 36.0, 30.0, 60.0)  # the item grid, and the spread case's region
REGIONS = {"packed": PACKED, "spread": EUROPE}
DEFAULT_CASES = "packed:10000,spread:100,spread:1000,spread:10000"
TILE_DEG = 1.0
NOW = datetime(2024, 8, 30, 12, tzinfo=UTC)


def generate_items(template: dict, dates: int, rng: random.Random) -> list[dict]:
    items = []
    minx, miny, maxx, maxy = EUROPE
    nx, ny = int((maxx - minx) / TILE_DEG), int((maxy - miny) / TILE_DEG)
    for ix in range(nx):
        for iy in range(ny):
            tile = f"{29 + ix // 6}{chr(67 + iy % 20)}{chr(65 + ix % 6)}{chr(65 + iy // 20)}"
            # Tiles overlap a little, as MGRS tiles do.
            footprint = box(minx + ix * TILE_DEG - 0.05, miny + iy * TILE_DEG - 0.05,
                            minx + (ix + 1) * TILE_DEG + 0.05, miny + (iy + 1) * TILE_DEG + 0.05)
            for d in range(dates):
                when = NOW - timedelta(days=2 + 3 * d, hours=ix % 3)
                item = copy.deepcopy(template)
                item["id"] = f"S2B_{tile}_{when:%Y%m%d}_0_L2A"
                item["geometry"] = mapping(footprint)
                item["bbox"] = list(footprint.bounds)
                props = item["properties"]
                props.update({"datetime": when.strftime("%Y-%m-%dT%H:%M:%S.000000Z"), "grid:code": f"MGRS-{tile}",
                              "eo:cloud_cover": round(rng.uniform(0, 100), 2),
                              "s2:product_uri": f"S2B_MSIL2A_{when:%Y%m%dT%H%M%S}_N0510_R{(ix * 7) % 143:03d}_T{tile}_"
                                                f"{when:%Y%m%dT%H%M%S}.SAFE"})
                items.append(item)
    return items


def generate_areas(n: int, region: tuple[float, float, float, float], rng: random.Random) -> list[MultiPolygon]:
    minx, miny, maxx, maxy = region
    out = []
    for _ in range(n):
        size = rng.uniform(0.004, 0.025)  # ~0.3–2 km
        x, y = rng.uniform(minx, maxx - size), rng.uniform(miny, maxy - size)
        out.append(MultiPolygon([box(x, y, x + size, y + size)]))
    return out


def insert_areas(geoms: list[MultiPolygon], collection: str) -> list[int]:
    from core.db import session_scope
    from core.models import Area

    rows = [{"name": f"bench-{i:05d}", "geom": from_shape(g, srid=4326), "area_km2": 1.0, "collections": [collection],
             "max_cloud_cover": 80.0, "min_clear_fraction": 0.7, "recipients": [], "questions": [], "properties": {}}
            for i, g in enumerate(geoms)]
    with session_scope(get_settings()) as session:
        ids = []
        for start in range(0, len(rows), 2000):
            ids += list(session.execute(insert(Area).returning(Area.id), rows[start:start + 2000]).scalars())
    return ids


def reset_tables(settings: Settings) -> None:
    """Empty what a poll writes (and the areas), so each case and each arm starts from the same state."""
    from core.db import session_scope

    with session_scope(settings) as session:
        session.execute(text("TRUNCATE observations, scenes, acquisitions, poll_states, areas "
                             "RESTART IDENTITY CASCADE"))


def naive_poll(settings: Settings, catalogue: CatalogueSettings, areas: list[tuple[int, MultiPolygon]],
               collection: str) -> dict[str, float]:
    """One search per area (its own geometry); the distinct items found ingested once, then observations
    per area. Returns search requests, search seconds, ingest seconds, items returned and distinct items."""
    from core.db import session_scope
    from monitor.catalogues.client import open_client, search_pages
    from monitor.catalogues.poller import RequestCounter, _scene_ids_for, create_observations
    from monitor.catalogues.store import ingest_items, upsert_catalogue

    with session_scope(settings) as session:
        catalogue_id = upsert_catalogue(session, catalogue)
    counter = RequestCounter()
    client = open_client(catalogue, settings.poll, response_hooks=[counter])
    start = NOW - timedelta(days=settings.poll.lookback_days)
    started = time.monotonic()
    distinct: dict[str, dict] = {}
    returned = 0
    for _area_id, geom in areas:
        for page in search_pages(client, collection=collection, intersects=geom.geoms[0], start=start, end=NOW,
                                 max_cloud_cover=80.0, page_size=catalogue.page_size):
            returned += len(page)
            distinct.update((item["id"], item) for item in page)
    search_seconds = time.monotonic() - started
    started = time.monotonic()
    with session_scope(settings) as session:
        stats = ingest_items(session, catalogue, catalogue_id, collection, list(distinct.values()))
        scene_ids = _scene_ids_for(session, catalogue_id, stats)
        create_observations(session, [a for a, _ in areas], scene_ids)
    return {"requests": counter.searches, "search_seconds": search_seconds,
            "ingest_seconds": time.monotonic() - started, "items": returned, "distinct": len(distinct)}


# Runs in a subprocess on the baseline revision's code: one poll of the benchmark's databases.
BASELINE_POLL = """
import json, os, sys, time
from core.config import CatalogueSettings, PollSettings, Settings
from monitor.catalogues import poll_all
from datetime import datetime
spec = json.loads(sys.argv[1])
catalogue = CatalogueSettings(**spec["catalogue"])
settings = Settings(database_url=spec["database_url"], catalogues=[catalogue], poll=PollSettings(**spec["poll"]))
started = time.monotonic()
result = poll_all(settings, now=datetime.fromisoformat(spec["now"]))
poll = result.polls[0]
print(json.dumps({"seconds": time.monotonic() - started, "ok": poll.ok, "error": poll.error, "groups": poll.groups,
                  "searches": poll.search_requests, "items": poll.stats.items_seen, "scenes": poll.stats.new_scenes,
                  "observations": poll.observations_created}))
"""


def extract_revision(revision: str, into: Path) -> Path:
    """The tracked files of ``revision`` of this repository, unpacked under ``into``."""
    repo = Path(__file__).resolve().parent.parent
    archive = into / "baseline.tar"
    subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", "-o", str(archive), revision], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def poll_once(settings: Settings, baseline: Path | None) -> dict[str, Any]:
    """One grouped poll from empty scene tables (the areas stay): this code, or the baseline's in a subprocess."""
    truncate_scenes(settings)
    if baseline is None:
        from monitor.catalogues import poll_all

        started = time.monotonic()
        result = poll_all(settings, now=NOW)
        poll = result.polls[0]
        return {"seconds": time.monotonic() - started, "ok": poll.ok, "error": poll.error, "groups": poll.groups,
                "searches": poll.search_requests, "items": poll.stats.items_seen, "scenes": poll.stats.new_scenes,
                "observations": poll.observations_created}
    catalogue = settings.catalogues[0]
    spec = {"database_url": settings.database_url, "now": NOW.isoformat(),
            "catalogue": catalogue.model_dump(include={"name", "url", "collections", "allowed_schemes", "allowed_hosts",
                                                       "allow_private_hosts", "page_size", "timeout_seconds",
                                                       "late_sweep"}),
            "poll": settings.poll.model_dump(include={"lookback_days", "group_distance_km"})}
    env = {**os.environ, "PYTHONPATH": str(baseline), "UNIRS_DATABASE_URL": settings.database_url}
    out = subprocess.run([sys.executable, "-c", BASELINE_POLL, json.dumps(spec)], cwd=baseline, env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def truncate_scenes(settings: Settings) -> None:
    from core.db import session_scope

    with session_scope(settings) as session:
        session.execute(text("TRUNCATE observations, scenes, acquisitions, poll_states RESTART IDENTITY CASCADE"))


def run_case(name: str, n: int, settings: Settings, catalogue: CatalogueSettings, collection: str,
             naive_sample: int, rng: random.Random, *, baseline: Path | None = None, repeat: int = 1,
             poll_only: bool = False) -> dict[str, Any]:
    reset_tables(settings)
    geoms = generate_areas(n, REGIONS[name], rng)
    ids = insert_areas(geoms, collection)
    runs: dict[str, list[dict[str, Any]]] = {"current": [], "baseline": []}
    for _ in range(repeat):
        for arm in ("baseline", "current") if baseline is not None else ("current",):
            run = poll_once(settings, baseline if arm == "baseline" else None)
            if not run["ok"]:
                raise SystemExit(f"{arm} poll failed ({name} {n}): {run['error']}")
            runs[arm].append(run)
    last = runs["current"][-1]
    grouped_seconds = statistics.median(r["seconds"] for r in runs["current"])
    row: dict[str, Any] = {
        "areas": len(ids), "groups": last["groups"], "grouped_requests": last["searches"],
        "grouped_items": last["items"], "scenes": last["scenes"], "observations": last["observations"],
        "grouped_seconds": grouped_seconds, "runs": runs,
    }
    if baseline is not None:
        row["baseline_seconds"] = statistics.median(r["seconds"] for r in runs["baseline"])
        row["baseline"] = runs["baseline"][-1]
        if (row["baseline"]["scenes"], row["baseline"]["observations"]) != (last["scenes"], last["observations"]):
            raise SystemExit(f"{name} {n}: baseline stored {row['baseline']['scenes']} scenes / "
                             f"{row['baseline']['observations']} observations, current {last['scenes']} / "
                             f"{last['observations']}")
    if poll_only:
        return row

    # Same starting state for the naive arm: no scenes stored yet (the areas stay).
    truncate_scenes(settings)
    sample = rng.sample(list(zip(ids, geoms, strict=True)), min(naive_sample, len(ids)))
    naive = naive_poll(settings, catalogue, sample, collection)
    scale = len(ids) / len(sample)
    # Ingest is linear in distinct items: all N areas' searches would return what the grouped arm stored.
    ingest_scale = last["scenes"] / naive["distinct"] if naive["distinct"] else 1.0
    naive_seconds_all = naive["search_seconds"] * scale + naive["ingest_seconds"] * max(ingest_scale, 1.0)
    row.update({
        "sample": len(sample), "naive_requests_sample": naive["requests"],
        "naive_requests": naive["requests"] * scale, "naive_items_sample": naive["items"],
        "naive_search_seconds": naive["search_seconds"] * scale,
        "naive_ingest_seconds": naive["ingest_seconds"] * max(ingest_scale, 1.0),
        "naive_seconds": naive_seconds_all,
        "request_ratio": naive["requests"] * scale / last["searches"],
        "time_ratio": naive_seconds_all / grouped_seconds,
    })
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help=f"comma-separated region:areas (regions: {', '.join(REGIONS)}; default {DEFAULT_CASES})")
    parser.add_argument("--naive-sample", type=int, default=200, help="areas searched one by one (extrapolated)")
    parser.add_argument("--dates", type=int, default=3, help="acquisitions per tile inside the look-back window")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--page-size", type=int, default=200)
    parser.add_argument("--poll-only", action="store_true", help="skip the naive arm")
    parser.add_argument("--baseline", metavar="REV", help="also poll with the code of this git revision")
    parser.add_argument("--repeat", type=int, default=1, help="polls per arm (alternating; medians reported)")
    args = parser.parse_args()
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    unknown = [c for c, _ in cases if c not in REGIONS]
    if unknown:
        parser.error(f"unknown region {unknown[0]!r}; choose from {', '.join(REGIONS)}")
    logging.basicConfig(level=logging.WARNING)
    rng = random.Random(args.seed)

    scratch = tempfile.TemporaryDirectory(prefix="bench-polling-")
    baseline = extract_revision(args.baseline, Path(scratch.name)) if args.baseline else None
    app_url = dbadmin.create_scratch_database(ADMIN_URL, "unirs_bench")
    stac_dsn = dbadmin.create_scratch_database(ADMIN_URL, "unirs_bench_stac")
    api = None
    try:
        sa_url = dbadmin.sqlalchemy_url(app_url)
        migrate.upgrade(sa_url)
        os.environ["UNIRS_DATABASE_URL"] = sa_url
        get_settings.cache_clear()

        localstac.prepare_database(stac_dsn, create=False)
        collection = localstac.read_sample_collection()
        collection["extent"]["spatial"]["bbox"] = [list(EUROPE)]
        localstac.load_collection(stac_dsn, collection)
        template = localstac.read_sample_items()[0]
        items = generate_items(template, args.dates, rng)
        localstac.load_items(stac_dsn, items, asset_base_url="http://127.0.0.1:9")
        api = localstac.StacApiServer(stac_dsn).start()

        catalogue = CatalogueSettings(name="bench", url=api.url, collections=[collection["id"]],
                                      allowed_schemes=["http"], allowed_hosts=["127.0.0.1"], allow_private_hosts=True,
                                      page_size=args.page_size, timeout_seconds=120, late_sweep="off")
        settings = Settings(database_url=sa_url, catalogues=[catalogue],
                            poll=PollSettings(lookback_days=10, group_distance_km=50))
        from monitor.catalogues.groups import MAX_EXTENT_FACTOR

        print(f"STAC API: stac-fastapi-pgstac on {api.url}; {len(items)} items ({len(items) // args.dates} 1° tiles x "
              f"{args.dates} dates) over lon {EUROPE[0]}..{EUROPE[2]}, lat {EUROPE[1]}..{EUROPE[3]}")
        print(f"areas: 0.3-2 km squares, uniform over the region (packed: lon {PACKED[0]}..{PACKED[2]}, lat "
              f"{PACKED[1]}..{PACKED[3]}, ~780 x 555 km; spread: all of the item grid, ~3,000 x 2,700 km); look-back "
              f"10 d; page size {catalogue.page_size}; group distance {settings.poll.group_distance_km} km (groups at "
              f"most {MAX_EXTENT_FACTOR * settings.poll.group_distance_km:.0f} km wide)")
        print(f"naive: one search per area on a random sample of {args.naive_sample} areas, extrapolated to all; "
              "its ingest done once for the distinct items found (scaled by distinct items), not once per area")
        rows = []
        for name, n in cases:
            row = run_case(name, n, settings, catalogue, collection["id"], args.naive_sample, rng, baseline=baseline,
                           repeat=args.repeat, poll_only=args.poll_only)
            rows.append((name, n, row))
            runs = ", ".join(f"{r['seconds']:.1f}" for r in row["runs"]["current"])
            print(f"  {name} {n}: grouped {row['groups']} searches / {row['grouped_requests']} requests / "
                  f"{row['grouped_items']} items / {runs} s", flush=True)
            if baseline is not None:
                b = row["baseline"]
                runs = ", ".join(f"{r['seconds']:.1f}" for r in row["runs"]["baseline"])
                print(f"  {name} {n}: baseline {args.baseline}: {b['groups']} searches / {b['searches']} requests / "
                      f"{b['items']} items / {runs} s", flush=True)
            if not args.poll_only:
                print(f"  {name} {n}: naive ~{row['naive_requests']:.0f} requests / ~{row['naive_seconds']:.0f} s",
                      flush=True)

        if baseline is not None:
            print(f"\npoll only, {args.dates} dates, page size {args.page_size}; median of {args.repeat} alternating "
                  f"run(s) per arm; baseline = {args.baseline}")
            print(f"{'case':<16}{'base req':>9}{'req':>6}{'base items':>11}{'items':>7}{'base s':>8}{'s':>7}"
                  f"{'speedup':>9}{'scenes':>8}{'obs':>8}")
            for name, n, r in rows:
                b = r["baseline"]
                print(f"{name + ' ' + str(n):<16}{b['searches']:>9}{r['grouped_requests']:>6}{b['items']:>11}"
                      f"{r['grouped_items']:>7}{r['baseline_seconds']:>8.1f}{r['grouped_seconds']:>7.1f}"
                      f"{r['baseline_seconds'] / r['grouped_seconds']:>9.2f}{r['scenes']:>8}{r['observations']:>8}")
        if args.poll_only or baseline is not None:
            name, n, r = next(((name, n, r) for name, n, r in reversed(rows) if name == "spread"), rows[-1])
            if baseline is not None:
                print(f"{name}_{n}_poll_speedup: {r['baseline_seconds'] / r['grouped_seconds']:.2f}")
            else:
                print(f"{name}_{n}_poll_seconds: {r['grouped_seconds']:.1f}")
            return 0

        header = (f"{'case':<16}{'areas':>7}{'groups':>8}{'grouped req':>12}{'naive req':>11}{'req ratio':>10}"
                  f"{'grouped s':>10}{'naive s':>9}{'(search+ingest)':>17}{'time ratio':>11}{'scenes':>8}{'obs':>8}")
        print(header)
        for name, n, r in rows:
            split = f"{r['naive_search_seconds']:.0f}+{r['naive_ingest_seconds']:.1f}"
            print(f"{name + ' ' + str(n):<16}{r['areas']:>7}{r['groups']:>8}{r['grouped_requests']:>12}"
                  f"{r['naive_requests']:>11.0f}{r['request_ratio']:>10.1f}{r['grouped_seconds']:>10.1f}"
                  f"{r['naive_seconds']:>9.0f}{split:>17}{r['time_ratio']:>11.1f}{r['scenes']:>8}{r['observations']:>8}")
        last = next(((n, r) for name, n, r in reversed(rows) if name == "spread"), None)
        if last is None:
            name, n, r = rows[-1]
            print(f"{name}_{n}_request_ratio: {r['request_ratio']:.1f}")
        else:
            print(f"spread_{last[0]}_request_ratio: {last[1]['request_ratio']:.1f}")
    finally:
        if api is not None:
            api.stop()
        from core.db import reset_engines

        reset_engines()
        dbadmin.drop_database(app_url)
        dbadmin.drop_database(stac_dsn)
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: grouped polling vs one search per area, against a real local STAC API.

Setup (all on loopback, throw-away databases dropped at the end):
- a pgstac database served by stac-fastapi-pgstac (``devtools.localstac``) holding generated Sentinel-2
  shaped items: a grid of 1° × 1° "tiles" over a 10° × 5° region (Romania), several acquisitions each
  within the look-back window, random scene cloud cover;
- an application database (the real Alembic schema) with N generated watched areas (small squares,
  0.3–2 km wide) spread uniformly over the region.

Measured in the same run:
- grouped: ``monitor.catalogues.poll_all`` — one poll cycle (searches, paging, scene upserts, pending
  observations for every area × scene that intersect), HTTP search requests counted on the wire;
- naive: one search per area with the area's own geometry, plus the same ingest, on a random SAMPLE of
  areas, then extrapolated linearly to all N (each naive search is independent, so per-area cost is flat).

Run: ``.venv/bin/python benchmarks/bench_polling.py [--areas 10000] [--naive-sample 200]``.
The last line is ``request_ratio: <naive requests / grouped requests>``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from geoalchemy2.shape import from_shape
from shapely.geometry import MultiPolygon, box, mapping
from sqlalchemy import insert

from core import migrate
from core.config import CatalogueSettings, PollSettings, Settings, get_settings
from devtools import dbadmin, localstac

ADMIN_URL = os.environ.get("UNIRS_BENCH_ADMIN_URL", "postgresql://unirs:unirs@127.0.0.1:5432/postgres")
REGION = (20.0, 43.5, 30.0, 48.5)  # lon/lat box (about 780 km × 555 km)
TILE_DEG = 1.0
NOW = datetime(2024, 8, 30, 12, tzinfo=UTC)


def generate_items(template: dict, dates: int, rng: random.Random) -> list[dict]:
    items = []
    minx, miny, maxx, maxy = REGION
    nx, ny = int((maxx - minx) / TILE_DEG), int((maxy - miny) / TILE_DEG)
    for ix in range(nx):
        for iy in range(ny):
            tile = f"{34 + ix // 6}T{chr(65 + ix % 6)}{chr(65 + iy)}"
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


def generate_areas(n: int, rng: random.Random) -> list[MultiPolygon]:
    minx, miny, maxx, maxy = REGION
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


def naive_poll(settings: Settings, catalogue: CatalogueSettings, areas: list[tuple[int, MultiPolygon]],
               collection: str) -> tuple[int, float, int]:
    """One search per area (its own geometry), same ingest path. Returns (search requests, seconds, items)."""
    from core.db import session_scope
    from monitor.catalogues.client import open_client
    from monitor.catalogues.groups import SearchGroup
    from monitor.catalogues.poller import RequestCounter, search_and_ingest
    from monitor.catalogues.store import IngestStats, upsert_catalogue

    with session_scope(settings) as session:
        catalogue_id = upsert_catalogue(session, catalogue)
    counter = RequestCounter()
    started = time.monotonic()
    client = open_client(catalogue, settings.poll, response_hooks=[counter])
    stats = IngestStats()
    start = NOW - timedelta(days=settings.poll.lookback_days)
    for area_id, geom in areas:
        group = SearchGroup(area_ids=[area_id], geometry=geom.geoms[0], max_cloud_cover=80.0)
        search_and_ingest(settings, client, catalogue, catalogue_id, collection, group, start, NOW,
                          catalogue.page_size, stats)
    return counter.searches, time.monotonic() - started, stats.items_seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--areas", type=int, default=10_000)
    parser.add_argument("--naive-sample", type=int, default=200, help="areas searched one by one (extrapolated)")
    parser.add_argument("--dates", type=int, default=3, help="acquisitions per tile inside the look-back window")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = random.Random(args.seed)

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
        collection["extent"]["spatial"]["bbox"] = [list(REGION)]
        localstac.load_collection(stac_dsn, collection)
        template = localstac.read_sample_items()[0]
        items = generate_items(template, args.dates, rng)
        localstac.load_items(stac_dsn, items, asset_base_url="http://127.0.0.1:9")
        api = localstac.StacApiServer(stac_dsn).start()

        catalogue = CatalogueSettings(name="bench", url=api.url, collections=[collection["id"]],
                                      allowed_schemes=["http"], allowed_hosts=["127.0.0.1"], allow_private_hosts=True,
                                      page_size=200, timeout_seconds=120)
        settings = Settings(database_url=sa_url, catalogues=[catalogue],
                            poll=PollSettings(lookback_days=10, group_distance_km=50))
        geoms = generate_areas(args.areas, rng)
        ids = insert_areas(geoms, collection["id"])

        from monitor.catalogues import poll_all
        from monitor.catalogues.groups import MAX_EXTENT_FACTOR

        started = time.monotonic()
        result = poll_all(settings, now=NOW)
        grouped_seconds = time.monotonic() - started
        poll = result.polls[0]
        if not poll.ok:
            raise SystemExit(f"grouped poll failed: {poll.error}")

        sample = rng.sample(list(zip(ids, geoms, strict=True)), min(args.naive_sample, len(ids)))
        naive_requests, naive_seconds, naive_items = naive_poll(settings, catalogue, sample, collection["id"])
        scale = len(ids) / len(sample)
        naive_requests_all = naive_requests * scale
        naive_seconds_all = naive_seconds * scale

        print(f"STAC API: stac-fastapi-pgstac on {api.url}; {len(items)} items ({len(items) // args.dates} tiles x "
              f"{args.dates} dates) over lon {REGION[0]}..{REGION[2]}, lat {REGION[1]}..{REGION[3]}")
        print(f"areas: {len(ids)} (0.3-2 km squares, uniform over the region); look-back 10 d; page size "
              f"{catalogue.page_size}; group distance {settings.poll.group_distance_km} km "
              f"(groups at most {MAX_EXTENT_FACTOR * settings.poll.group_distance_km:.0f} km wide)")
        print(f"grouped: {poll.groups} searches, {poll.search_requests} HTTP search requests (incl. pages), "
              f"{poll.http_requests} HTTP requests in all, {poll.stats.items_seen} items returned, "
              f"{poll.stats.new_scenes} scenes, {poll.observations_created} area x scene observations, "
              f"cycle {grouped_seconds:.1f} s")
        print(f"naive (measured on a random sample of {len(sample)} areas, extrapolated x{scale:.1f} to {len(ids)}): "
              f"{naive_requests} search requests / {naive_seconds:.1f} s / {naive_items} items for the sample -> "
              f"~{naive_requests_all:.0f} requests, ~{naive_seconds_all:.0f} s per cycle")
        print(f"time_ratio: {naive_seconds_all / grouped_seconds:.1f}")
        print(f"request_ratio: {naive_requests_all / poll.search_requests:.1f}")
    finally:
        if api is not None:
            api.stop()
        from core.db import reset_engines

        reset_engines()
        dbadmin.drop_database(app_url)
        dbadmin.drop_database(stac_dsn)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: observations for 10,000 areas — shared mask reads vs per-area reads — and one full poll + pairing
cycle for 10,000 areas spread over Europe, on loopback (local STAC API, COGs over HTTP, throw-away databases).

1. **One scene.** A 109.8 km Sentinel-2 granule's SCL (20 m, 5490 × 5490 px, 512 px tiles, overviews; clouds
   and shadows in 100 m patches) and 10,000 random areas (0.3–2 km squares) under it.
   - shared: :func:`eo.observe.observe_acquisition` for all areas at once (one read per granule and window);
   - per-area: one read per area (``shared=False``, what pairing did before), measured on a random sample of
     areas and extrapolated linearly (each read is independent), on a second copy of the file so GDAL's
     cache of the shared arm cannot help it. The sample's fractions must equal the shared ones exactly.
   HTTP requests are counted by the COG server.
2. **Europe.** 10,000 areas uniform over lon −10..30, lat 36..60; a Sentinel-2 item per 1° tile that holds
   an area and per date (two dates in the look-back; the tiles of one longitude column share a datatake,
   so acquisitions are mosaics of several granules), each with its own SCL COG in the tile's UTM zone
   (sparse GeoTIFF: only the blocks under areas are written). Timed: ``poll_all`` (searches, ingest, pending
   observations), then observations and pairing as the scheduler runs them: ``process_pending`` sends one
   ``unirs.observe`` task per acquisition to ``--workers`` real Celery worker processes (a private
   redis-server), and pairs what they computed, in a loop, until no observation is left pending (the last
   observation/analysis row written). Baseline arm, same run: ``--baseline-rev``'s (main before the workers
   took the observations) in-process ``process_pending`` on a copy of the polled database; both arms must
   settle the same observations and create the same analyses. ``--compare-rev REV``: first the same cycle with
   REV's workers and pairing loop (a process each, REV's packages on the path) on another copy of the polled
   database, then this code's; the md5 of every observation and analysis must agree between the two, and
   ``workers_speedup`` gives the ratio with the load average. Both arms' CPU seconds are printed side by side
   (worker programs with their pool processes, the dispatch + pairing loop, the database backends, the COG
   server): on a shared machine the seconds depend on the load, the CPU seconds much less.

Run: ``.venv/bin/python benchmarks/bench_pairing.py [--areas 10000] [--per-area-sample 1000] [--workers 2]``.
The last line is ``shared_speedup: <per-area seconds / shared seconds>``; the Europe part ends with
``pairing_speedup`` (before / after) and ``full_cycle_seconds`` (poll + observations and pairing).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's area generator

import numpy as np
import rasterio
from affine import Affine
from bench_pairing_workers import cycle_with_workers, export_code, outcome_digest
from bench_polling import EUROPE, generate_areas  # one area generator for both benchmarks
from geoalchemy2.shape import from_shape
from rasterio.warp import transform_geom
from rasterio.windows import Window
from shapely.geometry import MultiPolygon, box, mapping, shape
from sqlalchemy import insert

from core import migrate
from core.config import CatalogueSettings, PollSettings, Settings, get_settings
from devtools import dbadmin, localstac
from eo.cog import utm_crs_for
from eo.observe import GranuleMask, ReadStats, observe_acquisition

REPO = Path(__file__).resolve().parent.parent
# main before observations moved to the workers: one process, one read per granule and window.
BASELINE_REV = "4e3669f"
ADMIN_URL = os.environ.get("UNIRS_BENCH_ADMIN_URL", "postgresql://unirs:unirs@127.0.0.1:5432/postgres")
SCENE_EPSG, SCENE_LEFT, SCENE_TOP, SCENE_PX = 32634, 600_000.0, 5_100_000.0, 5490
NOW = datetime(2024, 8, 30, 12, tzinfo=UTC)
LAT_BANDS = "CDEFGHJKLMNPQRSTUVWX"


def scl_patches(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """SCL in 100 m (5 px) patches: 70 % vegetation/bare, 20 % cloud, 10 % shadow."""
    patches = rng.choice(np.array([4, 4, 4, 4, 5, 5, 5, 9, 8, 3], dtype=np.uint8),
                         size=(height // 5 + 1, width // 5 + 1))
    return np.kron(patches, np.ones((5, 5), dtype=np.uint8))[:height, :width]


def write_scene(path: Path, rng: np.random.Generator) -> None:
    data = scl_patches(rng, SCENE_PX, SCENE_PX)
    with rasterio.open(path, "w", driver="COG", width=SCENE_PX, height=SCENE_PX, count=1, dtype="uint8",
                       crs=f"EPSG:{SCENE_EPSG}", transform=Affine(20, 0, SCENE_LEFT, 0, -20, SCENE_TOP), nodata=0,
                       blocksize=512, compress="deflate", overview_resampling="nearest") as dst:
        dst.write(data, 1)


def one_scene(cogs: localstac.CogServer, root: Path, n: int, sample: int, rng: random.Random) -> tuple[float, float]:
    """Part 1; returns (shared seconds, per-area seconds extrapolated to all areas)."""
    catalogue = CatalogueSettings(name="bench", url=cogs.url, allowed_schemes=["http"], allowed_hosts=["127.0.0.1"],
                                  allow_private_hosts=True, timeout_seconds=60)
    footprint = shape(transform_geom(f"EPSG:{SCENE_EPSG}", "EPSG:4326", mapping(
        box(SCENE_LEFT, SCENE_TOP - SCENE_PX * 20, SCENE_LEFT + SCENE_PX * 20, SCENE_TOP))))
    inner = footprint.buffer(-0.03)
    areas: dict[int, MultiPolygon] = {}
    while len(areas) < n:
        geom = generate_areas(1, inner.bounds, rng)[0]
        if inner.contains(geom):
            areas[len(areas)] = geom

    def granule(name: str) -> list[GranuleMask]:
        # One item id for both copies: the coverages name the granules they used.
        return [GranuleMask("scene", {"scl": {"href": cogs.href(f"{name}.tif"), "nodata": 0}}, catalogue, footprint)]

    cogs.reset_stats()
    shared_stats: list[ReadStats] = []
    t0 = time.monotonic()
    shared = observe_acquisition(granule("scene-shared"), areas, stats=shared_stats)
    shared_seconds = time.monotonic() - t0
    shared_requests = cogs.stats()["requests"]

    picked = rng.sample(sorted(areas), min(sample, n))
    cogs.reset_stats()
    alone_stats: list[ReadStats] = []
    t0 = time.monotonic()
    alone = {k: observe_acquisition(granule("scene-alone"), {k: areas[k]}, shared=False, stats=alone_stats)[k]
             for k in picked}
    alone_seconds = time.monotonic() - t0
    alone_requests = cogs.stats()["requests"]
    scale = n / len(picked)
    same = sum(alone[k] == shared[k] for k in picked)
    clear = [c.clear_fraction for c in shared.values() if c.clear_fraction is not None]
    print(f"one scene: SCL {SCENE_PX}x{SCENE_PX} px at 20 m (EPSG:{SCENE_EPSG}, 512 px tiles, 4 overviews), "
          f"{n} areas (0.3-2 km squares), mean clear fraction {np.mean(clear):.2f}")
    print(f"{'arm':<10}{'granule reads':>15}{'HTTP requests':>15}{'seconds':>10}")
    print(f"{'shared':<10}{sum(s.reads for s in shared_stats):>15}{shared_requests:>15}{shared_seconds:>10.1f}")
    print(f"{'per-area':<10}{len(picked) * scale:>15.0f}{alone_requests * scale:>15.0f}{alone_seconds * scale:>10.1f}"
          f"   (measured on {len(picked)} areas: {alone_requests} requests, {alone_seconds:.1f} s; x{scale:.1f})")
    print(f"per-area fractions equal to shared ones: {same} of {len(picked)}")
    print(f"request_ratio: {alone_requests * scale / max(shared_requests, 1):.1f}")
    if same != len(picked):
        raise SystemExit("shared and per-area fractions differ")
    return shared_seconds, alone_seconds * scale


def tile_code(lon: float, lat: float, ix: int, iy: int) -> tuple[int, str, str]:
    zone = int((lon + 180) // 6) + 1
    return zone, LAT_BANDS[int((lat + 80) // 8)], chr(65 + ix % 24) + chr(65 + iy % 24)


def write_sparse_scl(path: Path, epsg: int, bounds: tuple[float, float, float, float], areas_utm: list,
                     rng: np.random.Generator) -> None:
    """A tiled SCL GeoTIFF over ``bounds`` in which only the 256 px blocks under ``areas_utm`` hold data."""
    left, bottom, right, top = bounds
    width, height = round((right - left) / 20), round((top - bottom) / 20)
    blocks: set[tuple[int, int]] = set()
    for geom in areas_utm:
        minx, miny, maxx, maxy = geom.bounds
        for br in range(max(0, int((top - maxy) / 20) // 256), min(height - 1, int((top - miny) / 20)) // 256 + 1):
            for bc in range(max(0, int((minx - left) / 20) // 256), min(width - 1, int((maxx - left) / 20)) // 256 + 1):
                blocks.add((br, bc))
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=1, dtype="uint8",
                       crs=f"EPSG:{epsg}", transform=Affine(20, 0, left, 0, -20, top), nodata=0, tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate", sparse_ok=True) as dst:
        for br, bc in sorted(blocks):
            win = Window(bc * 256, br * 256, min(256, width - bc * 256), min(256, height - br * 256))
            dst.write(scl_patches(rng, int(win.height), int(win.width)), 1, window=win)


def europe(cogs_root: Path, n: int, rng: random.Random, nprng: np.random.Generator, workers: int = 2,
           baseline_rev: str | None = BASELINE_REV, compare_rev: str | None = None) -> None:
    """Part 2: one poll + pairing cycle over Europe: observations by ``workers`` Celery worker processes, and
    (``baseline_rev``) the same pairing by that revision's in-process code on a copy of the polled database."""
    app_url = dbadmin.create_scratch_database(ADMIN_URL, "unirs_bench_pairing")
    stac_dsn = dbadmin.create_scratch_database(ADMIN_URL, "unirs_bench_pairing_stac")
    api = cogs = None
    try:
        sa_url = dbadmin.sqlalchemy_url(app_url)
        migrate.upgrade(sa_url)
        os.environ["UNIRS_DATABASE_URL"] = sa_url
        get_settings.cache_clear()
        geoms = generate_areas(n, EUROPE, rng)
        by_tile: dict[tuple[int, int], list] = {}
        for g in geoms:
            c = g.centroid
            by_tile.setdefault((int(c.x - EUROPE[0]), int(c.y - EUROPE[1])), []).append(g)
        t0 = time.monotonic()
        folder = cogs_root / "europe"
        folder.mkdir()
        template = localstac.read_sample_items()[0]
        items = []
        for ix, iy in sorted(by_tile):
            lon, lat = EUROPE[0] + ix, EUROPE[1] + iy
            zone, band, square = tile_code(lon + 0.5, lat + 0.5, ix, iy)
            tile = f"{zone:02d}{band}{square}"
            footprint = box(lon - 0.05, lat - 0.05, lon + 1.05, lat + 1.05)  # tiles overlap, as MGRS tiles do
            crs = utm_crs_for(footprint)
            utm = shape(transform_geom("EPSG:4326", crs, mapping(footprint)))
            bounds = tuple(math.floor(v / 20) * 20 if k < 2 else math.ceil(v / 20) * 20
                           for k, v in enumerate(utm.bounds))
            # Areas near the edge may sit in a neighbouring tile too: write the blocks for every area touching it.
            touching = [shape(transform_geom("EPSG:4326", crs, mapping(g)))
                        for key in ((ix + dx, iy + dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1))
                        for g in by_tile.get(key, []) if g.intersects(footprint)]
            for d in range(2):
                when = NOW - timedelta(days=2 + 5 * d, minutes=-ix)
                name = f"europe/{tile}-{d}.tif"
                write_sparse_scl(cogs_root / name, crs.to_epsg(), bounds, touching, nprng)
                item = copy.deepcopy(template)
                item["id"] = f"S2B_{tile}_{when:%Y%m%d}_0_L2A"
                item["geometry"] = mapping(footprint)
                item["bbox"] = list(footprint.bounds)
                props = item["properties"]
                stamp = when.strftime("%Y%m%dT%H%M%S")
                props.update({"datetime": when.strftime("%Y-%m-%dT%H:%M:%S.000000Z"), "grid:code": f"MGRS-{tile}",
                              "mgrs:utm_zone": zone, "mgrs:latitude_band": band, "mgrs:grid_square": square,
                              "proj:epsg": crs.to_epsg(), "eo:cloud_cover": 20.0,
                              "s2:datatake_id": f"GS2B_{stamp}_0{ix:05d}_N05.10",
                              "s2:product_uri": f"S2B_MSIL2A_{stamp}_N0510_R{(ix * 7) % 143:03d}_T{tile}_{stamp}.SAFE"})
                for key in item["assets"]:
                    item["assets"][key]["href"] = f"/{name}"
                items.append(item)
        setup_seconds = time.monotonic() - t0
        cogs = localstac.CogServer(cogs_root).start()
        localstac.prepare_database(stac_dsn, create=False)
        collection = localstac.read_sample_collection()
        collection["extent"]["spatial"]["bbox"] = [[EUROPE[0] - 1, EUROPE[1] - 1, EUROPE[2] + 1, EUROPE[3] + 1]]
        localstac.load_collection(stac_dsn, collection)
        for item in items:
            for asset in item["assets"].values():
                asset["href"] = cogs.url + asset["href"]
        localstac.load_items(stac_dsn, items)
        api = localstac.StacApiServer(stac_dsn).start()
        catalogue = CatalogueSettings(name="bench", url=api.url, collections=[collection["id"]],
                                      allowed_schemes=["http"], allowed_hosts=["127.0.0.1"], allow_private_hosts=True,
                                      page_size=500, timeout_seconds=120)
        settings = Settings(database_url=sa_url, catalogues=[catalogue],
                            poll=PollSettings(lookback_days=10, group_distance_km=50))
        from core.db import session_scope
        from core.models import Area

        rows = [{"name": f"bench-{i:05d}", "geom": from_shape(g, srid=4326), "area_km2": 1.0,
                 "collections": [collection["id"]], "max_cloud_cover": 80.0, "min_clear_fraction": 0.5,
                 "recipients": [], "questions": [], "properties": {}} for i, g in enumerate(geoms)]
        with session_scope(settings) as session:
            for start in range(0, len(rows), 2000):
                session.execute(insert(Area), rows[start:start + 2000])

        from monitor.catalogues import poll_all

        cogs.reset_stats()
        t0 = time.monotonic()
        polled = poll_all(settings, now=NOW)
        poll_seconds = time.monotonic() - t0
        if not polled.ok:
            raise SystemExit(f"poll failed: {[p.error for p in polled.polls if not p.ok]}")
        print(f"Europe: {n} areas uniform over lon {EUROPE[0]}..{EUROPE[2]}, lat {EUROPE[1]}..{EUROPE[3]}; "
              f"{len(items)} items ({len(by_tile)} 1-degree tiles x 2 dates, one datatake per longitude column "
              f"and date), sparse SCL COGs per item (setup {setup_seconds:.0f} s, not timed)")
        print(f"poll: {polled.search_requests} search requests, {polled.total('new_scenes')} scenes, "
              f"{polled.polls[0].observations_created} pending observations, {poll_seconds:.1f} s")
        from core.db import reset_engines

        reset_engines()  # the baseline's copy is made from this database: no connection may stay open
        time.sleep(1)
        copy_url = clone_database(app_url) if baseline_rev else None
        compare_url = clone_database(app_url, "compare") if compare_rev else None
        print(f"{'arm':<34}{'observations':>13}{'clear':>7}{'window reads':>13}{'files opened':>13}"
              f"{'COG requests':>13}{'analyses':>9}{'seconds':>9}")
        arms: list[tuple[str, Settings, Path]] = [(f"after: {workers} cpu worker processes", settings, REPO)]
        code_dir = None
        if compare_url is not None:
            code_dir = Path(tempfile.mkdtemp(prefix="bench-pairing-code-"))
            export_code(compare_rev, code_dir)
            compare = settings.model_copy(update={"database_url": dbadmin.sqlalchemy_url(compare_url)})
            arms.insert(0, (f"workers at {compare_rev}", compare, code_dir))  # the old code first: no warm-up gift
        results = {}
        try:
            for label, arm_settings, code in arms:
                results[label] = cycle_with_workers(arm_settings, cogs, workers, code)
                r = results[label]
                r["digest"] = outcome_digest(arm_settings)
                print(f"{label:<34}{r['observations']:>13}{r['clear']:>7}{r['reads']:>13}{r['opens']:>13}"
                      f"{r['requests']:>13}{r['analyses']:>9}{r['seconds']:>9.1f}")
                print(f"  md5 of observations {r['digest'][0]}, of analyses {r['digest'][1]}")
        finally:
            if compare_url is not None:
                from core.db import reset_engines

                reset_engines()
                dbadmin.drop_database(compare_url)
            if code_dir is not None:
                shutil.rmtree(code_dir, ignore_errors=True)
        after = results[arms[-1][0]]
        if compare_url is not None:
            old = results[arms[0][0]]
            if old["digest"] != after["digest"]:
                raise SystemExit(f"workers at {compare_rev} and this code settled different observations or "
                                 "created different analyses")
            print(f"{'CPU seconds':<34}{'workers':>13}{'loop':>7}{'database':>13}{'COG server':>13}")
            for name, r in ((f"workers at {compare_rev}", old), ("this code", after)):
                print(f"{name:<34}{r['workers_cpu']:>13.1f}{r['loop_cpu']:>7.1f}{r['database_cpu']:>13.1f}"
                      f"{r['server_cpu']:>13.1f}")
            print(f"workers_speedup: {old['seconds'] / after['seconds']:.2f} (observations and pairing, workers at "
                  f"{compare_rev} {old['seconds']:.1f} s -> this code {after['seconds']:.1f} s, same run and data; "
                  f"full cycle {poll_seconds + old['seconds']:.1f} -> {poll_seconds + after['seconds']:.1f} s; "
                  f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f})")
        if copy_url is not None:
            try:
                before = baseline_cycle(copy_url, catalogue, cogs, baseline_rev)
            finally:
                dbadmin.drop_database(copy_url)
            print(f"{f'before: {baseline_rev}, in-process':<34}{before['observations']:>13}{before['clear']:>7}"
                  f"{before['reads']:>13}{'-':>13}{before['requests']:>13}{before['analyses']:>9}"
                  f"{before['seconds']:>9.1f}")
            if (before["observations"], before["analyses"]) != (after["observations"], after["analyses"]):
                raise SystemExit("the arms settled different observations or created different analyses")
            print(f"pairing_speedup: {before['seconds'] / after['seconds']:.2f} (same run, same data)")
        print(f"full_cycle_seconds: {poll_seconds + after['seconds']:.1f} (poll {poll_seconds:.1f} + observations "
              f"and pairing {after['seconds']:.1f}; goal < 60)")
    finally:
        for server in (api, cogs):
            if server is not None:
                server.stop()
        from core.db import reset_engines

        reset_engines()
        dbadmin.drop_database(app_url)
        dbadmin.drop_database(stac_dsn)


def clone_database(dsn: str, suffix: str = "copy") -> str:
    """A copy of the database (``CREATE DATABASE … TEMPLATE``; nobody may be connected to it)."""
    import psycopg

    source = dbadmin.dbname(dsn)
    name = f"{source}_{suffix}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        # Idle pooled connections of this process (this scratch database is ours alone) would block the copy.
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                     "AND pid <> pg_backend_pid()", [source])
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
    return dbadmin.with_dbname(dsn, name)


BASELINE_SCRIPT = """
import json, sys, time
from core.config import CatalogueSettings, Settings
from monitor.pairing import process_pending
cfg = json.loads(sys.argv[1])
settings = Settings(database_url=cfg["database_url"], catalogues=[CatalogueSettings(**cfg["catalogue"])])
t0 = time.monotonic()
p = process_pending(settings)
print(json.dumps({"seconds": time.monotonic() - t0, "observations": p.observations, "clear": p.clear,
                  "analyses": p.analyses_created, "reads": p.granule_reads}))
"""


def baseline_cycle(dsn: str, catalogue: CatalogueSettings, cogs: localstac.CogServer, rev: str) -> dict[str, float]:
    """``rev``'s pairing (in one process, as the scheduler ran it) on a copy of the polled database."""
    with tempfile.TemporaryDirectory(prefix="bench-pairing-baseline-") as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "core", "eo", "monitor"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        cfg = {"database_url": dbadmin.sqlalchemy_url(dsn), "catalogue": catalogue.model_dump(mode="json")}
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNIRS_")}
        cogs.reset_stats()
        out = subprocess.run([sys.executable, "-c", BASELINE_SCRIPT, json.dumps(cfg)], cwd=tmp, check=True,
                             capture_output=True, text=True, env={**env, "PYTHONPATH": tmp}).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "requests": cogs.stats()["requests"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--areas", type=int, default=10_000)
    parser.add_argument("--per-area-sample", type=int, default=1000, help="areas read one by one (extrapolated)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip-europe", action="store_true")
    parser.add_argument("--skip-one-scene", action="store_true")
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes of the Europe cycle")
    parser.add_argument("--baseline-rev", default=BASELINE_REV,
                        help="git revision whose in-process pairing is the Europe baseline ('' = none)")
    parser.add_argument("--compare-rev", default="",
                        help="git revision whose worker code runs the same Europe cycle first, on a copy of the "
                             "polled database (the before arm of a worker-side change; '' = none)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng, nprng = random.Random(args.seed), np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-pairing-") as tmp:
        root = Path(tmp)
        write_scene(root / "scene-shared.tif", np.random.default_rng(args.seed))
        write_scene(root / "scene-alone.tif", np.random.default_rng(args.seed))
        if not args.skip_one_scene:
            with localstac.CogServer(root) as cogs:
                shared_seconds, alone_seconds = one_scene(cogs, root, args.areas, args.per_area_sample, rng)
        if not args.skip_europe:
            europe(root, args.areas, rng, nprng, args.workers, args.baseline_rev or None, args.compare_rev or None)
    if not args.skip_one_scene:
        print(f"shared_speedup: {alone_seconds / shared_seconds:.1f} (goal >= 15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the analysis pipeline without the model — per-pair time, peak memory and read amplification,
this code side by side with a baseline revision, in one run.

Data. The real Sentinel-2 sample (data/sentinel2-romania, 1 × 1 km) is **mirrored** into a large image
(tiles flipped alternately so edges stay continuous), written as COGs like Earth Search's (DEFLATE +
predictor 2, 256 × 256 internal tiles, overviews), in EPSG:32634 (the sample's UTM zone, 34T) with the
sample at the centre; the pixels are real Sentinel-2 values, the scene is synthetic (change patterns
repeat every km). A second copy is written in EPSG:32635, the neighbouring zone, to measure reads of a
tile from another UTM zone than the area's grid.

Figures, per arm (``baseline`` = ``--baseline`` revision exported with ``git archive``; ``current`` = this
checkout), each pair analysed in a fresh subprocess (no GDAL cache carried over; peak RSS is the
child's own high-water mark, ``VmHWM`` of /proc/self/status — not ``ru_maxrss``, which Linux carries over
``execve`` from the vforked parent, so it reported the parent's peak from building the data):

- ``seconds`` / ``peak_rss_mb`` for square areas of 1, 25, 100, 1,000 and 10,000 km² (change pair
  2015-08-31 → 2020-08-29): raster prep (HTTP window reads of mask + 4 bands of both scenes, warp to the
  UTM 10 m grid, harmonisation, buffered SCL mask), spectral analysis (indices, classes, regions,
  EPSG:4326, chip scores, caption) and the three PNG thumbnails. An arm that fails says why.
  ``req``: HTTP requests the COG server answered for the pair; ``CPU`` (1,000 km² line): the child's
  user + system seconds, all threads (steadier than wall time on a shared machine).
- ``read_amplification``: bytes the COG server sent / the true minimum (the header bytes before the
  first tile plus the internal tiles holding the source pixel of at least one grid pixel centre),
  averaged over ``--placements`` random 5 × 5 km areas, each read from the same-zone tile and from the
  neighbouring-zone tile.

Goals (issue 13): 1,000 km² < 3 s and < 1 GB; read amplification ≤ 1.3× on average.
Run: ``.venv/bin/python benchmarks/bench_pipeline.py [--sizes 1,25,100,1000,10000] [--placements 6]``.
Timings on a shared 2-core machine are noisy: compare the arms' ratio, repeat with ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BANDS = ("blue", "green", "red", "nir", "scl")
BLOCK = 256
CHANGE_PAIR = ("2015-08-31", "2020-08-29")
ZONES = ("EPSG:32634", "EPSG:32635")
# main before issue 13 (tiled analysis): the baseline arm.
BASELINE_REV = "b10ec78"


def mirrored(array, times: int):
    import numpy as np

    rows = []
    for i in range(times):
        row = []
        for j in range(times):
            tile = array[::-1] if i % 2 else array
            row.append(tile[:, ::-1] if j % 2 else tile)
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)


def build_cogs(out: Path, side_km: int, neighbour_km: int = 14) -> None:
    """Mirrored COGs centred on the sample per date: ``side_km`` a side in the sample's zone, ``neighbour_km``
    in the neighbouring zone (only the placements read it)."""
    import rasterio
    from affine import Affine
    from pyproj import Transformer
    from rasterio.shutil import copy as rio_copy

    sys.path.insert(0, str(ROOT))
    from devtools import localstac

    item = json.loads(next((localstac.SAMPLE_DATA_DIR / "items").glob("S2A_34TER_20150831_*.json")).read_text())
    from shapely.geometry import shape

    centre = shape(item["geometry"]).centroid
    for zone, times in zip(ZONES, (side_km, neighbour_km), strict=True):  # the sample is 100 px = 1 km
        x, y = Transformer.from_crs("EPSG:4326", zone, always_xy=True).transform(centre.x, centre.y)
        x, y = round(x / 20) * 20, round(y / 20) * 20
        for date in CHANGE_PAIR:
            out_dir = out / zone.replace(":", "") / date
            out_dir.mkdir(parents=True, exist_ok=True)
            for band in BANDS:
                with rasterio.open(localstac.SAMPLE_DATA_DIR / "cogs" / date / f"{band}.tif") as src:
                    data = mirrored(src.read(1), times)
                    nodata, dtype = src.nodata, data.dtype
                half = data.shape[0] * 10 / 2
                transform = Affine(10, 0, x - half, 0, -10, y + half)
                tmp = out_dir / f"{band}.tmp.tif"
                with rasterio.open(tmp, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                                   dtype=dtype, crs=zone, transform=transform, nodata=nodata, tiled=True,
                                   blockxsize=512, blockysize=512) as dst:
                    dst.write(data, 1)
                del data
                rio_copy(tmp, out_dir / f"{band}.tif", driver="COG", blocksize=BLOCK, compress="DEFLATE", predictor=2,
                         overview_resampling="nearest" if band == "scl" else "average")
                tmp.unlink()


def area_geometry(km2: float, zone_of_data: str, offset_m: tuple[float, float] = (0.0, 0.0)):
    """A square of ``km2`` in the area's UTM zone, centred on the sample (+ offset), as EPSG:4326."""
    from pyproj import Transformer
    from rasterio.warp import transform_geom
    from shapely.geometry import box, mapping, shape

    from devtools import localstac
    from eo.cog import utm_crs_for

    item = json.loads(next((localstac.SAMPLE_DATA_DIR / "items").glob("S2A_34TER_20150831_*.json")).read_text())
    centre = shape(item["geometry"]).centroid
    utm = utm_crs_for(centre)
    x, y = Transformer.from_crs("EPSG:4326", utm, always_xy=True).transform(centre.x, centre.y)
    x, y = x + offset_m[0], y + offset_m[1]
    half = math.sqrt(km2) * 500.0
    return shape(transform_geom(utm, "EPSG:4326", mapping(box(x - half, y - half, x + half, y + half).segmentize(500))))


def scene_refs(base_url: str, catalogue, zone: str):
    from devtools import localstac
    from monitor.catalogues.items import parse_item
    from workers.raster import SceneRef

    items = {it["properties"]["datetime"][:10]: it for it in localstac.read_sample_items()}
    refs = []
    for date in CHANGE_PAIR:
        parsed = parse_item(localstac.rewrite_asset_hrefs(items[date], base_url), catalogue)
        assets = {k: dict(v, href=f"{base_url}/{zone.replace(':', '')}/{date}/{k}.tif")
                  for k, v in parsed.assets.items() if k in BANDS}
        refs.append(SceneRef(0, parsed.item_id, parsed.acquired_at, parsed.processing_baseline, assets, catalogue))
    return refs[0], refs[1]


class CogServer:
    """The COGs over HTTP on 127.0.0.1 for the pairs, with the counters ``localstac.CogServer`` has
    (``GET /_stats``: requests, bytes_sent; ``POST /_stats/reset``), answering single Range requests
    with ``sendfile``, one thread per connection.

    Why not ``localstac.CogServer`` (Starlette ``StaticFiles``, one Python process): it spent 0.71 s of CPU
    per 1,000 km² pair copying 82 MB through Python (this one: ~0.25 s), on the same 2 cores as the pair
    it serves — a cost an object store never puts on the worker's machine. ``--server localstac`` runs
    the old one. Multi-range requests (GDAL does not send them with GDAL_HTTP_MULTIRANGE's default) get
    416, so one would show as a failed read rather than as a whole file sent.
    """

    def __init__(self, root: Path):
        import http.server
        import socketserver
        import threading

        self.root = root.resolve()
        self.lock = threading.Lock()
        self.requests = self.bytes_sent = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/_stats":
                    with server.lock:
                        self._json({"requests": server.requests, "bytes_sent": server.bytes_sent})
                    return
                self._file(body=True)

            def do_HEAD(self) -> None:
                self._file(body=False)

            def do_POST(self) -> None:
                if self.path != "/_stats/reset":
                    self.send_error(405)
                    return
                with server.lock:
                    server.requests = server.bytes_sent = 0
                self._json({"reset": True})

            def _json(self, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, body: bool) -> None:
                sent = 0
                try:
                    path = (server.root / urllib.parse.unquote(self.path.split("?")[0]).lstrip("/")).resolve()
                    if server.root not in path.parents or not path.is_file():
                        self.send_error(404)
                        return
                    size = path.stat().st_size
                    start, end, ranged = 0, size - 1, self.headers.get("Range")
                    if ranged:
                        first, _, last = ranged.removeprefix("bytes=").partition("-")
                        if "," in ranged or not first.isdigit() or int(first) >= size:
                            self.send_error(416)
                            return
                        start, end = int(first), min(int(last) if last.isdigit() else size - 1, size - 1)
                    self.send_response(206 if ranged else 200)
                    if ranged:
                        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                    self.send_header("Content-Type", "image/tiff")
                    self.send_header("Accept-Ranges", "bytes")
                    self.send_header("Content-Length", str(end - start + 1))
                    self.end_headers()
                    if body:
                        self.wfile.flush()
                        with open(path, "rb") as f:
                            sent = self.connection.sendfile(f, start, end - start + 1)
                finally:
                    with server.lock:
                        server.requests += 1
                        server.bytes_sent += sent

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            request_queue_size = 512  # GDAL opens many connections at once (see eo/egress.py)

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="bench-cogs", daemon=True)

    def __enter__(self) -> CogServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def peak_rss_mb() -> float:
    """This process's own peak resident set (MB): VmHWM belongs to the address space, which execve replaces."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best there is


def answer_digest(result, images: dict) -> str:
    """sha256 (16 hex) of what the pair answers: every region (class, pixels, geometry, statistics), the
    metrics, chip scores, caption and the three PNGs' bytes — equal digests, identical answers. A region's
    geometry counts as its normalised UTM polygon without collinear vertices: a region across a block edge
    is the union of its parts, whose rings can start elsewhere or keep a vertex on the seam, so the same
    pixels give other WKB bytes under another block size."""
    import hashlib

    import shapely

    h = hashlib.sha256()
    for r in result.regions:
        h.update(shapely.normalize(shapely.simplify(r.geom_utm, 0)).wkb)
        h.update(repr((r.change_class, r.pixels, r.hectares, r.mean_dndvi, r.linear, r.elongation,
                       sorted(getattr(r, "before_means", {}).items()))).encode())
    h.update(repr(sorted(result.metrics.items())).encode())
    h.update(repr([(c.index, c.score, c.changed_pixels, c.valid_pixels) for c in result.chip_scores]).encode())
    h.update(result.caption.encode())
    for role in sorted(images):
        h.update(role.encode() + images[role].data)
    return h.hexdigest()[:16]


def figures_digest(result) -> str:
    """sha256 (16 hex) of the pair's figures without the regions' identities: the metrics, classes, caption,
    dropped count and the sorted (class, pixels) of the regions. When only :func:`answer_digest` differs,
    the arms chose other equal-sized regions for the cap's last places (the tie-break is the first pixel in
    raster order since c27d98d, block-by-block discovery order before). The classes' "where" and the
    caption follow the kept regions, so they too change when the chosen ones lie elsewhere (10,000 km²
    against 46e1f7f: 341 of 500 kept 92 px regions others, "mostly in the north-west" -> "mainly in the
    north and north-west"; every metric equal)."""
    import hashlib

    h = hashlib.sha256()
    h.update(repr(sorted(result.metrics.items())).encode())
    h.update(repr(sorted((k, sorted(v.items())) for k, v in result.classes.items())).encode())
    h.update(repr((result.caption, result.regions_dropped)).encode())
    h.update(repr(sorted((r.change_class, r.pixels) for r in result.regions)).encode())
    return h.hexdigest()[:16]


def child(args: argparse.Namespace) -> None:
    """One pair in this process with the code under ``--code``; prints one JSON line."""
    sys.path.insert(0, args.code)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from core.config import AnalysisSettings, CatalogueSettings

    settings = AnalysisSettings()
    catalogue = CatalogueSettings(name="bench", url=args.url, allowed_schemes=["http"], allowed_hosts=["127.0.0.1"],
                                  allow_private_hosts=True)
    offset = tuple(float(v) for v in args.offset.split(","))
    geom = area_geometry(args.km2, args.zone, offset)
    before, after = scene_refs(args.url, catalogue, args.zone)
    # Imported before the clock starts: a worker process imports once, not per pair (0.2-0.3 s here).
    from workers import spectral
    from workers.pipeline import thumbnails
    try:
        from workers.tiling import analyse_pair
    except ImportError:  # a baseline before tiling: one whole-area read
        analyse_pair = None
        from workers.raster import prepare_pair
    rss_before = peak_rss_mb()
    cpu_before = os.times()
    started = time.perf_counter()
    out: dict = {}
    try:
        if analyse_pair is not None:
            pair, result = analyse_pair(geom, before, after, settings)
        else:
            pair = prepare_pair(geom, before, after, settings)
            result = spectral.analyse(pair, settings.min_mapping_unit_ha)
        images = thumbnails(pair, result)
        out.update(ok=True, changed_ha=result.metrics["changed_ha"], regions=len(result.regions),
                   grid=[pair.grid.width, pair.grid.height], grid_crs=pair.grid.crs.to_string(),
                   answer=answer_digest(result, images), figures=figures_digest(result))
    except Exception as exc:  # the figure is "it failed, and why"
        out.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:160]}")
    out["seconds"] = time.perf_counter() - started
    cpu = os.times()
    # CPU of this process, all threads (the COG server's is not in it): steadier than wall time when the
    # machine is shared.
    out["cpu_seconds"] = cpu.user - cpu_before.user + cpu.system - cpu_before.system
    out["peak_rss_mb"] = peak_rss_mb()
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the old, inherited figure
    out["rss_at_start_mb"] = rss_before
    print(json.dumps(out))


def run_child(code: Path, url: str, km2: float, zone: str, offset=(0.0, 0.0)) -> dict:
    cmd = [sys.executable, __file__, "--child", "--code", str(code), "--url", url, "--km2", str(km2), "--zone", zone,
           f"--offset={offset[0]},{offset[1]}"]
    env = dict(os.environ, PYTHONPATH=str(code))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:160], "seconds": 0.0,
                "peak_rss_mb": 0.0}
    return json.loads(lines[-1])


def reset(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{url}/_stats/reset", method="POST"), timeout=10).read()


def stats(url: str) -> dict:
    return json.loads(urllib.request.urlopen(f"{url}/_stats", timeout=10).read())


def sent(url: str) -> int:
    return int(stats(url)["bytes_sent"])


def minimum_bytes(cog_dir: Path, zone: str, km2: float, offset) -> int:
    """Header bytes + bytes of the internal full-resolution tiles holding the source pixel of at least one
    pixel centre of the area's 10 m grid, summed over the pair's files."""
    import numpy as np
    import rasterio
    from pyproj import Transformer

    from workers.raster import common_grid

    grid = common_grid(area_geometry(km2, zone, offset), 10.0)
    cols, rows = np.meshgrid(np.arange(grid.width) + 0.5, np.arange(grid.height) + 0.5)
    xs = grid.transform.c + cols.ravel() * grid.pixel_size
    ys = grid.transform.f - rows.ravel() * grid.pixel_size
    total = 0
    for date in CHANGE_PAIR:
        for band in BANDS:
            path = cog_dir / zone.replace(":", "") / date / f"{band}.tif"
            with rasterio.open(path) as src:
                sx, sy = Transformer.from_crs(grid.crs, src.crs, always_xy=True).transform(xs, ys)
                inv = ~src.transform
                c, r = inv * (np.asarray(sx), np.asarray(sy))
                c, r = np.floor(c).astype(int), np.floor(r).astype(int)
                inside = (c >= 0) & (r >= 0) & (c < src.width) & (r < src.height)
                bh, bw = src.block_shapes[0]
                tiles = set(zip((c[inside] // bw).tolist(), (r[inside] // bh).tolist(), strict=True))
                for bx, by in tiles:
                    total += int(src.get_tag_item(f"BLOCK_SIZE_{bx}_{by}", "TIFF", bidx=1) or 0)
                levels = len(src.overviews(1))
            # The header, IFDs and overview directories, which GDAL must read first: everything before the
            # first tile of any level (a COG stores them all up front).
            firsts = []
            for level in [None, *range(levels)]:
                with rasterio.open(path, **({} if level is None else {"overview_level": level})) as ovr:
                    firsts.append(int(ovr.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1) or 0))
            total += min(f for f in firsts if f > 0)
    return total


def export(rev: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "code.tar"
    tmp.write_bytes(archive)
    with tarfile.open(tmp) as tar:
        tar.extractall(dest, filter="data")
    tmp.unlink()
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,25,100,1000,10000")
    parser.add_argument("--placements", type=int, default=6)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--baseline", default=BASELINE_REV)
    parser.add_argument("--server", choices=("sendfile", "localstac"), default="sendfile",
                        help="the COG server: this file's sendfile one, or devtools.localstac's Starlette one")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--km2", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--zone", default=ZONES[0], help=argparse.SUPPRESS)
    parser.add_argument("--offset", default="0,0", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(ROOT))
    from devtools import localstac

    sizes = [float(s) for s in args.sizes.split(",")]
    side_km = max(12, math.ceil(math.sqrt(max(sizes))) + 6)
    side_km += side_km % 2
    with tempfile.TemporaryDirectory(prefix="unirs-bench-pipeline-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        build_cogs(root / "cogs", side_km)
        print(f"data: {side_km} x {side_km} km mirrored sample in {ZONES[0]}, 14 x 14 km in {ZONES[1]}, built in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        arms = {"baseline": export(args.baseline, root / "baseline"), "current": ROOT}
        results: dict[str, dict[float, list[dict]]] = {arm: {} for arm in arms}
        serving = CogServer(root) if args.server == "sendfile" else localstac.CogServer(root)
        with serving as server:
            url = f"{server.url}/cogs"
            print(f"load average at start: {os.getloadavg()[0]:.2f} (2-core machine shared with other work)")
            print(f"{'km2':>7} | {'baseline s':>10} {'MB':>6} {'req':>5} | {'current s':>10} {'MB':>6} {'req':>5} | "
                  "ratio s | note")
            for km2 in sizes:
                for arm in arms:
                    results[arm][km2] = []
                for _ in range(args.runs):
                    for arm, code in arms.items():  # arms alternate, so load changes hit both alike
                        reset(server.url)
                        own = os.times()
                        run = run_child(code, url, km2, ZONES[0])
                        done = os.times()
                        run["requests"] = int(stats(server.url)["requests"])
                        # The sendfile server runs in this process, which does nothing else meanwhile.
                        run["server_cpu"] = (done.user - own.user + done.system - own.system
                                             if args.server == "sendfile" else float("nan"))
                        run["load"] = os.getloadavg()[0]
                        results[arm][km2].append(run)
                b, c = results["baseline"][km2], results["current"][km2]
                bs, cs = statistics.median(r["seconds"] for r in b), statistics.median(r["seconds"] for r in c)
                note = "; ".join(f"{arm}: {r[0]['error']}" for arm, r in (("baseline", b), ("current", c))
                                 if not r[0]["ok"])
                ratio = f"{bs / cs:6.1f}x" if b[0]["ok"] and c[0]["ok"] and cs > 0 else "   n/a"
                print(f"{km2:7g} | {bs:10.2f} {max(r['peak_rss_mb'] for r in b):6.0f} {b[0]['requests']:5d} | "
                      f"{cs:10.2f} {max(r['peak_rss_mb'] for r in c):6.0f} {c[0]['requests']:5d} | {ratio} | "
                      f"{note or 'both ok'}"
                      + (f" (changed_ha {c[0]['changed_ha']:.1f} / {b[0].get('changed_ha', float('nan')):.1f}, "
                         f"grid {c[0]['grid'][0]} x {c[0]['grid'][1]}; answers "
                         f"{'identical' if c[0].get('answer') == b[0].get('answer') else 'DIFFER'} (figures "
                         f"{'identical' if c[0].get('figures') == b[0].get('figures') else 'DIFFER'}); CPU "
                         f"{statistics.median(r['cpu_seconds'] for r in b):.2f} / "
                         f"{statistics.median(r['cpu_seconds'] for r in c):.2f} s, server CPU "
                         f"{statistics.median(r['server_cpu'] for r in b + c):.2f} s, load "
                         f"{statistics.mean(r['load'] for r in b + c):.1f})" if c[0]["ok"] else ""), flush=True)

            rng = random.Random(13)
            amplification = {arm: [] for arm in arms}
            print("read amplification, 5 x 5 km at random offsets (m), same-zone and neighbouring-zone tile:")
            for k in range(args.placements):
                offset = (rng.uniform(-3000, 3000), rng.uniform(-3000, 3000))
                zone = ZONES[k % 2]
                minimum = minimum_bytes(root / "cogs", zone, 25.0, offset)
                row = []
                for arm, code in arms.items():
                    reset(server.url)
                    outcome = run_child(code, url, 25.0, zone, offset)
                    ratio = sent(server.url) / minimum
                    amplification[arm].append(ratio)
                    row.append(f"{arm} {ratio:.3f}{'' if outcome['ok'] else ' (failed: ' + outcome['error'] + ')'}")
                print(f"  {zone} offset ({offset[0]:6.0f}, {offset[1]:6.0f}): minimum {minimum} B; " + ", ".join(row),
                      flush=True)
    for arm in arms:
        if amplification[arm]:
            print(f"read_amplification_mean_{arm}: {statistics.mean(amplification[arm]):.3f}")
    thousand = 1000.0 if 1000.0 in sizes else sizes[-1]
    for arm in arms:
        r = results[arm][thousand][0]
        print(f"pair_{thousand:g}km2_{arm}: {statistics.median(x['seconds'] for x in results[arm][thousand]):.2f} s "
              f"(CPU {statistics.median(x.get('cpu_seconds', 0.0) for x in results[arm][thousand]):.2f} s), "
              f"{r['peak_rss_mb']:.0f} MB peak, {r['requests']} HTTP requests"
              f"{'' if r['ok'] else ' (failed: ' + r['error'] + ')'}")
    for arm in arms:  # what the bench reported before it read VmHWM: the parent's peak, inherited over execve
        print(f"ru_maxrss_{thousand:g}km2_{arm} (inherited, not the child's own): "
              f"{results[arm][thousand][0].get('ru_maxrss_mb', float('nan')):.0f} MB")
    largest = results["current"][sizes[-1]][0]
    print(f"pair_{sizes[-1]:g}km2_current: {largest['seconds']:.2f} s, {largest['peak_rss_mb']:.0f} MB peak, "
          f"{'ok' if largest['ok'] else largest['error']}")
    print(f"pair_seconds_{thousand:g}km2: {statistics.median(x['seconds'] for x in results['current'][thousand]):.2f}")


if __name__ == "__main__":
    main()

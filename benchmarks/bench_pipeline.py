"""Benchmark: the analysis pipeline without the model, on a 5 × 5 km area read over HTTP.

The real Sentinel-2 sample (data/sentinel2-romania) is only 1 × 1 km (100 × 100 px). This benchmark builds
a larger test pair from it: each band is **mirrored** into a 10 × 10 km image (1000 × 1000 px, EPSG:3035,
tiles flipped alternately so edges stay continuous), written as a COG like Earth Search's (DEFLATE +
predictor 2, 256 × 256 internal tiles, overviews), centred on the sample. The pixels are therefore real
Sentinel-2 values but the scene is synthetic: change patterns repeat 100 times.

Measured, each on its own line:

- ``pair_seconds_cold`` / ``pair_seconds_median``: per-pair cost excluding model inference for the 5 × 5 km
  area — raster prep (HTTP window reads of 2 × (mask + 4 bands), warp onto the UTM 10 m grid,
  harmonisation, SCL mask with buffered clouds), spectral analysis (indices, classes, regions →
  polygons → EPSG:4326, chip scores, caption) and the three PNG thumbnails. Every run reads a fresh copy
  of the files (a new URL), so GDAL's in-process cache does not help; goal < 2 s on CPU.
- ``http_bytes`` / ``tile_bytes`` / ``bytes_ratio``: bytes the COG server sent for one pair versus the
  bytes of the internal tiles the area's read windows touch (from the TIFF tile byte counts); goal ≤ 1.5.
- ``chips_kept_off_model_no_change``: share of chips whose spectral score is under
  ``analysis.model_score_threshold`` on a no-change pair (2017-07-06 vs 2017-07-11).

Run: ``.venv/bin/python benchmarks/bench_pipeline.py [--runs 3]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.io import MemoryFile
from rasterio.shutil import copy as rio_copy
from rasterio.warp import transform_bounds, transform_geom
from shapely.geometry import box, mapping, shape

from core.config import AnalysisSettings, CatalogueSettings
from devtools import localstac
from eo.cog import utm_crs_for
from monitor.catalogues.items import parse_item
from workers import spectral
from workers.pipeline import thumbnails
from workers.raster import SceneRef, common_grid
from workers.tiling import analyse_pair

SAMPLE = localstac.SAMPLE_DATA_DIR
BANDS = ("blue", "green", "red", "nir", "scl")
MIRROR = 10  # 10 × 10 copies of the 100 px sample: 1000 px = 10 km
BLOCK = 256
AREA_KM = 5.0
CHANGE_PAIR = ("2015-08-31", "2020-08-29")
NO_CHANGE_PAIR = ("2017-07-06", "2017-07-11")


def mirrored(array: np.ndarray, times: int) -> np.ndarray:
    """Tile a 2-D array times × times, flipping every other copy so neighbours meet edge to edge."""
    rows = []
    for i in range(times):
        row = []
        for j in range(times):
            tile = array[::-1] if i % 2 else array
            row.append(tile[:, ::-1] if j % 2 else tile)
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)


def build_cogs(root: Path, dates: list[str]) -> None:
    for date in dates:
        out_dir = root / "cogs" / date
        out_dir.mkdir(parents=True, exist_ok=True)
        for band in BANDS:
            with rasterio.open(SAMPLE / "cogs" / date / f"{band}.tif") as src:
                data = mirrored(src.read(1), MIRROR)
                t = src.transform
                # Keep the sample at the centre of the big image.
                shift = (MIRROR // 2) * src.width
                transform = Affine(t.a, t.b, t.c - shift * t.a, t.d, t.e, t.f - shift * t.e)
                profile = {"driver": "GTiff", "width": data.shape[1], "height": data.shape[0], "count": 1,
                           "dtype": data.dtype, "crs": src.crs, "transform": transform, "nodata": src.nodata}
            with MemoryFile() as mem:
                with mem.open(**profile) as tmp:
                    tmp.write(data, 1)
                with mem.open() as tmp:
                    rio_copy(tmp, out_dir / f"{band}.tif", driver="COG", blocksize=BLOCK, compress="DEFLATE",
                             predictor=2, overview_resampling="nearest" if band == "scl" else "average")


def area_geometry() -> object:
    """A 5 × 5 km square in the UTM zone, centred on the sample, as EPSG:4326."""
    item = json.loads(next((SAMPLE / "items").glob("S2A_34TER_20150831_*.json")).read_text())
    centre = shape(item["geometry"]).centroid
    utm = utm_crs_for(centre)
    x, y = Transformer.from_crs("EPSG:4326", utm, always_xy=True).transform(centre.x, centre.y)
    half = AREA_KM * 500.0
    square = box(x - half, y - half, x + half, y + half)
    return shape(transform_geom(utm, "EPSG:4326", mapping(square)))


def scene_refs(base_url: str, catalogue: CatalogueSettings, dates: tuple[str, str]) -> tuple[SceneRef, SceneRef]:
    items = {it["properties"]["datetime"][:10]: it for it in localstac.read_sample_items()}
    refs = []
    for date in dates:
        parsed = parse_item(localstac.rewrite_asset_hrefs(items[date], base_url), catalogue)
        assets = {k: v for k, v in parsed.assets.items() if k in BANDS}
        refs.append(SceneRef(0, parsed.item_id, parsed.acquired_at, parsed.processing_baseline, assets, catalogue))
    return refs[0], refs[1]


def tile_bytes_touched(path: Path, grid) -> int:
    """Bytes of the full-resolution tiles of ``path`` that the grid's window touches (1 px margin)."""
    with rasterio.open(path) as src:
        left, bottom, right, top = transform_bounds(grid.crs, src.crs, *grid.bounds)
        inv = ~src.transform
        cols = [c for c, _ in (inv * (left, top), inv * (right, bottom))]
        rows = [r for _, r in (inv * (left, top), inv * (right, bottom))]
        c0, c1 = max(0, math.floor(min(cols)) - 1), min(src.width, math.ceil(max(cols)) + 1)
        r0, r1 = max(0, math.floor(min(rows)) - 1), min(src.height, math.ceil(max(rows)) + 1)
        bh, bw = src.block_shapes[0]
        total = 0
        for by in range(r0 // bh, (r1 - 1) // bh + 1):
            for bx in range(c0 // bw, (c1 - 1) // bw + 1):
                total += int(src.get_tag_item(f"BLOCK_SIZE_{bx}_{by}", "TIFF", bidx=1) or 0)
        return total


def one_pair(server: localstac.CogServer, run_dir: str, catalogue: CatalogueSettings, geom, settings: AnalysisSettings,
             dates: tuple[str, str]) -> tuple[float, int, spectral.SpectralResult, object]:
    before, after = scene_refs(f"{server.url}/{run_dir}", catalogue, dates)
    server.reset_stats()
    started = time.perf_counter()
    pair, result = analyse_pair(geom, before, after, settings)
    thumbnails(pair, result)
    seconds = time.perf_counter() - started
    return seconds, server.stats()["bytes_sent"], result, pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = AnalysisSettings()
    geom = area_geometry()

    with tempfile.TemporaryDirectory(prefix="unirs-bench-pipeline-") as tmp:
        root = Path(tmp)
        build_cogs(root / "base", [*CHANGE_PAIR, *NO_CHANGE_PAIR])
        # One copy per run under a new URL: GDAL's per-process cache cannot serve a later run.
        for run in range(args.runs + 1):
            shutil.copytree(root / "base", root / f"run{run}")
        shutil.rmtree(root / "base")
        with localstac.CogServer(root) as server:
            catalogue = CatalogueSettings(name="bench", url=server.url, allowed_schemes=["http"],
                                          allowed_hosts=["127.0.0.1"], allow_private_hosts=True)
            timings, bytes_sent = [], []
            for run in range(args.runs):
                seconds, sent, result, pair = one_pair(server, f"run{run}", catalogue, geom, settings, CHANGE_PAIR)
                timings.append(seconds)
                bytes_sent.append(sent)
            grid = common_grid(geom, settings.pixel_size_m)
            touched = sum(tile_bytes_touched(root / "run0" / "cogs" / date / f"{band}.tif", grid)
                          for date in CHANGE_PAIR for band in BANDS)
            _, _, quiet, _ = one_pair(server, f"run{args.runs}", catalogue, geom, settings, NO_CHANGE_PAIR)

    threshold = settings.model_score_threshold
    kept_off = sum(c.score < threshold for c in quiet.chip_scores) / max(len(quiet.chip_scores), 1)
    kept_off_change = sum(c.score < threshold for c in result.chip_scores) / max(len(result.chip_scores), 1)
    print(f"area: {AREA_KM:g} x {AREA_KM:g} km, grid {pair.grid.width} x {pair.grid.height} px at "
          f"{settings.pixel_size_m:g} m in {pair.grid.crs.to_string()} (synthetic: the 1 km sample mirrored "
          f"{MIRROR} x {MIRROR})")
    print(f"pair_seconds_first: {timings[0]:.3f}")
    print(f"pair_seconds_median: {statistics.median(timings):.3f} (runs: {', '.join(f'{t:.3f}' for t in timings)})")
    print(f"http_bytes: {bytes_sent[0]}")
    print(f"tile_bytes: {touched}")
    print(f"bytes_ratio: {bytes_sent[0] / touched:.3f}")
    print(f"changed_ha_change_pair: {result.metrics['changed_ha']:.2f}")
    print(f"chips: {len(quiet.chip_scores)} of {settings.chip_size_m:g} m; threshold {threshold:g}")
    print(f"chip_scores_change_pair: {[c.score for c in result.chip_scores]}")
    print(f"chips_kept_off_model_change_pair: {kept_off_change:.2f}")
    print(f"chips_kept_off_model_no_change: {kept_off:.2f}")


if __name__ == "__main__":
    main()

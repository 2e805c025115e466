"""Build the forest-loss reference of the bundled site from all 140 dates of the nrt cube.

Output: ``forest_loss_reference.tif`` next to this file — uint16 on the cube's own 10 m grid
(EPSG:3035, 100 × 100 px): 0 = no forest loss 2015-08 .. 2020-12, 1 = not forest at the start (excluded
from the assessment), otherwise the loss date as days since 2015-01-01 (the first leaf-on clear date on
which the pixel is persistently cut, bare or road). ``reference_dates.json`` lists the events per date.
METHOD.md says how it was made and where it is weak.

Run: ``.venv/bin/python scripts/build-sample-data --all-dates --out build/sentinel2-romania-all`` then
``.venv/bin/python benchmarks/reference/build_reference.py --data build/sentinel2-romania-all``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from eo.masks import CLEAR_SCL
from eo.radiometry import reflectance_rule, to_reflectance

HERE = Path(__file__).resolve().parent
EPOCH = date(2015, 1, 1)
LEAF_ON = (135, 260)  # day of year, mid-May .. mid-September: full canopy, no senescence
FOREST_NDVI = 0.7  # leaf-on median NDVI of a closed forest pixel before any loss
DROP = 0.25  # a cut pixel's NDVI is at least this far below its own pre-loss leaf-on median
PERSIST = 3  # ... on this many consecutive leaf-on clear dates (or all that remain, at least 2)
MIN_PRE = 3  # leaf-on clear dates needed before a loss to know the pixel's forest level
MIN_CLEAR_SHARE = 0.9  # a date counts only when this share of the site is clear (partial clouds: left out)


def load(data: Path) -> tuple[list[date], np.ndarray, dict]:
    """Dates, NDVI stack (T, H, W; NaN where not clear) and the grid profile."""
    items = sorted((json.loads(p.read_text()) for p in (data / "items").glob("*.json")),
                   key=lambda it: it["properties"]["datetime"])
    dates, stack, profile = [], [], None
    for it in items:
        day = date.fromisoformat(it["properties"]["datetime"][:10])
        folder = data / "cogs" / day.isoformat()
        bands = {}
        for band in ("red", "nir", "scl"):
            with rasterio.open(folder / f"{band}.tif") as src:
                bands[band] = src.read(1, masked=True)
                profile = profile or src.profile
        rule = reflectance_rule(it["properties"].get("s2:processing_baseline"), {})
        red, nir = to_reflectance(bands["red"], rule), to_reflectance(bands["nir"], rule)
        clear = np.isin(np.asarray(bands["scl"]), CLEAR_SCL)
        if clear.mean() < MIN_CLEAR_SHARE:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            ndvi = (nir - red) / (nir + red)
        stack.append(np.where(clear, ndvi, np.nan))
        dates.append(day)
    return dates, np.stack(stack), profile


def reference(dates: list[date], ndvi: np.ndarray) -> np.ndarray:
    leaf_on = np.array([LEAF_ON[0] <= d.timetuple().tm_yday <= LEAF_ON[1] for d in dates])
    on_dates = [d for d, keep in zip(dates, leaf_on, strict=True) if keep]
    series = ndvi[leaf_on]  # (T_on, H, W)
    out = np.zeros(series.shape[1:], dtype=np.uint16)
    for r in range(series.shape[1]):
        for c in range(series.shape[2]):
            values = series[:, r, c]
            ok = np.flatnonzero(np.isfinite(values))
            if ok.size < MIN_PRE + 2:
                continue
            if np.median(values[ok[:MIN_PRE + 1]]) < FOREST_NDVI:
                out[r, c] = 1  # not closed forest at the start: outside the forest-loss question
                continue
            for k in range(MIN_PRE, ok.size - 1):
                level = np.median(values[ok[:k]])
                following = values[ok[k:k + PERSIST]]
                if following.size >= 2 and np.all(following <= level - DROP):
                    out[r, c] = (on_dates[ok[k]] - EPOCH).days
                    break
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="all-dates sample (scripts/build-sample-data)")
    args = parser.parse_args(argv)
    dates, ndvi, profile = load(args.data)
    ref = reference(dates, ndvi)
    profile.update(dtype="uint16", count=1, nodata=None, compress="deflate", driver="GTiff")
    for key in ("blockxsize", "blockysize", "tiled", "interleave"):
        profile.pop(key, None)
    with rasterio.open(HERE / "forest_loss_reference.tif", "w", **profile) as dst:
        dst.write(ref, 1)
    events: dict[str, float] = {}
    for value, count in zip(*np.unique(ref[ref > 1], return_counts=True), strict=True):
        events[(EPOCH + timedelta(days=int(value))).isoformat()] = round(count * 0.01, 2)
    summary = {"dates_used": len(dates), "leaf_on_dates": sum(LEAF_ON[0] <= d.timetuple().tm_yday <= LEAF_ON[1]
                                                                for d in dates),
               "forest_px": int((ref != 1).sum()), "not_forest_px": int((ref == 1).sum()),
               "loss_ha_by_date": events, "loss_ha": round(float((ref > 1).sum()) * 0.01, 2)}
    (HERE / "reference_dates.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

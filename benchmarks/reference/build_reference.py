"""Build the forest-loss reference of the bundled site from the visual interpretation of the 140-date nrt cube.

Output: ``forest_loss_reference.tif`` next to this file — uint16 on the cube's own 10 m grid (EPSG:3035,
100 × 100 px): 0 = no forest loss 2015-08 .. 2020-12, 1 = not closed forest at the start (excluded from
the assessment), otherwise the date on which the loss was first visible, as days since 2015-01-01.
``reference_dates.json`` sums the loss per date and per event.

The events — where, when first seen, on which leaf-on date they are delineated — are the interpreter's,
written down in ``visual_interpretation.json`` from rendered true-colour chips (``--chips DIR`` renders
them again: pre / first seen / delineated, with the delineated pixels outlined). This script only turns
them into pixels; METHOD.md says how the interpretation was made and where it is weak.

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
FOREST_NDVI = 0.7  # leaf-on median NDVI of the first looks of a closed forest pixel
PRE_FOREST_NDVI = 0.75  # an event's pixel was forest on the event's pre date
BARE_NDVI = 0.6  # ... and is bare (soil, slash, road) on its delineation date
SCALE = 4  # chip pixels per cube pixel


def load(data: Path) -> tuple[list[date], np.ndarray, np.ndarray, list[str], dict]:
    """All dates, NDVI and NIR reflectance stacks (T, H, W; NaN where SCL is not clear), each date's platform
    and the grid profile."""
    items = sorted((json.loads(p.read_text()) for p in (data / "items").glob("*.json")),
                   key=lambda it: it["properties"]["datetime"])
    dates, stack, nirs, platforms, profile = [], [], [], [], None
    for it in items:
        day = date.fromisoformat(it["properties"]["datetime"][:10])
        bands = {}
        for band in ("red", "nir", "scl"):
            with rasterio.open(data / "cogs" / day.isoformat() / f"{band}.tif") as src:
                bands[band] = src.read(1, masked=True)
                profile = profile or src.profile
        rule = reflectance_rule(it["properties"].get("s2:processing_baseline"), {})
        red, nir = to_reflectance(bands["red"], rule), to_reflectance(bands["nir"], rule)
        clear = np.isin(np.asarray(bands["scl"]), CLEAR_SCL)
        with np.errstate(invalid="ignore", divide="ignore"):
            ndvi = (nir - red) / (nir + red)
        stack.append(np.where(clear, np.ma.filled(ndvi, np.nan), np.nan))
        nirs.append(np.where(clear, np.ma.filled(nir, np.nan), np.nan))
        dates.append(day)
        platforms.append(it["properties"].get("platform", ""))
    return dates, np.stack(stack), np.stack(nirs), platforms, profile


def coregistration(dates: list[date], nir: np.ndarray) -> dict[date, tuple[float, float]]:
    """Each clear date's misregistration against the cube's common geometry, (row, col) in pixels (+ = the
    image's features lie south / east of where the other dates put them).

    Every pair of leaf-on dates at least 98 % clear is phase-correlated on NIR reflectance (scikit-image's
    ``phase_cross_correlation``, 1/20 pixel upsampling; NIR shows the canopy's texture, roads and clearings
    alike in every leaf-on look); a date's position is the median, over the other dates, of their position
    plus the pair's shift, iterated, the median of all positions being 0 (the common geometry). Other dates
    at least 98 % clear are placed by the median over the leaf-on network."""
    from skimage.registration import phase_cross_correlation

    def filled(img: np.ndarray) -> np.ndarray:
        return np.where(np.isfinite(img), img, np.nanmedian(img)) - np.nanmean(img)

    clear = np.isfinite(nir).mean(axis=(1, 2))
    leaf_on = [k for k, d in enumerate(dates) if clear[k] >= 0.98 and LEAF_ON[0] <= d.timetuple().tm_yday <= LEAF_ON[1]]
    n = len(leaf_on)
    pair = np.zeros((n, n, 2))  # pair[i, j]: the shift that registers date j onto date i (= pos_i - pos_j)
    for i in range(n):
        for j in range(i + 1, n):
            pair[i, j] = phase_cross_correlation(filled(nir[leaf_on[i]]), filled(nir[leaf_on[j]]), upsample_factor=20,
                                                 normalization=None)[0]
            pair[j, i] = -pair[i, j]
    pos = np.zeros((n, 2))
    for _ in range(10):
        pos = np.array([np.median([pos[i] - pair[i, j] for i in range(n) if i != j], axis=0) for j in range(n)])
        pos -= np.median(pos, axis=0)
    out = {dates[k]: (float(pos[j, 0]), float(pos[j, 1])) for j, k in enumerate(leaf_on)}
    for k, d in enumerate(dates):
        if d in out or clear[k] < 0.98:
            continue
        est = [pos[i] - phase_cross_correlation(filled(nir[a]), filled(nir[k]), upsample_factor=20,
                                                normalization=None)[0] for i, a in enumerate(leaf_on)]
        row, col = np.median(est, axis=0)
        out[d] = (float(row), float(col))
    return out


def aligned(ndvi: np.ndarray, offset: tuple[float, float]) -> np.ndarray:
    """``ndvi`` (H, W, NaN = not clear) moved onto the common geometry by its measured ``offset`` (rows, cols)
    rounded to whole pixels (NaN where the shift leaves the image). Whole pixels: the cube's pixels were
    resampled by nearest neighbour, so an image is off by whole pixels of its own, and interpolating a
    fraction would blur every patch edge across the delineation threshold."""
    rows, cols = round(offset[0]), round(offset[1])
    out = np.full(ndvi.shape, np.nan, dtype=ndvi.dtype)
    h, w = ndvi.shape
    out[max(0, -rows):h - max(0, rows), max(0, -cols):w - max(0, cols)] = \
        ndvi[max(0, rows):h - max(0, -rows), max(0, cols):w - max(0, -cols)]
    return out


def not_forest(dates: list[date], ndvi: np.ndarray) -> np.ndarray:
    """Pixels whose first four clear leaf-on looks (dates ≥ 90 % clear) have a median NDVI below 0.7."""
    keep = [k for k, d in enumerate(dates) if LEAF_ON[0] <= d.timetuple().tm_yday <= LEAF_ON[1]
            and np.isfinite(ndvi[k]).mean() >= 0.9]
    series = ndvi[keep]
    out = np.zeros(series.shape[1:], bool)
    for r in range(series.shape[1]):
        for c in range(series.shape[2]):
            values = series[:, r, c]
            values = values[np.isfinite(values)][:4]
            out[r, c] = values.size == 0 or np.median(values) < FOREST_NDVI
    return out


def reference(dates: list[date], ndvi: np.ndarray, events: list[dict], offsets: dict[date, tuple[float, float]]
              ) -> tuple[np.ndarray, dict[str, float]]:
    """The reference raster and its hectares per event. The delineation and pre images are moved onto the
    cube's common geometry by their measured ``offsets`` (:func:`coregistration`) before the thresholds."""
    index = {d.isoformat(): k for k, d in enumerate(dates)}

    def look(day: str) -> np.ndarray:
        return aligned(ndvi[index[day]], offsets.get(date.fromisoformat(day), (0.0, 0.0)))

    out = np.zeros(ndvi.shape[1:], dtype=np.uint16)
    per_event: dict[str, float] = {}
    for event in events:
        (r0, r1), (c0, c1) = event["rows"], event["cols"]
        window = np.zeros(out.shape, bool)
        window[r0:r1, c0:c1] = True
        with np.errstate(invalid="ignore"):
            lost = (window & (look(event["delineate"]) <= BARE_NDVI)
                    & (look(event["pre"]) >= PRE_FOREST_NDVI) & (out == 0))
        # Each pixel gets the first of the event's "seen" dates on which it is clear (the delineation date last).
        day = np.full(out.shape, (date.fromisoformat(event["delineate"]) - EPOCH).days, dtype=np.uint16)
        for seen in reversed(event["visible"]):
            day = np.where(np.isfinite(ndvi[index[seen]]), (date.fromisoformat(seen) - EPOCH).days, day)
        out[lost] = day[lost]
        per_event[event["id"]] = round(float(lost.sum()) * 0.01, 2)
    return out, per_event


def render_chips(data: Path, out_dir: Path, events: list[dict], ref: np.ndarray) -> None:
    """pre / first seen / delineated true-colour chips of each event, delineated pixels outlined in yellow."""
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    size = ref.shape[0] * SCALE
    for event in events:
        lost = np.zeros(ref.shape, bool)
        start, end = (date.fromisoformat(event["visible"][0]) - EPOCH).days, \
            (date.fromisoformat(event["delineate"]) - EPOCH).days
        lost = (ref >= start) & (ref <= end)
        canvas = Image.new("RGB", (3 * (size + 10), size + 20), "white")
        draw = ImageDraw.Draw(canvas)
        for k, (label, day) in enumerate((("pre", event["pre"]), ("first seen", event["visible"][0]),
                                          ("delineated", event["delineate"]))):
            with rasterio.open(data / "cogs" / day / "visual.tif") as src:
                rgb = np.clip(src.read().astype(float) * 1.7, 0, 255).astype(np.uint8)
            chip = Image.fromarray(np.moveaxis(rgb, 0, -1)).resize((size, size), Image.NEAREST)
            if k == 2:
                edge = lost & ~(np.roll(lost, 1, 0) & np.roll(lost, -1, 0) & np.roll(lost, 1, 1)
                                & np.roll(lost, -1, 1))
                chip_draw = ImageDraw.Draw(chip)
                for r, c in zip(*np.nonzero(edge), strict=True):
                    chip_draw.rectangle([c * SCALE, r * SCALE, c * SCALE + SCALE - 1, r * SCALE + SCALE - 1],
                                        outline="yellow")
            canvas.paste(chip, (k * (size + 10), 20))
            draw.text((k * (size + 10) + 5, 3), f"{label} {day}", fill="black")
        canvas.save(out_dir / f"{event['id']}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="all-dates sample (scripts/build-sample-data)")
    parser.add_argument("--chips", type=Path, help="also render each event's chips into this directory")
    parser.add_argument("--as-imaged", action="store_true", help="delineate on the images as they are (no "
                        "co-registration to the common geometry; the reference before it)")
    parser.add_argument("--out", type=Path, default=HERE, help="directory of the .tif and .json (default: here)")
    args = parser.parse_args(argv)
    events = json.loads((HERE / "visual_interpretation.json").read_text())["events"]
    dates, ndvi, nir, platforms, profile = load(args.data)
    offsets = {} if args.as_imaged else coregistration(dates, nir)
    ref, per_event = reference(dates, ndvi, events, offsets)
    ref[not_forest(dates, ndvi)] = 1
    profile.update(dtype="uint16", count=1, nodata=None, compress="deflate", driver="GTiff")
    for key in ("blockxsize", "blockysize", "tiled", "interleave"):
        profile.pop(key, None)
    with rasterio.open(args.out / "forest_loss_reference.tif", "w", **profile) as dst:
        dst.write(ref, 1)
    by_date: dict[str, float] = {}
    for value, count in zip(*np.unique(ref[ref > 1], return_counts=True), strict=True):
        by_date[(EPOCH + timedelta(days=int(value))).isoformat()] = round(count * 0.01, 2)
    summary = {"dates": len(dates), "forest_px": int((ref != 1).sum()), "not_forest_px": int((ref == 1).sum()),
               "loss_ha_by_event_delineated": per_event, "loss_ha_by_first_seen_date": by_date,
               "loss_ha": round(float((ref > 1).sum()) * 0.01, 2)}
    if offsets:
        used = sorted({e[k] for e in events for k in ("pre", "delineate")})
        summary["offsets_px_of_delineation_and_pre_dates"] = {
            d: [round(v, 2) for v in offsets[date.fromisoformat(d)]] for d in used}
        by_platform: dict[str, list] = {}
        for d, p in zip(dates, platforms, strict=True):
            if d in offsets and LEAF_ON[0] <= d.timetuple().tm_yday <= LEAF_ON[1]:
                by_platform.setdefault(p, []).append(offsets[d])
        summary["offsets_px_median_by_platform_leaf_on"] = {
            p: [len(v)] + [round(float(x), 2) for x in np.median(v, axis=0)] for p, v in sorted(by_platform.items())}
    (args.out / "reference_dates.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    if args.chips:
        render_chips(args.data, args.chips, events, ref)


if __name__ == "__main__":
    main()

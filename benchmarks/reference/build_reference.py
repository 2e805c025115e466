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


def load(data: Path) -> tuple[list[date], np.ndarray, dict]:
    """All dates, NDVI stack (T, H, W; NaN where SCL is not clear) and the grid profile."""
    items = sorted((json.loads(p.read_text()) for p in (data / "items").glob("*.json")),
                   key=lambda it: it["properties"]["datetime"])
    dates, stack, profile = [], [], None
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
        dates.append(day)
    return dates, np.stack(stack), profile


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


def reference(dates: list[date], ndvi: np.ndarray, events: list[dict]) -> tuple[np.ndarray, dict[str, float]]:
    index = {d.isoformat(): k for k, d in enumerate(dates)}
    out = np.zeros(ndvi.shape[1:], dtype=np.uint16)
    per_event: dict[str, float] = {}
    for event in events:
        (r0, r1), (c0, c1) = event["rows"], event["cols"]
        window = np.zeros(out.shape, bool)
        window[r0:r1, c0:c1] = True
        with np.errstate(invalid="ignore"):
            lost = (window & (ndvi[index[event["delineate"]]] <= BARE_NDVI)
                    & (ndvi[index[event["pre"]]] >= PRE_FOREST_NDVI) & (out == 0))
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
    args = parser.parse_args(argv)
    events = json.loads((HERE / "visual_interpretation.json").read_text())["events"]
    dates, ndvi, profile = load(args.data)
    ref, per_event = reference(dates, ndvi, events)
    ref[not_forest(dates, ndvi)] = 1
    profile.update(dtype="uint16", count=1, nodata=None, compress="deflate", driver="GTiff")
    for key in ("blockxsize", "blockysize", "tiled", "interleave"):
        profile.pop(key, None)
    with rasterio.open(HERE / "forest_loss_reference.tif", "w", **profile) as dst:
        dst.write(ref, 1)
    by_date: dict[str, float] = {}
    for value, count in zip(*np.unique(ref[ref > 1], return_counts=True), strict=True):
        by_date[(EPOCH + timedelta(days=int(value))).isoformat()] = round(count * 0.01, 2)
    summary = {"dates": len(dates), "forest_px": int((ref != 1).sum()), "not_forest_px": int((ref == 1).sum()),
               "loss_ha_by_event_delineated": per_event, "loss_ha_by_first_seen_date": by_date,
               "loss_ha": round(float((ref > 1).sum()) * 0.01, 2)}
    (HERE / "reference_dates.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    if args.chips:
        render_chips(args.data, args.chips, events, ref)


if __name__ == "__main__":
    main()

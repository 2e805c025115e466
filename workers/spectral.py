"""Spectral change analyser (``spectral@1``): index differences on clear pixels, change classes, regions.

Always runs; it is the whole analysis when no UniRS weights are configured, and the screen that decides
which chips the model sees when they are.

Indices (reflectance, valid pixels only — inside the area, clear and with data in both scenes):

- NDVI = (nir − red) / (nir + red); NDWI = (green − nir) / (green + nir) (McFeeters: water > 0);
  NDBI = (swir16 − nir) / (swir16 + nir) — only when both scenes have ``swir16`` (the result says so
  otherwise and built-up change is reported as not computable, never as zero).
- dX = X(after) − X(before).

Change classes, one per pixel, checked in this order (:data:`CLASS_ORDER`); thresholds in
:class:`Thresholds`, with the reasons:

1. ``water_change``: |dNDWI| ≥ 0.3 and NDWI crossed 0 (land became water or water became land). The zero
   crossing is McFeeters' water line; the 0.3 magnitude keeps turbid-water and wet-soil jitter out.
2. ``new_built_up_or_bare``: dNDBI ≥ 0.15, NDBI(after) > 0 and NDVI(after) < 0.3: the surface became
   SWIR-bright (roofs, asphalt, bare soil) and is not vegetated any more.
3. ``vegetation_loss``: dNDVI ≤ −0.2 and NDVI(before) ≥ 0.3: there was vegetation and its NDVI fell by
   0.2 or more. −0.2 is the usual clear-cut / disturbance threshold; on the Romanian sample it separates
   the 2015→2020 road and clear-cuts (≈1.7 ha) from two clear dates five days apart (≈0.05 ha of
   scattered single pixels, removed by the minimum mapping unit), while −0.1 flags ≈1.4 ha on those
   same five-day-apart dates.
4. ``vegetation_gain``: dNDVI ≥ +0.2 and NDVI(after) ≥ 0.3.

Regions: connected pixels of one class (8-connectivity, so a one-pixel-wide diagonal road stays one
region) as polygons (``rasterio.features.shapes``); regions smaller than
``analysis.min_mapping_unit_ha`` are noise and dropped. Hectares = pixel count × pixel area, both for all
pixels of a class and for the pixels in kept regions ("mapped"); answers and captions use the mapped
figure. A region is *linear* (road, track, pipeline) when its minimum rotated rectangle is at least
4× longer than wide and its mean width is at most 40 m.

Per-chip change score = mapped changed pixels / valid pixels of the chip (0..1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
from rasterio.features import rasterize, shapes
from rasterio.warp import transform_geom
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from eo.change_classes import CLASS_LABELS, CLASS_ORDER, format_hectares
from eo.questions import QuestionTemplate
from workers.raster import PreparedPair

logger = logging.getLogger(__name__)

NAME = "spectral"
VERSION = "1"

CLASS_CODES = {name: code for code, name in enumerate(CLASS_ORDER, start=1)}
# More regions than this are summarised, not written one by one (a noisy pair must not write 100k rows).
MAX_REGIONS = 500
SECTORS = (("north-west", "north", "north-east"), ("west", "centre", "east"), ("south-west", "south", "south-east"))


@dataclass(frozen=True)
class Thresholds:
    ndvi_drop: float = -0.2
    ndvi_rise: float = 0.2
    vegetated_ndvi: float = 0.3
    bare_ndvi: float = 0.2
    ndbi_rise: float = 0.15
    ndwi_change: float = 0.3
    linear_elongation: float = 4.0
    linear_max_width_m: float = 40.0


THRESHOLDS = Thresholds()


@dataclass
class Region:
    change_class: str
    geom_utm: BaseGeometry
    geom_4326: BaseGeometry
    pixels: int
    hectares: float
    mean_dndvi: float | None
    linear: bool
    elongation: float
    # Mean index values of the region's pixels in the before scene (ndvi, ndwi, ndbi; None when not
    # computable): what a later acquisition is compared with to confirm or dismiss the change.
    before_means: dict[str, float | None] = field(default_factory=dict)


@dataclass
class ChipScore:
    index: int
    score: float
    changed_pixels: int
    valid_pixels: int


@dataclass
class SpectralResult:
    class_map: np.ndarray  # uint8 (H, W): 0 = no change, else CLASS_CODES
    mapped: np.ndarray  # bool (H, W): changed pixels inside kept regions
    metrics: dict[str, float | None]  # the backing statistics of the question templates
    classes: dict[str, dict[str, Any]]
    regions: list[Region]
    regions_dropped: int
    chip_scores: list[ChipScore]
    caption: str
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why it was not computed
    notes: list[str] = field(default_factory=list)

    @property
    def significant(self) -> bool:
        return bool(self.regions)

    def answer(self, template: QuestionTemplate) -> tuple[str, bool | None, float | None]:
        """(answer text, yes/no, value) of one template, from its backing statistic."""
        value = self.metrics.get(template.backing_statistic)
        reason = self.unavailable.get(template.backing_statistic)
        if value is None and reason is None and template.backing_statistic not in self.metrics:
            reason = f"the spectral analyser has no statistic {template.backing_statistic!r}"
        text, yes = template.answer_from(value, reason)
        return text, yes, value


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (a - b) / (a + b)
    out[~np.isfinite(out)] = np.nan
    return out


def indices(refl: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    return {
        "ndvi": _ratio(refl["nir"], refl["red"]),
        "ndwi": _ratio(refl["green"], refl["nir"]) if "green" in refl else None,
        "ndbi": _ratio(refl["swir16"], refl["nir"]) if "swir16" in refl else None,
    }


def classify(before: dict[str, np.ndarray | None], after: dict[str, np.ndarray | None], valid: np.ndarray,
             t: Thresholds = THRESHOLDS) -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
    """Class map (uint8) and the per-class boolean masks (None when the index is missing)."""
    ndvi_b, ndvi_a = before["ndvi"], after["ndvi"]
    d_ndvi = ndvi_a - ndvi_b
    ok = valid & np.isfinite(d_ndvi)
    masks: dict[str, np.ndarray | None] = {}
    if before["ndwi"] is not None and after["ndwi"] is not None:
        d_ndwi = after["ndwi"] - before["ndwi"]
        with np.errstate(invalid="ignore"):
            crossed = (before["ndwi"] > 0) != (after["ndwi"] > 0)
            masks["water_change"] = ok & (np.abs(d_ndwi) >= t.ndwi_change) & crossed
    else:
        masks["water_change"] = None
    if before["ndbi"] is not None and after["ndbi"] is not None:
        d_ndbi = after["ndbi"] - before["ndbi"]
        with np.errstate(invalid="ignore"):
            masks["new_built_up_or_bare"] = (ok & (d_ndbi >= t.ndbi_rise) & (after["ndbi"] > 0)
                                             & (ndvi_a < t.vegetated_ndvi))
    else:
        masks["new_built_up_or_bare"] = None
    with np.errstate(invalid="ignore"):
        masks["vegetation_loss"] = ok & (d_ndvi <= t.ndvi_drop) & (ndvi_b >= t.vegetated_ndvi)
        masks["vegetation_gain"] = ok & (d_ndvi >= t.ndvi_rise) & (ndvi_a >= t.vegetated_ndvi)
    class_map = np.zeros(valid.shape, dtype=np.uint8)
    for name in reversed(CLASS_ORDER):  # earlier classes win: paint them last
        if masks[name] is not None:
            class_map[masks[name]] = CLASS_CODES[name]
    return class_map, masks


def still_changed(change_class: str, before_means: dict[str, float | None], after: dict[str, np.ndarray | None],
                  t: Thresholds = THRESHOLDS) -> np.ndarray | None:
    """Per pixel of a later acquisition: does it still show ``change_class`` against the region's mean
    before values (the class rules of :func:`classify`, the before scene replaced by its region means)?
    None when an index the rule needs is missing."""
    ndvi = after["ndvi"]
    b_ndvi = before_means.get("ndvi")
    with np.errstate(invalid="ignore"):
        if change_class == "vegetation_loss":
            return None if b_ndvi is None else (ndvi - b_ndvi <= t.ndvi_drop) & (b_ndvi >= t.vegetated_ndvi)
        if change_class == "vegetation_gain":
            return None if b_ndvi is None else (ndvi - b_ndvi >= t.ndvi_rise) & (ndvi >= t.vegetated_ndvi)
        if change_class == "new_built_up_or_bare":
            b_ndbi, ndbi = before_means.get("ndbi"), after.get("ndbi")
            if b_ndbi is None or ndbi is None:
                return None
            return (ndbi - b_ndbi >= t.ndbi_rise) & (ndbi > 0) & (ndvi < t.vegetated_ndvi)
        if change_class == "water_change":
            b_ndwi, ndwi = before_means.get("ndwi"), after.get("ndwi")
            if b_ndwi is None or ndwi is None:
                return None
            return ((b_ndwi > 0) != (ndwi > 0)) & (np.abs(ndwi - b_ndwi) >= t.ndwi_change)
    return None


def _regions(class_map: np.ndarray, pair: PreparedPair, d_ndvi: np.ndarray, min_ha: float,
             before: dict[str, np.ndarray | None]) -> tuple[list[Region], int]:
    grid = pair.grid
    pixel_m2 = grid.pixel_area_m2
    found: list[Region] = []
    dropped = 0
    for geojson, value in shapes(class_map, mask=class_map > 0, connectivity=8, transform=grid.transform):
        geom = shape(geojson)
        if not geom.is_valid:  # 8-connected pixels touching at a corner make a self-touching ring
            geom = shapely.make_valid(geom)
        pixels = round(geom.area / pixel_m2)
        hectares = pixels * pixel_m2 / 10_000.0
        if hectares < min_ha:
            dropped += 1
            continue
        rect = geom.minimum_rotated_rectangle
        coords = np.asarray(rect.exterior.coords) if rect.geom_type == "Polygon" else np.zeros((0, 2))
        if len(coords) >= 4:
            sides = np.hypot(*(coords[1:3] - coords[0:2]).T)
            long_side, short_side = float(sides.max()), max(float(sides.min()), grid.pixel_size)
        else:
            long_side = short_side = grid.pixel_size
        elongation = long_side / short_side
        mean_width = geom.area / max(long_side, grid.pixel_size)
        found.append(Region(
            change_class=CLASS_ORDER[int(value) - 1], geom_utm=geom,
            geom_4326=shape(transform_geom(grid.crs, "EPSG:4326", mapping(geom))), pixels=pixels,
            hectares=hectares, mean_dndvi=None, linear=bool(elongation >= THRESHOLDS.linear_elongation
                                                            and mean_width <= THRESHOLDS.linear_max_width_m),
            elongation=round(elongation, 2),
        ))
    found.sort(key=lambda r: r.hectares, reverse=True)
    if len(found) > MAX_REGIONS:
        dropped += len(found) - MAX_REGIONS
        found = found[:MAX_REGIONS]
    if found:
        labels = rasterize([(r.geom_utm, k + 1) for k, r in enumerate(found)], out_shape=class_map.shape,
                           transform=grid.transform, fill=0, dtype="int32")
        for k, region in enumerate(found):
            inside = labels == k + 1
            values = d_ndvi[inside & np.isfinite(d_ndvi)]
            region.mean_dndvi = round(float(values.mean()), 4) if values.size else None
            for name, index in before.items():
                v = index[inside & np.isfinite(index)] if index is not None else np.zeros(0)
                region.before_means[name] = round(float(v.mean()), 4) if v.size else None
    return found, dropped


def where_in_area(mask: np.ndarray, aoi: np.ndarray) -> str:
    """'mostly in the north-east of the area', from the share of ``mask`` pixels per 3×3 sector of the AOI."""
    rows, cols = np.nonzero(aoi)
    if rows.size == 0 or not mask.any():
        return ""
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    mr, mc = np.nonzero(mask[r0:r1, c0:c1])
    sector_r = np.minimum((mr * 3) // max(r1 - r0, 1), 2)
    sector_c = np.minimum((mc * 3) // max(c1 - c0, 1), 2)
    counts = np.bincount(sector_r * 3 + sector_c, minlength=9) / mr.size
    order = np.argsort(counts)[::-1]
    first, second = SECTORS[order[0] // 3][order[0] % 3], SECTORS[order[1] // 3][order[1] % 3]
    if counts[order[0]] >= 0.5:
        return f"mostly in the {first} of the area"
    if counts[order[0]] + counts[order[1]] >= 0.6:
        return f"mainly in the {first} and {second} of the area"
    return "spread across the area"


def analyse(pair: PreparedPair, min_mapping_unit_ha: float, t: Thresholds = THRESHOLDS) -> SpectralResult:
    """Everything the spectral analyser says about a prepared pair."""
    grid, valid = pair.grid, pair.valid
    ha_per_px = grid.pixel_area_m2 / 10_000.0
    idx_b, idx_a = indices(pair.before.reflectance), indices(pair.after.reflectance)
    class_map, masks = classify(idx_b, idx_a, valid, t)
    d_ndvi = idx_a["ndvi"] - idx_b["ndvi"]
    regions, dropped = _regions(class_map, pair, d_ndvi, min_mapping_unit_ha, idx_b)
    mapped = np.zeros(valid.shape, dtype=bool)
    if regions:
        mapped = rasterize([(r.geom_utm, 1) for r in regions], out_shape=valid.shape, transform=grid.transform,
                           fill=0, dtype="uint8").astype(bool) & (class_map > 0)

    unavailable: dict[str, str] = {}
    notes = list(pair.notes)
    if idx_b["ndbi"] is None or idx_a["ndbi"] is None:
        unavailable["new_built_up_or_bare_ha"] = "dNDBI needs the swir16 band, which these scenes do not both have"
        notes.append("dNDBI not computed: no swir16 band in both scenes; built-up change cannot be detected")
    if idx_b["ndwi"] is None or idx_a["ndwi"] is None:
        unavailable["water_change_ha"] = "dNDWI needs the green band, which these scenes do not both have"
        notes.append("dNDWI not computed: no green band in both scenes")

    classes: dict[str, dict[str, Any]] = {}
    metrics: dict[str, float | None] = {}
    for name in CLASS_ORDER:
        code = CLASS_CODES[name]
        if masks[name] is None:
            metrics[f"{name}_ha"] = None
            continue
        in_class = class_map == code
        in_regions = mapped & in_class
        kept = [r for r in regions if r.change_class == name]
        classes[name] = {
            "pixels": int(in_class.sum()),
            "hectares_all_pixels": round(float(in_class.sum()) * ha_per_px, 4),
            "hectares": round(float(in_regions.sum()) * ha_per_px, 4),
            "regions": len(kept),
            "where": where_in_area(in_regions, grid.aoi),
        }
        metrics[f"{name}_ha"] = classes[name]["hectares"]
    with np.errstate(invalid="ignore"):
        bare = valid & (idx_b["ndvi"] >= t.vegetated_ndvi) & (idx_a["ndvi"] < t.bare_ndvi) & mapped
    metrics["bare_soil_exposed_ha"] = round(float(bare.sum()) * ha_per_px, 4)
    metrics["linear_change_ha"] = round(sum(r.hectares for r in regions if r.linear), 4)
    metrics["changed_ha"] = round(float(mapped.sum()) * ha_per_px, 4)
    metrics["changed_all_pixels_ha"] = round(float((class_map > 0).sum()) * ha_per_px, 4)
    metrics["valid_ha"] = round(float(valid.sum()) * ha_per_px, 4)
    metrics["area_ha"] = round(float(grid.aoi.sum()) * ha_per_px, 4)
    metrics["valid_fraction"] = round(pair.valid_fraction, 4)
    metrics["changed_fraction"] = round(float(mapped.sum()) / max(int(valid.sum()), 1), 6)
    for key, before, after in (("ndvi", idx_b["ndvi"], idx_a["ndvi"]), ("ndwi", idx_b["ndwi"], idx_a["ndwi"]),
                               ("ndbi", idx_b["ndbi"], idx_a["ndbi"])):
        if before is None or after is None:
            metrics[f"mean_d{key}"] = None
            continue
        diff = (after - before)[valid]
        diff = diff[np.isfinite(diff)]
        metrics[f"mean_d{key}"] = round(float(diff.mean()), 4) if diff.size else None
    # Scene-level NDVI over the valid pixels: what a radiometry mistake shows first (a whole-area shift).
    for label, idx in (("before", idx_b), ("after", idx_a)):
        values = idx["ndvi"][valid]
        values = values[np.isfinite(values)]
        metrics[f"mean_ndvi_{label}"] = round(float(values.mean()), 4) if values.size else None

    scores = []
    for chip in pair.chips:
        window = chip.window
        n_valid = int(valid[window].sum())
        n_changed = int(mapped[window].sum())
        scores.append(ChipScore(chip.index, round(n_changed / n_valid, 6) if n_valid else 0.0, n_changed, n_valid))

    result = SpectralResult(class_map=class_map, mapped=mapped, metrics=metrics, classes=classes, regions=regions,
                            regions_dropped=dropped, chip_scores=scores, caption="", unavailable=unavailable,
                            notes=notes)
    result.caption = caption(result, pair, min_mapping_unit_ha)
    logger.info("spectral: %d regions (%d below the mapping unit), %.2f ha changed of %.2f ha valid",
                len(regions), dropped, metrics["changed_ha"], metrics["valid_ha"])
    return result


def caption(result: SpectralResult, pair: PreparedPair, min_mapping_unit_ha: float) -> str:
    """A sentence or two written from the numbers: what changed, how much, where; how much was seen."""
    parts = []
    for name in CLASS_ORDER:
        info = result.classes.get(name)
        if not info or info["hectares"] <= 0:
            continue
        where = f", {info['where']}" if info["where"] else ""
        label = CLASS_LABELS[name]
        parts.append(f"{label} of {format_hectares(info['hectares'])}{where}")
    dates = f"{pair.before.scene.acquired_at:%Y-%m-%d} → {pair.after.scene.acquired_at:%Y-%m-%d}"
    seen = f"{pair.valid_fraction:.0%} of the area was clear in both images ({dates})."
    if not parts:
        text = (f"No significant change: no changed region of at least {min_mapping_unit_ha:g} ha. {seen}")
    else:
        first = parts[0][0].upper() + parts[0][1:]
        text = "; ".join([first, *parts[1:]]) + f". {seen}"
    if "new_built_up_or_bare_ha" in result.unavailable:
        text += " Built-up change not assessed (no SWIR band)."
    return text

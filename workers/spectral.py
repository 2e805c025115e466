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
``analysis.min_mapping_unit_ha`` are noise and dropped; of more than :data:`MAX_REGIONS`, the largest are
kept, equal sizes by their first pixel in raster order (:func:`rank`: the same regions whatever the block
layout). Hectares = pixel count × pixel area, both for all
pixels of a class and for the pixels in kept regions ("mapped"); answers and captions use the mapped
figure. A region is *linear* (road, track, pipeline) when its minimum rotated rectangle is at least
4× longer than wide and its mean width is at most 40 m.

Per-chip change score = mapped changed pixels / valid pixels of the chip (0..1).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eo.change_classes import CLASS_LABELS, CLASS_ORDER, format_hectares
from eo.questions import QuestionTemplate
from workers.raster import BlockPair, Grid, Survey
from workers.regions import Fragment, Region, block_fragments, merge, shape_measures, to_4326

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
class ChipScore:
    index: int
    score: float
    changed_pixels: int
    valid_pixels: int


@dataclass
class SpectralResult:
    metrics: dict[str, float | None]  # the backing statistics of the question templates
    classes: dict[str, dict[str, Any]]
    regions: list[Region]
    regions_dropped: int
    chip_scores: list[ChipScore]
    caption: str
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why it was not computed
    notes: list[str] = field(default_factory=list)

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
        out = np.subtract(a, b)
        np.divide(out, np.add(a, b), out=out)
    np.copyto(out, np.float32(np.nan) if out.dtype == np.float32 else np.nan, where=~np.isfinite(out))
    return out


def indices(refl: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    return {
        "ndvi": _ratio(refl["nir"], refl["red"]),
        "ndwi": _ratio(refl["green"], refl["nir"]) if "green" in refl else None,
        "ndbi": _ratio(refl["swir16"], refl["nir"]) if "swir16" in refl else None,
    }


def differences(before: dict[str, np.ndarray | None],
                after: dict[str, np.ndarray | None]) -> dict[str, np.ndarray | None]:
    """dX = X(after) − X(before) per index (None when either scene lacks it)."""
    return {key: None if before[key] is None or after[key] is None else after[key] - before[key]
            for key in ("ndvi", "ndwi", "ndbi")}


def classify(before: dict[str, np.ndarray | None], after: dict[str, np.ndarray | None], valid: np.ndarray,
             t: Thresholds = THRESHOLDS, diffs: dict[str, np.ndarray | None] | None = None,
             ) -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
    """Class map (uint8) and the per-class boolean masks (None when the index is missing). ``diffs``:
    :func:`differences` of these indices when the caller has them already."""
    diffs = differences(before, after) if diffs is None else diffs
    ndvi_b, ndvi_a = before["ndvi"], after["ndvi"]
    d_ndvi = diffs["ndvi"]
    ok = valid & np.isfinite(d_ndvi)
    masks: dict[str, np.ndarray | None] = {}
    if diffs["ndwi"] is not None:
        d_ndwi = diffs["ndwi"]
        with np.errstate(invalid="ignore"):
            crossed = (before["ndwi"] > 0) != (after["ndwi"] > 0)
            masks["water_change"] = ok & (np.abs(d_ndwi) >= t.ndwi_change) & crossed
    else:
        masks["water_change"] = None
    if diffs["ndbi"] is not None:
        d_ndbi = diffs["ndbi"]
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


def where_from_sectors(counts: np.ndarray) -> str:
    """'mostly in the north-east of the area', from the pixels per 3×3 sector of the AOI's extent."""
    total = int(counts.sum())
    if total == 0:
        return ""
    share = counts / total
    order = np.argsort(share)[::-1]
    first, second = SECTORS[order[0] // 3][order[0] % 3], SECTORS[order[1] // 3][order[1] % 3]
    if share[order[0]] >= 0.5:
        return f"mostly in the {first} of the area"
    if share[order[0]] + share[order[1]] >= 0.6:
        return f"mainly in the {first} and {second} of the area"
    return "spread across the area"


@dataclass
class PairFacts:
    """What the spectral step needs to know about the whole prepared pair (workers.tiling)."""

    grid: Grid
    survey: Survey
    valid_fraction: float
    notes: list[str]
    acquired: tuple[Any, Any]  # (before, after) acquisition datetimes, for the caption


def rank(fragment: Fragment) -> tuple[int, int]:
    """Sort key of regions: the largest first; equal sizes by their first pixel in raster order of the
    whole grid (north-west first). Regions are disjoint, so no two share a key: which regions the cap keeps
    and their order depend on the pixels only, not on the block size or the order blocks were read in."""
    return -fragment.pixels, fragment.first_pixel


class SpectralAccumulator:
    """The spectral analysis of a pair, fed one block at a time (:meth:`add`), summed up by :meth:`finish`.

    Memory: the statistics, the regions of at least the mapping unit, and the fragments waiting at block
    edges; never a full-area array.
    """

    def __init__(self, grid: Grid, survey: Survey, min_mapping_unit_ha: float, t: Thresholds = THRESHOLDS):
        self.grid, self.survey, self.min_ha, self.t = grid, survey, min_mapping_unit_ha, t
        self.class_pixels = dict.fromkeys(CLASS_ORDER, 0)
        self.available = dict.fromkeys(CLASS_ORDER, True)
        self.index_available = {"ndvi": True, "ndwi": True, "ndbi": True}
        self.d_sum = dict.fromkeys(("ndvi", "ndwi", "ndbi"), 0.0)
        self.d_count = dict.fromkeys(("ndvi", "ndwi", "ndbi"), 0)
        self.ndvi_sum = {"before": 0.0, "after": 0.0}
        self.ndvi_count = {"before": 0, "after": 0}
        self.changed_all = 0
        self.valid = 0
        self.chip_valid = np.zeros(len(survey.chips), dtype=np.int64)
        self.whole: list[Fragment] = []
        self.border: list[Fragment] = []
        self.dropped = 0
        # (pixels, first_pixel) of the last whole fragment the cap keeps: any ranked after it cannot be kept.
        self._floor: tuple[int, int] | None = None
        # The fewest pixels of a kept region: the same test as ``pixels * ha_per_px < min_ha`` in finish().
        ha_per_px = grid.pixel_area_m2 / 10_000.0
        self.min_pixels = max(0, math.floor(min_mapping_unit_ha / ha_per_px) - 1)
        while self.min_pixels * ha_per_px < min_mapping_unit_ha:
            self.min_pixels += 1

    def add(self, block: BlockPair) -> None:
        t = self.t
        idx_b, idx_a = indices(block.before), indices(block.after)
        valid = block.valid
        diffs = differences(idx_b, idx_a)  # each once: the classes, the sums and the fragments share them
        d_ndvi = diffs["ndvi"]
        class_map, masks = classify(idx_b, idx_a, valid, t, diffs)
        per_class = np.bincount(class_map.ravel(), minlength=len(CLASS_ORDER) + 1)  # one pass, not one per class
        for name in CLASS_ORDER:
            if masks[name] is None:
                self.available[name] = False
            else:
                self.class_pixels[name] += int(per_class[CLASS_CODES[name]])
        changed = int(per_class[1:].sum())
        self.changed_all += changed
        self.valid += int(np.count_nonzero(valid))
        # The finite values over the valid pixels in one selection (the same values in the same order as
        # selecting the valid ones, then the finite ones among them: the same sums).
        for key in ("ndvi", "ndwi", "ndbi"):
            diff = diffs[key]
            if diff is None:
                self.index_available[key] = False
                continue
            diff = diff[valid & np.isfinite(diff)]
            self.d_sum[key] += float(diff.sum(dtype=np.float64))
            self.d_count[key] += int(diff.size)
        for label, idx in (("before", idx_b), ("after", idx_a)):
            values = idx["ndvi"]
            values = values[valid & np.isfinite(values)]
            self.ndvi_sum[label] += float(values.sum(dtype=np.float64))
            self.ndvi_count[label] += int(values.size)

        rows, cols = block.block.rows, block.block.cols
        chip_local = np.full(valid.shape, -1, dtype=np.int32)
        chip_ids = []
        for chip in self.survey.chips:
            if rows.start <= chip.row < rows.stop and cols.start <= chip.col < cols.stop:
                r, c = chip.row - rows.start, chip.col - cols.start
                chip_local[r:r + chip.height, c:c + chip.width] = len(chip_ids)
                chip_ids.append(chip.index)
                # Valid pixels per chip: a count over the chip's window (cheaper than a bincount of the block).
                self.chip_valid[chip.index] += int(np.count_nonzero(valid[r:r + chip.height, c:c + chip.width]))
        if not changed:
            return
        (r0, r1), (c0, c1) = self.survey.rows, self.survey.cols
        sector_r = np.clip(((np.arange(rows.start, rows.stop) - r0) * 3) // max(r1 - r0, 1), 0, 2).astype(np.int8)
        sector_c = np.clip(((np.arange(cols.start, cols.stop) - c0) * 3) // max(c1 - c0, 1), 0, 2).astype(np.int8)
        sector = sector_r[:, None] * np.int8(3) + sector_c[None, :]  # int8 (h, w): 0-8
        with np.errstate(invalid="ignore"):
            bare = valid & (idx_b["ndvi"] >= t.vegetated_ndvi) & (idx_a["ndvi"] < t.bare_ndvi)
        edges = (rows.start > 0, rows.stop < self.grid.height, cols.start > 0, cols.stop < self.grid.width)
        found = block_fragments(class_map, d_ndvi, bare, chip_local, chip_ids, sector, block.grid.transform, edges,
                                (rows.start, cols.start, self.grid.width), before=idx_b, min_pixels=self.min_pixels,
                                floor=self._floor)
        self.dropped += found.dropped
        for fragment in found.fragments:
            (self.border if fragment.border else self.whole).append(fragment)
        self._keep_best_whole()

    def _keep_best_whole(self) -> None:
        """Keep only the :data:`MAX_REGIONS` best whole fragments (:func:`rank`).

        A whole fragment is final, so one ranked below that many others can never be among the regions
        :meth:`finish` keeps: it is counted as dropped now (as finish would count it over the cap) and its
        geometry freed, and any later whole fragment ranked after the last one kept is not even vectorised
        (``self._floor``). Same regions and dropped count as keeping all; on a pair with thousands of
        regions, most of the vectorisation is skipped.
        """
        if len(self.whole) <= MAX_REGIONS:
            return
        self.whole.sort(key=rank)
        self.dropped += len(self.whole) - MAX_REGIONS
        del self.whole[MAX_REGIONS:]
        self._floor = (self.whole[-1].pixels, self.whole[-1].first_pixel)

    def finish(self, facts: PairFacts) -> SpectralResult:
        grid, t = self.grid, self.t
        ha_per_px = grid.pixel_area_m2 / 10_000.0
        candidates = []
        dropped = self.dropped
        for fragment in self.whole + merge(self.border):
            if fragment.pixels * ha_per_px < self.min_ha:
                dropped += 1
            else:
                candidates.append(fragment)
        self.whole, self.border = [], []
        candidates.sort(key=rank)
        if len(candidates) > MAX_REGIONS:
            dropped += len(candidates) - MAX_REGIONS
            candidates = candidates[:MAX_REGIONS]
        regions = []
        for fragment, geom_4326 in zip(candidates, to_4326([f.geom for f in candidates], grid.crs), strict=True):
            elongation, mean_width = shape_measures(fragment.geom, grid.pixel_size)
            regions.append(Region(
                change_class=CLASS_ORDER[fragment.code - 1], geom_utm=fragment.geom, geom_4326=geom_4326,
                pixels=fragment.pixels, hectares=fragment.pixels * ha_per_px,
                mean_dndvi=round(fragment.d_sum / fragment.d_count, 4) if fragment.d_count else None,
                linear=bool(elongation >= t.linear_elongation and mean_width <= t.linear_max_width_m),
                elongation=round(elongation, 2), fragment=fragment,
                before_means={name: round(fragment.b_sum[name] / fragment.b_count[name], 4)
                              if fragment.b_count.get(name) else None for name in fragment.b_sum}))

        unavailable: dict[str, str] = {}
        notes = list(facts.notes)
        if not self.index_available["ndbi"]:
            unavailable["new_built_up_or_bare_ha"] = ("dNDBI needs the swir16 band, which these scenes do not "
                                                      "both have")
            notes.append("dNDBI not computed: no swir16 band in both scenes; built-up change cannot be detected")
        if not self.index_available["ndwi"]:
            unavailable["water_change_ha"] = "dNDWI needs the green band, which these scenes do not both have"
            notes.append("dNDWI not computed: no green band in both scenes")

        classes: dict[str, dict[str, Any]] = {}
        metrics: dict[str, float | None] = {}
        mapped_total = sum(r.pixels for r in regions)
        for name in CLASS_ORDER:
            if not self.available[name]:
                metrics[f"{name}_ha"] = None
                continue
            kept = [r for r in regions if r.change_class == name]
            sectors = np.sum([r.fragment.sectors for r in kept], axis=0) if kept else np.zeros(9, dtype=np.int64)
            pixels = self.class_pixels[name]
            classes[name] = {
                "pixels": pixels,
                "hectares_all_pixels": round(float(pixels) * ha_per_px, 4),
                "hectares": round(float(sum(r.pixels for r in kept)) * ha_per_px, 4),
                "regions": len(kept),
                "where": where_from_sectors(sectors),
            }
            metrics[f"{name}_ha"] = classes[name]["hectares"]
        metrics["bare_soil_exposed_ha"] = round(float(sum(r.fragment.bare for r in regions)) * ha_per_px, 4)
        metrics["linear_change_ha"] = round(sum(r.hectares for r in regions if r.linear), 4)
        metrics["changed_ha"] = round(float(mapped_total) * ha_per_px, 4)
        metrics["changed_all_pixels_ha"] = round(float(self.changed_all) * ha_per_px, 4)
        metrics["valid_ha"] = round(float(self.valid) * ha_per_px, 4)
        metrics["area_ha"] = round(float(self.survey.aoi_pixels) * ha_per_px, 4)
        metrics["valid_fraction"] = round(facts.valid_fraction, 4)
        metrics["changed_fraction"] = round(float(mapped_total) / max(self.valid, 1), 6)
        for key in ("ndvi", "ndwi", "ndbi"):
            ok = self.index_available[key] and self.d_count[key]
            metrics[f"mean_d{key}"] = round(self.d_sum[key] / self.d_count[key], 4) if ok else None
        # Scene-level NDVI over the valid pixels: what a radiometry mistake shows first (a whole-area shift).
        for label in ("before", "after"):
            n = self.ndvi_count[label]
            metrics[f"mean_ndvi_{label}"] = round(self.ndvi_sum[label] / n, 4) if n else None

        changed = np.zeros(len(self.survey.chips), dtype=np.int64)
        for region in regions:
            for chip, count in region.fragment.chips.items():
                changed[chip] += count
        scores = []
        for chip in self.survey.chips:
            n_valid, n_changed = int(self.chip_valid[chip.index]), int(changed[chip.index])
            scores.append(ChipScore(chip.index, round(n_changed / n_valid, 6) if n_valid else 0.0, n_changed, n_valid))

        result = SpectralResult(metrics=metrics, classes=classes, regions=regions, regions_dropped=dropped,
                                chip_scores=scores, caption="", unavailable=unavailable, notes=notes)
        result.caption = caption(result, facts.valid_fraction, facts.acquired, self.min_ha)
        logger.info("spectral: %d regions (%d below the mapping unit or over the cap), %.2f ha changed of %.2f ha "
                    "valid", len(regions), dropped, metrics["changed_ha"], metrics["valid_ha"])
        return result


def caption(result: SpectralResult, valid_fraction: float, acquired: tuple[Any, Any],
            min_mapping_unit_ha: float) -> str:
    """A sentence or two written from the numbers: what changed, how much, where; how much was seen."""
    parts = []
    for name in CLASS_ORDER:
        info = result.classes.get(name)
        if not info or info["hectares"] <= 0:
            continue
        where = f", {info['where']}" if info["where"] else ""
        label = CLASS_LABELS[name]
        parts.append(f"{label} of {format_hectares(info['hectares'])}{where}")
    dates = f"{acquired[0]:%Y-%m-%d} → {acquired[1]:%Y-%m-%d}"
    seen = f"{valid_fraction:.0%} of the area was clear in both images ({dates})."
    if not parts:
        text = (f"No significant change: no changed region of at least {min_mapping_unit_ha:g} ha. {seen}")
    else:
        first = parts[0][0].upper() + parts[0][1:]
        text = "; ".join([first, *parts[1:]]) + f". {seen}"
    if "new_built_up_or_bare_ha" in result.unavailable:
        text += " Built-up change not assessed (no SWIR band)."
    return text

"""Raster preparation: both scenes of a pair on one grid, as reflectance, with a clear-pixel mask.

1. **One grid.** The area's UTM zone at ``analysis.pixel_size_m`` (10 m), bounds snapped to whole pixels
   from the zone's origin, so every scene of an area lands pixel on pixel whatever its native CRS.
2. **Window reads only.** Each band is read through :func:`eo.cog.read_aoi` (hrefs checked by
   :mod:`eo.security`, HTTP Range reads of the tiles the AOI touches, warped through a WarpedVRT).
   Nearest-neighbour resampling: the target pixel size equals the native 10 m one, so nearest keeps the
   measured values (no blending across a field edge) and SCL classes stay classes. The cloud masks are
   read first: a pair too cloudy to compare is skipped before any reflectance is fetched.
3. **Reflectance.** The rule decided at ingest per collection profile (:mod:`eo.radiometry`: the item's
   offset flag, its processing baseline and ``raster:bands`` together) and stored with each asset, then
   checked against the clear red pixels: a contradiction fails the analysis
   (:class:`eo.radiometry.RadiometryMismatch`). No-data becomes NaN.
4. **Mask.** SCL (or Landsat QA_PIXEL) clear classes, clouds and shadows buffered (:mod:`eo.masks`);
   a pixel is *valid* when it is inside the AOI, clear and has data in both scenes. Too few valid pixels
   (``analysis.min_valid_fraction``) → :class:`SkipAnalysis` with the numbers.
5. **Chips.** The grid cut into squares of ``analysis.chip_size_m`` (384 px at 10 m: the model's input).
"""

from __future__ import annotations

import logging
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from core.config import AnalysisSettings, CatalogueSettings
from eo import radiometry
from eo.cog import read_aoi, utm_crs_for
from eo.masks import MASK_BANDS, clear_mask, haze_mask

logger = logging.getLogger(__name__)

# rasterio occasionally reports "Dataset has no geotransform" from rasterize()/geometry_mask() when several
# threads rasterise at once (its GDAL error handler is shared); every call here passes a transform, so the
# warning is spurious noise in the worker logs.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio.features")

REQUIRED_BANDS = ("red", "nir")
OPTIONAL_BANDS = ("blue", "green", "swir16")
# Parallel band reads: GDAL releases the GIL while it waits on HTTP, and each read is a few requests.
READ_THREADS = 4


class SkipAnalysis(Exception):
    """The pair cannot be compared (too cloudy, no overlap); the message is the reason users see."""


@dataclass
class SceneRef:
    """What raster prep needs to know about a scene (copied out of the DB row)."""

    scene_id: int
    item_id: str
    acquired_at: datetime
    processing_baseline: str | None
    assets: dict[str, dict[str, Any]]
    catalogue: CatalogueSettings


@dataclass
class Grid:
    crs: CRS
    transform: Affine
    width: int
    height: int
    pixel_size: float
    aoi: np.ndarray  # bool (H, W): pixel centre inside the area polygon

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        left, top = self.transform.c, self.transform.f
        return left, top - self.height * self.pixel_size, left + self.width * self.pixel_size, top

    @property
    def pixel_area_m2(self) -> float:
        return self.pixel_size * self.pixel_size


@dataclass
class SceneRaster:
    scene: SceneRef
    reflectance: dict[str, np.ndarray]  # band -> float32 (H, W), NaN where no data
    clear: np.ndarray  # bool (H, W) from the cloud mask (buffered)
    harmonisation: str  # the rule applied, for the record
    radiometry: dict[str, Any] = field(default_factory=dict)  # rule, profile, offset_in_pixels


@dataclass
class Chip:
    index: int
    row: int
    col: int
    height: int
    width: int

    @property
    def window(self) -> tuple[slice, slice]:
        return slice(self.row, self.row + self.height), slice(self.col, self.col + self.width)


@dataclass
class PreparedPair:
    grid: Grid
    before: SceneRaster
    after: SceneRaster
    valid: np.ndarray  # bool (H, W): in AOI, clear in both, data in both
    valid_fraction: float
    before_clear_fraction: float
    after_clear_fraction: float
    bands: tuple[str, ...]  # reflectance bands present in both scenes
    chips: list[Chip]
    notes: list[str] = field(default_factory=list)


def common_grid(geom_4326: BaseGeometry, pixel_size: float) -> Grid:
    """The area's UTM grid: bounds grown to whole pixels counted from the zone origin."""
    crs = utm_crs_for(geom_4326)
    geom = shape(transform_geom("EPSG:4326", crs, mapping(geom_4326)))
    minx, miny, maxx, maxy = geom.bounds
    left = math.floor(minx / pixel_size) * pixel_size
    bottom = math.floor(miny / pixel_size) * pixel_size
    right = max(math.ceil(maxx / pixel_size) * pixel_size, left + pixel_size)
    top = max(math.ceil(maxy / pixel_size) * pixel_size, bottom + pixel_size)
    width, height = round((right - left) / pixel_size), round((top - bottom) / pixel_size)
    transform = Affine(pixel_size, 0.0, left, 0.0, -pixel_size, top)
    aoi = geometry_mask([mapping(geom)], out_shape=(height, width), transform=transform, invert=True)
    if not aoi.any():  # an area smaller than a pixel still gets the pixels it touches
        aoi = geometry_mask([mapping(geom)], out_shape=(height, width), transform=transform, invert=True,
                            all_touched=True)
    return Grid(crs=crs, transform=transform, width=width, height=height, pixel_size=pixel_size, aoi=aoi)


def harmonisation_rule(scene: SceneRef, band: str) -> tuple[float, float, str]:
    """(scale, offset, description) turning the DNs of ``band`` into surface reflectance (:mod:`eo.radiometry`)."""
    rule = radiometry.reflectance_rule(scene.processing_baseline, scene.assets.get(band, {}))
    return rule.scale, rule.offset, rule.description


def chips_for(grid: Grid, chip_size_m: float) -> list[Chip]:
    """Squares of ``chip_size_m`` over the grid (edge chips are smaller); chips outside the AOI are dropped."""
    size = max(1, round(chip_size_m / grid.pixel_size))
    chips: list[Chip] = []
    for row in range(0, grid.height, size):
        for col in range(0, grid.width, size):
            h, w = min(size, grid.height - row), min(size, grid.width - col)
            if grid.aoi[row:row + h, col:col + w].any():
                chips.append(Chip(index=len(chips), row=row, col=col, height=h, width=w))
    return chips


def _read_band(scene: SceneRef, band: str, geom: BaseGeometry, grid: Grid) -> np.ndarray:
    entry = scene.assets[band]
    raster = read_aoi(entry["href"], geom, catalogue=scene.catalogue, dst_crs=grid.crs, resolution=grid.pixel_size,
                      bounds=grid.bounds, resampling=Resampling.nearest, indexes=1)
    array = raster.array[0]
    if array.shape != (grid.height, grid.width):  # read_aoi honours bounds; a mismatch is a bug, say so
        raise RuntimeError(f"{band} of {scene.item_id}: read {array.shape}, grid is {(grid.height, grid.width)}")
    nodata = entry.get("nodata", raster.nodata)
    if nodata is None:
        return np.ma.asarray(array)
    return np.ma.masked_equal(array, nodata)


def _rule(scene: SceneRef, band: str) -> radiometry.ReflectanceRule:
    return radiometry.reflectance_rule(scene.processing_baseline, scene.assets.get(band, {}))


def _reflectance(scene: SceneRef, band: str, dn: np.ma.MaskedArray) -> np.ndarray:
    return radiometry.to_reflectance(dn, _rule(scene, band))


def _clear_mask(scene: SceneRef, band: str, values: np.ma.MaskedArray, buffer_px: int) -> np.ndarray:
    data = values.data
    no_data = np.ma.getmaskarray(values)
    return clear_mask(band, data, buffer_px) & ~no_data


def _mask_band(scene: SceneRef) -> str:
    for band in MASK_BANDS:
        if band in scene.assets:
            return band
    raise SkipAnalysis(f"scene {scene.item_id} has no cloud mask asset (scl or qa_pixel)")


def prepare_pair(geom_4326: BaseGeometry, before: SceneRef, after: SceneRef,
                 settings: AnalysisSettings) -> PreparedPair:
    """Read, harmonise and mask both scenes over the area; raise :class:`SkipAnalysis` when not comparable."""
    grid = common_grid(geom_4326, settings.pixel_size_m)
    aoi_pixels = int(grid.aoi.sum())
    for scene in (before, after):
        missing = [b for b in REQUIRED_BANDS if b not in scene.assets]
        if missing:
            raise SkipAnalysis(f"scene {scene.item_id} has no {', '.join(missing)} asset")
    mask_bands = (_mask_band(before), _mask_band(after))

    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="cog-read") as pool:
        # Masks first: a cloudy pair is skipped without fetching any reflectance.
        masks = list(pool.map(lambda sb: _read_band(sb[0], sb[1], geom_4326, grid),
                              [(before, mask_bands[0]), (after, mask_bands[1])]))
        clear_b = _clear_mask(before, mask_bands[0], masks[0], settings.cloud_buffer_px)
        clear_a = _clear_mask(after, mask_bands[1], masks[1], settings.cloud_buffer_px)
        frac_b = float((clear_b & grid.aoi).sum()) / max(aoi_pixels, 1)
        frac_a = float((clear_a & grid.aoi).sum()) / max(aoi_pixels, 1)
        both = float((clear_b & clear_a & grid.aoi).sum()) / max(aoi_pixels, 1)
        if both < settings.min_valid_fraction:
            raise SkipAnalysis(_cloudy_reason(both, frac_b, frac_a, settings))

        notes: list[str] = []
        bands = list(REQUIRED_BANDS)
        for band in OPTIONAL_BANDS:
            have = [s.item_id for s in (before, after) if band in s.assets]
            if len(have) == 2:
                bands.append(band)
            else:
                notes.append(f"no {band} band in {'both scenes' if not have else 'one scene'}")
        jobs = [(s, b) for s in (before, after) for b in bands]
        dns = list(pool.map(lambda sb: _read_band(sb[0], sb[1], geom_4326, grid), jobs))

    # The metadata's rule against the pixels, before anything is compared (raises RadiometryMismatch).
    for scene, dn, clear in ((before, dns[0], clear_b), (after, dns[len(bands)], clear_a)):
        note = radiometry.check_pixels(scene.item_id, _rule(scene, "red"), dn, clear & grid.aoi)
        if note:
            notes.append(note)
    arrays = [_reflectance(s, b, dn) for (s, b), dn in zip(jobs, dns, strict=True)]
    refl_b = {b: arrays[i] for i, b in enumerate(bands)}
    refl_a = {b: arrays[len(bands) + i] for i, b in enumerate(bands)}
    if "blue" in bands:
        for label, refl, clear in (("before", refl_b, clear_b), ("after", refl_a, clear_a)):
            hazy = haze_mask(refl["blue"], refl["red"], settings.cloud_buffer_px) & clear & grid.aoi
            if hazy.any():
                clear &= ~hazy  # in place: the scene's clear mask is what the spectral step trusts
                notes.append(f"{int(hazy.sum())} px of haze or small cloud that the {label} scene's cloud mask "
                             "missed were excluded (blue/red haze test)")
    has_data = np.ones((grid.height, grid.width), dtype=bool)
    for band in bands:
        has_data &= np.isfinite(refl_b[band]) & np.isfinite(refl_a[band])
    valid = grid.aoi & clear_b & clear_a & has_data
    valid_fraction = float(valid.sum()) / max(aoi_pixels, 1)
    if valid_fraction < settings.min_valid_fraction:
        raise SkipAnalysis(
            f"only {valid_fraction:.0%} of the area has clear data in both scenes (minimum "
            f"{settings.min_valid_fraction:.0%}); the scenes cover it only partly"
        )
    pair = PreparedPair(
        grid=grid,
        before=SceneRaster(before, refl_b, clear_b, harmonisation_rule(before, "red")[2], _record(before)),
        after=SceneRaster(after, refl_a, clear_a, harmonisation_rule(after, "red")[2], _record(after)),
        valid=valid,
        valid_fraction=valid_fraction,
        before_clear_fraction=frac_b,
        after_clear_fraction=frac_a,
        bands=tuple(bands),
        chips=chips_for(grid, settings.chip_size_m),
        notes=notes,
    )
    logger.info("prepared %s -> %s: %dx%d px in %s, %.0f%% valid, bands %s", before.item_id, after.item_id,
                grid.width, grid.height, grid.crs.to_string(), 100 * valid_fraction, ",".join(bands))
    return pair


def _record(scene: SceneRef) -> dict[str, Any]:
    rule = _rule(scene, "red")
    return {"rule": rule.rule, "profile": rule.profile, "offset_in_pixels": rule.offset_in_pixels,
            "scale": rule.scale, "offset": rule.offset}


def _cloudy_reason(both: float, before: float, after: float, settings: AnalysisSettings) -> str:
    return (
        f"too cloudy to compare: only {both:.0%} of the area is clear in both scenes (before {before:.0%}, "
        f"after {after:.0%}; minimum {settings.min_valid_fraction:.0%}; clouds and shadows buffered by "
        f"{settings.cloud_buffer_px} px)"
    )


def read_rgb(scene: SceneRef, geom_4326: BaseGeometry, grid: Grid) -> np.ndarray:
    """True-colour reflectance (3, H, W) of one scene on ``grid`` (the video frames of the model)."""
    bands = [b for b in ("red", "green", "blue") if b in scene.assets]
    if len(bands) < 3:
        bands = ["red", "red", "red"] if "red" in scene.assets else []
    if not bands:
        raise SkipAnalysis(f"scene {scene.item_id} has no visible bands")
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="cog-read") as pool:
        arrays = list(pool.map(lambda b: _reflectance(scene, b, _read_band(scene, b, geom_4326, grid)), bands))
    return np.stack(arrays)

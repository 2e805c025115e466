"""Raster preparation: both scenes of a pair on one grid, as reflectance, with a clear-pixel mask.

1. **One grid.** The area's UTM zone at ``analysis.pixel_size_m`` (10 m), bounds snapped to whole pixels
   from the zone's origin, so every scene of an area lands pixel on pixel whatever its native CRS.
2. **Window reads only.** Each band is read through :func:`eo.cog.read_aoi` (hrefs checked by
   :mod:`eo.security`, HTTP Range reads of the tiles the AOI touches, warped through a WarpedVRT).
   Nearest-neighbour resampling: the target pixel size equals the native 10 m one, so nearest keeps the
   measured values (no blending across a field edge) and SCL classes stay classes.
   **Block by block**: the grid is cut into blocks of whole chips (:data:`BLOCK_PX`), each read with a
   halo of ``cloud_buffer_px`` so buffered clouds and the haze test are the same as on one big read;
   nothing of full-area size is held (:mod:`workers.tiling` merges the results). The cloud masks are read
   first: a pair too cloudy to compare is skipped before any reflectance is fetched (large areas: a coarse
   screen from the mask's overviews, then the exact figures from the blocks).
3. **Reflectance.** The rule decided at ingest per collection profile (:mod:`eo.radiometry`: the item's
   offset flag, its processing baseline and ``raster:bands`` together) and stored with each asset, then
   checked against the clear red pixels (counted block by block): a contradiction fails the analysis
   (:class:`eo.radiometry.RadiometryMismatch`). No-data becomes NaN.
4. **Mask.** SCL (or Landsat QA_PIXEL) clear classes, clouds and shadows buffered (:mod:`eo.masks`);
   a pixel is *valid* when it is inside the AOI, clear and has data in both scenes. Too few valid pixels
   (``analysis.min_valid_fraction``) → :class:`SkipAnalysis` with the numbers.
5. **Chips.** The grid cut into squares of ``analysis.chip_size_m`` (384 px at 10 m: the model's input),
   numbered row by row; blocks are whole chips, so a chip never straddles two blocks.
"""

from __future__ import annotations

import logging
import math
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry

from core.config import AnalysisSettings, CatalogueSettings
from eo import radiometry
from eo.cog import CogSession, read_aoi, utm_crs_for
from eo.masks import MASK_BANDS, QA_FILL, clear_mask, haze_mask

logger = logging.getLogger(__name__)

# rasterio occasionally reports "Dataset has no geotransform" from rasterize()/geometry_mask() when several
# threads rasterise at once (its GDAL error handler is shared); every call here passes a transform, so the
# warning is spurious noise in the worker logs.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio.features")

REQUIRED_BANDS = ("red", "nir")
OPTIONAL_BANDS = ("blue", "green", "swir16")
# Parallel band reads: GDAL releases the GIL while it waits on HTTP, and each read is a few requests.
# Enough for every read of a block at once (the masks and up to five bands of both scenes): on a shared
# 2-core machine the reads wait on the server far more than they compute.
READ_THREADS = 12
# Block side (pixels, rounded to whole chips): 1152 px = 11.5 km at 10 m, 1.3 M pixels; both scenes' bands
# and the indices of one block stay within a few hundred MB whatever the area's size. bench_pipeline's
# 1,000 km² pair (3163 px a side, same answers): 1536 px cuts it 1536/1536/91 and spent 2.78 s CPU, 1152 px
# cuts it 1152/1152/859 (the next block's read overlaps an analysis of similar length) and spent 2.28 s
# (a 5.3 MB float32 band per block instead of 9.4 MB); 768 px, 2.55 s (25 blocks' halos and overheads).
# Peak RSS (bench_pipeline, same run): 0.70 → 0.51 GB at 1,000 km², 0.87 → 0.64 GB at 10,000 km².
BLOCK_PX = 1152


class SkipAnalysis(Exception):
    """The pair cannot be compared (too cloudy, no overlap); the message is the reason users see."""


@dataclass
class SceneRef:
    """What raster prep needs to know about an acquisition over the area (copied out of the DB rows): its
    first granule, and in ``others`` the further granules touching the area (mosaic order). A band is read
    from the first granule and its no-data filled from the others, in order (:func:`read_band`)."""

    scene_id: int
    item_id: str
    acquired_at: datetime
    processing_baseline: str | None
    assets: dict[str, dict[str, Any]]
    catalogue: CatalogueSettings
    others: tuple[SceneRef, ...] = ()
    # (east, north) m by which this acquisition's features lie off the area's geometry: every read of it is
    # moved by as much, so it lands on the area's geometry (workers/coregistration.py; 0, 0 = as imaged).
    offset_m: tuple[float, float] = (0.0, 0.0)


@dataclass
class Grid:
    """The analysis grid of an area: ``width`` × ``height`` pixels of ``pixel_size`` m in ``crs``.

    No full-size array is held: the AOI mask of any window is rasterised on demand (:meth:`aoi`), so a
    10,000 km² area (10⁸ pixels at 10 m) costs what one block costs.
    """

    crs: CRS
    transform: Affine
    width: int
    height: int
    pixel_size: float
    geom: BaseGeometry  # the area in ``crs``
    all_touched: bool = False  # an area smaller than a pixel gets the pixels it touches

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        left, top = self.transform.c, self.transform.f
        return left, top - self.height * self.pixel_size, left + self.width * self.pixel_size, top

    @property
    def pixel_area_m2(self) -> float:
        return self.pixel_size * self.pixel_size

    def window(self, rows: slice, cols: slice) -> Grid:
        """The sub-grid of ``rows`` × ``cols`` (pixel offsets on this grid, clipped to it)."""
        r0, r1 = max(0, rows.start), min(self.height, rows.stop)
        c0, c1 = max(0, cols.start), min(self.width, cols.stop)
        return Grid(self.crs, self.transform @ Affine.translation(c0, r0), c1 - c0, r1 - r0, self.pixel_size,
                    self.geom, self.all_touched)

    def aoi(self) -> np.ndarray:
        """bool (H, W): pixel centre inside the area polygon (or touching it, for sub-pixel areas).

        A window wholly inside the area's interior is all True and one that does not touch it all False,
        without rasterising (most blocks of a large area; 6.5 ms per 1536 px block otherwise)."""
        left, bottom, right, top = self.bounds
        window = box(left, bottom, right, top)
        if shapely.contains_properly(self.geom, window):
            return np.ones((self.height, self.width), dtype=bool)
        if not shapely.intersects(self.geom, window):
            return np.zeros((self.height, self.width), dtype=bool)
        return geometry_mask([mapping(self.geom)], out_shape=(self.height, self.width), transform=self.transform,
                             invert=True, all_touched=self.all_touched)

    def decimated(self, factor: int) -> Grid:
        """Every ``factor``-th pixel (rows and columns 0, f, 2f…): coarse pixels centred on those fine pixels,
        so a coarse read samples the same places as striding a fine array (``factor`` 1 is this grid)."""
        if factor <= 1:
            return self
        shift = 0.5 - factor / 2.0
        transform = self.transform @ Affine.translation(shift, shift) @ Affine.scale(factor)
        return Grid(self.crs, transform, -(-self.width // factor), -(-self.height // factor),
                    self.pixel_size * factor, self.geom, self.all_touched)


@dataclass
class SceneRaster:
    scene: SceneRef
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
class Block:
    """One block of the grid: ``rows`` × ``cols`` (whole chips), read with ``halo`` extra pixels each side
    (clipped to the grid) so cloud buffers and the haze dilation see across the block edge."""

    rows: slice
    cols: slice
    halo: int = 0

    def read_window(self, grid: Grid) -> tuple[slice, slice]:
        return (slice(max(0, self.rows.start - self.halo), min(grid.height, self.rows.stop + self.halo)),
                slice(max(0, self.cols.start - self.halo), min(grid.width, self.cols.stop + self.halo)))

    def inner(self, grid: Grid) -> tuple[slice, slice]:
        """The block inside its halo'd read window."""
        rows, cols = self.read_window(grid)
        r, c = self.rows.start - rows.start, self.cols.start - cols.start
        return slice(r, r + self.rows.stop - self.rows.start), slice(c, c + self.cols.stop - self.cols.start)


@dataclass
class Survey:
    """What the whole AOI looks like on the grid, gathered block by block without a full-size mask."""

    aoi_pixels: int
    rows: tuple[int, int]  # [first, last + 1) grid rows holding AOI pixels
    cols: tuple[int, int]
    chips: list[Chip]
    blocks: list[Block]


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
    return Grid(crs=crs, transform=transform, width=width, height=height, pixel_size=pixel_size, geom=geom)


def block_size_px(chip_px: int, target_px: int = BLOCK_PX) -> int:
    """Block side in pixels: a whole number of chips, about ``target_px``."""
    return chip_px * max(1, target_px // max(chip_px, 1))


def survey(grid: Grid, chip_size_m: float, *, block_px: int = BLOCK_PX, halo: int = 0) -> Survey:
    """Blocks, chips (squares of ``chip_size_m``, edge chips smaller, chips outside the AOI dropped, numbered
    row by row over the whole grid) and the AOI's pixel count and extent. Switches the grid to
    ``all_touched`` when no pixel centre falls inside the area (an area smaller than a pixel)."""
    chip_px = max(1, round(chip_size_m / grid.pixel_size))
    size = block_size_px(chip_px, block_px)
    for attempt in (0, 1):
        blocks, cells, total = [], [], 0
        r_lo, r_hi, c_lo, c_hi = grid.height, 0, grid.width, 0
        for row in range(0, grid.height, size):
            for col in range(0, grid.width, size):
                rows, cols = slice(row, min(row + size, grid.height)), slice(col, min(col + size, grid.width))
                blocks.append(Block(rows, cols, halo))
                aoi = grid.window(rows, cols).aoi()
                count = int(aoi.sum())
                if not count:
                    continue
                total += count
                hit_r, hit_c = np.flatnonzero(aoi.any(axis=1)), np.flatnonzero(aoi.any(axis=0))
                r_lo, r_hi = min(r_lo, row + int(hit_r[0])), max(r_hi, row + int(hit_r[-1]) + 1)
                c_lo, c_hi = min(c_lo, col + int(hit_c[0])), max(c_hi, col + int(hit_c[-1]) + 1)
                for r in range(0, aoi.shape[0], chip_px):
                    for c in range(0, aoi.shape[1], chip_px):
                        if aoi[r:r + chip_px, c:c + chip_px].any():
                            h, w = min(chip_px, aoi.shape[0] - r), min(chip_px, aoi.shape[1] - c)
                            cells.append((row + r, col + c, h, w))
        if total or attempt or grid.all_touched:
            break
        grid.all_touched = True
    cells.sort()
    chips = [Chip(index=k, row=r, col=c, height=h, width=w) for k, (r, c, h, w) in enumerate(cells)]
    return Survey(aoi_pixels=total, rows=(r_lo, r_hi), cols=(c_lo, c_hi), chips=chips, blocks=blocks)


def harmonisation_rule(scene: SceneRef, band: str) -> tuple[float, float, str]:
    """(scale, offset, description) turning the DNs of ``band`` into surface reflectance (:mod:`eo.radiometry`)."""
    rule = radiometry.reflectance_rule(scene.processing_baseline, scene.assets.get(band, {}))
    return rule.scale, rule.offset, rule.description


def read_band(scene: SceneRef, band: str, grid: Grid, *, use_overviews: bool = False,
              session: CogSession | None = None) -> np.ma.MaskedArray:
    """DNs of ``band`` on ``grid`` (nearest), no-data masked: the acquisition's mosaic — the first granule,
    its no-data filled from the other granules that have the band, in order. A granule whose reflectance
    rule differs (another catalogue's copy, another offset convention) is brought to the first granule's DN
    convention through reflectance, so one rule reads the whole array. ``use_overviews``: from the coarsest
    internal overview still at least as fine as the grid (coarse grids: thumbnails, cloud screens).
    ``session``: through its open datasets (:class:`eo.cog.CogSession`; block-by-block readers)."""
    out = _read_granule(scene, band, grid, use_overviews, session)
    rule = rule_of(scene, band) if band not in MASK_BANDS else None
    for other in scene.others:
        if not np.ma.getmaskarray(out).any():
            break
        if band not in other.assets:
            continue
        part = _read_granule(other, band, grid, use_overviews, session)
        fill = np.ma.getmaskarray(out) & ~np.ma.getmaskarray(part)
        if not fill.any():
            continue
        values = part.data
        other_rule = rule_of(other, band) if rule is not None else None
        data = out.data.copy()
        if other_rule is not None and (other_rule.scale, other_rule.offset) != (rule.scale, rule.offset):
            values = (values.astype(np.float64) * other_rule.scale + other_rule.offset - rule.offset) / rule.scale
            data = data.astype(np.float32)
        data[fill] = values[fill]
        out = np.ma.MaskedArray(data, mask=np.ma.getmaskarray(out) & ~fill)
    return out


def _read_granule(scene: SceneRef, band: str, grid: Grid, use_overviews: bool,
                  session: CogSession | None = None) -> np.ma.MaskedArray:
    entry = scene.assets[band]
    left, bottom, right, top = grid.bounds
    east, north = scene.offset_m
    raster = read_aoi(entry["href"], None, catalogue=scene.catalogue, dst_crs=grid.crs, resolution=grid.pixel_size,
                      bounds=(left + east, bottom + north, right + east, top + north),
                      resampling=Resampling.nearest, indexes=1, aoi_mask=False,
                      use_overviews=use_overviews, session=session)
    array = raster.array[0]
    if array.shape != (grid.height, grid.width):  # read_aoi honours bounds; a mismatch is a bug, say so
        raise RuntimeError(f"{band} of {scene.item_id}: read {array.shape}, grid is {(grid.height, grid.width)}")
    nodata = entry.get("nodata", raster.nodata)
    mask = np.zeros(array.shape, dtype=bool) if nodata is None else array == nodata
    if band == "scl":
        mask |= array == 0  # SCL class 0 is "no data" whatever the file says
    elif band == "qa_pixel":
        mask |= (array.astype(np.uint32) & QA_FILL) != 0
    return np.ma.MaskedArray(array, mask=mask)


def rule_of(scene: SceneRef, band: str) -> radiometry.ReflectanceRule:
    return radiometry.reflectance_rule(scene.processing_baseline, scene.assets.get(band, {}))


def radiometry_record(scene: SceneRef) -> dict[str, Any]:
    rule = rule_of(scene, "red")
    return {"rule": rule.rule, "profile": rule.profile, "offset_in_pixels": rule.offset_in_pixels,
            "scale": rule.scale, "offset": rule.offset}


def _reflectance(scene: SceneRef, band: str, dn: np.ma.MaskedArray) -> np.ndarray:
    return radiometry.to_reflectance(dn, rule_of(scene, band))


def _clear_mask(band: str, values: np.ma.MaskedArray, buffer_px: int) -> np.ndarray:
    return clear_mask(band, values.data, buffer_px) & ~np.ma.getmaskarray(values)


def mask_band(scene: SceneRef) -> str:
    """The scene's cloud-mask asset key (``scl`` or ``qa_pixel``); :class:`SkipAnalysis` when it has none."""
    for band in MASK_BANDS:
        if band in scene.assets:
            return band
    raise SkipAnalysis(f"scene {scene.item_id} has no cloud mask asset (scl or qa_pixel)")


def pair_bands(before: SceneRef, after: SceneRef) -> tuple[list[str], list[str]]:
    """(reflectance bands both scenes have, notes on the optional ones missing); SkipAnalysis when a
    required band or the cloud mask is missing."""
    for scene in (before, after):
        missing = [b for b in REQUIRED_BANDS if b not in scene.assets]
        if missing:
            raise SkipAnalysis(f"scene {scene.item_id} has no {', '.join(missing)} asset")
        mask_band(scene)
    notes: list[str] = []
    bands = list(REQUIRED_BANDS)
    for band in OPTIONAL_BANDS:
        have = [s.item_id for s in (before, after) if band in s.assets]
        if len(have) == 2:
            bands.append(band)
        else:
            notes.append(f"no {band} band in {'both scenes' if not have else 'one scene'}")
    return bands, notes


@dataclass
class BlockPair:
    """Both scenes over one block: reflectance, clear masks (buffered, haze removed), validity, counts."""

    block: Block
    grid: Grid  # the block's own sub-grid (no halo)
    aoi: np.ndarray  # bool (h, w)
    before: dict[str, np.ndarray]  # band -> float32 reflectance (h, w), NaN where no data
    after: dict[str, np.ndarray]
    valid: np.ndarray  # bool (h, w): in AOI, clear in both, data in both
    clear_after: np.ndarray  # bool (h, w): the after scene's clear mask (buffered, haze removed)
    counts: dict[str, int] = field(default_factory=dict)


def read_block_masks(grid: Grid, block: Block, before: SceneRef, after: SceneRef, buffer_px: int,
                     pool: ThreadPoolExecutor, session: CogSession | None = None,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """(AOI, clear before, clear after) over the block — clear masks on the halo'd window — and the counts
    of AOI pixels clear in each and in both (unbuffered by haze). ``session``: see :func:`read_band`."""
    read_grid = grid.window(*block.read_window(grid))
    inner = block.inner(grid)
    bands = (mask_band(before), mask_band(after))
    values = list(pool.map(lambda sb: read_band(sb[0], sb[1], read_grid, session=session),
                           ((before, bands[0]), (after, bands[1]))))
    clear_b = _clear_mask(bands[0], values[0], buffer_px)
    clear_a = _clear_mask(bands[1], values[1], buffer_px)
    aoi = grid.window(block.rows, block.cols).aoi()
    counts = {"aoi": int(aoi.sum()), "clear_before": int((clear_b[inner] & aoi).sum()),
              "clear_after": int((clear_a[inner] & aoi).sum()),
              "clear_both": int((clear_b[inner] & clear_a[inner] & aoi).sum())}
    return aoi, clear_b, clear_a, counts


def start_band_reads(grid: Grid, block: Block, before: SceneRef, after: SceneRef, bands: list[str],
                     pool: ThreadPoolExecutor, session: CogSession | None = None) -> list[Future]:
    """The DN reads of ``bands`` of both scenes over the block's halo'd window, submitted to ``pool``
    (before's bands, then after's): :func:`read_block`'s ``dns``, started while the masks are read."""
    read_grid = grid.window(*block.read_window(grid))
    return [pool.submit(read_band, s, b, read_grid, session=session) for s in (before, after) for b in bands]


def read_block(grid: Grid, block: Block, before: SceneRef, after: SceneRef, bands: list[str],
               settings: AnalysisSettings, pool: ThreadPoolExecutor,
               masks: tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]],
               session: CogSession | None = None, dns: list[Future] | None = None) -> BlockPair:
    """Reflectance of ``bands`` for both scenes over the block, the haze test on what the cloud masks
    missed, and the valid mask. ``masks`` is :func:`read_block_masks`' answer for this block; ``session``:
    see :func:`read_band`; ``dns``: :func:`start_band_reads` of this block, when already started."""
    aoi, clear_b, clear_a, counts = masks
    inner = block.inner(grid)
    jobs = [(s, b) for s in (before, after) for b in bands]
    if dns is None:
        dns = start_band_reads(grid, block, before, after, bands, pool, session)
    dns = [f.result() for f in dns]
    counts = dict(counts)
    # The metadata's rule against the clear red DNs (cloud-masked, before the haze test), counted here and
    # judged over the whole area by the caller (eo.radiometry.check_pixel_counts).
    for label, dn, clear_halo in (("before", dns[0], clear_b), ("after", dns[len(bands)], clear_a)):
        where = clear_halo[inner] & aoi & ~np.ma.getmaskarray(dn)[inner]
        below, total, darkest = radiometry.red_counts(dn.data[inner][where])
        counts[f"red_below_offset_{label}"], counts[f"red_clear_{label}"] = below, total
        if darkest is not None:
            counts[f"red_darkest_{label}"] = darkest
    arrays = [_reflectance(s, b, dn) for (s, b), dn in zip(jobs, dns, strict=True)]
    del dns
    refl_b = {b: arrays[i] for i, b in enumerate(bands)}
    refl_a = {b: arrays[len(bands) + i] for i, b in enumerate(bands)}
    clears = []
    for label, refl, clear_halo in (("before", refl_b, clear_b), ("after", refl_a, clear_a)):
        clear = clear_halo[inner].copy()
        if "blue" in bands:
            hazy = haze_mask(refl["blue"], refl["red"], settings.cloud_buffer_px)[inner] & clear & aoi
            counts[f"hazy_{label}"] = int(hazy.sum())
            clear &= ~hazy  # the scene's clear mask is what the spectral step trusts
        clears.append(clear)
    refl_b = {b: a[inner] for b, a in refl_b.items()}
    refl_a = {b: a[inner] for b, a in refl_a.items()}
    valid = aoi & clears[0] & clears[1]
    for band in bands:
        valid &= np.isfinite(refl_b[band]) & np.isfinite(refl_a[band])
    counts["valid"] = int(valid.sum())
    return BlockPair(block=block, grid=grid.window(block.rows, block.cols), aoi=aoi, before=refl_b, after=refl_a,
                     valid=valid, clear_after=clears[1], counts=counts)


def cloudy_reason(both: float, before: float, after: float, settings: AnalysisSettings, how: str = "") -> str:
    return (
        f"too cloudy to compare: only {both:.0%} of the area is clear in both scenes (before {before:.0%}, "
        f"after {after:.0%}; minimum {settings.min_valid_fraction:.0%}; clouds and shadows buffered by "
        f"{settings.cloud_buffer_px} px{how})"
    )


def read_rgb(scene: SceneRef, grid: Grid, *, use_overviews: bool = False) -> np.ndarray:
    """True-colour reflectance (3, H, W) of one scene on ``grid`` (video frames, model chips)."""
    bands = [b for b in ("red", "green", "blue") if b in scene.assets]
    if len(bands) < 3:
        bands = ["red", "red", "red"] if "red" in scene.assets else []
    if not bands:
        raise SkipAnalysis(f"scene {scene.item_id} has no visible bands")
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="cog-read") as pool:
        arrays = list(pool.map(lambda b: _reflectance(scene, b, read_band(scene, b, grid,
                                                                          use_overviews=use_overviews)), bands))
    return np.stack(arrays)

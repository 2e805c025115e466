"""A pair analysed block by block: bounded memory whatever the area's size, results merged.

``analyse_pair(geom, before, after, settings)`` — the spectral analysis of one pair without the model:

1. the area's grid (:func:`workers.raster.common_grid`) and a survey of it in blocks of whole chips
   (AOI pixel count and extent, chips) — no full-area mask;
2. large areas (more than one block): a coarse cloud screen from the masks' overviews
   (``eo.cog.read_aoi(use_overviews=True)``); a pair clearly too cloudy is skipped before any
   reflectance is read (the reason says the figures are estimates);
3. per block (:func:`workers.raster.read_block_masks`, :func:`workers.raster.read_block`): cloud masks
   with a halo, reflectance, haze test, validity; the spectral statistics and region fragments
   (:class:`workers.spectral.SpectralAccumulator`); and every ``f``-th pixel of both scenes' true
   colour into the thumbnail canvas (``f`` = 1 up to :data:`workers.render.MAX_SIDE` px);
4. the exact clear fractions decide skips (same numbers and wording as one whole-area read), regions are
   merged across block edges, and the thumbnails, video frames and model chips come from the canvas or
   from small window reads — never from a full-area array.

The next block is read while one is analysed (all its band reads at once). Peak memory is two blocks of
both scenes plus the thumbnail canvas, the regions (at most :data:`workers.spectral.MAX_REGIONS` whole ones
held) and GDAL's block cache (capped at :data:`eo.cog.BLOCK_CACHE_BYTES`): peak RSS on bench_pipeline's
pairs at the default 1152 px: 0.51 GB at 1,000 km², 0.64 GB at 10,000 km². Every asset is
opened once for the pair (:class:`eo.cog.CogSession`), so the tiles a block's halo shares with the blocks
read before it come from that cache instead of being fetched and decoded again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from rasterio.features import rasterize
from shapely.geometry.base import BaseGeometry

from core.config import AnalysisSettings
from eo import radiometry
from eo.cog import CogSession
from eo.masks import clear_mask
from workers import render
from workers.raster import (
    BLOCK_PX,
    READ_THREADS,
    BlockPair,
    Chip,
    Grid,
    SceneRaster,
    SceneRef,
    SkipAnalysis,
    Survey,
    cloudy_reason,
    common_grid,
    harmonisation_rule,
    mask_band,
    pair_bands,
    radiometry_record,
    read_band,
    read_block,
    read_block_masks,
    read_rgb,
    rule_of,
    start_band_reads,
    survey,
)
from workers.spectral import CLASS_CODES, PairFacts, SpectralAccumulator, SpectralResult

logger = logging.getLogger(__name__)

# A coarse screen below this share of the threshold skips the pair without reading reflectance; anything
# closer is decided by the exact block figures.
SCREEN_MARGIN = 0.5


@dataclass
class Thumbs:
    """Every ``factor``-th pixel of both scenes' true colour on ``grid`` (a decimated copy of the area grid)."""

    grid: Grid
    factor: int
    before: np.ndarray  # float32 (3, h, w) reflectance
    after: np.ndarray
    valid: np.ndarray  # bool (h, w)
    aoi: np.ndarray  # bool (h, w)

    @classmethod
    def for_grid(cls, grid: Grid) -> Thumbs:
        factor = max(1, math.ceil(max(grid.width, grid.height) / render.MAX_SIDE))
        small = grid.decimated(factor)
        shape = (small.height, small.width)
        return cls(small, factor, np.full((3, *shape), np.nan, np.float32), np.full((3, *shape), np.nan, np.float32),
                   np.zeros(shape, bool), np.zeros(shape, bool))

    def add(self, block, rgb_before: np.ndarray, rgb_after: np.ndarray) -> None:
        """Every ``factor``-th pixel of the block's (3, h, w) true colour of both scenes."""
        r_off, c_off = self._offsets(block)
        f = self.factor
        self._put(block, rgb_before[:, r_off::f, c_off::f], rgb_after[:, r_off::f, c_off::f])

    def add_block(self, block) -> None:
        """:meth:`add` with the block's own reflectance, decimated before the bands are stacked (no
        full-block true-colour copy: 2 × 16 MB per 1152 px block)."""
        (r_off, c_off), f = self._offsets(block), self.factor

        def picked(refl: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {b: refl[b][r_off::f, c_off::f] for b in ("red", "green", "blue") if b in refl}

        self._put(block, render.rgb_of(picked(block.before)), render.rgb_of(picked(block.after)))

    def _offsets(self, block) -> tuple[int, int]:
        return (-block.block.rows.start) % self.factor, (-block.block.cols.start) % self.factor

    def _put(self, block, small_before: np.ndarray, small_after: np.ndarray) -> None:
        f = self.factor
        rows, cols = block.block.rows, block.block.cols
        r_off, c_off = self._offsets(block)
        picked_valid = block.valid[r_off::f, c_off::f]
        h, w = picked_valid.shape
        tr = slice((rows.start + r_off) // f, (rows.start + r_off) // f + h)
        tc = slice((cols.start + c_off) // f, (cols.start + c_off) // f + w)
        self.before[:, tr, tc] = small_before
        self.after[:, tr, tc] = small_after
        self.valid[tr, tc] = picked_valid
        self.aoi[tr, tc] = block.aoi[r_off::f, c_off::f]


@dataclass
class PreparedPair:
    """Everything known about a pair after the block pass (no full-area arrays)."""

    grid: Grid
    survey: Survey
    before: SceneRaster
    after: SceneRaster
    valid_fraction: float
    before_clear_fraction: float
    after_clear_fraction: float
    bands: tuple[str, ...]
    thumbs: Thumbs
    blocks: int
    notes: list[str] = field(default_factory=list)

    @property
    def chips(self) -> list[Chip]:
        return self.survey.chips


def analyse_pair(geom_4326: BaseGeometry, before: SceneRef, after: SceneRef, settings: AnalysisSettings,
                 *, block_px: int = BLOCK_PX,
                 on_block: Callable[[BlockPair], None] | None = None) -> tuple[PreparedPair, SpectralResult]:
    """The prepared pair and its spectral result; :class:`SkipAnalysis` when the pair cannot be compared.
    ``on_block`` sees every block while it is in memory (confirmation of earlier regions).
    Read errors propagate (:class:`eo.cog.CogReadError`, :class:`eo.security.HrefRefused`,
    :class:`eo.radiometry.RadiometryMismatch`)."""
    grid = common_grid(geom_4326, settings.pixel_size_m)
    bands, notes = pair_bands(before, after)
    plan = survey(grid, settings.chip_size_m, block_px=block_px, halo=settings.cloud_buffer_px)
    # Every asset opened once for the whole pair (not once per block): see eo.cog.CogSession.
    with CogSession() as cogs:
        return _analyse(grid, plan, bands, notes, before, after, settings, cogs, on_block)


def _analyse(grid: Grid, plan: Survey, bands: list[str], notes: list[str], before: SceneRef, after: SceneRef,
             settings: AnalysisSettings, cogs: CogSession,
             on_block: Callable[[BlockPair], None] | None) -> tuple[PreparedPair, SpectralResult]:
    aoi_pixels = max(plan.aoi_pixels, 1)
    thumbs = Thumbs.for_grid(grid)
    spectral = SpectralAccumulator(grid, plan, settings.min_mapping_unit_ha)
    totals: dict[str, int] = {}

    def read(block, pool: ThreadPoolExecutor, masks: Future | None = None) -> BlockPair:
        # Blocks without AOI pixels are read too: the thumbnails show the area in its surroundings.
        # One block: the exact screen decides before any reflectance is fetched. Several: the coarse screen
        # has decided, so the bands are fetched while the masks are.
        dns = start_band_reads(grid, block, before, after, bands, pool, cogs) if len(plan.blocks) > 1 else None
        masks = masks.result() if masks is not None else read_block_masks(
            grid, block, before, after, settings.cloud_buffer_px, pool, cogs)
        if dns is None:
            _screen(masks[3], aoi_pixels, settings)
        return read_block(grid, block, before, after, bands, settings, pool, masks, cogs, dns)

    # The next block is read while this one is analysed (one block ahead: reading waits on the COG server,
    # the analysis on the CPU; two blocks in memory at most).
    with (ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="cog-read") as pool,
          ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-ahead") as ahead):
        first_masks = None
        if len(plan.blocks) > 1:
            # The first block's cloud masks are read while the coarse screen runs (no reflectance before it
            # decides): bench_pipeline's 1,000 km² pair started its first analysis 0.57 s in, ~0.2 s of it
            # the screen's two overview reads one after the other.
            first_masks = ahead.submit(read_block_masks, grid, plan.blocks[0], before, after,
                                       settings.cloud_buffer_px, pool, cogs)
            _coarse_screen(grid, before, after, settings, cogs, pool)
        pending = ahead.submit(read, plan.blocks[0], pool, first_masks) if plan.blocks else None
        for k in range(len(plan.blocks)):
            pair_block = pending.result()
            pending = ahead.submit(read, plan.blocks[k + 1], pool) if k + 1 < len(plan.blocks) else None
            for key, value in pair_block.counts.items():
                if key.startswith("red_darkest_"):
                    totals[key] = min(totals.get(key, value), value)
                else:
                    totals[key] = totals.get(key, 0) + value
            spectral.add(pair_block)
            if on_block is not None:
                on_block(pair_block)
            thumbs.add_block(pair_block)
            del pair_block
    _screen(totals, aoi_pixels, settings)
    # The metadata's rule against the clear red pixels of the whole area (raises RadiometryMismatch).
    for scene, label in ((before, "before"), (after, "after")):
        note = radiometry.check_pixel_counts(scene.item_id, rule_of(scene, "red"),
                                             totals.get(f"red_below_offset_{label}", 0),
                                             totals.get(f"red_clear_{label}", 0), totals.get(f"red_darkest_{label}"))
        if note:
            notes.append(note)
    for label in ("before", "after"):
        if totals.get(f"hazy_{label}"):
            notes.append(f"{totals[f'hazy_{label}']} px of haze or small cloud that the {label} scene's cloud mask "
                         "missed were excluded (blue/red haze test)")
    valid_fraction = totals.get("valid", 0) / aoi_pixels
    if valid_fraction < settings.min_valid_fraction:
        raise SkipAnalysis(
            f"only {valid_fraction:.0%} of the area has clear data in both scenes (minimum "
            f"{settings.min_valid_fraction:.0%}); the scenes cover it only partly"
        )
    pair = PreparedPair(
        grid=grid, survey=plan,
        before=SceneRaster(before, harmonisation_rule(before, "red")[2], radiometry_record(before)),
        after=SceneRaster(after, harmonisation_rule(after, "red")[2], radiometry_record(after)),
        valid_fraction=valid_fraction, before_clear_fraction=totals.get("clear_before", 0) / aoi_pixels,
        after_clear_fraction=totals.get("clear_after", 0) / aoi_pixels, bands=tuple(bands), thumbs=thumbs,
        blocks=len(plan.blocks), notes=notes)
    result = spectral.finish(PairFacts(grid=grid, survey=plan, valid_fraction=valid_fraction, notes=notes,
                                       acquired=(before.acquired_at, after.acquired_at)))
    logger.info("prepared %s -> %s: %dx%d px in %s (%d blocks), %.0f%% valid, bands %s", before.item_id,
                after.item_id, grid.width, grid.height, grid.crs.to_string(), len(plan.blocks),
                100 * valid_fraction, ",".join(bands))
    return pair, result


def _screen(counts: dict[str, int], aoi_pixels: int, settings: AnalysisSettings) -> None:
    both = counts.get("clear_both", 0) / aoi_pixels
    if both < settings.min_valid_fraction:
        raise SkipAnalysis(cloudy_reason(both, counts.get("clear_before", 0) / aoi_pixels,
                                         counts.get("clear_after", 0) / aoi_pixels, settings))


def _coarse_screen(grid: Grid, before: SceneRef, after: SceneRef, settings: AnalysisSettings,
                   cogs: CogSession | None = None, pool: ThreadPoolExecutor | None = None) -> None:
    """Skip a large pair that is clearly too cloudy, from the cloud masks' overviews (≤ 1024 px a side);
    both scenes' masks read at once when a ``pool`` is given."""
    factor = max(1, math.ceil(max(grid.width, grid.height) / render.MAX_SIDE))
    small = grid.decimated(factor)
    aoi = small.aoi()
    if not aoi.any():
        return
    buffer_px = math.ceil(settings.cloud_buffer_px / factor)
    clear = []
    bands = [mask_band(scene) for scene in (before, after)]

    def read(job: tuple[SceneRef, str]) -> np.ma.MaskedArray:
        return read_band(job[0], job[1], small, use_overviews=True, session=cogs)

    jobs = list(zip((before, after), bands, strict=True))
    for band, values in zip(bands, pool.map(read, jobs) if pool is not None else map(read, jobs), strict=True):
        clear.append(clear_mask(band, values.data, buffer_px) & ~np.ma.getmaskarray(values) & aoi)
    n = int(aoi.sum())
    both = float((clear[0] & clear[1]).sum()) / n
    if both < settings.min_valid_fraction * SCREEN_MARGIN:
        raise SkipAnalysis(cloudy_reason(both, float(clear[0].sum()) / n, float(clear[1].sum()) / n, settings,
                                         how=f"; estimated on a {small.pixel_size:g} m overview of the cloud masks"))


def chip_images(pair: PreparedPair, chip: Chip, value_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(before, after) uint8 (h, w, 3) of one chip at full resolution, read as a small window."""
    sub = pair.grid.window(*chip.window)
    return (render.to_uint8(read_rgb(pair.before.scene, sub), value_range),
            render.to_uint8(read_rgb(pair.after.scene, sub), value_range))


def frame(scene: SceneRef, pair: PreparedPair) -> np.ndarray:
    """True colour (3, h, w) of another scene on the thumbnail grid (overview-aware when decimated)."""
    return read_rgb(scene, pair.thumbs.grid, use_overviews=pair.thumbs.factor > 1)


def overlay_classes(pair: PreparedPair, regions: list) -> np.ndarray:
    """uint8 class codes of the kept regions on the thumbnail grid (0 elsewhere): the overlay's tint."""
    grid = pair.thumbs.grid
    if not regions:
        return np.zeros((grid.height, grid.width), dtype=np.uint8)
    return rasterize([(r.geom_utm, CLASS_CODES[r.change_class]) for r in regions], out_shape=(grid.height, grid.width),
                     transform=grid.transform, fill=0, dtype="uint8")

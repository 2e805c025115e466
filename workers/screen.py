"""Time-series screen of changed regions: is a bi-temporal change what the season does, or a departure?

Two dates alone call phenology change: an autumn date against a leaf-off spring date drops NDVI over the
whole forest, a spring → summer pair raises it. So every region of an analysis is screened against the
area's clear history (the ``clear`` observations the service already records) before it can alert:

1. **Harmonic model** (enough history: at least :data:`MIN_HISTORY_DATES` clear dates spanning
   :data:`MIN_HISTORY_DAYS`): per pixel, NDVI of the last :data:`HISTORY_DAYS` of clear dates before the
   after acquisition is fitted with ``nrt`` (EC JRC, Vanderpol et al.; ``nrt.monitor.ccdc.CCDC``: a
   second-order harmonic model without trend, robust iteratively reweighted least squares, so a few
   residual clouds in the history do not bend the fit). The after acquisition's residual against the
   model's prediction for its day of year, minus the median residual of the window's vegetated pixels
   (a scene-wide offset is haze or illumination, not a change on the ground), *departs* when it is beyond
   ``max(SENSITIVITY × pixel RMSE, MIN_DEPARTURE)`` in the direction of the region's class
   (nrt's CCDC rule: 3 × RMSE). A loss departure on a green-up date by a pixel that lagged the forest as
   much at the same time of an earlier year and then leafed out (:func:`own_spring_lag`: a late-leafing
   stand) is seasonal.
2. **Scene-normalised fallback** (history too short — a new area, the first year of a mission): the
   pixel's dNDVI minus the median dNDVI of the window's vegetated pixels must still pass the classifier's
   threshold (:attr:`workers.spectral.Thresholds.ndvi_drop` / ``ndvi_rise``): leaf-off lowers the whole
   forest together, a cut lowers its own pixels far more than the rest.

A region is ``departure`` when at least :data:`DEPARTURE_SHARE` of its screened pixels depart, otherwise
``seasonal``; with the model, a loss region whose departing pixels mostly do not look bare (red − blue
reflectance below :data:`BARE_REDNESS`: haze and thin cloud brighten flat, shadows darken) is
``atmospheric`` (the fallback does not judge this: without the pixel's own history a half-regrown patch
— 2017-07-11 → 2018-08-25, red − blue ≈ 0.025 — looks as flat as haze); water change
(NDWI) and regions without NDVI values are ``unscreened``.

3. **Loss the pair missed.** A cut first seen on a leaf-off → leaf-on pair raises NDVI like the rest of
   the scene, so the pair's dNDVI misses it. With the model, pixels where it expects full canopy
   (:data:`EXPECTED_FOREST`) and sees at most :data:`FOUND_MAX_NDVI`, departing as in 1, outside the pair's
   own departing loss regions, become ``vegetation_loss`` regions of their own (8-connected, at least the
   minimum mapping unit together with the patches within :data:`CLUSTER_GAP_M` — group-selection gaps of one
   harvest —, at least :data:`DEPARTURE_SHARE` of their pixels bare-looking — judged per region like the
   atmospheric verdict, since a patch's mixed edge pixels and slash are not all red; their before values are
   what the forest should show that day, the model lifted by the scene offset once the forest has leafed out
   ahead of it (:func:`expected_canopy`);
   ``statistics.screen.found_by``). Not on a date that has atmospheric regions. The verdict is stored
per region finding (``findings.screen_verdict``, revision 0010) with its figures in
``statistics["screen"]``; :mod:`workers.confirmation` never alerts a seasonal region nor links later
re-detections to it.

Reads: red, nir (blue for the haze test when present) and the cloud mask of each history scene over the
area's grid (areas over :data:`MAX_WINDOW_PX`: the regions' bounding window plus :data:`MARGIN_PX`, and
nothing looked for outside it), cached per worker process
(:data:`CACHE_BYTES`), since consecutive analyses of an area share most of their history.
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
from rasterio.features import geometry_mask, shapes
from shapely.geometry import mapping, shape

from eo.cog import CogReadError
from eo.masks import haze_mask
from eo.security import HrefRefused
from workers import atmosphere
from workers.arraycache import ArrayCache
from workers.raster import Grid, SceneRef, SkipAnalysis, _clear_mask, _reflectance, mask_band, read_band
from workers.regions import Region, shape_measures, to_4326
from workers.spectral import THRESHOLDS, Thresholds

logger = logging.getLogger(__name__)

SEASONAL, DEPARTURE, UNSCREENED, ATMOSPHERIC = "seasonal", "departure", "unscreened", "atmospheric"
HISTORY_DAYS = 3 * 365  # older dates describe a forest that may not stand any more
MAX_HISTORY = 80  # clear dates read at most (the newest)
MIN_HISTORY_DATES = 12  # a second-order harmonic has 5 coefficients; 12 dates leave residuals to judge by
MIN_HISTORY_DAYS = 330  # the model must have seen (nearly) every season
SENSITIVITY = 3.0  # × the pixel's RMSE of the fit (nrt CCDC default)
MIN_DEPARTURE = 0.2  # NDVI: never finer than the classifier's own threshold
DEPARTURE_SHARE = 0.5  # of a region's screened pixels
MIN_PIXEL_HISTORY = 8  # clear history looks a pixel needs to be judged by the model
MARGIN_PX = 30  # around the regions' bounding box: context for the scene-wide offset
MAX_WINDOW_PX = 4_000_000  # beyond (a 20 km × 20 km window) the regions are screened by the fallback only
CACHE_BYTES = 256 * 2**20
VEGETATED = 0.3  # NDVI: pixels whose median residual / dNDVI is the scene-wide offset
BARE_REDNESS = 0.03  # red − blue reflectance: bare soil, slash and roads are red; haze, thin cloud, shadow flat
EXPECTED_FOREST = 0.7  # NDVI the model expects where it looks for loss the pair missed (full canopy)
FOUND_MAX_NDVI = 0.6  # ... and what is left there: bare or barely vegetated
LAG_WINDOW_DAYS = 15  # day-of-year distance of an earlier spring's look at the same stage of leaf-out
LAG_SHARE = 0.5  # of today's lag behind the scene that an earlier spring must have shown (see own_spring_lag)
MIN_LAG = 0.1  # NDVI below the scene: clearly behind the forest round it, then and now
GREEN_UP_GAP = 0.05  # NDVI the forest (window median) is below its summer canopy (90th percentile of dates)
LAG_RECOVERY_DAYS = 45  # ... and full canopy (EXPECTED_FOREST) again within this many days: leafed out late
CLUSTER_GAP_M = 60.0  # m of forest between found patches of one harvest (about two tree heights of a mature stand)
NOT_CHANGE = (SEASONAL, ATMOSPHERIC)  # verdicts that keep a region from alerting
NDVI_CLASSES = {"vegetation_loss": -1, "new_built_up_or_bare": -1, "vegetation_gain": +1}


@dataclass
class Verdict:
    verdict: str  # departure | seasonal | unscreened
    statistics: dict[str, Any] = field(default_factory=dict)


_CACHE = ArrayCache(CACHE_BYTES)


def clear_looks(scene: SceneRef, grid: Grid, buffer_px: int) -> np.ndarray:
    """(2, H, W) float32 of ``scene`` — its acquisition's mosaic: the first granule, no-data filled from
    ``scene.others`` (:func:`workers.raster.read_band`) — on ``grid``: NDVI and red − blue reflectance (NaN
    without a blue band), NaN where the cloud mask (buffered) or the haze test says not clear or where no
    granule has data."""
    # The granules are part of the key: a granule of the acquisition published late changes the mosaic.
    key = (scene.scene_id, scene.item_id, tuple(o.scene_id for o in scene.others), grid.crs.to_string(),
           tuple(grid.transform)[:6], grid.width, grid.height, buffer_px, scene.offset_m)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    mask_key = mask_band(scene)
    bands = ["red", "nir"] + (["blue"] if "blue" in scene.assets else [])
    with ThreadPoolExecutor(max_workers=len(bands) + 1, thread_name_prefix="screen-read") as pool:
        raw = list(pool.map(lambda b: read_band(scene, b, grid), [mask_key, *bands]))
    clear = _clear_mask(mask_key, raw[0], buffer_px)
    refl = {b: _reflectance(scene, b, dn) for b, dn in zip(bands, raw[1:], strict=True)}
    if "blue" in refl:
        clear &= ~haze_mask(refl["blue"], refl["red"], buffer_px)
    with np.errstate(divide="ignore", invalid="ignore"):
        ndvi = (refl["nir"] - refl["red"]) / (refl["nir"] + refl["red"])
    ok = clear & np.isfinite(ndvi)
    redness = refl["red"] - refl["blue"] if "blue" in refl else np.full(ndvi.shape, np.nan, dtype=np.float32)
    layers = np.stack([np.where(ok, ndvi, np.nan), np.where(ok, redness, np.nan)]).astype(np.float32)
    _CACHE.put(key, layers)
    return layers


def window_of(grid: Grid, regions: list[Region]) -> Grid | None:
    """The whole grid when it is at most :data:`MAX_WINDOW_PX` (loss the pair missed is looked for too);
    otherwise the sub-grid covering every region's bounding box plus :data:`MARGIN_PX` (None: no region)."""
    if grid.width * grid.height <= MAX_WINDOW_PX:
        return grid
    if not regions:
        return None
    t, px = grid.transform, grid.pixel_size
    minx = min(r.geom_utm.bounds[0] for r in regions)
    miny = min(r.geom_utm.bounds[1] for r in regions)
    maxx = max(r.geom_utm.bounds[2] for r in regions)
    maxy = max(r.geom_utm.bounds[3] for r in regions)
    c0, c1 = math.floor((minx - t.c) / px) - MARGIN_PX, math.ceil((maxx - t.c) / px) + MARGIN_PX
    r0, r1 = math.floor((t.f - maxy) / px) - MARGIN_PX, math.ceil((t.f - miny) / px) + MARGIN_PX
    return grid.window(slice(r0, r1), slice(c0, c1))


def harmonic_fit(stack: np.ndarray, dates: list[datetime], targets: list[datetime]
                 ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Fit nrt's harmonic model (CCDC class, order 2, no trend, RIRLS) to ``stack`` (T, H, W NDVI, NaN =
    no look) and predict ``targets``: (predictions (H, W) per target, RMSE (H, W), looks per pixel (H, W)).
    Pixels with fewer than :data:`MIN_PIXEL_HISTORY` looks are NaN in every output."""
    import pandas as pd
    import xarray as xr
    from nrt.monitor.ccdc import CCDC

    looks = np.isfinite(stack).sum(axis=0)
    enough = (looks >= MIN_PIXEL_HISTORY).astype(np.uint8)
    h, w = stack.shape[1:]
    da = xr.DataArray(stack, dims=("time", "y", "x"),
                      coords={"time": pd.to_datetime([d.replace(tzinfo=None) for d in dates]),
                              "y": np.arange(h, dtype=float)[::-1], "x": np.arange(w, dtype=float)})
    model = CCDC(trend=False, harmonic_order=2, mask=enough)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-NaN pixels outside the mask: nrt's nanmean warns per pixel
        model.fit(da, method="RIRLS", screen_outliers=None)
    ok = enough == 1
    preds = [np.where(ok, model.predict(t.replace(tzinfo=None)), np.nan) for t in targets]
    rmse = np.where(ok, model.rmse, np.nan)
    return preds, rmse, looks


def scene_level(ndvi: np.ndarray, aoi: np.ndarray) -> float:
    """A look's level: the median NDVI of the window's vegetated pixels (NaN: fewer than 10 of them clear)."""
    veg = aoi & np.isfinite(ndvi) & (ndvi >= VEGETATED)
    return float(np.median(ndvi[veg])) if veg.sum() >= 10 else np.nan


def summer_canopy(levels: list[float]) -> float:
    """The forest's summer canopy NDVI: the 90th percentile of the history looks' levels (NaN: none)."""
    return float(np.nanpercentile(levels, 90)) if np.isfinite(levels).any() else np.nan


def expected_canopy(pred_a: np.ndarray, offset: float, stack: np.ndarray, ndvi_a: np.ndarray, aoi: np.ndarray
                    ) -> np.ndarray:
    """(H, W) NDVI the forest should show on the after date where the screen looks for loss the pair missed:
    the model's prediction ``pred_a``, or — when the forest round it already stands at its summer canopy
    (today's level within :data:`GREEN_UP_GAP` of :func:`summer_canopy` of the history ``stack``) while the
    scene reads at least :data:`GREEN_UP_GAP` above the model (``offset``, the median residual) — the model
    plus that offset. Two harmonics a year lag a fast leaf-out: on 2018-05-02 of the sample the scene reads
    0.105 above the model, and a west patch found at NDVI 0.55 where the model expected 0.73 was compared on
    2018-05-22 with 0.73 and dismissed (0.60 there: not 0.2 lower) although it stayed bare; against 0.83 it is
    confirmed."""
    level_now = scene_level(ndvi_a, aoi)
    canopy = summer_canopy([scene_level(look, aoi) for look in stack])
    if offset >= GREEN_UP_GAP and level_now >= canopy - GREEN_UP_GAP:
        return pred_a + offset
    return pred_a


def own_spring_lag(stack: np.ndarray, dates: list[datetime], after_at: datetime, ndvi_a: np.ndarray,
                   aoi: np.ndarray) -> np.ndarray:
    """bool (H, W): pixels that lag the forest round them today as they did at the same time of an earlier
    year, and leafed out fully soon after then — a stand that leafs out late (another species, a frost
    hollow, a north slope), not a cut. Two smooth harmonics a year cannot follow a green-up a week or two
    later than the forest's, so on a green-up date such a stand departs from the model every spring.

    ``stack``/``dates``: the history (T, H, W NDVI, NaN = no look). A look's *level* is the median NDVI of
    the window's vegetated pixels, its *lag* a pixel's NDVI minus that level. Only on a green-up date —
    today's level at least :data:`GREEN_UP_GAP` below the summer canopy (90th percentile of the history's
    levels) — a pixel qualifies when it lags by at least :data:`MIN_LAG` today and in one look of an earlier
    year (≥ 300 days back), itself a green-up look within :data:`LAG_WINDOW_DAYS` of today's day of year,
    it lagged by at least :data:`MIN_LAG` and :data:`LAG_SHARE` of today's lag (leaf-out dates move by a week
    or two between years, and the lag with them), and read full canopy (:data:`EXPECTED_FOREST`) within
    :data:`LAG_RECOVERY_DAYS` after that look — a cleared patch stays bare for the season."""
    levels = [scene_level(look, aoi) for look in stack]
    canopy = summer_canopy(levels)
    level_now = scene_level(ndvi_a, aoi)
    out = np.zeros(ndvi_a.shape, bool)
    # Only on green-up dates (the forest round it still below its summer canopy): in full leaf a pixel
    # behind the forest is a pixel without its canopy, whatever it did in spring.
    if not level_now <= canopy - GREEN_UP_GAP:
        return out
    now = ndvi_a - level_now
    doy = after_at.timetuple().tm_yday
    for k, day in enumerate(dates):
        gap = abs(day.timetuple().tm_yday - doy)
        if (after_at - day).days < 300 or min(gap, 365 - gap) > LAG_WINDOW_DAYS or \
                not levels[k] <= canopy - GREEN_UP_GAP:
            continue
        later = [j for j, d in enumerate(dates) if 0 < (d - day).days <= LAG_RECOVERY_DAYS]
        if not later:
            continue
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # all-NaN pixels: no look in the recovery window
            recovered = np.nanmax(stack[later], axis=0) >= EXPECTED_FOREST
            then = stack[k] - levels[k]
            out |= (now <= -MIN_LAG) & (then <= -MIN_LAG) & (then <= LAG_SHARE * now) & recovered
    return out


def _history_stack(past: list[SceneRef], window: Grid, buffer_px: int) -> tuple[np.ndarray | None, list[SceneRef]]:
    """(T, H, W) NDVI of the history scenes that could be read, and those scenes."""
    looks, looked = [], []
    for scene in past:
        try:
            looks.append(clear_looks(scene, window, buffer_px)[0])
            looked.append(scene)
        except (CogReadError, HrefRefused, SkipAnalysis) as exc:  # one unreadable date: screen without it
            logger.warning("screen: history scene %s left out: %s", scene.item_id, exc)
    return (np.stack(looks) if looks else None), looked


@dataclass
class Screened:
    verdicts: list[Verdict]  # one per region given, same order
    found: list[Region]  # loss regions the pair's dNDVI missed (leaf-off → leaf-on pairs), all departures
    found_verdicts: list[Verdict]


def screen(regions: list[Region], grid: Grid, before: SceneRef, after: SceneRef, history: list[SceneRef],
           buffer_px: int, min_mapping_unit_ha: float, t: Thresholds = THRESHOLDS) -> Screened:
    """Verdicts of ``regions`` and the loss regions found by the model alone. ``history``: the area's clear
    scenes before ``after`` (any order; ``before`` may be among them); only the newest :data:`MAX_HISTORY`
    within :data:`HISTORY_DAYS` are used."""
    if not regions and len(history) < MIN_HISTORY_DATES:
        return Screened([], [], [])
    window = window_of(grid, regions)
    if window is None:
        return Screened([], [], [])
    screened = [r for r in regions if r.change_class in NDVI_CLASSES]
    if regions and not screened:
        return Screened([Verdict(UNSCREENED, {"why": "not an NDVI change class"}) for _ in regions], [], [])
    past = sorted({s.scene_id: s for s in history
                   if s.acquired_at < after.acquired_at
                   and (after.acquired_at - s.acquired_at).days <= HISTORY_DAYS}.values(),
                  key=lambda s: s.acquired_at)[-MAX_HISTORY:]
    ndvi_b = clear_looks(before, window, buffer_px)[0]
    ndvi_a, redness_a = clear_looks(after, window, buffer_px)
    small = window.width * window.height <= MAX_WINDOW_PX
    stack = None
    if small and len(past) >= MIN_HISTORY_DATES:
        stack, past = _history_stack(past, window, buffer_px)
    span = (after.acquired_at - past[0].acquired_at).days if past else 0
    use_model = stack is not None and len(past) >= MIN_HISTORY_DATES and span >= MIN_HISTORY_DAYS
    common: dict[str, Any] = {"history_dates": len(past), "history_days": span}
    aoi = window.aoi()
    d_ndvi = ndvi_a - ndvi_b
    vegetated = aoi & np.isfinite(d_ndvi) & (ndvi_b >= VEGETATED)
    scene_d = float(np.median(d_ndvi[vegetated])) if vegetated.any() else 0.0
    pred_a = pred_b = rmse = None
    late_leafing = np.zeros(aoi.shape, bool)
    offset = 0.0
    if use_model:
        (pred_a, pred_b), rmse, _ = harmonic_fit(stack, [s.acquired_at for s in past],
                                                 [after.acquired_at, before.acquired_at])
        res = ndvi_a - pred_a
        ok = aoi & np.isfinite(res) & (pred_a >= VEGETATED)
        offset = float(np.median(res[ok])) if ok.any() else 0.0
        late_leafing = own_spring_lag(stack, [s.acquired_at for s in past], after.acquired_at, ndvi_a, aoi)
        common.update(method="nrt CCDC harmonic (order 2, RIRLS), 3 × RMSE", scene_offset=round(offset, 3))
    else:
        why = ("window too large for the model" if not small else
               f"history too short ({len(past)} clear dates over {span} days; the model needs "
               f"{MIN_HISTORY_DATES} over {MIN_HISTORY_DAYS})")
        common.update(method="scene-normalised dNDVI", why=why)
    common["scene_dndvi"] = round(scene_d, 3)

    limit = np.maximum(SENSITIVITY * rmse, MIN_DEPARTURE) if rmse is not None else None
    with np.errstate(invalid="ignore"):
        looks_bare = redness_a >= BARE_REDNESS if np.isfinite(redness_a).any() else np.ones(aoi.shape, bool)
    out: list[Verdict] = []
    t_win = window.transform
    for region in regions:
        sign = NDVI_CLASSES.get(region.change_class)
        if sign is None:
            out.append(Verdict(UNSCREENED, {"why": "not an NDVI change class"}))
            continue
        inside = geometry_mask([mapping(region.geom_utm)], out_shape=(window.height, window.width),
                               transform=t_win, invert=True) & np.isfinite(d_ndvi)
        stats: dict[str, Any] = dict(common)
        threshold = t.ndvi_drop if sign < 0 else t.ndvi_rise
        relative = d_ndvi - scene_d
        departs = sign * relative >= sign * threshold
        if pred_a is not None:
            modelled = inside & np.isfinite(pred_a) & np.isfinite(rmse)
            model_departs = sign * (ndvi_a - pred_a - offset) >= limit
            if sign < 0:  # a stand that leafs out late every spring is the season, not a loss
                model_departs &= ~late_leafing
            # Pixels the model cannot judge (too few looks of their own) keep the fallback's answer.
            departs = np.where(modelled, model_departs, departs)
            if modelled.any():
                stats.update(expected_ndvi=round(float(np.mean(pred_a[modelled])), 3),
                             expected_dndvi=round(float(np.mean((pred_a - pred_b)[modelled])), 3),
                             rmse=round(float(np.median(rmse[modelled])), 3),
                             modelled_share=round(float(modelled.sum()) / max(int(inside.sum()), 1), 3))
        n = int(inside.sum())
        if n == 0:
            out.append(Verdict(UNSCREENED, {**stats, "why": "no pixel of the region clear in both scenes"}))
            continue
        share = float(departs[inside].sum()) / n
        n_departs = int((departs & inside).sum())
        bare_share = float((departs & inside & looks_bare).sum()) / n_departs if n_departs else 0.0
        stats.update(departure_share=round(share, 3), after_ndvi=round(float(np.mean(ndvi_a[inside])), 3),
                     before_ndvi=round(float(np.mean(ndvi_b[inside])), 3),
                     relative_dndvi=round(float(np.mean(relative[inside])), 3), pixels_screened=n)
        if share < DEPARTURE_SHARE:
            verdict = SEASONAL
        elif sign < 0 and bare_share < DEPARTURE_SHARE and pred_a is not None:
            # NDVI fell but the ground does not look bare: brightening as flat as haze or thin cloud, or a
            # shadow's darkening — what the cloud mask missed, not a change on the ground.
            verdict = ATMOSPHERIC
            stats["bare_looking_share"] = round(bare_share, 3)
        else:
            verdict = DEPARTURE
        out.append(Verdict(verdict, stats))
    _atmosphere(regions, out, after, window, ndvi_a)
    found: list[Region] = []
    found_verdicts: list[Verdict] = []
    # A date on which the screen saw haze or shadow is not trusted to find loss on its own.
    if pred_a is not None and not any(v.verdict == ATMOSPHERIC for v in out):
        with np.errstate(invalid="ignore"):
            expected = expected_canopy(pred_a, offset, stack, ndvi_a, aoi)
            lost = (aoi & np.isfinite(ndvi_a) & np.isfinite(pred_a) & (expected >= EXPECTED_FOREST)
                    & (ndvi_a - pred_a - offset <= -limit) & (ndvi_a <= FOUND_MAX_NDVI) & ~late_leafing)
        taken = [r.geom_utm for r, v in zip(regions, out, strict=True)
                 if v.verdict == DEPARTURE and NDVI_CLASSES.get(r.change_class) == -1]
        if taken:
            lost &= ~geometry_mask([mapping(g) for g in taken], out_shape=lost.shape, transform=t_win, invert=True)
        found, found_verdicts = _found_regions(lost, looks_bare, window, ndvi_a, ndvi_b, expected, d_ndvi,
                                               min_mapping_unit_ha, common)
        _atmosphere(found, found_verdicts, after, window, ndvi_a)
    logger.info("screen: %s over %d history dates (%s); %d loss regions the pair missed",
                ", ".join(v.verdict for v in out), len(past), common.get("method"), len(found))
    return Screened(out, found, found_verdicts)


def _atmosphere(regions: list[Region], verdicts: list[Verdict], after: SceneRef, window: Grid,
                ndvi_a: np.ndarray) -> None:
    """Departing loss regions that are haze or a cloud's edge become atmospheric (workers/atmosphere.py)."""
    hits = atmosphere.recheck([r.geom_utm for r in regions], [v.verdict for v in verdicts],
                              [NDVI_CLASSES.get(r.change_class) for r in regions], after, window, ndvi_a)
    for v, hit in zip(verdicts, hits, strict=True):
        if hit:
            v.verdict = ATMOSPHERIC
            v.statistics.update(atmosphere=hit[0], **hit[1])


def _found_regions(lost: np.ndarray, looks_bare: np.ndarray, window: Grid, ndvi_a: np.ndarray, ndvi_b: np.ndarray,
                   pred_a: np.ndarray, d_ndvi: np.ndarray, min_ha: float, common: dict[str, Any]
                   ) -> tuple[list[Region], list[Verdict]]:
    """Connected (8-neighbour) departure-loss pixels of which at least :data:`DEPARTURE_SHARE` look bare
    (``looks_bare``), as vegetation-loss regions, each one a patch; the minimum mapping unit ``min_ha`` applies
    to a patch together with the other such patches within :data:`CLUSTER_GAP_M` of it. Their ``before_means`` NDVI
    is what the forest should show (:func:`expected_canopy`), so confirmation compares later looks with the forest
    that should be there (a leaf-off before date would make bare ground look unchanged).

    Bareness is judged per region, as for the pair's own regions (the atmospheric verdict), not per pixel: a
    cut patch's edge pixels (part crown, part soil), its slash and its shaded side depart like its bare centre
    but are not all red; pixel by pixel they split a small patch into pieces under the minimum mapping unit.
    Group-selection harvesting (the bundled site's cuts, benchmarks/reference/METHOD.md) opens gaps of a few
    hundred m² each, tens of metres apart, in one winter: the unit of change is the operation, not each gap,
    and the model's departures (3 × RMSE, NDVI <= 0.6 where canopy is expected, bare-looking) do not fall in
    such clusters by chance."""
    from scipy import ndimage

    ha_per_px = window.pixel_area_m2 / 10_000.0
    labels = rasterio_label(lost)
    n_px = np.bincount(labels.ravel())
    n_bare = np.bincount(labels.ravel(), weights=(lost & looks_bare).ravel(), minlength=len(n_px))
    bare = n_bare >= DEPARTURE_SHARE * n_px
    bare[0] = False
    eligible = bare[labels]
    # Gaps of one operation: patches with at most CLUSTER_GAP_M of forest between them count together.
    reach = max(1, round(CLUSTER_GAP_M / (2 * window.pixel_size)))
    clusters = rasterio_label(ndimage.binary_dilation(eligible, structure=np.ones((3, 3), bool), iterations=reach))
    clusters = np.where(eligible, clusters, 0)
    cluster_px = np.bincount(clusters.ravel())
    geoms, stats = [], []
    for geom, value in shapes(labels, mask=eligible, transform=window.transform, connectivity=8):
        px = labels == int(value)
        n = int(px.sum())
        if cluster_px[clusters[px][0]] * ha_per_px < min_ha:
            continue
        geoms.append(shape(geom))
        stats.append((n, px, int((px & looks_bare).sum()) / n))
    out, verdicts = [], []
    for g, g4326, (n, px, bare) in zip(geoms, to_4326(geoms, window.crs), stats, strict=True):
        elongation, width = shape_measures(g, window.pixel_size)
        finite = px & np.isfinite(d_ndvi)
        out.append(Region(change_class="vegetation_loss", geom_utm=g, geom_4326=g4326, pixels=n,
                          hectares=n * ha_per_px,
                          mean_dndvi=round(float(np.mean(d_ndvi[finite])), 4) if finite.any() else None,
                          linear=bool(elongation >= THRESHOLDS.linear_elongation
                                      and width <= THRESHOLDS.linear_max_width_m),
                          elongation=round(elongation, 2),
                          before_means={"ndvi": round(float(np.mean(pred_a[px])), 4), "ndwi": None, "ndbi": None}))
        verdicts.append(Verdict(DEPARTURE, {**common, "found_by": "time-series screen (the pair's dNDVI missed it)",
                                            "expected_ndvi": round(float(np.mean(pred_a[px])), 3),
                                            "after_ndvi": round(float(np.mean(ndvi_a[px])), 3),
                                            "before_ndvi": round(float(np.nanmean(ndvi_b[px])), 3)
                                            if np.isfinite(ndvi_b[px]).any() else None,
                                            "departure_share": 1.0, "bare_looking_share": round(bare, 3),
                                            "pixels_screened": n}))
    return out, verdicts


def rasterio_label(mask: np.ndarray) -> np.ndarray:
    """int32 labels of the 8-connected components of ``mask`` (0 outside)."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    return labels.astype(np.int32)

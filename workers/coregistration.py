"""Co-registration: each acquisition moved onto its area's geometry before a pair is compared.

Sentinel-2 products before the Global Reference Image refinement (processing baselines < 03/04, 2021) are
not co-registered across the two platforms: over the bundled site Sentinel-2B dates lie a median 0.65 row
(6.5 m) south of the dates' common geometry, 2A dates 0.25 row north (``benchmarks/reference/METHOD.md``
step 4). Compared as imaged, a patch drawn on a 2B date is up to a row south of the ground: a rim of false
loss on one side, a miss on the other.

**Estimate** (once per acquisition per area, stored in ``observations.coregistration``, revision 0019):
NIR reflectance (SCL-clear pixels; the rest filled with the image's median) over the area's analysis grid
— its central :data:`MAX_WINDOW_PX` square for larger areas — is phase-correlated (scikit-image
``phase_cross_correlation``, 1/:data:`UPSAMPLE` px) against each of the :data:`REFERENCES` newest earlier
clear acquisitions of the area already registered, and the acquisition's *position* is the median over
those pairs of (reference's position + pair shift): a network of shifts, not one pair (a single pair's
peak is moved by cuts and phenology; an earlier pair-wise attempt was unstable). Quality gate: a pair
counts when both images share at least :data:`MIN_COMMON_CLEAR` clear pixels and its position is within
:data:`MAX_SHIFT_PX`; the estimate stands when at least :data:`MIN_PAIRS` pairs count and they agree
(median absolute deviation ≤ :data:`MAX_SPREAD_PX`), else it falls back to no shift (``fallback``; not
used as a reference). The first :data:`MIN_PAIRS` registered acquisitions of an area are ``anchor``s:
their positions are measured against each other but they are not moved (too few references to tell);
they pass the same gate (every pair, and the anchor itself ≥ :data:`MIN_COMMON_CLEAR` clear), else fall
back and the next acquisition anchors. A window under :data:`MIN_WINDOW_PX` a side (an area under 320 m
across) falls back: it is not grown around the area, so what is estimated is the area's own ground.
A reference that cannot be read is dropped (the record's ``dropped``); an acquisition that cannot be read
is not registered (no shift, not stored). One area's registrations are serialised by an advisory lock
(:func:`register`). The record keeps the ``item_ids`` it was estimated on: a product upgraded since
(reprocessed, a new processing baseline: same scene row, new item id) is read as imaged until an analysis
re-estimates it, and is no reference meanwhile.

**The area's geometry** is the median position of its registered acquisitions of the last
:data:`CENTRE_DAYS` (this one included), fixed when the acquisition is registered: ``shift`` = position −
that median, in analysis-grid pixels (rows + = features lie south of the area's geometry, cols + = east).

**Applied** (:func:`apply_stored`, :func:`offset_m`) when an acquisition is read for an analysis — the
pair, the screen's history, the video frames: the shift rounded to whole pixels, as an offset of the read
window (:attr:`workers.raster.SceneRef.offset_m`). Whole pixels, not resampling: every read of the
service is nearest neighbour (measured values kept, SCL classes stay classes), and interpolating a
fraction would blur every patch edge across the classifier's thresholds; the reference of the benchmark
moved its images by rounded offsets for the same reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, select, update

from core.config import Settings
from core.db import session_scope
from core.locks import area_lock_key
from core.models import Area, Observation, ObservationStatus, Scene
from eo.cog import CogReadError
from eo.radiometry import RadiometryMismatch
from eo.security import HrefRefused
from workers.arraycache import ArrayCache
from workers.raster import Grid, SceneRef, SkipAnalysis, _clear_mask, _reflectance, common_grid, mask_band, read_band

logger = logging.getLogger(__name__)

METHOD = "phase correlation of NIR, network of earlier clear acquisitions"
MAX_WINDOW_PX = 512  # side of the window estimated on (5 km at 10 m): plenty of texture, 1 MB per image
MIN_WINDOW_PX = 32  # a smaller side (an area under 320 m across) is not estimated: its correlation is noise
REFERENCES = 16  # newest earlier registered acquisitions of the area each new one is correlated with
UPSAMPLE = 20  # 1/20 px
MIN_COMMON_CLEAR = 0.5  # of the window's pixels clear in both images of a pair
MAX_SHIFT_PX = 1.5  # a position beyond is a wrong peak (the mission's requirement is 0.3 px; seen: 1.1)
MIN_PAIRS = 3
MAX_SPREAD_PX = 0.3  # median absolute deviation of the pairs' positions, rows and cols
CENTRE_DAYS = 3 * 365
MOVE_PX = 0.7  # |shift| from which an acquisition is moved (whole_pixels)
SEASON_BIN_DAYS = 30  # references: the nearest in day of year first, in bins of this many days, newest first
ESTIMATED, ANCHOR, FALLBACK = "estimated", "anchor", "fallback"
REGISTERED = (ESTIMATED, ANCHOR)  # statuses whose position serves as a reference
CACHE_BYTES = 64 * 2**20  # 64 windows of 512 x 512 float32
# What reading one acquisition may raise (the screen leaves such a date out the same way): a reference that
# cannot be read is dropped from the network, not a reason to fail another pair's analysis.
READ_ERRORS = (CogReadError, HrefRefused, RadiometryMismatch, SkipAnalysis)


@dataclass
class Estimate:
    """One acquisition's co-registration. ``position``: (rows, cols) in analysis-grid pixels on the network
    of the area's acquisitions (None when it fell back); ``shift``: position − the area's geometry (what is
    applied, rounded); ``pairs``/``spread``: the references that counted and their median absolute
    deviation; ``reason``: why it fell back or anchored."""

    status: str
    position: tuple[float, float] | None
    shift: tuple[float, float]
    pairs: int = 0
    spread: tuple[float, float] | None = None
    reason: str | None = None
    dropped: list[dict[str, str]] | None = None  # references left out: [{"item_id", "reason"}]

    def record(self, pixel_size: float) -> dict[str, Any]:
        rows, cols = (whole_pixels(v) for v in self.shift)
        return {"status": self.status, "method": METHOD,
                "position_px": None if self.position is None else [round(v, 3) for v in self.position],
                "shift_px": [round(v, 3) for v in self.shift], "applied_px": [rows, cols],
                "offset_m": [cols * pixel_size, -rows * pixel_size], "pixel_size_m": pixel_size,
                "pairs": self.pairs, "spread_px": None if self.spread is None else [round(v, 3) for v in self.spread],
                "reason": self.reason, "dropped": self.dropped or []}


def whole_pixels(shift: float) -> int:
    """The whole pixels an acquisition ``shift`` px off is moved by: the nearest whole number when at least
    :data:`MOVE_PX` off, else 0. Moving a 0.55 px offset by a pixel leaves it 0.45 px off the other way
    (nothing gained) and an estimate is good to about 0.2 px (median residual against the benchmark's
    network), so only an offset beyond 0.5 px by that much is moved."""
    return round(shift) if abs(shift) >= MOVE_PX else 0


def pair_shift(reference: np.ndarray, moving: np.ndarray) -> tuple[np.ndarray, float]:
    """Where ``moving``'s features lie relative to ``reference``'s: (rows, cols) px, + = south / east, and
    the share of pixels clear (finite) in both. Both (H, W) float, NaN where not clear."""
    from skimage.registration import phase_cross_correlation

    common = float((np.isfinite(reference) & np.isfinite(moving)).mean())
    if common == 0.0:
        return np.zeros(2), 0.0
    shift, _, _ = phase_cross_correlation(_filled(reference), _filled(moving), upsample_factor=UPSAMPLE,
                                          normalization=None)
    return -np.asarray(shift, dtype=float), common  # skimage: the shift that registers moving onto reference


def _filled(image: np.ndarray) -> np.ndarray:
    # Not-clear pixels get the image's median: flat, so they add no peak of their own.
    return np.where(np.isfinite(image), image, np.nanmedian(image)) - np.nanmean(image)


def estimate(moving: np.ndarray, references: list[tuple[np.ndarray, tuple[float, float]]],
             centre_positions: list[tuple[float, float]], registered: int | None = None) -> Estimate:
    """The co-registration of ``moving`` (NIR, (H, W), NaN where not clear) from ``references`` — (NIR,
    position) of the area's registered acquisitions, newest first — and the area's geometry as the median
    of ``centre_positions`` (the registered positions of the last :data:`CENTRE_DAYS`) with this one's.
    ``registered``: how many earlier registered acquisitions the area has (default ``len(references)``;
    more when some could not be read): fewer than :data:`MIN_PAIRS` make this one an anchor."""
    if min(moving.shape) < MIN_WINDOW_PX:
        return Estimate(FALLBACK, None, (0.0, 0.0), reason=f"window {moving.shape[0]} x {moving.shape[1]} px "
                        f"(< {MIN_WINDOW_PX} px a side): too small to correlate, not moved")
    counted = []
    for img, pos in references:
        shift, common = pair_shift(img, moving)
        candidate = np.asarray(pos) + shift
        if common >= MIN_COMMON_CLEAR and np.all(np.abs(candidate) <= MAX_SHIFT_PX):
            counted.append(candidate)
    if (len(references) if registered is None else registered) < MIN_PAIRS:
        # Anchors are gated like the others: a cloudy anchor, or one whose pairs peak off, would fix the
        # area's geometry wrong for every later acquisition. Failing, it falls back and the next one anchors.
        clear = float(np.isfinite(moving).mean())
        if clear < MIN_COMMON_CLEAR or len(counted) < len(references) or (references and not counted):
            return Estimate(FALLBACK, None, (0.0, 0.0), len(counted),
                            reason=f"anchor gate: {clear:.0%} clear, {len(counted)} of {len(references)} pair(s) "
                                   f"passed (>= {MIN_COMMON_CLEAR:.0%} clear in both, within {MAX_SHIFT_PX} px): "
                                   "not moved")
        position = np.median(counted, axis=0) if counted else np.zeros(2)
        return Estimate(ANCHOR, (float(position[0]), float(position[1])), (0.0, 0.0), len(counted),
                        reason=f"{len(references)} earlier registered acquisition(s) (< {MIN_PAIRS}): an anchor "
                               "of the area's geometry, not moved")
    if len(counted) < MIN_PAIRS:
        return Estimate(FALLBACK, None, (0.0, 0.0), len(counted),
                        reason=f"{len(counted)} of {len(references)} reference pairs passed the gate "
                               f"(>= {MIN_COMMON_CLEAR:.0%} clear in both, within {MAX_SHIFT_PX} px); "
                               f"{MIN_PAIRS} needed: not moved")
    stack = np.array(counted)
    position = np.median(stack, axis=0)
    spread = np.median(np.abs(stack - position), axis=0)
    if np.any(spread > MAX_SPREAD_PX):
        return Estimate(FALLBACK, None, (0.0, 0.0), len(counted), (float(spread[0]), float(spread[1])),
                        reason=f"the {len(counted)} reference pairs disagree (median absolute deviation "
                               f"{spread[0]:.2f}, {spread[1]:.2f} px > {MAX_SPREAD_PX}): not moved")
    centre = np.median(np.array([*centre_positions, position]), axis=0)
    shift = position - centre
    return Estimate(ESTIMATED, (float(position[0]), float(position[1])), (float(shift[0]), float(shift[1])),
                    len(counted), (float(spread[0]), float(spread[1])))


def offset_m(record: dict[str, Any] | None) -> tuple[float, float]:
    """(east, north) metres by which the acquisition's features lie off the area's geometry (0, 0 when
    not registered): the read window is moved by this much (:func:`workers.raster._read_granule`)."""
    if not record:
        return 0.0, 0.0
    east, north = record.get("offset_m") or (0.0, 0.0)
    return float(east), float(north)


def with_offset(ref: SceneRef, offset: tuple[float, float]) -> SceneRef:
    """``ref`` and its other granules read ``offset`` (east, north) metres off (one acquisition, one shift)."""
    return replace(ref, offset_m=offset, others=tuple(replace(o, offset_m=offset) for o in ref.others))


def stored(session: Any, area_id: int, scene_ids: list[int]) -> dict[int, dict[str, Any] | None]:
    """scene id → its acquisition's stored co-registration over the area (None: not registered)."""
    if not scene_ids:
        return {}
    rows = session.execute(
        select(Scene.id, Observation.coregistration)
        .join(Observation, (Observation.acquisition_id == Scene.acquisition_id) & (Observation.area_id == area_id))
        .where(Scene.id.in_(scene_ids))
    ).all()
    return {scene_id: record for scene_id, record in rows}


def apply_stored(session: Any, area_id: int, refs: list[SceneRef]) -> list[SceneRef]:
    """``refs`` with their stored offsets (:func:`offset_m`) set: read on the area's geometry. A record of
    other item ids (the product upgraded since, e.g. reprocessed onto the Global Reference Image) is not
    applied: the acquisition is read as imaged until an analysis re-estimates it."""
    records = stored(session, area_id, [r.scene_id for r in refs])
    return [with_offset(r, offset_m(_current(records.get(r.scene_id), r))) for r in refs]


def item_ids(ref: SceneRef) -> list[str]:
    """The item ids of the acquisition's granules ``ref`` reads (sorted): what a record was estimated on."""
    return sorted([ref.item_id, *(o.item_id for o in ref.others)])


def _current(record: dict[str, Any] | None, ref: SceneRef) -> dict[str, Any] | None:
    # Records of 9332b3a carry no item ids: kept (nothing tells they are stale; re-estimating every area's
    # archive would move the geometry its later records were measured on).
    if record and record.get("item_ids") not in (None, item_ids(ref)):
        return None
    return record


_CACHE = ArrayCache(CACHE_BYTES)


def window_grid(area_geom: Any, pixel_size: float) -> Grid:
    """The area's analysis grid (:func:`workers.raster.common_grid`), or its central :data:`MAX_WINDOW_PX`
    square when larger: the window shifts are estimated on."""
    grid = common_grid(area_geom, pixel_size)
    r0, c0 = max(0, (grid.height - MAX_WINDOW_PX) // 2), max(0, (grid.width - MAX_WINDOW_PX) // 2)
    return grid.window(slice(r0, r0 + MAX_WINDOW_PX), slice(c0, c0 + MAX_WINDOW_PX))


def clear_nir(scene: SceneRef, grid: Grid, buffer_px: int) -> np.ndarray:
    """NIR reflectance (H, W) float32 of the acquisition as imaged (no offset) on ``grid``, NaN where its
    cloud mask (buffered) says not clear or no granule has data."""
    # Ids and item ids both: ids restart with a new database (tests), item ids alone may repeat across catalogues.
    key = (scene.scene_id, scene.item_id, tuple((o.scene_id, o.item_id) for o in scene.others), grid.crs.to_string(),
           tuple(grid.transform)[:6], grid.width, grid.height, buffer_px)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    raw = with_offset(scene, (0.0, 0.0))
    band = mask_band(raw)
    clear = _clear_mask(band, read_band(raw, band, grid), buffer_px)
    nir = _reflectance(raw, "nir", read_band(raw, "nir", grid))
    out = np.where(clear & np.isfinite(nir), nir, np.nan).astype(np.float32)
    _CACHE.put(key, out)
    return out


def register(settings: Settings, area_id: int, area_geom: Any, scene: SceneRef, acquisition_ref: Any
             ) -> dict[str, Any]:
    """The stored co-registration of ``scene``'s acquisition over the area, estimated and stored first when
    missing (the observation must exist; an acquisition that is not observed is read as imaged).
    ``acquisition_ref(session, Scene, geom, settings)`` builds a reference acquisition's :class:`SceneRef`
    (:func:`workers.pipeline.acquisition_ref`, passed in: workers/pipeline.py imports this module).

    A reference that cannot be read (:data:`READ_ERRORS`) is dropped and listed in the record's
    ``dropped``; when ``scene`` itself cannot be read the record says why (``fallback``, no shift) and is
    not stored — the next analysis retries, and the pair's own read decides this one.

    Estimating holds the area's advisory lock (transaction-level, :func:`core.locks.area_lock_key`) from the
    references' query to the write, and first registers the area's earlier clear acquisitions still
    unregistered, oldest first: concurrent analyses of one area (a backfill, a new area) give the records
    that analysing its pairs one at a time in date order gives, whichever takes the lock first (without the
    lock each found no reference and anchored; without the catch-up the first to lock would anchor)."""
    pixel_size = settings.analysis.pixel_size_m
    with session_scope(settings) as session:
        record = _current(stored(session, area_id, [scene.scene_id]).get(scene.scene_id), scene)
        if record:
            return record
    grid = window_grid(area_geom, pixel_size)
    buffer_px = settings.analysis.cloud_buffer_px
    try:
        moving = clear_nir(scene, grid, buffer_px)
    except READ_ERRORS as exc:
        logger.warning("co-registration of %s over area %s: not read (%s), not registered", scene.item_id,
                       area_id, exc)
        return Estimate(FALLBACK, None, (0.0, 0.0), reason=f"not read ({type(exc).__name__}: {exc}): not "
                        "registered, not stored (retried by the next analysis)").record(pixel_size)
    with session_scope(settings) as session:
        session.execute(select(func.pg_advisory_xact_lock(area_lock_key("coregistration", area_id))))
        record = _current(stored(session, area_id, [scene.scene_id]).get(scene.scene_id), scene)
        if record:  # another analysis registered it while this one waited
            return record
        _catch_up(session, settings, area_id, scene, grid, acquisition_ref)
        return _store(session, settings, area_id, scene,
                      _estimate_locked(session, settings, area_id, scene, moving, grid, acquisition_ref))


def _catch_up(session: Any, settings: Settings, area_id: int, scene: SceneRef, grid: Grid, acquisition_ref: Any
              ) -> None:
    # Under the area's lock: its earlier clear acquisitions not yet registered, oldest first (each one the
    # next one's reference, as analysing the pairs in date order registers them); unreadable ones are left.
    area_wkb = session.execute(select(Area.geom).where(Area.id == area_id)).scalar_one()
    pending = session.execute(
        select(Scene).join(Observation, Observation.scene_id == Scene.id)
        .where(Observation.area_id == area_id, Observation.status == ObservationStatus.CLEAR,
               Observation.coregistration.is_(None), Scene.acquired_at < scene.acquired_at)
        .order_by(Scene.acquired_at, Scene.id)
    ).scalars().all()
    for earlier in pending:
        try:
            ref = acquisition_ref(session, earlier, area_wkb, settings)
            moving = clear_nir(ref, grid, settings.analysis.cloud_buffer_px)
        except READ_ERRORS as exc:
            logger.warning("co-registration over area %s: earlier %s not read (%s), left unregistered", area_id,
                           earlier.item_id, exc)
            continue
        _store(session, settings, area_id, ref,
               _estimate_locked(session, settings, area_id, ref, moving, grid, acquisition_ref))


def _store(session: Any, settings: Settings, area_id: int, scene: SceneRef, result: Estimate) -> dict[str, Any]:
    record = {**result.record(settings.analysis.pixel_size_m), "item_ids": item_ids(scene)}
    acquisition_id = session.get(Scene, scene.scene_id).acquisition_id
    # Under the area's lock: NULL, or a record of other items (re-estimated after an upgrade).
    session.execute(update(Observation)
                    .where(Observation.area_id == area_id, Observation.acquisition_id == acquisition_id)
                    .values(coregistration=record))
    logger.info("co-registration of %s over area %s: %s, shift %s px (applied %s), %d pair(s)%s%s", scene.item_id,
                area_id, result.status, record["shift_px"], record["applied_px"], result.pairs,
                f": {result.reason}" if result.reason else "",
                f"; {len(record['dropped'])} reference(s) unreadable" if record["dropped"] else "")
    return record


def _estimate_locked(session: Any, settings: Settings, area_id: int, scene: SceneRef, moving: np.ndarray,
                     grid: Grid, acquisition_ref: Any) -> Estimate:
    # Inside the area's lock: the references are those registered before it was taken.
    area_wkb = session.execute(select(Area.geom).where(Area.id == area_id)).scalar_one()
    since = scene.acquired_at - timedelta(days=max(CENTRE_DAYS, 1))
    earlier = session.execute(
        select(Scene, Observation.coregistration)
        .join(Observation, Observation.scene_id == Scene.id)
        .where(Observation.area_id == area_id, Observation.status == ObservationStatus.CLEAR,
               Observation.coregistration["status"].astext.in_(REGISTERED),
               Scene.acquired_at < scene.acquired_at, Scene.acquired_at >= since)
        .order_by(Scene.acquired_at.desc())
    ).all()
    centre = [tuple(rec["position_px"]) for _, rec in earlier]
    # The same season first: leaf-off and leaf-on NIR differ in texture, which moves a pair's peak.
    nearest = sorted(earlier, key=lambda row: _season_distance(row[0].acquired_at, scene.acquired_at)
                     // SEASON_BIN_DAYS)  # stable: newest first within a bin
    references, dropped = [], []
    for s, rec in nearest[:REFERENCES]:
        try:
            ref = acquisition_ref(session, s, area_wkb, settings)
            if _current(rec, ref) is None:
                dropped.append({"item_id": s.item_id, "reason": "upgraded since it was registered"})
                continue
            references.append((clear_nir(ref, grid, settings.analysis.cloud_buffer_px), tuple(rec["position_px"])))
        except READ_ERRORS as exc:
            logger.warning("co-registration of %s over area %s: reference %s left out: %s", scene.item_id,
                           area_id, s.item_id, exc)
            dropped.append({"item_id": s.item_id, "reason": f"{type(exc).__name__}: {exc}"})
    result = estimate(moving, references, centre, registered=len(earlier))
    result.dropped = dropped
    return result


def _season_distance(a: Any, b: Any) -> int:
    days = abs(a.timetuple().tm_yday - b.timetuple().tm_yday)
    return min(days, 365 - days)


def onto_area(settings: Settings, area_id: int, area_geom: Any, before: SceneRef, after: SceneRef,
              acquisition_ref: Any) -> tuple[SceneRef, SceneRef, dict[str, Any]]:
    """The pair, each read on the area's geometry (the before registered first: it is the after's newest
    reference), and both records (``{"before": ..., "after": ...}``, for the analysis's statistics)."""
    records = {role: register(settings, area_id, area_geom, ref, acquisition_ref)
               for role, ref in (("before", before), ("after", after))}
    return (with_offset(before, offset_m(records["before"])), with_offset(after, offset_m(records["after"])),
            records)

"""Confirmation and re-detection of changed regions across acquisitions (GLAD-style "probable" → "confirmed").

A region found on one pair is a claim about one after acquisition; haze, a shadow or a wet field can
make a single date look like a clear-cut. So, per area and per region (Hansen et al. 2016, GLAD alerts:
a first detection is *probable*, a repeat on the next clear observation *confirms* it):

- a region the time-series screen judged ``seasonal`` (:mod:`workers.screen`: what the season does to
  the area's NDVI) or ``atmospheric`` (haze, thin cloud or shadow the cloud mask missed) keeps that as its
  state: never alerted, never settled, and never a link target — a leaf-off date must not absorb the
  real cuts detected after it;
- every other new region is ``probable`` …
- … unless at least :data:`REDETECTED_SHARE` of its area lies in earlier, not dismissed regions of the
  same headline group (loss / gain / water, :data:`eo.change_classes.HEADLINE_GROUPS`) and not seasonal: then it is
  ``redetected`` and links to that change's first finding (``first_finding_id``). A seasonal baseline
  or a long gap between clear dates sees old cuts again; linking is what keeps each hectare emailed once.
- … but re-detections that grew (:func:`split_grown`): their parts outside those earlier regions, when they
  add up to at least the minimum mapping unit over the pair, become regions of their own, ``probable``
  like any first detection (a cut that widened, patch edges the first look missed), and only the rest
  links. So the new hectares are alerted once and the old ones not again.
- when an analysis runs on a later acquisition, every earlier ``probable`` region of the area is looked
  at in that acquisition's pixels: if at least :data:`SEEN_SHARE` of its pixels are clear there, it is
  ``confirmed`` when at least :data:`CONFIRM_SHARE` of those still show the class against the region's
  own before values (``workers.spectral.still_changed``), ``dismissed`` otherwise. A region hidden by
  clouds stays probable until a clear look.

The states are written with the analysis's findings in one transaction
(:func:`workers.findings_writer.write_done`), earlier rows only while they are still ``probable``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np
from affine import Affine
from geoalchemy2.shape import to_shape
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom
from shapely import make_valid
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from core.models import Finding
from eo.change_classes import HEADLINE_GROUPS
from workers import spectral
from workers.raster import BlockPair, SceneRef
from workers.regions import Region, shape_measures, to_4326

logger = logging.getLogger(__name__)

PROBABLE, CONFIRMED, DISMISSED, REDETECTED = "probable", "confirmed", "dismissed", "redetected"
SEASONAL, ATMOSPHERIC = "seasonal", "atmospheric"  # the time-series screen's verdicts that never alert
NOT_TARGETS = (DISMISSED, SEASONAL, ATMOSPHERIC)  # earlier regions a new one may not link to
REDETECTED_SHARE = 0.5  # of the new region's area inside earlier regions of its group
SEEN_SHARE = 0.5  # of an earlier region's pixels clear in the later acquisition, to judge it at all
CONFIRM_SHARE = 0.5  # of those pixels still showing the class


@dataclass
class EarlierRegion:
    finding_id: int
    change_class: str
    geom: BaseGeometry  # EPSG:4326
    observed_at: datetime
    state: str | None
    first_finding_id: int | None
    before_means: dict[str, float | None] = field(default_factory=dict)

    @property
    def root(self) -> int:
        return self.first_finding_id or self.finding_id


@dataclass
class Settlement:
    finding_id: int
    state: str  # confirmed | dismissed
    statistics: dict[str, Any]


@dataclass
class NewState:
    state: str
    first_finding_id: int | None
    statistics: dict[str, Any]


def group(change_class: str | None) -> str:
    return HEADLINE_GROUPS.get(change_class or "", change_class or "")


def earlier_regions(session: Session, area_id: int, before: datetime) -> list[EarlierRegion]:
    """Region findings of the area from acquisitions before ``before``, neither dismissed nor seasonal."""
    rows = session.execute(
        select(Finding.id, Finding.change_class, Finding.geom, Finding.observed_at, Finding.alert_state,
               Finding.first_finding_id, Finding.statistics)
        .where(Finding.area_id == area_id, Finding.kind == "region", Finding.geom.is_not(None),
               Finding.observed_at < before,
               or_(Finding.alert_state.is_(None), Finding.alert_state.not_in(NOT_TARGETS)),
               func.ST_Dimension(Finding.geom) == 2)
        .order_by(Finding.observed_at, Finding.id)
    ).all()
    return [EarlierRegion(r.id, r.change_class, to_shape(r.geom), r.observed_at, r.alert_state, r.first_finding_id,
                          dict((r.statistics or {}).get("before_means") or {})) for r in rows]


class Settler:
    """Confirm or dismiss the earlier probable regions from the after acquisition's pixels, block by block
    (:func:`workers.tiling.analyse_pair` calls :meth:`add` with every block; :meth:`finish` decides).

    Each region is rasterised only over its own bounding window inside a block (no full-area mask per
    region); its pixel counts — inside, seen clear, still changed — add up across blocks.
    """

    def __init__(self, earlier: list[EarlierRegion]):
        self.pending = [r for r in earlier if r.state in (None, PROBABLE) and r.first_finding_id is None]
        self._utm: list[tuple[BaseGeometry, tuple[float, float, float, float]]] | None = None
        self.counts = {r.finding_id: [0, 0, 0] for r in self.pending}  # inside, seen, still
        self.judgeable = {r.finding_id: True for r in self.pending}

    def add(self, block: BlockPair) -> None:
        if not self.pending:
            return
        grid = block.grid
        if self._utm is None:
            geoms = [shape(transform_geom("EPSG:4326", grid.crs, mapping(r.geom))) for r in self.pending]
            self._utm = [(g, g.bounds) for g in geoms]
        idx = spectral.indices(block.after)
        seen_ok = block.aoi & block.clear_after & np.isfinite(idx["ndvi"])
        t, px = grid.transform, grid.pixel_size
        for region, (geom, (minx, miny, maxx, maxy)) in zip(self.pending, self._utm, strict=True):
            c0, c1 = max(0, math.floor((minx - t.c) / px)), min(grid.width, math.ceil((maxx - t.c) / px))
            r0, r1 = max(0, math.floor((t.f - maxy) / px)), min(grid.height, math.ceil((t.f - miny) / px))
            if c0 >= c1 or r0 >= r1:
                continue
            window = (slice(r0, r1), slice(c0, c1))
            inside = geometry_mask([mapping(geom)], out_shape=(r1 - r0, c1 - c0),
                                   transform=t @ Affine.translation(c0, r0), invert=True, all_touched=False)
            seen = inside & seen_ok[window]
            counts = self.counts[region.finding_id]
            counts[0] += int(inside.sum())
            counts[1] += int(seen.sum())
            still = spectral.still_changed(region.change_class, region.before_means,
                                           {k: (v[window] if v is not None else None) for k, v in idx.items()})
            if still is None:
                self.judgeable[region.finding_id] = False
            else:
                counts[2] += int(still[seen].sum())

    def finish(self, after: SceneRef) -> list[Settlement]:
        out: list[Settlement] = []
        for region in self.pending:
            total, n_seen, n_still = self.counts[region.finding_id]
            if total == 0:
                continue  # outside this grid (another part of a large area)
            if n_seen < SEEN_SHARE * total:
                continue  # mostly hidden: judge it on a clearer acquisition
            if not self.judgeable[region.finding_id]:
                continue
            share = n_still / n_seen
            state = CONFIRMED if share >= CONFIRM_SHARE else DISMISSED
            out.append(Settlement(region.finding_id, state, {
                "settled_by": f"{after.acquired_at:%Y-%m-%d}", "still_changed_share": round(share, 3),
                "pixels_seen": n_seen, "pixels": total,
            }))
        return out


def new_states(regions: list[spectral.Region], earlier: list[EarlierRegion],
               settled: list[Settlement], screened_out: list[str | None] | None = None) -> list[NewState]:
    """State and link of each new region (same order as ``regions``); ``screened_out[i]``: ``seasonal`` or
    ``atmospheric`` when the time-series screen says region i is not a change on the ground."""
    dismissed = {s.finding_id for s in settled if s.state == DISMISSED}
    by_group: dict[str, list[EarlierRegion]] = {}
    for e in earlier:
        if e.finding_id not in dismissed:
            by_group.setdefault(group(e.change_class), []).append(e)
    out: list[NewState] = []
    for k, region in enumerate(regions):
        if screened_out and screened_out[k]:
            out.append(NewState(screened_out[k], None, {}))
            continue
        geom = make_valid(region.geom_4326)
        candidates = [e for e in by_group.get(group(region.change_class), []) if e.geom.intersects(geom)]
        if candidates and geom.area > 0:
            old = make_valid(unary_union([make_valid(e.geom) for e in candidates]))
            covered = old.intersection(geom).area / geom.area
            if covered >= REDETECTED_SHARE:
                best = max(candidates, key=lambda e: make_valid(e.geom).intersection(geom).area)
                out.append(NewState(REDETECTED, best.root, {"overlap_share": round(covered, 3),
                                                            "first_observed_at": _first_date(best, earlier)}))
                continue
        out.append(NewState(PROBABLE, None, {}))
    return out


def split_grown(regions: list[Region], verdicts: list[Any], earlier: list[EarlierRegion],
                settled: list[Settlement], crs: Any, pixel_size: float, min_ha: float
                ) -> tuple[list[Region], list[Any]]:
    """``regions`` (and their screen ``verdicts``, same order) with the would-be re-detections that grew
    split in two: the part inside the earlier, not dismissed regions of its group (it stays a re-detection)
    and, right after it, the part outside them (a new region, so :func:`new_states` makes it probable; the
    area's alert minimum then applies to the analysis as to any other). Only when the grown parts of the
    analysis add up to at least ``min_ha``: a cut widens by a pixel or two along its edges, so growth is
    judged over the pair, not per patch. Regions the screen calls seasonal or atmospheric are kept whole.
    ``crs``/``pixel_size``: the regions' grid (``geom_utm``, m). A grown part's ``mean_dndvi`` and
    ``before_means`` are the whole region's (its pixels are not re-read)."""
    dismissed = {st.finding_id for st in settled if st.state == DISMISSED}
    by_group: dict[str, list[EarlierRegion]] = {}
    for e in earlier:
        if e.finding_id not in dismissed:
            by_group.setdefault(group(e.change_class), []).append(e)
    grown: dict[int, BaseGeometry] = {}
    for k, (region, verdict) in enumerate(zip(regions, verdicts, strict=True)):
        if getattr(verdict, "verdict", None) in (SEASONAL, ATMOSPHERIC) or region.geom_4326.area <= 0:
            continue
        candidates = [e for e in by_group.get(group(region.change_class), []) if e.geom.intersects(region.geom_4326)]
        if not candidates:
            continue
        # Outlines vectorised from pixels touch at corners; repaired so that overlay operations cannot fail.
        old = make_valid(unary_union([make_valid(e.geom) for e in candidates]))
        if old.intersection(make_valid(region.geom_4326)).area / region.geom_4326.area < REDETECTED_SHARE:
            continue  # a first detection already (new_states makes it probable)
        old_utm = make_valid(shape(transform_geom("EPSG:4326", crs, mapping(old))))
        outside = make_valid(region.geom_utm).difference(old_utm)
        # Both outlines follow the same pixel grid: what is not at least half a pixel is a reprojection sliver.
        parts = [g for g in _polygons(outside) if g.area >= 0.5 * pixel_size * pixel_size]
        if parts:
            grown[k] = unary_union(parts)
    if sum(g.area for g in grown.values()) / 10_000.0 < min_ha:
        return list(regions), list(verdicts)
    out_r: list[Region] = []
    out_v: list[Any] = []
    for k, (region, verdict) in enumerate(zip(regions, verdicts, strict=True)):
        if k not in grown:
            out_r.append(region)
            out_v.append(verdict)
            continue
        kept = unary_union(_polygons(make_valid(region.geom_utm).difference(grown[k])))
        out_r += [_part(region, kept, make_valid(to_4326([kept], crs)[0]), pixel_size),
                  _part(region, grown[k], make_valid(to_4326([grown[k]], crs)[0]), pixel_size)]
        out_v += [verdict, replace(verdict, statistics={**verdict.statistics,
                                                        "grown_from_hectares": round(region.hectares, 2)})]
    return out_r, out_v


def _polygons(geom: BaseGeometry) -> list[BaseGeometry]:
    """The polygons of ``geom`` (collections flattened; the lines and points an overlay may leave dropped)."""
    if geom.geom_type == "Polygon":
        return [geom]
    return [p for g in getattr(geom, "geoms", []) for p in _polygons(g)]


def _part(region: Region, geom_utm: BaseGeometry, geom_4326: BaseGeometry, pixel_size: float) -> Region:
    elongation, width = shape_measures(geom_utm, pixel_size)
    return Region(
        change_class=region.change_class, geom_utm=geom_utm, geom_4326=geom_4326,
        pixels=round(geom_utm.area / (pixel_size * pixel_size)), hectares=geom_utm.area / 10_000.0,
        mean_dndvi=region.mean_dndvi,
        linear=bool(elongation >= spectral.THRESHOLDS.linear_elongation
                    and width <= spectral.THRESHOLDS.linear_max_width_m),
        elongation=round(elongation, 2), before_means=dict(region.before_means))


def _first_date(region: EarlierRegion, earlier: list[EarlierRegion]) -> str:
    root = next((e for e in earlier if e.finding_id == region.root), region)
    return f"{root.observed_at:%Y-%m-%d}"

"""What one acquisition saw of a group of areas: per area, how much was imaged and how much of that was clear.

An acquisition is a mosaic of granules (MGRS tiles of one datatake, possibly in different UTM zones and
served by different catalogues). Each granule's cloud-mask asset (SCL / QA_PIXEL) is read **once**, over
the window of the whole group, onto one metric grid (the group centroid's UTM zone, 20 m — SCL's native
pixel — or coarser for very large groups) through :func:`eo.cog.read_aoi` (a WarpedVRT per granule);
the granules are merged first-come (the order given, best first); then every area's fractions are
counted in memory. So one read per granule serves any number of areas (the seam batch pairing builds on).

- ``covered_fraction`` = imaged pixels / area pixels. Not imaged = outside every granule's footprint or
  the granule's no-data (SCL class 0, the QA_PIXEL fill bit, or the file's nodata): that is *missing*, never
  cloud.
- ``clear_fraction`` = clear pixels / imaged pixels, clear by :func:`eo.masks.clear_mask` (unbuffered).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from core.config import CatalogueSettings
from eo.cog import read_aoi, utm_crs_for
from eo.masks import MASK_BANDS, QA_FILL, clear_mask

MASK_PIXEL_M = 20.0
# A group's window is capped at about this many pixels (coarser grid beyond: a fraction needs no detail).
MAX_MASK_PIXELS = 4_000_000


class NoCloudMask(LookupError):
    """A granule has neither an SCL nor a QA_PIXEL asset."""


@dataclass(frozen=True)
class GranuleMask:
    """One granule to read: its cloud-mask assets and the catalogue whose allow-list its hrefs pass."""

    item_id: str
    assets: dict[str, Any]
    catalogue: CatalogueSettings


@dataclass(frozen=True)
class Coverage:
    """What the acquisition saw of one area (fractions 0..1; ``clear_fraction`` None when nothing was imaged)."""

    area_pixels: int
    imaged_pixels: int
    clear_pixels: int
    granules_used: tuple[str, ...]

    @property
    def covered_fraction(self) -> float:
        return self.imaged_pixels / self.area_pixels if self.area_pixels else 0.0

    @property
    def clear_fraction(self) -> float | None:
        return self.clear_pixels / self.imaged_pixels if self.imaged_pixels else None


def mask_band(assets: dict[str, Any]) -> str:
    """The granule's cloud-mask band (``scl`` preferred, else ``qa_pixel``); :class:`NoCloudMask` otherwise."""
    for band in MASK_BANDS:
        if band in assets:
            return band
    raise NoCloudMask("the scene has no SCL or QA_PIXEL asset")


def _grid(areas: Sequence[BaseGeometry]) -> tuple[Any, float, tuple[float, float, float, float]]:
    union = unary_union(list(areas))
    crs = utm_crs_for(union)
    projected = shape(transform_geom("EPSG:4326", crs, mapping(union)))
    minx, miny, maxx, maxy = projected.bounds
    size = MASK_PIXEL_M
    if (maxx - minx) * (maxy - miny) / (size * size) > MAX_MASK_PIXELS:
        size = math.sqrt((maxx - minx) * (maxy - miny) / MAX_MASK_PIXELS)
    left, bottom = math.floor(minx / size) * size, math.floor(miny / size) * size
    right = max(math.ceil(maxx / size) * size, left + size)
    top = max(math.ceil(maxy / size) * size, bottom + size)
    return crs, size, (left, bottom, right, top)


def _imaged(band: str, values: np.ndarray, nodata: float | None) -> np.ndarray:
    if band == "scl":
        imaged = values != 0  # SCL class 0 is "no data"
    else:
        imaged = (values.astype(np.uint32) & QA_FILL) == 0
    if nodata is not None:
        imaged &= values != nodata
    return imaged


def observe_acquisition(granules: Sequence[GranuleMask], areas: dict[int, BaseGeometry]) -> dict[int, Coverage]:
    """Coverage of each area (id → EPSG:4326 geometry) by the acquisition made of ``granules`` (best first).

    Reads each granule's mask once over the areas' common window. Raises :class:`NoCloudMask` when a
    granule has no mask asset, and what :func:`eo.cog.read_aoi` raises (``HrefRefused``,
    ``CogReadError``) when one cannot be read: a mosaic with a hole it does not know about would call
    the hole "not imaged".
    """
    if not areas:
        return {}
    crs, size, bounds = _grid(list(areas.values()))
    left, bottom, right, top = bounds
    width, height = round((right - left) / size), round((top - bottom) / size)
    transform = Affine(size, 0.0, left, 0.0, -size, top)
    window = shape(transform_geom(crs, "EPSG:4326", mapping(box(*bounds))))
    imaged = np.zeros((height, width), dtype=bool)
    clear = np.zeros((height, width), dtype=bool)
    used: list[str] = []
    for granule in granules:
        band = mask_band(granule.assets)
        entry = granule.assets[band]
        raster = read_aoi(entry["href"], window, catalogue=granule.catalogue, dst_crs=crs, resolution=size,
                      bounds=bounds, indexes=1)
        values = raster.array[0]
        nodata = entry.get("nodata", raster.nodata)
        seen = _imaged(band, values, nodata) & ~imaged  # first granule to image a pixel decides it
        if not seen.any():
            continue
        used.append(granule.item_id)
        clear |= seen & clear_mask(band, values)
        imaged |= seen
    out: dict[int, Coverage] = {}
    for area_id, geom in areas.items():
        projected = transform_geom("EPSG:4326", crs, mapping(geom))
        inside = geometry_mask([projected], out_shape=(height, width), transform=transform, invert=True)
        if not inside.any():  # smaller than a pixel: the pixels it touches
            inside = geometry_mask([projected], out_shape=(height, width), transform=transform, invert=True,
                                   all_touched=True)
        out[area_id] = Coverage(area_pixels=int(inside.sum()), imaged_pixels=int((inside & imaged).sum()),
                                clear_pixels=int((inside & clear).sum()), granules_used=tuple(used))
    return out

"""What one acquisition saw of a group of areas: per area, how much was imaged and how much of that was clear.

An acquisition is a mosaic of granules (MGRS tiles of one datatake, possibly in different UTM zones and
served by different catalogues). Every area has a fixed **lattice**: the UTM zone of its centroid, 20 m
pixels (SCL's native size; doubled until the area's box holds at most :data:`MAX_MASK_PIXELS`, so very
large areas are read from the mask's overviews) counted from the zone's origin. Areas of one lattice are
binned into clusters of :data:`CLUSTER_M`; each granule's cloud-mask asset (SCL / QA_PIXEL) is read
**once per cluster** it touches, over the cluster's window (:func:`eo.cog.read_aoi`: a WarpedVRT per
granule, exact transformer, overview-aware); the granules are merged first-come (the order given, best
first); then every area's fractions are counted in memory (``rasterio.features.rasterize`` of layers of
non-overlapping areas as label images, ``np.bincount``). An area read alone (``shared=False``) lands on the
same lattice pixels, so shared and per-area reads give exactly the same numbers — the shared read only
fetches less.

- ``covered_fraction`` = imaged pixels / area pixels. Not imaged = outside every granule's footprint or
  the granule's no-data (SCL class 0, the QA_PIXEL fill bit, or the file's nodata): that is *missing*, never
  cloud.
- ``clear_fraction`` = clear pixels / imaged pixels, clear by :func:`eo.masks.clear_mask` (unbuffered).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.features import geometry_mask, rasterize
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry

from core.config import CatalogueSettings
from eo.cog import read_aoi, utm_crs_for
from eo.masks import MASK_BANDS, QA_FILL, clear_mask

MASK_PIXEL_M = 20.0
# An area's box holds at most about this many mask pixels (coarser lattice beyond: a fraction needs no detail).
MAX_MASK_PIXELS = 4_000_000
# Areas are binned into cells of this size (metres a side); a cell's window is the union of its areas' boxes,
# read once per granule. Dense areas share reads; a lone area's window is its own box (no over-read), and a
# window stays a few MB whatever the group (10 km at 20 m: 500 px a side, plus the areas' own extent).
CLUSTER_M = 10_000.0
# Warp approximation error (source pixels): small enough that every pixel is transformed exactly, whatever the
# window (rasterio refuses 0 itself).
EXACT_TOLERANCE = 1e-9
READ_THREADS = 4


class NoCloudMask(LookupError):
    """A granule has neither an SCL nor a QA_PIXEL asset."""


@dataclass(frozen=True)
class GranuleMask:
    """One granule to read: its cloud-mask assets, the catalogue whose allow-list its hrefs pass, and its
    footprint (EPSG:4326; a window it does not touch is not read for it — None: always read)."""

    item_id: str
    assets: dict[str, Any]
    catalogue: CatalogueSettings
    footprint: BaseGeometry | None = None


@dataclass(frozen=True)
class Coverage:
    """What the acquisition saw of one area (fractions 0..1; ``clear_fraction`` None when nothing was imaged).
    ``granules_used``: item ids of the granules that imaged some of the area, in mosaic order."""

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


@dataclass(frozen=True)
class ReadStats:
    """What a call read: granule window reads (one per granule and window) and the pixels fetched."""

    reads: int
    pixels: int


def mask_band(assets: dict[str, Any]) -> str:
    """The granule's cloud-mask band (``scl`` preferred, else ``qa_pixel``); :class:`NoCloudMask` otherwise."""
    for band in MASK_BANDS:
        if band in assets:
            return band
    raise NoCloudMask("the scene has no SCL or QA_PIXEL asset")


def lattice_size(width_m: float, height_m: float) -> float:
    """Mask pixel size (m) for an area whose box is ``width_m`` × ``height_m``: 20 m, doubled while the box
    would hold more than :data:`MAX_MASK_PIXELS` pixels (so overview levels of a 20 m mask fit it)."""
    size = MASK_PIXEL_M
    while (width_m / size + 1) * (height_m / size + 1) > MAX_MASK_PIXELS:
        size *= 2
    return size


@dataclass
class _Area:
    id: int
    geom: BaseGeometry  # projected onto the lattice CRS
    bounds: tuple[int, int, int, int]  # lattice pixel index box: col0, row0, col1, row1 (exclusive)


def _imaged(band: str, values: np.ndarray, nodata: float | None) -> np.ndarray:
    if band == "scl":
        imaged = values != 0  # SCL class 0 is "no data"
    else:
        imaged = (values.astype(np.uint32) & QA_FILL) == 0
    if nodata is not None:
        imaged &= values != nodata
    return imaged


def _project(areas: dict[int, BaseGeometry]) -> dict[tuple[str, float], list[_Area]]:
    """Areas by lattice (CRS, pixel size), each with its geometry in that CRS and its pixel box."""
    by_crs: dict[str, list[tuple[int, BaseGeometry]]] = defaultdict(list)
    for area_id, geom in areas.items():
        by_crs[utm_crs_for(geom).to_string()].append((area_id, geom))
    out: dict[tuple[str, float], list[_Area]] = defaultdict(list)
    for crs, members in by_crs.items():
        transformer = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
        projected = shapely.transform(np.array([g for _, g in members], dtype=object), transformer.transform,
                                      interleaved=False)
        for (area_id, _), geom in zip(members, projected, strict=True):
            minx, miny, maxx, maxy = geom.bounds
            size = lattice_size(maxx - minx, maxy - miny)
            col0, row0 = math.floor(minx / size), math.floor(-maxy / size)  # rows count down from the origin
            col1, row1 = max(math.ceil(maxx / size), col0 + 1), max(math.ceil(-miny / size), row0 + 1)
            out[(crs, size)].append(_Area(area_id, geom, (col0, row0, col1, row1)))
    return out


def _clusters(members: list[_Area], size: float, shared: bool) -> list[list[_Area]]:
    if not shared:
        return [[a] for a in members]
    step = max(1, round(CLUSTER_M / size))
    bins: dict[tuple[int, int], list[_Area]] = defaultdict(list)
    for a in members:
        bins[(a.bounds[0] // step, a.bounds[1] // step)].append(a)
    return list(bins.values())


def _layers(cluster: list[_Area]) -> list[list[int]]:
    """Indexes of ``cluster`` in layers whose pixel boxes do not overlap (greedy colouring of the overlap
    graph): each layer is rasterised once as a label image, so areas need no rasterisation of their own."""
    boxes = shapely.box(*np.array([a.bounds for a in cluster], dtype=float).T)
    left, right = shapely.STRtree(boxes).query(boxes, predicate="intersects")
    neighbours: dict[int, list[int]] = defaultdict(list)
    for i, j in zip(left.tolist(), right.tolist(), strict=True):
        if j < i:
            neighbours[i].append(j)
    colour: list[int] = []
    for i in range(len(cluster)):
        taken = {colour[j] for j in neighbours.get(i, ())}
        colour.append(next(c for c in range(len(taken) + 1) if c not in taken))
    layers: list[list[int]] = [[] for _ in range(max(colour) + 1)]
    for i, c in enumerate(colour):
        layers[c].append(i)
    return layers


def _count(cluster: list[_Area], origin: tuple[int, int], size: float, source: np.ndarray, clear: np.ndarray,
           granules: Sequence[GranuleMask]) -> dict[int, Coverage]:
    """Per-area pixel counts over one window, by label images and ``np.bincount`` (no per-area arrays)."""
    col0, row0 = origin
    height, width = source.shape
    transform = Affine(size, 0.0, col0 * size, 0.0, -size, -row0 * size)
    g = len(granules) + 1
    src, clr = source.ravel(), clear.ravel()
    out: dict[int, Coverage] = {}
    for layer in _layers(cluster):
        labels = rasterize([(cluster[i].geom, n + 1) for n, i in enumerate(layer)], out_shape=(height, width),
                           transform=transform, fill=0, dtype="int32").ravel()
        inside = np.flatnonzero(labels)  # only the layer's own pixels are counted
        lab, lsrc = labels[inside], src[inside]
        n = len(layer) + 1
        total = np.bincount(lab, minlength=n)
        seen = np.bincount(lab[lsrc > 0], minlength=n)
        sky = np.bincount(lab[clr[inside]], minlength=n)
        by_granule = (np.bincount(lab * g + lsrc, minlength=n * g).reshape(n, g) if g > 2
                      else np.stack([total - seen, seen], axis=1))
        for n_, i in enumerate(layer, start=1):
            a = cluster[i]
            if total[n_] == 0:  # smaller than a pixel: the pixels it touches, on its own box
                out[a.id] = _touched(a, origin, size, source, clear, granules)
                continue
            out[a.id] = Coverage(area_pixels=int(total[n_]), imaged_pixels=int(seen[n_]), clear_pixels=int(sky[n_]),
                                 granules_used=tuple(granules[k - 1].item_id for k in range(1, g)
                                                     if by_granule[n_, k]))
    return out


def _touched(a: _Area, origin: tuple[int, int], size: float, source: np.ndarray, clear: np.ndarray,
             granules: Sequence[GranuleMask]) -> Coverage:
    rows = slice(a.bounds[1] - origin[1], a.bounds[3] - origin[1])
    cols = slice(a.bounds[0] - origin[0], a.bounds[2] - origin[0])
    shape_ = (a.bounds[3] - a.bounds[1], a.bounds[2] - a.bounds[0])
    transform = Affine(size, 0.0, a.bounds[0] * size, 0.0, -size, -a.bounds[1] * size)
    inside = geometry_mask([a.geom], out_shape=shape_, transform=transform, invert=True, all_touched=True)
    src = source[rows, cols][inside]
    used = np.unique(src[src > 0])
    return Coverage(area_pixels=int(inside.sum()), imaged_pixels=int((src > 0).sum()),
                    clear_pixels=int(clear[rows, cols][inside].sum()),
                    granules_used=tuple(granules[int(k) - 1].item_id for k in used))


def _mosaic(crs: CRS, size: float, cluster: list[_Area], granules: Sequence[GranuleMask], bands: list[str]
            ) -> tuple[tuple[int, int], np.ndarray, np.ndarray, int]:
    """The cluster's window: (origin col/row, which granule first imaged each pixel, clear, granules read)."""
    col0, row0 = min(a.bounds[0] for a in cluster), min(a.bounds[1] for a in cluster)
    col1, row1 = max(a.bounds[2] for a in cluster), max(a.bounds[3] for a in cluster)
    bounds = (col0 * size, -row1 * size, col1 * size, -row0 * size)
    window = shape(transform_geom(crs, "EPSG:4326", mapping(box(*bounds))))
    source = np.zeros((row1 - row0, col1 - col0), dtype=np.uint8)  # 0 = not imaged, k = granule k-1 first
    clear = np.zeros(source.shape, dtype=bool)
    reads = 0
    for k, (granule, band) in enumerate(zip(granules, bands, strict=True)):
        if granule.footprint is not None and not granule.footprint.intersects(window):
            continue
        entry = granule.assets[band]
        raster = read_aoi(entry["href"], None, catalogue=granule.catalogue, dst_crs=crs, resolution=size,
                          bounds=bounds, indexes=1, aoi_mask=False, use_overviews=True, tolerance=EXACT_TOLERANCE)
        reads += 1
        values = raster.array[0]
        seen = _imaged(band, values, entry.get("nodata", raster.nodata)) & (source == 0)
        source[seen] = min(k + 1, 255)
        clear |= seen & clear_mask(band, values)
    return (col0, row0), source, clear, reads


def observe_acquisition(granules: Sequence[GranuleMask], areas: dict[int, BaseGeometry], *,
                        shared: bool = True, stats: list[ReadStats] | None = None) -> dict[int, Coverage]:
    """Coverage of each area (id → EPSG:4326 geometry) by the acquisition made of ``granules`` (best first).

    ``shared`` (default): one read per granule and cluster window; False: one read per granule and area
    (the reference the shared read must equal, and the benchmark's baseline). ``stats``, when given, gets
    one :class:`ReadStats` appended. Raises :class:`NoCloudMask` when a granule has no mask asset, and what
    :func:`eo.cog.read_aoi` raises (``HrefRefused``, ``CogReadError``) when one cannot be read: a mosaic
    with a hole it does not know about would call the hole "not imaged".
    """
    bands = [mask_band(g.assets) for g in granules]
    jobs = [(CRS.from_string(crs_name), size, cluster) for (crs_name, size), members in _project(areas).items()
            for cluster in _clusters(members, size, shared)]
    out: dict[int, Coverage] = {}
    reads = pixels = 0
    # Windows are read by a few threads (GDAL releases the GIL while it waits on HTTP); counting stays here.
    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="mask-read") as pool:
        for (_, size, cluster), (origin, source, clear, n) in zip(
                jobs, pool.map(lambda job: _mosaic(job[0], job[1], job[2], granules, bands), jobs), strict=True):
            reads += n
            pixels += n * source.size
            out.update(_count(cluster, origin, size, source, clear, granules))
    if stats is not None:
        stats.append(ReadStats(reads, pixels))
    return out

"""What one acquisition saw of a group of areas: per area, how much was imaged and how much of that was clear.

An acquisition is a mosaic of granules (MGRS tiles of one datatake, possibly in different UTM zones and
served by different catalogues). Every area has a fixed **lattice**: the UTM zone of its centroid, 20 m
pixels (SCL's native size; doubled until the area's box holds at most :data:`MAX_MASK_PIXELS`, so very
large areas are read from the mask's overviews) counted from the zone's origin. Areas of one lattice are
binned into clusters of :data:`CLUSTER_M`; each granule's cloud-mask asset (SCL / QA_PIXEL) is read
**once per cluster** it touches, over the cluster's window (the file opened once for all its windows; a
plain window read on the file's own grid, else a WarpedVRT of the window, exact transformer; overview-aware);
the granules are merged first-come (the order given, best
first); then every area's fractions are counted in memory (each area's pixel box in a slot of a
packed atlas, all areas of the atlas rasterised at once as labels by ``rasterio.features.rasterize``, one
``np.bincount``). An area read alone (``shared=False``) lands on the
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
import rasterio
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.features import geometry_mask, rasterize
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from shapely.geometry.base import BaseGeometry

from core.config import CatalogueSettings
from eo.cog import open_checked, overview_level, utm_crs_for
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
    """What a call read: granule window reads (one per granule and window), the pixels fetched, files opened."""

    reads: int
    pixels: int
    opens: int = 0  # granule files opened (once per granule and overview level used)


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


# Every area's own pixel box gets a slot of its own in an "atlas" (shelf packing, next fit, tallest first:
# ATLAS_WIDTH px wide, at most ATLAS_PIXELS), so one rasterize of all the atlas's areas as labels and one
# np.bincount count them all. A rasterize call costs ~1 ms of GDAL setup however small its window; packing
# the areas' boxes (not their cluster windows) and giving each its own slot needs no layers of
# non-overlapping areas and counts ~1/3 of the pixels the windows' atlases did (bench_pairing's Europe cycle:
# 121 M box pixels against 358 M atlas pixels of windows).
ATLAS_WIDTH = 2048
ATLAS_PIXELS = 4_000_000
# Bins of one atlas's bincount (areas × granules × clear): bounds the counts' memory (8 bytes each, 32 MB).
ATLAS_BINS = 1 << 22


@dataclass(frozen=True)
class _Slot:
    """An area's pixel box placed in an atlas: the window it was read through, and the box's top-left corner."""

    window: int
    area: _Area
    col: int
    row: int

    @property
    def shape(self) -> tuple[int, int]:
        b = self.area.bounds
        return b[3] - b[1], b[2] - b[0]


def _pack(windows: list[_Window], granules: int) -> list[list[_Slot]]:
    """Every area of ``windows`` in a slot of an atlas (same lattice per atlas; ``granules``: the mosaic's count,
    which bounds the areas an atlas may hold by :data:`ATLAS_BINS`)."""
    by_lattice: dict[tuple[str, float], list[tuple[int, _Area]]] = defaultdict(list)
    for i, w in enumerate(windows):
        by_lattice[(w.crs.to_string(), w.size)].extend((i, a) for a in w.cluster)
    most = max(1, ATLAS_BINS // (2 * (granules + 1)) - 1)
    out: list[list[_Slot]] = []
    for items in by_lattice.values():
        items.sort(key=lambda t: (t[1].bounds[3] - t[1].bounds[1], t[1].bounds[2] - t[1].bounds[0]), reverse=True)
        atlas: list[_Slot] = []
        col = row = shelf = 0
        for i, a in items:
            h, w = a.bounds[3] - a.bounds[1], a.bounds[2] - a.bounds[0]
            if col and col + w > ATLAS_WIDTH:  # the next shelf
                col, row, shelf = 0, row + shelf, 0
            if atlas and ((row + h) * max(ATLAS_WIDTH, w) > ATLAS_PIXELS or len(atlas) >= most):
                out.append(atlas)
                atlas, col, row, shelf = [], 0, 0, 0
            atlas.append(_Slot(i, a, col, row))
            col, shelf = col + w, max(shelf, h)
        if atlas:
            out.append(atlas)
    return out


def _count(windows: list[_Window], slots: list[_Slot], source: list[np.ndarray], clear: list[np.ndarray],
           granules: Sequence[GranuleMask]) -> dict[int, Coverage]:
    """Per-area pixel counts of one atlas: each area's box copied from its window into its slot, its geometry
    moved by whole pixels onto the slot (an exact shift: it covers the same lattice pixels), all areas
    rasterised at once as labels, and one ``np.bincount`` of (label, first granule, clear) per pixel."""
    size = windows[slots[0].window].size
    height = max(s.row + s.shape[0] for s in slots)
    width = max(s.col + s.shape[1] for s in slots)
    src = np.zeros((height, width), dtype=np.uint8)
    clr = np.zeros((height, width), dtype=bool)
    shifts = np.empty((len(slots), 2))
    for k, s in enumerate(slots):
        w, (c0, r0, c1, r1) = windows[s.window], s.area.bounds
        inner = (slice(r0 - w.box[1], r1 - w.box[1]), slice(c0 - w.box[0], c1 - w.box[0]))
        slot = (slice(s.row, s.row + r1 - r0), slice(s.col, s.col + c1 - c0))
        src[slot] = source[s.window][inner]
        clr[slot] = clear[s.window][inner]
        shifts[k] = ((s.col - c0) * size, (r0 - s.row) * size)
    geoms = np.array([s.area.geom for s in slots], dtype=object)
    offsets = np.repeat(shifts, shapely.get_num_coordinates(geoms), axis=0)
    moved = shapely.transform(geoms, lambda c: c + offsets)
    n, g = len(slots) + 1, len(granules) + 1
    key = rasterize(zip(moved, range(1, n), strict=True), out_shape=(height, width),
                    transform=Affine(size, 0.0, 0.0, 0.0, -size, 0.0), fill=0, dtype="int32")
    # key = (label * g + first granule) * 2 + clear, in place (n * g * 2 < 2**31: ATLAS_BINS).
    key *= g
    key += src
    key <<= 1
    key += clr
    counts = np.bincount(key.ravel(), minlength=n * g * 2).reshape(n, g, 2)
    by_granule = counts.sum(axis=2)
    total = by_granule.sum(axis=1)
    seen = total - by_granule[:, 0]
    sky = counts[:, :, 1].sum(axis=1)  # clear pixels are imaged ones
    out: dict[int, Coverage] = {}
    for label, s in enumerate(slots, start=1):
        if total[label] == 0:  # smaller than a pixel: the pixels it touches, on its own box
            w = windows[s.window]
            out[s.area.id] = _touched(s.area, (w.box[0], w.box[1]), size, source[s.window], clear[s.window],
                                      granules)
            continue
        out[s.area.id] = Coverage(area_pixels=int(total[label]), imaged_pixels=int(seen[label]),
                                  clear_pixels=int(sky[label]),
                                  granules_used=tuple(granules[k - 1].item_id for k in range(1, g)
                                                      if by_granule[label, k]))
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


@dataclass(frozen=True)
class _Window:
    """One window of a lattice to read: its CRS, pixel size, pixel index box and the areas it serves."""

    crs: CRS
    size: float
    box: tuple[int, int, int, int]  # col0, row0, col1, row1 (exclusive) on the lattice
    cluster: list[_Area]

    @property
    def shape(self) -> tuple[int, int]:
        return self.box[3] - self.box[1], self.box[2] - self.box[0]

    @property
    def transform(self) -> Affine:
        return Affine(self.size, 0.0, self.box[0] * self.size, 0.0, -self.size, -self.box[1] * self.size)


def _windows(areas: dict[int, BaseGeometry], shared: bool) -> list[_Window]:
    out = []
    for (crs_name, size), members in _project(areas).items():
        crs = CRS.from_string(crs_name)
        for cluster in _clusters(members, size, shared):
            box_ = (min(a.bounds[0] for a in cluster), min(a.bounds[1] for a in cluster),
                    max(a.bounds[2] for a in cluster), max(a.bounds[3] for a in cluster))
            out.append(_Window(crs, size, box_, cluster))
    return out


def _footprints_4326(windows: list[_Window]) -> np.ndarray:
    """Each window's box (its four corners) in EPSG:4326, as the footprints it is tested against."""
    out = np.empty(len(windows), dtype=object)
    by_crs: dict[str, list[int]] = defaultdict(list)
    for i, w in enumerate(windows):
        by_crs[w.crs.to_string()].append(i)
    for crs_name, idx in by_crs.items():
        b = np.array([windows[i].box for i in idx], dtype=float) * np.array([[windows[i].size] for i in idx])
        left, top, right, bottom = b[:, 0], -b[:, 1], b[:, 2], -b[:, 3]
        xs = np.stack([right, right, left, left], axis=1)
        ys = np.stack([bottom, top, top, bottom], axis=1)
        lon, lat = Transformer.from_crs(crs_name, "EPSG:4326", always_xy=True).transform(xs, ys)
        out[idx] = shapely.polygons(np.stack([lon, lat], axis=-1))
    return out


def _aligned(src: Any, w: _Window) -> tuple[int, int] | None:
    """(column, row) offset of the window in ``src`` when the lattice is ``src``'s own pixel grid (same CRS and
    pixel size, pixel edges on each other): then a plain window read gives exactly what nearest warping gives —
    only when the file has no mask but its no-data value, which the warper would apply too (as
    :func:`eo.cog._aligned_window`)."""
    t = src.transform
    if src.crs != w.crs or t.b != 0 or t.d != 0 or not math.isclose(t.a, w.size, rel_tol=1e-9) \
            or not math.isclose(-t.e, w.size, rel_tol=1e-9):
        return None
    if any(set(flags) - {MaskFlags.all_valid, MaskFlags.nodata} for flags in src.mask_flag_enums):
        return None
    col = (w.box[0] * w.size - t.c) / w.size
    row = (t.f + w.box[1] * w.size) / w.size
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return round(col), round(row)


def _clipped_read(dataset: Any, col: int, row: int, height: int, width: int, fill: float) -> np.ndarray:
    """Band 1 of ``dataset`` over the pixel box at (``col``, ``row``), ``fill`` where the box leaves the dataset."""
    out = np.full((height, width), fill, dtype=dataset.dtypes[0])
    c0, r0 = max(col, 0), max(row, 0)
    c1, r1 = min(col + width, dataset.width), min(row + height, dataset.height)
    if c1 > c0 and r1 > r0:
        out[r0 - row:r1 - row, c0 - col:c1 - col] = dataset.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
    return out


def _read_window(src: Any, w: _Window, fill: float) -> np.ndarray:
    height, width = w.shape
    offset = _aligned(src, w)
    if offset is not None:  # pixels outside the file are ``fill``, as a warp leaves them
        return _clipped_read(src, offset[0], offset[1], height, width, fill)
    # A warped view of exactly this window: with an exact transformer each pixel's value does not depend on the
    # window (or the view) it is read through. One view of the whole lattice per granule, read window by
    # window, warped whole 512 x 128 blocks of it for every small window: 0.2 s a window, 40 % of an
    # acquisition's task where two UTM zones meet (a view of the window costs ~7 ms).
    with WarpedVRT(src, crs=w.crs, transform=w.transform, width=width, height=height,
                   resampling=Resampling.nearest, nodata=fill, tolerance=EXACT_TOLERANCE) as vrt:
        return vrt.read(1)


def _read_granule(granule: GranuleMask, band: str, windows: list[_Window]) -> tuple[list[np.ndarray], float | None]:
    """Every window of one granule's mask from ONE open file (per overview level used): the arrays (the file's
    nodata, else 0, where it has no pixel) and the nodata value to test against."""
    entry = granule.assets[band]
    out: list[np.ndarray | None] = [None] * len(windows)
    with open_checked(entry["href"], granule.catalogue) as opener:
        by_level: dict[int | None, list[int]] = defaultdict(list)
        with opener() as src:
            fill = src.nodata if src.nodata is not None else 0
            levels = {key: overview_level(src, key[0], key[1]) for key in {(w.crs, w.size) for w in windows}}
            for i, w in enumerate(windows):
                by_level[levels[(w.crs, w.size)]].append(i)
            for i in by_level.pop(None, []):
                out[i] = _read_window(src, windows[i], fill)
        for level, idx in sorted(by_level.items()):
            with opener(level) as src:
                for i in idx:
                    out[i] = _read_window(src, windows[i], fill)
    return out, entry.get("nodata", fill)  # type: ignore[return-value]


def observe_acquisition(granules: Sequence[GranuleMask], areas: dict[int, BaseGeometry], *,
                        shared: bool = True, stats: list[ReadStats] | None = None) -> dict[int, Coverage]:
    """Coverage of each area (id → EPSG:4326 geometry) by the acquisition made of ``granules`` (best first).

    ``shared`` (default): one read per granule and cluster window; False: one read per granule and area
    (the reference the shared read must equal, and the benchmark's baseline). Either way each granule's
    file is opened once (per overview level) for all its windows. ``stats``, when given, gets one
    :class:`ReadStats` appended. Raises :class:`NoCloudMask` when a granule has no mask asset, and what
    :func:`eo.cog.open_checked` raises (``HrefRefused``, ``CogReadError``) when one cannot be read: a mosaic
    with a hole it does not know about would call the hole "not imaged".
    """
    bands = [mask_band(g.assets) for g in granules]
    windows = _windows(areas, shared)
    touching: list[list[int]] = []
    if windows:
        footprints = _footprints_4326(windows)
        tree = shapely.STRtree(footprints)
        for g in granules:
            touching.append(sorted(tree.query(g.footprint, predicate="intersects").tolist())
                            if g.footprint is not None else list(range(len(windows))))
    else:
        touching = [[] for _ in granules]
    source = [np.zeros(w.shape, dtype=np.uint8) for w in windows]  # 0 = not imaged, k = granule k-1 first
    clear = [np.zeros(w.shape, dtype=bool) for w in windows]
    reads = pixels = opens = 0

    def read(k: int) -> tuple[list[np.ndarray], float | None]:
        if not touching[k]:
            return [], None
        return _read_granule(granules[k], bands[k], [windows[i] for i in touching[k]])

    # Granules are read by a few threads (GDAL releases the GIL while it waits on HTTP), merged here in
    # mosaic order (first granule first) as they come.
    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="mask-read") as pool:
        for k, (arrays, nodata) in enumerate(pool.map(read, range(len(granules)))):
            opens += bool(arrays)
            for i, values in zip(touching[k], arrays, strict=True):
                reads += 1
                pixels += values.size
                seen = _imaged(bands[k], values, nodata) & (source[i] == 0)
                source[i][seen] = min(k + 1, 255)
                clear[i] |= seen & clear_mask(bands[k], values)
    out: dict[int, Coverage] = {}
    with rasterio.Env():  # one GDAL environment for every rasterize call (each would set one up and tear it down)
        for slots in _pack(windows, len(granules)):
            out.update(_count(windows, slots, source, clear, granules))
    if stats is not None:
        stats.append(ReadStats(reads, pixels, opens))
    return out

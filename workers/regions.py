"""Change regions of a tiled analysis: connected pixels of one class, found block by block and merged.

A region is an 8-connected set of pixels of one change class (``rasterio.features.shapes``). Blocks are
vectorised one at a time (:func:`block_fragments`); a fragment that does not reach an inside edge of its
block is a whole region and is decided at once (dropped below the minimum mapping unit, its geometry
freed). Fragments that reach an inside edge wait for :func:`merge`, which joins same-class fragments of
neighbouring blocks that share an edge or a corner (8-connectivity across the seam) — block edges lie on
pixel edges, so shared boundaries have identical coordinates and the union is exact.

Per-fragment statistics come from one label image per block (``scipy.ndimage.label`` per class,
8-connectivity) and ``numpy.bincount`` (no per-region full-size mask): pixel count, sum and count of
finite dNDVI, bare-soil pixels, pixels per chip and per 3 × 3 sector of the AOI's extent. They add up when
fragments merge; a fragment's first pixel in raster order of the whole grid (the tie-break of equal sizes
at the region cap) is the earliest of its parts'. Only fragments that can still be kept (at least the
mapping unit and not ranked after the cap's last region, or reaching an inside edge) are vectorised, in
one ``shapes`` pass over the label image masked to them. Validity repair
(``shapely.make_valid``, only for the self-touching rings that corner-connected pixels make) and the
reprojection to EPSG:4326 (one ``shapely.transform`` call over all kept regions) are vectorised.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import shapely
from pyproj import Transformer
from rasterio.features import shapes
from scipy import ndimage
from shapely.geometry.base import BaseGeometry

SECTORS = 9
EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity: a one-pixel diagonal road is one region


@dataclass
class Fragment:
    """One connected piece of a class inside one block (or, after :func:`merge`, across blocks)."""

    code: int  # change class code (workers.spectral.CLASS_CODES)
    geom: BaseGeometry  # grid CRS
    pixels: int
    d_sum: float  # sum of finite dNDVI over the pixels
    d_count: int
    bare: int  # pixels that went from vegetated to bare (workers.spectral: bare_soil_exposed)
    sectors: np.ndarray  # int64 (9,): pixels per 3 × 3 sector of the AOI extent, row-major from north-west
    chips: dict[int, int]  # chip index -> pixels
    border: bool  # reaches an inside block edge: may continue in the next block
    # Raster index on the whole grid (row × grid width + column) of the fragment's first pixel, north-west
    # first: regions of equal size rank by it, so which ones the cap keeps does not depend on the blocks.
    first_pixel: int
    b_sum: dict[str, float] = field(default_factory=dict)  # before-scene index -> sum over finite pixels
    b_count: dict[str, int] = field(default_factory=dict)


@dataclass
class Region:
    change_class: str
    geom_utm: BaseGeometry
    geom_4326: BaseGeometry
    pixels: int
    hectares: float
    mean_dndvi: float | None
    linear: bool
    elongation: float
    fragment: Fragment | None = field(default=None, repr=False)
    # Mean index values of the region's pixels in the before scene (ndvi, ndwi, ndbi; None when not
    # computable): what a later acquisition is compared with to confirm or dismiss the change.
    before_means: dict[str, float | None] = field(default_factory=dict)


class BlockFragments(NamedTuple):
    fragments: list[Fragment]  # the kept fragments, in vectorisation order
    dropped: int  # whole fragments below ``min_pixels`` (counted, never vectorised)
    count: int  # all connected components of the block, kept or not


def block_fragments(class_map: np.ndarray, d_ndvi: np.ndarray, bare: np.ndarray, chip_local: np.ndarray,
                    chip_ids: list[int], sector: np.ndarray, transform, inside_edges: tuple[bool, bool, bool, bool],
                    origin: tuple[int, int, int], before: dict[str, np.ndarray | None] | None = None,
                    min_pixels: int = 0, floor: tuple[int, int] | None = None) -> BlockFragments:
    """Fragments of ``class_map`` (uint8 (h, w), 0 = no change) on a block with ``transform``.

    ``chip_local`` (int (h, w), index into ``chip_ids``, −1 outside every chip), ``sector`` (int (h, w), 0–8),
    ``bare`` (bool (h, w)); ``inside_edges`` = (top, bottom, left, right) edges that border another block;
    ``origin`` = (first row, first column, width) of the block on the whole grid (for ``first_pixel``);
    ``before``: the before scene's indices (name -> float (h, w) or None), summed per fragment. A fragment
    that reaches no inside edge is counted in ``dropped`` and never turned into a polygon when it has fewer
    than ``min_pixels`` pixels (below the mapping unit) or ranks after ``floor`` = (pixels, first_pixel)
    of the last region the cap still keeps (fewer pixels, or as many and a later first pixel).

    Components are labelled per class (``scipy.ndimage.label``, 8-connectivity) and their statistics summed
    by ``numpy.bincount`` over the label image; only the kept components are vectorised
    (``rasterio.features.shapes`` over the label image, masked to them).
    """
    labels = np.zeros(class_map.shape, dtype=np.int32)
    codes: list[int] = []
    # Counted over the changed pixels only (a few % of a block), not the whole class map.
    present = np.flatnonzero(np.bincount(class_map[class_map > 0], minlength=256)[1:]) + 1
    for code in present.tolist():
        lab, k = ndimage.label(class_map == code, structure=EIGHT, output=np.int32)
        if k:
            on = lab > 0
            labels[on] = lab[on] + len(codes)
            codes.extend([code] * k)
    n = len(codes)
    if not n:
        return BlockFragments([], 0, 0)
    inside = labels > 0
    lab = labels[inside]
    pixels = np.bincount(lab, minlength=n + 1)
    # A component reaches an inside edge when one of its pixels lies in that edge's row or column.
    top_i, bottom_i, left_i, right_i = inside_edges
    border = np.zeros(n + 1, dtype=bool)
    for reaches, line in ((top_i, labels[0, :]), (bottom_i, labels[-1, :]), (left_i, labels[:, 0]),
                          (right_i, labels[:, -1])):
        if reaches:
            border[line] = True
    border[0] = False
    # First pixel of each component in raster order (``lab`` is in raster order: the smallest position).
    first = np.full(n + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, lab, np.flatnonzero(inside))
    first[0] = 0  # no component
    row0, col0, grid_width = origin
    first = (row0 + first // labels.shape[1]) * grid_width + col0 + first % labels.shape[1]
    can_rank = pixels >= min_pixels
    if floor is not None:
        can_rank &= (pixels > floor[0]) | ((pixels == floor[0]) & (first < floor[1]))
    keep = border | can_rank
    keep[0] = False
    dropped = int(n - keep[1:].sum())
    if dropped == n:
        return BlockFragments([], dropped, n)

    d = d_ndvi[inside]
    finite = np.isfinite(d)
    d_sum = np.bincount(lab[finite], weights=d[finite].astype(np.float64), minlength=n + 1)
    d_count = np.bincount(lab[finite], minlength=n + 1)
    bare_count = np.bincount(lab[bare[inside]], minlength=n + 1)
    sectors = np.bincount(lab * SECTORS + sector[inside], minlength=(n + 1) * SECTORS).reshape(n + 1, SECTORS)
    n_chips = max(len(chip_ids), 1)
    per_chip = np.bincount(lab.astype(np.int64) * n_chips + np.clip(chip_local[inside], 0, None),
                           minlength=(n + 1) * n_chips).reshape(n + 1, n_chips)
    b_sums: dict[str, np.ndarray] = {}
    b_counts: dict[str, np.ndarray] = {}
    for name, index in (before or {}).items():
        if index is None:
            continue
        v = index[inside]
        ok = np.isfinite(v)
        b_sums[name] = np.bincount(lab[ok], weights=v[ok].astype(np.float64), minlength=n + 1)
        b_counts[name] = np.bincount(lab[ok], minlength=n + 1)
    missing = [name for name, index in (before or {}).items() if index is None]

    # np.take: half the time of keep[labels] (fancy indexing) on a 1152 px block, the same mask.
    features = list(shapes(labels, mask=np.take(keep, labels), connectivity=8, transform=transform))
    polygons: dict[int, list[BaseGeometry]] = {}
    for geom, (_, v) in zip(_polygons(features), features, strict=True):
        polygons.setdefault(int(v), []).append(geom)
    ids = list(polygons)  # vectorisation order, as one pass over the class map would find them
    geoms = np.array([parts[0] if len(parts) == 1 else shapely.union_all(parts) for parts in polygons.values()],
                     dtype=object)
    invalid = ~shapely.is_valid(geoms)  # 8-connected pixels touching at a corner make a self-touching ring
    if invalid.any():
        geoms[invalid] = shapely.make_valid(geoms[invalid], method="structure", keep_collapsed=False)
    out = []
    for k, geom in zip(ids, geoms, strict=True):
        row = per_chip[k]
        chips = {chip_ids[j]: int(row[j]) for j in np.flatnonzero(row)} if chip_ids else {}
        out.append(Fragment(code=codes[k - 1], geom=geom, pixels=int(pixels[k]), d_sum=float(d_sum[k]),
                            d_count=int(d_count[k]), bare=int(bare_count[k]), sectors=sectors[k].copy(),
                            chips=chips, border=bool(border[k]), first_pixel=int(first[k]),
                            b_sum={**{m: 0.0 for m in missing}, **{m: float(v[k]) for m, v in b_sums.items()}},
                            b_count={**{m: 0 for m in missing}, **{m: int(v[k]) for m, v in b_counts.items()}}))
    return BlockFragments(out, dropped, n)


def _polygons(features: list[tuple[dict, float]]) -> np.ndarray:
    """Shapely polygons of ``rasterio.features.shapes`` output (GeoJSON Polygons), built in two vectorised
    calls (rings, then polygons) — ``shapely.geometry.shape`` per polygon was 3.5× slower."""
    if not features:
        return np.zeros(0, dtype=object)
    rings = [ring for g, _ in features for ring in g["coordinates"]]
    ring_poly = np.repeat(np.arange(len(features)), [len(g["coordinates"]) for g, _ in features])
    ring_len = np.fromiter(map(len, rings), dtype=np.int64, count=len(rings))
    coords = np.array(list(itertools.chain.from_iterable(rings)), dtype=np.float64)
    linear = shapely.linearrings(coords, indices=np.repeat(np.arange(len(rings)), ring_len))
    return shapely.polygons(linear, indices=ring_poly)  # the first ring of each polygon is its shell


def merge(fragments: list[Fragment]) -> list[Fragment]:
    """Join same-class fragments that touch (share an edge or a corner) into whole regions."""
    if not fragments:
        return []
    geoms = np.array([f.geom for f in fragments], dtype=object)
    parent = list(range(len(fragments)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    for i, j in zip(left.tolist(), right.tolist(), strict=True):
        if i < j and fragments[i].code == fragments[j].code:
            ri, rj = root(i), root(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(len(fragments)):
        groups.setdefault(root(i), []).append(i)
    merged = []
    for members in groups.values():
        if len(members) == 1:
            only = fragments[members[0]]
            only.border = False
            merged.append(only)
            continue
        parts = [fragments[i] for i in members]
        chips: dict[int, int] = {}
        for part in parts:
            for chip, count in part.chips.items():
                chips[chip] = chips.get(chip, 0) + count
        merged.append(Fragment(
            code=parts[0].code, geom=shapely.union_all([p.geom for p in parts]), pixels=sum(p.pixels for p in parts),
            d_sum=sum(p.d_sum for p in parts), d_count=sum(p.d_count for p in parts),
            bare=sum(p.bare for p in parts), sectors=np.sum([p.sectors for p in parts], axis=0), chips=chips,
            border=False, first_pixel=min(p.first_pixel for p in parts),
            b_sum={m: sum(p.b_sum.get(m, 0.0) for p in parts) for m in parts[0].b_sum},
            b_count={m: sum(p.b_count.get(m, 0) for p in parts) for m in parts[0].b_count}))
    return merged


def shape_measures(geom: BaseGeometry, pixel_size: float) -> tuple[float, float]:
    """(elongation, mean width in m) from the minimum rotated rectangle."""
    rect = geom.minimum_rotated_rectangle
    coords = np.asarray(rect.exterior.coords) if rect.geom_type == "Polygon" else np.zeros((0, 2))
    if len(coords) >= 4:
        sides = np.hypot(*(coords[1:3] - coords[0:2]).T)
        long_side, short_side = float(sides.max()), max(float(sides.min()), pixel_size)
    else:
        long_side = short_side = pixel_size
    return long_side / short_side, geom.area / max(long_side, pixel_size)


def to_4326(geoms: list[BaseGeometry], crs) -> list[BaseGeometry]:
    """All geometries from ``crs`` to EPSG:4326 (lon, lat) in one vectorised call."""
    if not geoms:
        return []
    transformer = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)

    def project(xy: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return list(shapely.transform(np.array(geoms, dtype=object), project))

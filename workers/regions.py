"""Change regions of a tiled analysis: connected pixels of one class, found block by block and merged.

A region is an 8-connected set of pixels of one change class (``rasterio.features.shapes``). Blocks are
vectorised one at a time (:func:`block_fragments`); a fragment that does not reach an inside edge of its
block is a whole region and is decided at once (dropped below the minimum mapping unit, its geometry
freed). Fragments that reach an inside edge wait for :func:`merge`, which joins same-class fragments of
neighbouring blocks that share an edge or a corner (8-connectivity across the seam) — block edges lie on
pixel edges, so shared boundaries have identical coordinates and the union is exact.

Per-fragment statistics come from one rasterised label image per block and ``numpy.bincount`` (no
per-region full-size mask): pixel count, sum and count of finite dNDVI, bare-soil pixels, pixels per
chip and per 3 × 3 sector of the AOI's extent. They add up when fragments merge. Validity repair
(``shapely.make_valid``, only for the self-touching rings that corner-connected pixels make) and the
reprojection to EPSG:4326 (one ``shapely.transform`` call over all kept regions) are vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import shapely
from pyproj import Transformer
from rasterio.features import rasterize, shapes
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

SECTORS = 9


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
    order: int  # discovery order (ties in size keep it, as one whole-image vectorisation would)
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


def block_fragments(class_map: np.ndarray, d_ndvi: np.ndarray, bare: np.ndarray, chip_local: np.ndarray,
                    chip_ids: list[int], sector: np.ndarray, transform, inside_edges: tuple[bool, bool, bool, bool],
                    first_order: int, before: dict[str, np.ndarray | None] | None = None) -> list[Fragment]:
    """Fragments of ``class_map`` (uint8 (h, w), 0 = no change) on a block with ``transform``.

    ``chip_local`` (int (h, w), index into ``chip_ids``, −1 outside every chip), ``sector`` (int (h, w), 0–8),
    ``bare`` (bool (h, w)); ``inside_edges`` = (top, bottom, left, right) edges that border another block;
    ``before``: the before scene's indices (name -> float (h, w) or None), summed per fragment.
    """
    found = [(shape(g), int(v)) for g, v in
             shapes(class_map, mask=class_map > 0, connectivity=8, transform=transform)]
    if not found:
        return []
    geoms = np.array([g for g, _ in found], dtype=object)
    codes = [v for _, v in found]
    invalid = ~shapely.is_valid(geoms)  # 8-connected pixels touching at a corner make a self-touching ring
    if invalid.any():
        geoms[invalid] = shapely.make_valid(geoms[invalid], method="structure", keep_collapsed=False)
    n = len(geoms)
    labels = rasterize(zip(geoms, range(1, n + 1), strict=True), out_shape=class_map.shape, transform=transform,
                       fill=0, dtype="int32")
    inside = labels > 0
    lab = labels[inside]
    d = d_ndvi[inside]
    finite = np.isfinite(d)
    d_sum = np.bincount(lab[finite], weights=d[finite].astype(np.float64), minlength=n + 1)
    d_count = np.bincount(lab[finite], minlength=n + 1)
    bare_count = np.bincount(lab[bare[inside]], minlength=n + 1)
    sectors = np.bincount(lab * SECTORS + sector[inside], minlength=(n + 1) * SECTORS).reshape(n + 1, SECTORS)
    n_chips = max(len(chip_ids), 1)
    per_chip = np.bincount(lab * n_chips + np.clip(chip_local[inside], 0, None),
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
    pixel_m2 = abs(transform.a * transform.e)
    pixels = np.rint(shapely.area(geoms) / pixel_m2).astype(np.int64)
    h, w = class_map.shape
    left, top = transform.c, transform.f
    right, bottom = left + w * transform.a, top + h * transform.e
    eps = abs(transform.a) * 1e-6
    b = shapely.bounds(geoms)  # minx, miny, maxx, maxy
    top_i, bottom_i, left_i, right_i = inside_edges
    border = ((top_i & (b[:, 3] >= top - eps)) | (bottom_i & (b[:, 1] <= bottom + eps))
              | (left_i & (b[:, 0] <= left + eps)) | (right_i & (b[:, 2] >= right - eps)))
    out = []
    for k in range(n):
        row = per_chip[k + 1]
        chips = {chip_ids[j]: int(row[j]) for j in np.flatnonzero(row)} if chip_ids else {}
        out.append(Fragment(code=codes[k], geom=geoms[k], pixels=int(pixels[k]), d_sum=float(d_sum[k + 1]),
                            d_count=int(d_count[k + 1]), bare=int(bare_count[k + 1]), sectors=sectors[k + 1].copy(),
                            chips=chips, border=bool(border[k]), order=first_order + k,
                            b_sum={**{m: 0.0 for m in missing}, **{m: float(v[k + 1]) for m, v in b_sums.items()}},
                            b_count={**{m: 0 for m in missing}, **{m: int(v[k + 1]) for m, v in b_counts.items()}}))
    return out


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
            border=False, order=min(p.order for p in parts),
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

"""Group nearby watched areas so one catalogue search serves many of them.

One search per area does not scale (10,000 areas = 10,000 requests per poll, and rate limits, §3.4 of
the design notes). Areas whose bounding boxes are within ``group_distance_km`` of each other are linked
(single linkage). A cluster is split again (at the median of its longer side) while it is wider than
``MAX_EXTENT_FACTOR × group_distance_km`` (no continent-wide search) or its hull is mostly empty — more
than :data:`SPARSE_EMPTY_KM2` and more than the ``group_distance_km`` cells its members touch, as for an
L-shaped chain of areas — and each group is searched once with a simple polygon that contains every
member (the exact area × footprint test happens later in PostGIS).

Why large groups: a catalogue's answer costs a fixed part per request and a part per item returned, and
an item returned to two neighbouring groups is paid twice. For 10,000 areas spread over Europe (one per
~30 km) groups at most 200 km wide meant 337 searches returning 3,680 items for 1,529 granules; at most
800 km wide, 23 searches returning 2,007 (benchmarks/bench_polling.py). Where the hull is mostly empty,
the items under the empty part are the waste, hence the sparseness split.

Missing a link here only costs an extra search, never a missed scene: every search geometry contains
its areas.

Antimeridian: an area split at ±180° (parts near +180 and −180) is its own group, and its search
geometry is a MultiPolygon of one simple superset per side — never one hull of both sides, which would be
a band round the whole world.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from shapely.geometry import MultiPolygon, box
from shapely.geometry.base import BaseGeometry

from monitor.geometry import crosses_antimeridian

KM_PER_DEG_LAT = 110.574
KM_PER_DEG_LON_EQUATOR = 111.320
# A group's search box is at most this many group distances wide (800 km by default: about seven MGRS tiles).
MAX_EXTENT_FACTOR = 16.0
# A group whose hull holds more empty km² than this (and than the km² its members occupy) is split: about
# one Sentinel-2 tile (110 km × 110 km), whose items a split would no longer ask for.
SPARSE_EMPTY_KM2 = 12_000.0
# Occupancy is counted on cells at least this wide (a tiny group distance must not mean millions of cells).
MIN_CELL_KM = 10.0
# Servers choke on complex search geometries (pgstac once capped them near 8 KB, PC returns 500s).
MAX_SEARCH_VERTICES = 64


@dataclass(frozen=True)
class AreaFootprint:
    area_id: int
    geometry: BaseGeometry  # EPSG:4326
    max_cloud_cover: float


@dataclass
class SearchGroup:
    area_ids: list[int]
    geometry: BaseGeometry  # contains every member area
    max_cloud_cover: float  # the loosest member filter: the catalogue filter must not drop anyone's scene


def group_areas(areas: Sequence[AreaFootprint], distance_km: float) -> list[SearchGroup]:
    """Partition ``areas`` into search groups (deterministic for a given input order)."""
    if not areas:
        return []
    distance_km = max(distance_km, 0.0)
    # A split area's planar bounds span the world: linked by them, it would join every area of its latitudes.
    apart = [crosses_antimeridian(a.geometry) for a in areas]
    boxes = [_km_box(a.geometry) for a in areas]
    # Single linkage = connected components of the "bounding boxes within distance_km" graph (the gap
    # between two axis-parallel boxes is their planar distance): pairs from an STRtree, components by scipy.
    label = list(range(len(areas)))
    linked = [i for i in range(len(areas)) if not apart[i]]
    if distance_km > 0 and len(linked) > 1:
        b = np.array([boxes[i] for i in linked], dtype=float)
        # Candidates: boxes meeting the other box grown by distance_km (envelopes only, no GEOS predicate,
        # which is 50x slower here); then the exact gap, vectorised.
        grow = np.array([-distance_km, -distance_km, distance_km, distance_km])
        left, right = shapely.STRtree(shapely.box(*b.T)).query(shapely.box(*(b + grow).T))
        dx = np.maximum(0.0, np.maximum(b[right, 0] - b[left, 2], b[left, 0] - b[right, 2]))
        dy = np.maximum(0.0, np.maximum(b[right, 1] - b[left, 3], b[left, 1] - b[right, 3]))
        near = np.hypot(dx, dy) <= distance_km
        left, right = left[near], right[near]
        graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(len(linked), len(linked)))
        _, components = connected_components(graph, directed=False)
        for i, component in zip(linked, components.tolist(), strict=True):
            label[i] = -1 - component  # apart areas keep their own index: labels never collide

    clusters: dict[int, list[int]] = defaultdict(list)
    for i in range(len(areas)):
        clusters[label[i]].append(i)

    max_extent = MAX_EXTENT_FACTOR * distance_km if distance_km > 0 else 0.0
    groups: list[SearchGroup] = []
    for members in sorted(clusters.values(), key=lambda m: m[0]):
        for part in _split(members, boxes, max_extent, distance_km):
            groups.append(_group([areas[i] for i in part]))
    return groups


def search_geometry(geometries: Sequence[BaseGeometry]) -> BaseGeometry:
    """A simple geometry (≤ MAX_SEARCH_VERTICES vertices in all, lon/lat) that contains every geometry.

    A Polygon, or, when the geometries lie on both sides of ±180°, a MultiPolygon of one superset per
    side (east of 0° and west of it), each within ±180°.
    """
    if len(geometries) == 1 and shapely.get_num_coordinates(geometries[0]) <= MAX_SEARCH_VERTICES:
        return geometries[0]
    whole = shapely.GeometryCollection(list(geometries))
    if not crosses_antimeridian(whole):
        return _superset(geometries, MAX_SEARCH_VERTICES)
    sides = []
    for half in (box(0, -90, 180, 90), box(-180, -90, 0, 90)):
        parts = [p for p in (shapely.intersection(g, half) for g in geometries) if not p.is_empty and p.area > 0]
        if parts:
            sides.append(_superset(parts, MAX_SEARCH_VERTICES // 2))
    return MultiPolygon(sides) if len(sides) > 1 else sides[0]


def _superset(geometries: Sequence[BaseGeometry], max_vertices: int) -> BaseGeometry:
    """A simple polygon (≤ ``max_vertices`` vertices) containing every geometry, all on one side of ±180°."""
    if len(geometries) == 1:
        geom = geometries[0]
        if geom.geom_type == "Polygon" and shapely.get_num_coordinates(geom) <= max_vertices:
            return geom
        geom = geom.convex_hull
    else:
        geom = shapely.GeometryCollection(list(geometries)).convex_hull
    if shapely.get_num_coordinates(geom) > max_vertices:
        # Simplifying a hull could cut corners off an area; a rotated rectangle still contains it.
        geom = shapely.oriented_envelope(geom)
    if geom.geom_type != "Polygon" or geom.area == 0 or not geom.is_valid or not _contains_all(geom, geometries):
        # Degenerate hulls (points/lines) or a hull GEOS got wrong on odd coordinates: the bounding box
        # is always a valid superset, and always accepted by servers.
        bounds = [g.bounds for g in geometries]
        eps = 1e-6
        geom = box(max(min(b[0] for b in bounds) - eps, -180), max(min(b[1] for b in bounds) - eps, -90),
                   min(max(b[2] for b in bounds) + eps, 180), min(max(b[3] for b in bounds) + eps, 90))
    return geom


def _contains_all(geom: BaseGeometry, geometries: Sequence[BaseGeometry]) -> bool:
    grown = geom.buffer(1e-9)
    shapely.prepare(grown)
    return all(grown.covers(g) for g in geometries)


def _group(members: list[AreaFootprint]) -> SearchGroup:
    return SearchGroup(
        area_ids=[m.area_id for m in members],
        geometry=search_geometry([m.geometry for m in members]),
        max_cloud_cover=max(m.max_cloud_cover for m in members),
    )


def _km_box(geom: BaseGeometry) -> tuple[float, float, float, float]:
    """Bounds in a local sinusoidal approximation (km): good enough to compare nearby distances."""
    minx, miny, maxx, maxy = geom.bounds
    lat = (miny + maxy) / 2
    kx = KM_PER_DEG_LON_EQUATOR * max(math.cos(math.radians(lat)), 0.01)
    return (minx * kx, miny * KM_PER_DEG_LAT, maxx * kx, maxy * KM_PER_DEG_LAT)


def _cells(b: tuple[float, float, float, float], cell: float, pad: float):
    x0, y0 = math.floor((b[0] - pad) / cell), math.floor((b[1] - pad) / cell)
    x1, y1 = math.floor((b[2] + pad) / cell), math.floor((b[3] + pad) / cell)
    for x in range(x0, x1 + 1):
        for y in range(y0, y1 + 1):
            yield (x, y)


def _split(members: list[int], boxes: list[tuple[float, float, float, float]], max_extent: float,
           cell_km: float) -> list[list[int]]:
    """Split a cluster at the median along its longer side until each part is at most ``max_extent`` wide
    and not sparse (:func:`_sparse`)."""
    if max_extent <= 0:
        return [[m] for m in members]
    if len(members) == 1:
        return [members]
    minx = min(boxes[i][0] for i in members)
    miny = min(boxes[i][1] for i in members)
    maxx = max(boxes[i][2] for i in members)
    maxy = max(boxes[i][3] for i in members)
    if maxx - minx <= max_extent and maxy - miny <= max_extent and not _sparse(members, boxes, cell_km):
        return [members]
    axis = 0 if maxx - minx >= maxy - miny else 1
    ordered = sorted(members, key=lambda i: (boxes[i][axis] + boxes[i][axis + 2]) / 2)
    half = len(ordered) // 2
    return _split(ordered[:half], boxes, max_extent, cell_km) + _split(ordered[half:], boxes, max_extent, cell_km)


def _sparse(members: list[int], boxes: list[tuple[float, float, float, float]], cell_km: float) -> bool:
    """Whether the members' hull (km², local approximation) is mostly empty: more than
    :data:`SPARSE_EMPTY_KM2` and more than the area of the ``cell_km`` grid cells the members touch."""
    cell_km = max(cell_km, MIN_CELL_KM)
    occupied = {key for i in members for key in _cells(boxes[i], cell_km, pad=0.0)}
    occupied_km2 = len(occupied) * cell_km * cell_km
    corners = np.array([(b[x], b[y]) for b in (boxes[i] for i in members) for x in (0, 2) for y in (1, 3)])
    empty_km2 = shapely.convex_hull(shapely.multipoints(corners)).area - occupied_km2
    return empty_km2 > max(SPARSE_EMPTY_KM2, occupied_km2)

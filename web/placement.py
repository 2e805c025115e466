"""A stored thumbnail placed on the web map: its map part reprojected to Web Mercator, and where it lies.

A thumbnail (``finding_images``) is drawn on the area's UTM grid; its ``bounds`` say which rectangle of
that grid its map part (the PNG's top ``map_height_px`` rows, above the legend strip) covers. A UTM
rectangle is not a rectangle on a Web Mercator map (grid north turns from true north away from the zone's
central meridian: ~2° at 24°E, 45°N, tens of metres over a few km), and ``L.imageOverlay`` stretches an
image over a lat/lon rectangle. So the map part is warped to EPSG:3857 (nearest: pixels stay pixels,
transparent outside), whose axis-aligned bounds are exactly what Leaflet's overlay spans.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from typing import Any

import numpy as np
from PIL import Image
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.transform import from_bounds
from rasterio.warp import Resampling, calculate_default_transform, reproject

# Part of every ETag: bump it when placed_png's output changes, so browsers fetch the new rendering.
VERSION = 1
# Warped PNGs kept per process (an RGBA chip is ~50–300 kB; the web map asks for a before and an after).
CACHE_SIZE = 64
WEB_MERCATOR = CRS.from_epsg(3857)
_TO_LONLAT = Transformer.from_crs(3857, 4326, always_xy=True)


def _target(bounds: dict[str, Any], width: int) -> tuple[Any, int, int]:
    height = int(bounds["map_height_px"])
    transform, w, h = calculate_default_transform(CRS.from_user_input(bounds["crs"]), WEB_MERCATOR, width, height,
                                                  *bounds["bbox"])
    return transform, w, h


def latlng_bounds(bounds: dict[str, Any], width: int) -> list[list[float]]:
    """``[[south, west], [north, east]]`` (degrees, Leaflet's order) of the warped map part of a thumbnail
    ``width`` px wide with these stored ``bounds``."""
    transform, w, h = _target(bounds, width)
    west, north = _TO_LONLAT.transform(transform.c, transform.f)
    east, south = _TO_LONLAT.transform(transform.c + w * transform.a, transform.f + h * transform.e)
    return [[south, west], [north, east]]


def placed_png(png: bytes, bounds: dict[str, Any]) -> bytes:
    """The map part of a stored thumbnail (PNG bytes) on the Web Mercator grid of :func:`latlng_bounds`,
    as an RGBA PNG (transparent outside the thumbnail's grid)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    width, height = image.width, int(bounds["map_height_px"])
    src = np.moveaxis(np.asarray(image)[:height], -1, 0)
    src = np.concatenate([src, np.full((1, height, width), 255, dtype=np.uint8)])
    transform, w, h = _target(bounds, width)
    dst = np.zeros((4, h, w), dtype=np.uint8)
    reproject(src, dst, src_transform=from_bounds(*bounds["bbox"], width, height),
              src_crs=CRS.from_user_input(bounds["crs"]), dst_transform=transform, dst_crs=WEB_MERCATOR,
              resampling=Resampling.nearest)
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.moveaxis(dst, 0, -1)), "RGBA").save(out, format="PNG")
    return out.getvalue()


def placed_etag(png: bytes, bounds: dict[str, Any]) -> str:
    """Strong HTTP ETag of the placed rendering of a stored thumbnail: a digest of its bytes, its bounds and
    :data:`VERSION`, so it changes exactly when the response would (a re-run that rewrites the image)."""
    digest = hashlib.sha256(png)
    digest.update(json.dumps(bounds, sort_keys=True).encode())
    digest.update(f"placement v{VERSION}".encode())
    return f'"{digest.hexdigest()[:32]}"'


def placed_png_cached(etag: str, png: bytes, bounds: dict[str, Any]) -> bytes:
    """:func:`placed_png`, warped once per process per ETag (:data:`CACHE_SIZE` most recent kept)."""
    return _warped(etag, png, json.dumps(bounds, sort_keys=True))


@functools.lru_cache(maxsize=CACHE_SIZE)
def _warped(etag: str, png: bytes, bounds_json: str) -> bytes:
    return placed_png(png, json.loads(bounds_json))


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header (RFC 9110 §13.1.2: ``*`` or a list of tags, weak comparison)
    names ``etag``."""
    if not if_none_match:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or etag in (t.removeprefix("W/") for t in tags)


"""Synthetic Sentinel-2-like COGs of any size on a UTM grid, written block by block (never whole in memory).

Each band is a constant "vegetation" value (NDVI 0.71) with rectangles of other values painted in; a
window of such a file compresses to almost nothing, so a 100 km × 100 km band (10⁸ pixels) is a few
hundred kB and builds in seconds. Files are tiled, DEFLATE-compressed COGs with overviews, like Earth
Search's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.shutil import copy as rio_copy
from rasterio.windows import Window

CRS = "EPSG:32634"  # UTM 34N (Romania)
# Vegetation in DN (processing baseline < 04.00: reflectance = DN / 10000): NDVI 0.71, NDWI < 0, no haze.
VEGETATION = {"blue": 400, "green": 600, "red": 500, "nir": 3000, "scl": 4}
BARE_NIR = 700  # nir of cleared ground: NDVI 0.17, dNDVI −0.55 → vegetation loss


@dataclass(frozen=True)
class Paint:
    """Set ``value`` in pixel rows [r0, r1) and columns [c0, c1) (10 m pixels)."""

    r0: int
    r1: int
    c0: int
    c1: int
    value: int


def write_band(path: Path, origin: tuple[float, float], size_px: int, pixel_m: float, fill: int,
               paints: Iterable[Paint] = (), *, dtype: str = "uint16", scale: int = 1, block: int = 1024) -> None:
    """A ``size_px``/``scale`` square COG at ``pixel_m * scale`` m, constant ``fill`` plus ``paints``
    (given in 10 m pixel coordinates, divided by ``scale``); nearest overviews for ``uint8`` (classes)."""
    n = size_px // scale
    transform = Affine(pixel_m * scale, 0, origin[0], 0, -pixel_m * scale, origin[1])
    paints = [Paint(p.r0 // scale, -(-p.r1 // scale), p.c0 // scale, -(-p.c1 // scale), p.value) for p in paints]
    tmp = path.with_suffix(".tmp.tif")
    profile = {"driver": "GTiff", "width": n, "height": n, "count": 1, "dtype": dtype, "crs": CRS,
               "transform": transform, "nodata": 0, "tiled": True, "blockxsize": 512, "blockysize": 512,
               "compress": "DEFLATE"}
    with rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, n, block):
            for col in range(0, n, block):
                h, w = min(block, n - row), min(block, n - col)
                data = np.full((h, w), fill, dtype=dtype)
                for p in paints:
                    r0, r1, c0, c1 = max(p.r0, row), min(p.r1, row + h), max(p.c0, col), min(p.c1, col + w)
                    if r0 < r1 and c0 < c1:
                        data[r0 - row:r1 - row, c0 - col:c1 - col] = p.value
                dst.write(data, 1, window=Window(col, row, w, h))
    rio_copy(tmp, path, driver="COG", blocksize=512, compress="DEFLATE", predictor=2,
             overview_resampling="nearest" if dtype == "uint8" else "average")
    tmp.unlink()


def write_pair(root: Path, origin: tuple[float, float], size_px: int, cleared: list[Paint],
               clouds: list[Paint] = (), haze: list[Paint] = ()) -> dict[str, dict[str, str]]:
    """Before/after COGs under ``root``: the after scene's nir is ``BARE_NIR`` inside ``cleared``; ``clouds``
    are SCL class 9 in the after scene, ``haze`` bright blue in the after scene. Returns the relative paths
    per scene and band."""
    root.mkdir(parents=True, exist_ok=True)
    files = {"before": {}, "after": {}}
    for band, fill in VEGETATION.items():
        dtype, scale = ("uint8", 2) if band == "scl" else ("uint16", 1)  # SCL is 20 m, like Sentinel-2
        write_band(root / f"{band}.tif", origin, size_px, 10.0, fill, dtype=dtype, scale=scale)
        files["before"][band] = f"{band}.tif"
        files["after"][band] = f"{band}.tif"
    write_band(root / "nir_after.tif", origin, size_px, 10.0, VEGETATION["nir"],
               [Paint(p.r0, p.r1, p.c0, p.c1, BARE_NIR) for p in cleared])
    files["after"]["nir"] = "nir_after.tif"
    if clouds:
        write_band(root / "scl_after.tif", origin, size_px, 10.0, VEGETATION["scl"],
                   [Paint(p.r0, p.r1, p.c0, p.c1, 9) for p in clouds], dtype="uint8", scale=2)
        files["after"]["scl"] = "scl_after.tif"
    if haze:
        write_band(root / "blue_after.tif", origin, size_px, 10.0, VEGETATION["blue"],
                   [Paint(p.r0, p.r1, p.c0, p.c1, 1500) for p in haze])
        files["after"]["blue"] = "blue_after.tif"
    return files

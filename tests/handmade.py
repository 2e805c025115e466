"""Hand-made Sentinel-2 granules: constant-valued COGs on a UTM grid plus a STAC item in the shape of a
named catalogue profile (Earth Search v1 / C1 / v0, Planetary Computer), for radiometry, overlap and
straddle cases that the bundled sample (one tile, one catalogue) cannot show.

Pixel values are chosen by the test, so the expected reflectance, NDVI and fractions are computed
from them in the test itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry

BANDS = ("blue", "green", "red", "nir", "scl")
# Asset keys of each item shape (eo/profiles.py declares the same maps; restated here on purpose).
SHAPES: dict[str, dict[str, str]] = {
    "es-v1": {"blue": "blue", "green": "green", "red": "red", "nir": "nir", "scl": "scl"},
    "es-c1": {"blue": "blue", "green": "green", "red": "red", "nir": "nir", "scl": "scl"},
    "pc": {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08", "scl": "SCL"},
    "v0": {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08", "scl": "SCL"},
}
COLLECTION = {"es-v1": "sentinel-2-l2a", "es-c1": "sentinel-2-c1-l2a", "pc": "sentinel-2-l2a",
              "v0": "sentinel-s2-l2a-cogs"}


@dataclass
class Granule:
    """Where the files of one hand-made granule are and what it covers."""

    name: str
    epsg: int
    bounds: tuple[float, float, float, float]  # UTM metres: left, bottom, right, top
    relative_paths: dict[str, str]  # band -> path below the served root

    def footprint_4326(self) -> BaseGeometry:
        return shape(transform_geom(f"EPSG:{self.epsg}", "EPSG:4326", mapping(box(*self.bounds))))


def write_granule(root: Path, name: str, epsg: int, bounds: tuple[float, float, float, float], *,
                  red: int, nir: int, green: int | None = None, blue: int | None = None, scl: int = 4,
                  pixel: float = 10.0, scl_array: np.ndarray | None = None,
                  cut: tuple[BaseGeometry, dict[str, int]] | None = None) -> Granule:
    """Constant-valued uint16 bands (uint8 SCL at 20 m) over ``bounds``; nodata 0, tiled GeoTIFFs.
    ``cut``: (EPSG:4326 polygon, band -> value): other values where pixel centres fall inside (a clear-cut)."""
    values = {"red": red, "nir": nir, "green": green if green is not None else red + 200,
              "blue": blue if blue is not None else max(red - 100, 1)}
    left, bottom, right, top = bounds
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    for band in BANDS:
        size = pixel * 2 if band == "scl" else pixel
        width, height = round((right - left) / size), round((top - bottom) / size)
        if band == "scl":
            data = scl_array if scl_array is not None else np.full((height, width), scl, dtype=np.uint8)
            dtype = "uint8"
        else:
            data = np.full((height, width), values[band], dtype=np.uint16)
            dtype = "uint16"
            if cut is not None and band in cut[1]:
                inside = geometry_mask([transform_geom("EPSG:4326", f"EPSG:{epsg}", mapping(cut[0]))],
                                       out_shape=(height, width), transform=Affine(size, 0, left, 0, -size, top),
                                       invert=True)
                data[inside] = cut[1][band]
        path = folder / f"{band}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=1, dtype=dtype,
                           crs=f"EPSG:{epsg}", transform=Affine(size, 0, left, 0, -size, top), nodata=0,
                           tiled=True, blockxsize=256, blockysize=256, compress="deflate") as dst:
            dst.write(data.astype(dtype), 1)
        paths[band] = f"{name}/{band}.tif"
    return Granule(name, epsg, bounds, paths)


def item_for(granule: Granule, base_url: str, *, shape_name: str, item_id: str, platform: str, tile: str,
             sensed: str, baseline: str | None, flag: bool | None = None, datatake: str | None = None,
             orbit: int = 136, generated: str = "2024-06-19T12:00:00Z", extra: dict[str, Any] | None = None,
             footprint: BaseGeometry | None = None) -> dict[str, Any]:
    """A STAC item for ``granule`` shaped like ``shape_name`` (``es-v1``, ``es-c1``, ``pc``, ``v0``)."""
    geom = footprint if footprint is not None else granule.footprint_4326()
    stamp = datatake or sensed.replace("-", "").replace(":", "")[:15]
    props: dict[str, Any] = {"datetime": sensed, "platform": platform, "constellation": "sentinel-2",
                             "eo:cloud_cover": 0.0}
    product = (f"{'S2A' if platform.endswith('a') else 'S2B'}_MSIL2A_{stamp}_N{(baseline or '0000').replace('.', '')}"
               f"_R{orbit:03d}_T{tile}_{generated[:10].replace('-', '')}T120000")
    if shape_name == "v0":
        props.update({"sentinel:utm_zone": int(tile[:2]), "sentinel:latitude_band": tile[2],
                      "sentinel:grid_square": tile[3:], "sentinel:product_id": product,
                      "sentinel:data_coverage": 100.0, "sentinel:sequence": "0"})
        if flag is not None:
            props["sentinel:boa_offset_applied"] = flag
    else:
        props.update({"s2:mgrs_tile" if shape_name == "pc" else "grid:code":
                      tile if shape_name == "pc" else f"MGRS-{tile}", "s2:product_uri": f"{product}.SAFE",
                      "s2:generation_time": generated, "s2:datatake_id": f"GS2B_{stamp}_037000_N05.10"})
        if shape_name == "pc":
            props["sat:relative_orbit"] = orbit
        else:
            props.update({"created": generated, "updated": generated})
        if flag is not None:
            props["earthsearch:boa_offset_applied"] = flag
    if baseline is not None:
        props["s2:processing_baseline"] = baseline
    props.update(extra or {})
    keys = SHAPES[shape_name]
    assets: dict[str, Any] = {}
    for band, key in keys.items():
        asset: dict[str, Any] = {"href": f"{base_url}/{granule.relative_paths[band]}",
                                 "type": "image/tiff; application=geotiff; profile=cloud-optimized"}
        if band != "scl" and shape_name in ("es-v1", "es-c1"):
            # Earth Search lists the ESA offset in raster:bands even where the pixels no longer carry it.
            asset["raster:bands"] = [{"nodata": 0, "data_type": "uint16", "scale": 0.0001, "offset": -0.1}]
        assets[key] = asset
    return {"type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": COLLECTION[shape_name],
            "geometry": mapping(geom), "bbox": list(geom.bounds), "properties": props, "links": [],
            "assets": assets}


def utm_box(epsg: int, west: float, south: float, east: float, north: float, snap: float = 20.0
            ) -> tuple[float, float, float, float]:
    """Bounds in ``EPSG:epsg`` (snapped outwards to ``snap`` m) of the lon/lat box, for granule extents."""
    import math

    geom = shape(transform_geom("EPSG:4326", f"EPSG:{epsg}", mapping(box(west, south, east, north))))
    minx, miny, maxx, maxy = geom.bounds
    return (math.floor(minx / snap) * snap, math.floor(miny / snap) * snap,
            math.ceil(maxx / snap) * snap, math.ceil(maxy / snap) * snap)

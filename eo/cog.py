"""Reading the area of interest out of a remote Cloud-Optimised GeoTIFF.

Only the AOI window is fetched: the COG is opened through GDAL's /vsicurl/ (HTTP Range requests, the
header and the tiles that intersect the window) and warped through a ``WarpedVRT`` onto the requested
grid — the source grid by default, or a common grid (``dst_crs`` + ``resolution`` [+ ``bounds``]) when
two scenes must line up pixel for pixel.

Every href goes through :func:`eo.security.check_href` first, and every connection GDAL then makes for
it — each redirect hop included — through the policy proxy of :mod:`eo.egress`; nothing else in the
service opens third-party URLs with GDAL.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.env import get_gdal_config, set_gdal_config
from rasterio.errors import RasterioError
from rasterio.features import geometry_mask
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, transform_geom
from rasterio.windows import Window
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from core.config import CatalogueSettings
from eo import egress
from eo.security import HrefRefused, check_href

logger = logging.getLogger(__name__)

# One read larger than this (pixels per band) is refused: it would mean a continent-sized window at full
# resolution, which is a programming or configuration mistake, not something to fetch. The workers read
# large areas block by block (workers/raster.py), so no read of theirs comes near it.
MAX_PIXELS = 64_000_000
# GDAL's raster block cache (decoded tiles, process-wide; its default is 5 % of RAM, 1.2 GB on a 24 GB
# worker). A CogSession keeps datasets open, so their cached tiles stay resident up to the cap whatever the
# area's size. Measured on bench_pipeline's pairs (requests, MB from the server, peak RSS; per-read opens
# were 484, 86.7 MB, 0.67 GB at 1,000 km2 and 3400, 818 MB, 0.85 GB at 10,000 km2): 128 MB — 266, 65.4 MB
# at 1,000 km2 but 1.10 GB peak at 10,000 km2; 64 MB — 0.97 GB; 32 MB — 3485, 791 MB, 0.90 GB at
# 10,000 km2 and ~380, 81.6 MB at 1,000 km2. The 1 GB goal for the largest areas decides: 32 MB.
BLOCK_CACHE_BYTES = 32 * 1024 * 1024
# GDAL's /vsicurl/ remembers a URL's failure (403, 404, 503, a refused redirect hop) for the life of the
# process and answers every later open of that URL from that memory, without a request: an asset that was
# not yet uploaded when its item was published, or a host that answered 503 once, stayed unreadable in
# that worker until it restarted. URLs whose last read failed are opened once more with GDAL's cache
# bypassed (CPL_VSIL_CURL_NON_CACHED, which also drops the stale entry); the set is bounded, oldest out.
_RETRY_UNCACHED_MAX = 4096
_failed_urls: dict[str, None] = {}
_failed_lock = threading.Lock()


class CogReadError(RuntimeError):
    """A COG could not be opened or read; carries the href and GDAL's message."""

    def __init__(self, href: str, message: str):
        super().__init__(f"cannot read {href}: {message}")
        self.href = href
        self.gdal_message = message


@dataclass
class AoiRaster:
    """Pixels of the AOI on one grid."""

    array: np.ndarray  # (bands, height, width), the file's data type
    transform: Affine
    crs: CRS
    nodata: float | None
    mask: np.ndarray | None  # (height, width) bool: True where the pixel centre is inside the AOI polygon
    href: str
    overview_level: int | None = None  # the overview read (0 = first), None = full resolution

    @property
    def shape(self) -> tuple[int, int]:
        return self.array.shape[1], self.array.shape[2]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        height, width = self.shape
        left, top = self.transform.c, self.transform.f
        return left, top + height * self.transform.e, left + width * self.transform.a, top


def gdal_env(timeout_seconds: float = 30.0, **overrides: Any) -> rasterio.Env:
    """GDAL settings for remote COGs (why each: design notes §3.7)."""
    options: dict[str, Any] = {
        # Do not list the "directory" of an HTTP URL looking for sidecar files: one wasted request each.
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.TIF,.tiff",
        # Adjacent tiles in one Range request, several requests over one HTTP/2 connection.
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "GDAL_HTTP_MULTIPLEX": "YES",
        "VSI_CACHE": "TRUE",
        "GDAL_HTTP_MAX_RETRY": 3,
        "GDAL_HTTP_RETRY_DELAY": 1,
        "GDAL_HTTP_TIMEOUT": math.ceil(timeout_seconds),
        "GDAL_HTTP_CONNECTTIMEOUT": math.ceil(min(timeout_seconds, 10.0)),
    }
    options.update(overrides)
    return rasterio.Env(**options)


def utm_crs_for(geom_4326: BaseGeometry) -> CRS:
    """The UTM zone (WGS84) of the geometry's centroid: a metric grid for areas and common grids."""
    point = geom_4326.centroid
    lon = ((point.x + 180.0) % 360.0) - 180.0
    zone = min(int((lon + 180.0) // 6.0) + 1, 60)
    return CRS.from_epsg((32600 if point.y >= 0 else 32700) + zone)


def read_aoi(
    href: str,
    geom_4326: BaseGeometry | None,
    *,
    catalogue: CatalogueSettings,
    dst_crs: Any = None,
    resolution: float | tuple[float, float] | None = None,
    resampling: Resampling = Resampling.nearest,
    bounds: tuple[float, float, float, float] | None = None,
    indexes: int | list[int] | None = None,
    aoi_mask: bool = True,
    use_overviews: bool = False,
    tolerance: float | None = None,
    session: CogSession | None = None,
) -> AoiRaster:
    """Read the window of ``href`` covering ``geom_4326`` (EPSG:4326) on the requested grid (``geom_4326``
    may be None when ``bounds`` are given and ``aoi_mask`` is False).

    - default grid: the file's own CRS and pixel size, window snapped to its pixel grid (no resampling);
    - ``dst_crs`` / ``resolution``: that CRS and pixel size, window snapped to multiples of the pixel size
      so every scene read for the same AOI lands on the same grid;
    - ``bounds`` (in ``dst_crs``): exactly this extent (a caller-defined common grid).

    ``aoi_mask=False`` skips rasterising the AOI polygon (``mask`` is None; block readers that have their own
    AOI mask). ``use_overviews=True`` reads from the coarsest internal overview whose pixels are still no
    larger than the requested ``resolution`` (thumbnails, coarse cloud screens: a fraction of the bytes);
    nearest resampling of an overview built with nearest (SCL) keeps classes classes. ``tolerance``: the
    warp's approximation error in source pixels (GDAL's default 0.125 when None; a tiny value = exact transformer,
    so a pixel's value does not depend on the window it is read in — shared mask reads need that).

    ``session``: read through a :class:`CogSession`'s open dataset (one open per file and analysis, not one
    per read); the same policy check, proxy and errors.

    Pixels outside the file are ``nodata``. Raises :class:`eo.security.HrefRefused` for hrefs that
    must not be opened and :class:`CogReadError` for unreadable or corrupt files.
    """
    checked = session.opener(href, catalogue) if session is not None else open_checked(href, catalogue)
    with checked as opener:
        with opener() as src:
            level = overview_level(src, dst_crs, resolution) if use_overviews else None
            if level is None:
                return _read(src, href, geom_4326, dst_crs, resolution, resampling, bounds, indexes, aoi_mask,
                             tolerance)
        with opener(level) as src:
            raster = _read(src, href, geom_4326, dst_crs, resolution, resampling, bounds, indexes, aoi_mask,
                           tolerance)
            raster.overview_level = level
            return raster


@contextmanager
def open_checked(href: str, catalogue: CatalogueSettings) -> Iterator[Callable[..., Any]]:
    """``href`` checked against the catalogue's policy (:func:`eo.security.check_href`), GDAL set up for it
    (policy proxy included); yields ``opener(overview_level=None)`` → an open rasterio dataset (a context
    manager), to be called as often as needed while the block runs (one policy check and proxy token for
    many reads). Errors inside the block come out as :class:`eo.security.HrefRefused` (a redirect outside
    the policy) or :class:`CogReadError` (unreadable, corrupt, HTTP errors)."""
    url = check_href(href, catalogue)
    proxy = egress.guard() if egress.uses_proxy(url) else None
    token = proxy.open_read(catalogue) if proxy else None
    try:
        options = proxy.gdal_options(token) if proxy and token else {}
        with gdal_env(catalogue.timeout_seconds, **options, **_uncached_if_failed(url)):
            yield lambda overview_level=None: rasterio.open(url, overview_level=overview_level)
        _note_outcome(url, failed=False)
    except CogReadError:
        _note_outcome(url, failed=True)
        raise
    except (RasterioError, OSError, ValueError) as exc:
        _note_outcome(url, failed=True)
        raise _read_error(href, exc, proxy, token) from exc
    finally:
        if proxy and token:
            proxy.close_read(token)


def _uncached_if_failed(url: str) -> dict[str, str]:
    """GDAL options that bypass the /vsicurl/ cache for ``url`` when its last read in this process failed."""
    with _failed_lock:
        failed = url in _failed_urls
    return {"CPL_VSIL_CURL_NON_CACHED": f"/vsicurl/{url}"} if failed and egress.uses_proxy(url) else {}


def _note_outcome(url: str, failed: bool) -> None:
    with _failed_lock:
        if not failed:
            _failed_urls.pop(url, None)
            return
        _failed_urls[url] = None
        while len(_failed_urls) > _RETRY_UNCACHED_MAX:
            del _failed_urls[next(iter(_failed_urls))]


def _read_error(href: str, exc: Exception, proxy: egress.EgressGuard | None, token: str | None) -> Exception:
    refused = proxy.refusals(token) if proxy and token else []
    if refused:  # a redirect hop outside the policy: say so, not "HTTP error 403"
        return HrefRefused(f"href {href!r} redirected outside the policy: {refused[0].reason}")
    # RasterioIOError (not found, not a TIFF), CPLE_* (corrupt tiles), HTTP errors surfaced by GDAL.
    return CogReadError(href, str(exc) or exc.__class__.__name__)


def _cap_block_cache() -> None:
    """Lower GDAL's block cache to :data:`BLOCK_CACHE_BYTES` (never raise one configured lower)."""
    current = get_gdal_config("GDAL_CACHEMAX")
    if current is None or int(current) > BLOCK_CACHE_BYTES:
        set_gdal_config("GDAL_CACHEMAX", BLOCK_CACHE_BYTES)


class _OpenFile:
    """One checked href of a :class:`CogSession`: its proxy token and its open datasets by overview level."""

    def __init__(self, href: str, catalogue: CatalogueSettings):
        self.href, self.catalogue = href, catalogue
        self.url = check_href(href, catalogue)
        self.proxy = egress.guard() if egress.uses_proxy(self.url) else None
        self.token = self.proxy.open_read(catalogue) if self.proxy else None
        self.options = self.proxy.gdal_options(self.token) if self.proxy and self.token else {}
        self.options.update(_uncached_if_failed(self.url))
        self.lock = threading.Lock()  # a GDAL dataset is read by one thread at a time
        self.datasets: dict[int | None, Any] = {}

    def dataset(self, level: int | None) -> Any:
        if level not in self.datasets:
            self.datasets[level] = rasterio.open(self.url, overview_level=level)
        return self.datasets[level]

    def close(self) -> None:
        for dataset in self.datasets.values():
            dataset.close()
        self.datasets.clear()
        if self.proxy and self.token:
            self.proxy.close_read(self.token)
            self.token = None


class CogSession:
    """COGs opened once and read many times (``with CogSession() as cogs: read_aoi(..., session=cogs)``).

    A block-by-block analysis reads every asset once per block; through a session each file is checked
    against the policy and opened once, and every read goes through its open dataset (header and IFDs
    parsed once; GDAL's block cache of that dataset serves the tiles a block's halo shares with the block
    read before it, which a fresh open would fetch and decompress again). Each read still runs in the
    read's own GDAL environment with the file's proxy credentials (:mod:`eo.egress`: every connection,
    redirects included, passes the policy proxy), which live until the session closes. Thread-safe: reads
    of one file are serialised, different files are read in parallel.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[tuple[str, int], _OpenFile] = {}
        _cap_block_cache()

    def __enter__(self) -> CogSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            files, self._files = list(self._files.values()), {}
        for entry in files:
            with entry.lock:
                entry.close()

    @contextmanager
    def opener(self, href: str, catalogue: CatalogueSettings) -> Iterator[Callable[..., Any]]:
        """:func:`open_checked` through this session's open dataset of ``href`` (held for the block)."""
        key = (href, id(catalogue))
        with self._lock:
            entry = self._files.get(key)
            if entry is None or entry.catalogue is not catalogue:
                entry = self._files[key] = _OpenFile(href, catalogue)
        with entry.lock:
            try:
                with gdal_env(catalogue.timeout_seconds, **entry.options):
                    yield lambda overview_level=None: nullcontext(entry.dataset(overview_level))
                _note_outcome(entry.url, failed=False)
            except CogReadError:
                _note_outcome(entry.url, failed=True)
                raise
            except (RasterioError, OSError, ValueError) as exc:
                _note_outcome(entry.url, failed=True)
                error = _read_error(href, exc, entry.proxy, entry.token)
                entry.close()  # a dataset that failed a read is not trusted for the next one
                with self._lock:
                    if self._files.get(key) is entry:
                        del self._files[key]
                raise error from exc


def overview_level(src: Any, dst_crs: Any, resolution: Any) -> int | None:
    """Index of the coarsest overview whose pixel is no larger than ``resolution``; None = full resolution."""
    if resolution is None:
        return None
    target = min(resolution) if isinstance(resolution, tuple | list) else float(resolution)
    native = min(abs(src.res[0]), abs(src.res[1]))
    crs = CRS.from_user_input(dst_crs) if dst_crs is not None else src.crs
    if src.crs is not None and crs != src.crs:
        transform, _, _ = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
        native = min(abs(transform.a), abs(transform.e))
    level = None
    for k, factor in enumerate(src.overviews(1)):
        if native * factor <= target * (1 + 1e-6):
            level = k
    return level


def _read(src: Any, href: str, geom_4326: BaseGeometry | None, dst_crs: Any, resolution: Any,
          resampling: Resampling, bounds: tuple[float, float, float, float] | None, indexes: int | list[int] | None,
          aoi_mask: bool = True, tolerance: float | None = None) -> AoiRaster:
    if src.crs is None:
        raise CogReadError(href, "the file has no CRS (not georeferenced)")
    crs = CRS.from_user_input(dst_crs) if dst_crs is not None else src.crs
    same_grid = crs == src.crs and resolution is None
    if resolution is None:
        if crs == src.crs:
            res = (abs(src.res[0]), abs(src.res[1]))
        else:
            transform, _, _ = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
            res = (abs(transform.a), abs(transform.e))
    elif isinstance(resolution, tuple | list):
        res = (float(resolution[0]), float(resolution[1]))
    else:
        res = (float(resolution), float(resolution))

    # Block readers pass their own bounds and AOI mask: no need to reproject the polygon for every band.
    geom_dst = shape(transform_geom("EPSG:4326", crs, mapping(geom_4326))) if bounds is None or aoi_mask else None
    if bounds is None:
        origin = (src.transform.c, src.transform.f) if same_grid else (0.0, 0.0)
        bounds = _snap(geom_dst.bounds, origin, res)
    left, bottom, right, top = bounds
    width = max(1, round((right - left) / res[0]))
    height = max(1, round((top - bottom) / res[1]))
    if width * height > MAX_PIXELS:
        raise CogReadError(href, f"the AOI window is {width}x{height} pixels at {res}; refusing (max {MAX_PIXELS})")
    dst_transform = Affine(res[0], 0.0, left, 0.0, -res[1], top)

    nodata = src.nodata
    window = _aligned_window(src, crs, res, dst_transform, resampling)
    if window is not None:
        array = _read_window(src, window, width, height, indexes, nodata if nodata is not None else 0)
    else:
        extra = {} if tolerance is None else {"tolerance": tolerance}
        with WarpedVRT(src, crs=crs, transform=dst_transform, width=width, height=height, resampling=resampling,
                       nodata=nodata if nodata is not None else 0, **extra) as vrt:
            array = vrt.read(indexes)
    if array.ndim == 2:
        array = array[np.newaxis, ...]
    if not aoi_mask:
        return AoiRaster(array=array, transform=dst_transform, crs=crs, nodata=nodata if nodata is not None else 0,
                         mask=None, href=href)
    mask = geometry_mask([mapping(geom_dst)], out_shape=(height, width), transform=dst_transform, invert=True)
    if not mask.any():
        # An AOI smaller than a pixel: count the pixels it touches rather than none.
        mask = geometry_mask([mapping(geom_dst)], out_shape=(height, width), transform=dst_transform, invert=True,
                             all_touched=True)
    logger.debug("read %s: %dx%d px of %s at %s", href, width, height, crs, res)
    return AoiRaster(array=array, transform=dst_transform, crs=crs, nodata=nodata if nodata is not None else 0,
                     mask=mask, href=href)


def _aligned_window(src: Any, crs: CRS, res: tuple[float, float], dst_transform: Affine,
                    resampling: Resampling) -> Window | None:
    """The file's pixel window that IS the requested grid (same CRS, pixel size and pixel edges), else None.

    Nearest-neighbour warping onto such a grid copies every pixel, so reading the window gives the same
    array at about half the CPU of GDAL's warper (bench_pipeline: the same-zone reads of every block). Only
    when the file has no mask other than its no-data value, which the warper would also apply.
    """
    t = src.transform
    if resampling != Resampling.nearest or crs != src.crs or t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
        return None
    if not (math.isclose(t.a, res[0], rel_tol=1e-9) and math.isclose(-t.e, res[1], rel_tol=1e-9)):
        return None
    col, row = (dst_transform.c - t.c) / t.a, (t.f - dst_transform.f) / -t.e
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    if any(set(flags) - {MaskFlags.all_valid, MaskFlags.nodata} for flags in src.mask_flag_enums):
        return None
    return Window(round(col), round(row), 0, 0)


def _read_window(src: Any, origin: Window, width: int, height: int, indexes: int | list[int] | None,
                 fill: float) -> np.ndarray:
    """(bands, height, width) from ``origin`` (col_off/row_off on the file's grid); outside the file ``fill``."""
    bands = [indexes] if isinstance(indexes, int) else list(indexes) if indexes is not None else list(src.indexes)
    c0, r0 = max(0, origin.col_off), max(0, origin.row_off)
    c1, r1 = min(src.width, origin.col_off + width), min(src.height, origin.row_off + height)
    if (c1 - c0, r1 - r0) == (width, height):  # inside the file: GDAL's array as it is, no fill and copy
        return src.read(bands, window=Window(c0, r0, width, height))
    array = np.full((len(bands), height, width), fill, dtype=src.dtypes[bands[0] - 1])
    if c1 > c0 and r1 > r0:
        part = src.read(bands, window=Window(c0, r0, c1 - c0, r1 - r0))
        array[:, r0 - origin.row_off:r1 - origin.row_off, c0 - origin.col_off:c1 - origin.col_off] = part
    return array


def _snap(b: tuple[float, float, float, float], origin: tuple[float, float],
          res: tuple[float, float]) -> tuple[float, float, float, float]:
    """Grow bounds outwards to whole pixels of the grid anchored at ``origin``."""
    ox, oy = origin
    rx, ry = res
    eps = 1e-9
    left = ox + math.floor((b[0] - ox) / rx + eps) * rx
    right = ox + math.ceil((b[2] - ox) / rx - eps) * rx
    top = oy - math.floor((oy - b[3]) / ry + eps) * ry
    bottom = oy - math.ceil((oy - b[1]) / ry - eps) * ry
    if right <= left:
        right = left + rx
    if top <= bottom:
        bottom = top - ry
    return left, bottom, right, top

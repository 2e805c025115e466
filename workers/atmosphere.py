"""Is a loss region haze or a cloud's edge that the cloud mask called clear? (the screen's atmospheric tests)

A loss region's NDVI fell; :mod:`workers.screen` judged the fall a departure from the season. Two things
other than a cut lower NDVI without any change on the ground, and SCL calls both clear often enough to
alert (on the 140-date sample cube: the first-year false alerts of 2016-05-27, 4.07 ha of semi-transparent
cloud margins inside a cloud shadow, and the 0.29 ha colour fringe beside the 2018-08-15 cloud band):

1. **Haze and thin cloud** (``reason = "haze"``): scattering adds path radiance that is largest at short
   wavelengths, so over forest it lifts blue at least as much as red (the haze-optimised transform's idea,
   Zhang, Guindon & Cihlar 2002: haze departs from the clear blue-red line towards blue). Exposed soil,
   slash and roads are the other way round: red rises far more than blue. Both are measured against the
   same scene's lit forest (clear pixels with NDVI ≥ :data:`LIT_NDVI` outside the loss regions), so the
   test needs no history and holds in an area's first year, when the harmonic model cannot be fitted. A
   pixel looks hazy when its blue lift (blue / lit-forest blue) is at least :data:`HAZE_LIFT` × its red
   lift *and* its red − blue exceeds the lit forest's by less than :data:`HAZE_REDNESS` (a pale gravel road
   lifts blue nearly as much as red but stays redder than forest). On the sample the departing cuts'
   median lift ratio is 0.43 .. 0.74, the 2016-05-27 cloud margins' 0.99 .. 1.36, the 2018-08-15 haze's
   1.01 .. 1.12.
2. **Cloud edge** (``reason = "cloud edge"``): the pixels round a cloud or its shadow are mixed, and
   Sentinel-2's bands are imaged a moment apart, so a cloud's edge lies in a slightly different place in
   blue, red and NIR (the colour fringes of 2018-08-15). A region of which most pixels lie within
   :data:`EDGE_M` of a cloud or cloud-shadow pixel of the cloud mask (SCL 3, 8, 9, 10; QA_PIXEL cloud bits),
   of a haze pixel (:func:`eo.masks.haze_mask`) or of a region judged atmospheric on the same date cannot be
   judged by its colour. :data:`EDGE_M` is Fmask's dilation of its cloud and shadow masks (3 Landsat
   pixels, Zhu & Woodcock 2012). On the sample, the cuts the benchmark alerts lie ≥ 600 m from SCL cloud
   and shadow (when their date has any); the false regions 20 .. 55 m from cloud, shadow or haze.

A region is atmospheric when at least :data:`SHARE` of its screened pixels look hazy (only on a date that
shows cloud, shadow or haze somewhere in the window: thin cloud and a grey surface such as concrete or
gravel are the same colour), or lie at a cloud edge.

The bundled cube has no SWIR band (B02, B03, B04, B08 and SCL only), so the darkness of a shadow in SWIR
(Fmask's shadow test) is not used, nor the sun's azimuth to find the cloud that casts a shadow: on
2016-05-27 the shadow's core keeps NDVI ≈ 0.8 (a shadow darkens red and NIR alike) and is no loss region;
only its cloud-lit margins are, and the haze test rejects them.

Reads: the after scene's cloud mask, blue and red over the screen's window (one read per analysis that
has departing loss regions).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from rasterio.features import geometry_mask
from scipy import ndimage
from shapely.geometry import mapping

from eo.cog import CogReadError
from eo.masks import CLOUD_SCL, QA_CLOUDY, haze_mask
from eo.security import HrefRefused
from workers.raster import Grid, SceneRef, SkipAnalysis, _reflectance, mask_band, read_band

logger = logging.getLogger(__name__)

HAZE, CLOUD_EDGE = "haze", "cloud edge"
LIT_NDVI = 0.6  # NDVI of the lit, clear forest the lifts are measured against
HAZE_LIFT = 0.85  # blue lift / red lift at or above which a pixel brightened as haze does
HAZE_REDNESS = 0.015  # red − blue reflectance above the lit forest's: at or beyond it the pixel is red (bare)
EDGE_M = 90.0  # Fmask's cloud/shadow dilation: 3 pixels of 30 m
SHARE = 0.5  # of a region's pixels


@dataclass
class AfterLook:
    """The after scene over the window: blue and red reflectance (NaN = no data), the cloud/shadow/haze
    pixels (bool) and the lit forest's medians (None: no lit forest clear in the window)."""

    blue: np.ndarray
    red: np.ndarray
    cloud: np.ndarray
    lit_blue: float | None
    lit_red: float | None


def read_look(after: SceneRef, window: Grid, ndvi_a: np.ndarray, loss: np.ndarray) -> AfterLook | None:
    """Read the after scene's cloud mask, blue and red over ``window``; ``ndvi_a``: its clear NDVI (NaN =
    not clear), ``loss``: the loss regions' pixels (left out of the lit forest). None without a blue band."""
    if "blue" not in after.assets:
        return None
    key = mask_band(after)
    raw_mask = read_band(after, key, window)
    blue = _reflectance(after, "blue", read_band(after, "blue", window))
    red = _reflectance(after, "red", read_band(after, "red", window))
    values = raw_mask.data
    cloud = np.isin(values, CLOUD_SCL) if key == "scl" else (values.astype(np.int64) & QA_CLOUDY) != 0
    cloud &= ~np.ma.getmaskarray(raw_mask)
    with np.errstate(invalid="ignore"):
        cloud |= haze_mask(blue, red, 0)
        lit = np.isfinite(ndvi_a) & (ndvi_a >= LIT_NDVI) & ~loss & np.isfinite(blue) & np.isfinite(red)
    if lit.sum() < 10:
        return AfterLook(blue, red, cloud, None, None)
    return AfterLook(blue, red, cloud, float(np.median(blue[lit])), float(np.median(red[lit])))


def judge(masks: Callable[[int], np.ndarray], n: int, atmospheric: np.ndarray, look: AfterLook,
          pixel_size: float) -> list[tuple[str, dict[str, Any]] | None]:
    """Per region ``k < n`` (``masks(k)``: its screened pixels, bool of the window's shape, built on demand so
    that many regions over a large window never sit in memory together): ``(reason, figures)`` when it is
    haze or a cloud edge, else None. ``atmospheric``: pixels of regions already judged atmospheric on this
    date (their edges count as cloud edges)."""
    out: list[tuple[str, dict[str, Any]] | None] = [None] * n
    source = look.cloud | atmospheric
    # Colour alone cannot tell thin cloud from a grey surface (concrete, gravel): both lift blue and red
    # alike. Haze is judged on a date that shows cloud, shadow or haze somewhere in the window.
    if look.lit_blue and look.lit_red and source.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = (look.blue / look.lit_blue) / (look.red / look.lit_red)
            redder = (look.red - look.blue) - (look.lit_red - look.lit_blue)
            hazy = (lift >= HAZE_LIFT) & (redder < HAZE_REDNESS)
        for k in range(n):
            m = masks(k)
            size = int(m.sum())
            share = float(hazy[m].sum()) / size if size else 0.0
            if share >= SHARE:
                out[k] = (HAZE, {"hazy_share": round(share, 3),
                                 "blue_red_lift": round(float(np.nanmedian(lift[m])), 3)})
                source |= m
    if not source.any():
        return out
    near = ndimage.distance_transform_edt(~source) * pixel_size <= EDGE_M
    for k in range(n):
        if out[k] is not None:
            continue
        m = masks(k)
        size = int(m.sum())
        share = float((near & m).sum()) / size if size else 0.0
        if share >= SHARE:
            out[k] = (CLOUD_EDGE, {"cloud_edge_share": round(share, 3), "edge_m": EDGE_M})
    return out


def recheck(geoms: list, verdicts: list[str], signs: list[int | None], after: SceneRef, window: Grid,
            ndvi_a: np.ndarray) -> list[tuple[str, dict[str, Any]] | None]:
    """The atmospheric tests of the screen's ``departure`` loss regions (``signs[i]`` −1) of one analysis:
    per region ``(reason, figures)`` or None (not judged or not atmospheric). ``geoms``: the regions in the
    window's CRS; ``verdicts``: the screen's verdicts so far (``atmospheric`` ones are cloud-edge sources).
    An unreadable after scene leaves every region as it was (logged)."""
    todo = [k for k, (v, s) in enumerate(zip(verdicts, signs, strict=True)) if v == "departure" and s == -1]
    out: list[tuple[str, dict[str, Any]] | None] = [None] * len(geoms)
    if not todo:
        return out
    shape = (window.height, window.width)

    def raster(ks: list[int]) -> np.ndarray:
        if not ks:
            return np.zeros(shape, bool)
        return geometry_mask([mapping(geoms[k]) for k in ks], out_shape=shape, transform=window.transform,
                             invert=True)

    loss = raster([k for k, s in enumerate(signs) if s == -1])
    atmospheric = raster([k for k, v in enumerate(verdicts) if v == "atmospheric" and signs[k] == -1])
    try:
        look = read_look(after, window, ndvi_a, loss)
    except (CogReadError, HrefRefused, SkipAnalysis) as exc:
        logger.warning("screen: atmospheric tests left out, after scene unreadable: %s", exc)
        return out
    if look is None:
        return out
    clear = np.isfinite(ndvi_a)
    hits = judge(lambda j: raster([todo[j]]) & clear, len(todo), atmospheric, look, window.pixel_size)
    for k, hit in zip(todo, hits, strict=True):
        out[k] = hit
    return out

"""The clear-pixel rule, one per sensor: Sentinel-2 SCL classes, Landsat Collection 2 QA_PIXEL bits.

:func:`clear_mask` is used by pairing (AOI clear fraction, ``buffer_px=0``: is the sky clear over the
area?) and by the workers (which pixels to compare, clouds and shadows buffered by
``analysis.cloud_buffer_px``). Sources: ESA *Sentinel-2 L2A Product Specification* (SCL classes);
USGS *Landsat 8-9 Collection 2 Level-2 Science Product Guide* (QA_PIXEL bits 0-7).

Clouds and their shadows are the main source of false change (design notes §3.5): edges of clouds are
missed by the classifiers and shadows are offset from the cloud that casts them. So cloud and shadow
classes are grown by ``cloud_buffer_px`` pixels (a disk-shaped binary dilation, numpy only) before
anything is compared.
"""

from __future__ import annotations

import math

import numpy as np

# SCL classes counted as clear: vegetation, not vegetated, water, unclassified. Dark areas (2) are left
# out because unflagged cloud shadows land there; snow (11) because snow appearing or melting is
# seasonal, not the land change users watch.
CLEAR_SCL = (4, 5, 6, 7)
OPTIONAL_CLEAR_SCL = (2, 11)
# Cloud shadow, cloud medium / high probability, thin cirrus: buffered before comparing.
CLOUD_SCL = (3, 8, 9, 10)

# Landsat Collection 2 QA_PIXEL bits.
QA_FILL = 1 << 0
QA_DILATED_CLOUD = 1 << 1
QA_CIRRUS = 1 << 2
QA_CLOUD = 1 << 3
QA_SHADOW = 1 << 4
QA_SNOW = 1 << 5
QA_CLEAR = 1 << 6
QA_WATER = 1 << 7
QA_CLOUDY = QA_DILATED_CLOUD | QA_CIRRUS | QA_CLOUD | QA_SHADOW
QA_NOT_CLEAR = QA_FILL | QA_CLOUDY | QA_SNOW


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of ``mask`` by a disk of ``radius`` pixels (pixels within ``radius`` of a set pixel,
    Euclidean, centre to centre; numpy only).

    The disk is taken row by row: a row ``dy`` from the centre reaches ``w(dy) = floor(sqrt(r² − dy²))``
    columns either side. So the mask is first dilated along rows once per distinct half-width (each wider
    one grown from the narrower), then the row-dilated masks are ORed in at their row offsets: 12 array
    ORs for radius 3 instead of the 28 of one shifted OR per disk offset, and the same pixels.
    """
    if radius <= 0 or not mask.any():
        return mask.copy()
    height, width = mask.shape
    halves = [math.isqrt(radius * radius - dy * dy) for dy in range(radius + 1)]
    rows: dict[int, np.ndarray] = {0: mask}
    grown, reach = mask, 0
    for w in sorted(set(halves)):
        if w == 0:
            continue
        grown = grown.copy()
        for dx in range(reach + 1, w + 1):  # grown = source ORed with its shifts up to ±w
            for d in (dx, -dx):
                xs, xd = _shift(d, width)
                grown[:, xd] |= mask[:, xs]
        rows[w], reach = grown, w
    out = rows[halves[0]].copy()
    for dy in range(1, radius + 1):
        band = rows[halves[dy]]
        for d in (dy, -dy):
            ys, yd = _shift(d, height)
            out[yd] |= band[ys]
    return out


def _shift(d: int, n: int) -> tuple[slice, slice]:
    """(source, destination) slices of a shift by ``d`` along an axis of length ``n`` (empty when |d| ≥ n)."""
    if abs(d) >= n:
        return slice(0, 0), slice(0, 0)
    if d >= 0:
        return slice(0, n - d), slice(d, n)
    return slice(-d, n), slice(0, n + d)


def scl_clear(scl: np.ndarray, buffer_px: int, extra_clear: tuple[int, ...] = ()) -> np.ndarray:
    """True where the SCL class is clear and no (buffered) cloud or cloud shadow is near."""
    clear = _in_classes(scl, CLEAR_SCL + tuple(extra_clear))
    cloudy = dilate(_in_classes(scl, CLOUD_SCL), buffer_px)
    return clear & ~cloudy


def _in_classes(values: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """``np.isin(values, classes)``; for uint8 (SCL as stored) one table look-up per pixel instead of one
    comparison pass per class (a quarter of a 1,000 km² pair's mask time went to np.isin)."""
    if values.dtype != np.uint8:
        return np.isin(values, classes)
    table = np.zeros(256, dtype=bool)
    table[[c for c in classes if 0 <= c < 256]] = True
    return table[values]


def qa_pixel_clear(qa: np.ndarray, buffer_px: int) -> np.ndarray:
    """Landsat: True where the clear or water bit is set and no fill / cloud / cirrus / shadow / snow bit,
    away from (buffered) clouds."""
    values = qa.astype(np.uint32)
    clear = ((values & QA_NOT_CLEAR) == 0) & ((values & (QA_CLEAR | QA_WATER)) != 0)
    cloudy = dilate((values & QA_CLOUDY) != 0, buffer_px)
    return clear & ~cloudy


# SCL misses small and thin clouds (design notes §3.5: "the coarse CLM misses small clouds"). Haze and
# cloud are white — bright in blue relative to red — unlike bare soil, roads or clear-cuts, which are
# redder. The haze-optimised transform (Zhang, Guindon & Cihlar 2002) puts them above a line in blue/red
# space. On the bundled sample, SCL-clear land sits ≥ 0.034 below the line on every date; the one small
# cloud SCL missed (2019-08-20) rises 0.025 above it.
HOT_SLOPE = 0.5
HOT_INTERCEPT = 0.08


def haze_mask(blue: np.ndarray, red: np.ndarray, buffer_px: int) -> np.ndarray:
    """True where a pixel looks like haze or cloud (HOT > 0), buffered like SCL clouds. NaN never flags."""
    # blue − 0.5·red − 0.08 in the same order and dtype, without the temporaries; NaN > 0 is False.
    hot = np.multiply(red, HOT_SLOPE)
    np.subtract(blue, hot, out=hot)
    hot -= HOT_INTERCEPT
    return dilate(hot > 0, buffer_px)


#: Mask asset keys (logical band names) with a clear-pixel rule, in order of preference.
MASK_BANDS = ("scl", "qa_pixel")


def clear_mask(mask_band: str, values: np.ndarray, buffer_px: int = 0) -> np.ndarray:
    """Boolean array, True where ``values`` of the mask asset ``mask_band`` (``"scl"`` or ``"qa_pixel"``)
    say the pixel is clear (clouds/shadows grown by ``buffer_px``). Raises ``ValueError`` for another band."""
    if mask_band == "scl":
        return scl_clear(values, buffer_px)
    if mask_band == "qa_pixel":
        return qa_pixel_clear(values, buffer_px)
    raise ValueError(f"no clear-pixel rule for mask band {mask_band!r} (have: {', '.join(MASK_BANDS)})")


def clear_fraction(mask_band: str, values: np.ndarray, inside: np.ndarray) -> float:
    """Share of the ``inside`` pixels that are clear (unbuffered); 0.0 when nothing is inside."""
    total = int(inside.sum())
    if total == 0:
        return 0.0
    return float(clear_mask(mask_band, values)[inside].sum()) / total

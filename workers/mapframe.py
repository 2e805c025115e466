"""The email imagery frame: a thumbnail made readable on its own — at least :data:`MAP_SIDE` px, the area
outline, a scale bar, a north arrow and a class legend.

Everything sits in a white strip *below* the map (:data:`FOOTER_PX` high, the same for the before, after
and overlay images so they line up), except the area outline, which is drawn on the map. The thumbnail
grid is a UTM grid, rows running north to south, so up is grid north (within a degree or two of true
north inside a UTM zone): that is what the arrow shows.

Drawn with Pillow only (its bundled scalable font), no plotting library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

#: Least longer side of the map part of an email image, px: smaller thumbnails are upscaled (nearest, so
#: pixels stay visible as pixels); larger ones (up to the 1024 px thumbnail canvas) are kept as they are.
MAP_SIDE = 512
#: Height of the strip under the map: scale bar and north arrow, then up to two rows of legend.
FOOTER_PX = 92
OUTLINE = (255, 230, 0)  # the area outline: yellow, unlike every class colour
OUTLINE_PX = 2
SWATCH_PX = 12
TEXT = (31, 41, 55)
BAR = (17, 24, 39)
FONT_PX = 13
# Scale bar lengths are 1, 2 or 5 × 10^k metres, at most this share of the map width.
SCALE_BAR_MAX_SHARE = 0.3


@dataclass(frozen=True)
class ScaleBar:
    metres: float
    pixels: int
    label: str


@dataclass(frozen=True)
class LegendEntry:
    colour: tuple[int, int, int]
    label: str


def scale_bar(ground_width_m: float, width_px: int) -> ScaleBar:
    """The longest 1, 2 or 5 × 10^k m bar within :data:`SCALE_BAR_MAX_SHARE` of a map ``width_px`` wide
    covering ``ground_width_m``, its length in px (rounded) and its label ("200 m", "1 km"). Raises
    ValueError for a non-positive width."""
    if ground_width_m <= 0 or width_px <= 0:
        raise ValueError(f"scale bar needs a positive ground width and pixel width, got {ground_width_m}, {width_px}")
    limit = ground_width_m * SCALE_BAR_MAX_SHARE
    exponent = math.floor(math.log10(limit))
    metres = max(step * 10.0 ** exponent for step in (1, 2, 5) if step * 10.0 ** exponent <= limit)
    pixels = round(metres * width_px / ground_width_m)
    label = f"{metres / 1000:g} km" if metres >= 1000 else f"{metres:g} m"
    return ScaleBar(metres, pixels, label)


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_PX)


def map_size(height: int, width: int) -> tuple[int, int]:
    """(W, H) px of the map part for a ``height`` × ``width`` thumbnail (upscaled to :data:`MAP_SIDE`)."""
    if max(width, height) >= MAP_SIDE:
        return width, height
    scale = MAP_SIDE / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _upscaled(rgb8: np.ndarray) -> Image.Image:
    image = Image.fromarray(rgb8)
    size = map_size(*rgb8.shape[:2])
    return image if size == image.size else image.resize(size, Image.Resampling.NEAREST)


def outline_for(aoi: np.ndarray) -> np.ndarray:
    """(H, W) bool at the map's size: the area outline :func:`frame` draws for area mask ``aoi`` — computed
    once when several frames share the area (before, after, overlay: a 5 × 5 min filter each otherwise)."""
    return _outline(aoi, map_size(*aoi.shape))


def _outline(aoi: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the inner :data:`OUTLINE_PX` px band of the area mask at ``size`` (W, H)."""
    mask = Image.fromarray(aoi.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    eroded = mask.filter(ImageFilter.MinFilter(2 * OUTLINE_PX + 1))
    return (np.asarray(mask) > 0) & (np.asarray(eroded) == 0)


def _north_arrow(draw: ImageDraw.ImageDraw, right: int, top: int, font) -> None:
    cx, tip, base = right - 14, top + 2, top + 26
    draw.polygon([(cx, tip), (cx - 8, base), (cx, base - 6)], fill=BAR)
    draw.polygon([(cx, tip), (cx + 8, base), (cx, base - 6)], outline=BAR, fill=(255, 255, 255))
    draw.text((cx - 30, top + 8), "N", fill=TEXT, font=font, anchor="mm")


def frame(rgb8: np.ndarray, *, aoi: np.ndarray, pixel_m: float, legend: list[LegendEntry],
          outline: np.ndarray | None = None) -> Image.Image:
    """The email image of one (H, W, 3) uint8 thumbnail on a grid of ``pixel_m`` m pixels with area mask
    ``aoi`` (H, W): map upscaled to at least :data:`MAP_SIDE` px on its longer side, outline on it, and below it the
    scale bar, north arrow and legend (``legend``: the area outline comes first, then what is given).
    ``outline``: :func:`outline_for` of ``aoi``, when the caller frames several images of one area."""
    if rgb8.shape[:2] != aoi.shape:
        raise ValueError(f"thumbnail {rgb8.shape[:2]} and area mask {aoi.shape} differ in shape")
    map_image = _upscaled(rgb8)
    width, height = map_image.size
    pixels = np.array(map_image)
    if aoi.any():
        if outline is None:
            outline = _outline(aoi, (width, height))
        elif outline.shape != (height, width):
            raise ValueError(f"outline {outline.shape} is not the map's size {(height, width)}")
        pixels[outline] = OUTLINE
    canvas = Image.new("RGB", (width, height + FOOTER_PX), (255, 255, 255))
    canvas.paste(Image.fromarray(pixels), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font()

    bar = scale_bar(rgb8.shape[1] * pixel_m, width)
    left, top = 10, height + 10
    draw.rectangle([left, top + 14, left + bar.pixels - 1, top + 19], fill=BAR)
    for x in (left, left + bar.pixels - 1):
        draw.line([(x, top + 10), (x, top + 19)], fill=BAR, width=1)
    draw.text((left, top), bar.label, fill=TEXT, font=font, anchor="lt")
    _north_arrow(draw, width - 6, top - 2, font)

    x, y = left, height + 40
    for entry in [LegendEntry(OUTLINE, "area outline"), *legend]:
        text_width = draw.textlength(entry.label, font=font)
        if x > left and x + SWATCH_PX + 6 + text_width > width - 10:
            x, y = left, y + 22
        draw.rectangle([x, y, x + SWATCH_PX - 1, y + SWATCH_PX - 1], fill=entry.colour)
        draw.text((x + SWATCH_PX + 6, y + SWATCH_PX // 2), entry.label, fill=TEXT, font=font, anchor="lm")
        x += SWATCH_PX + 6 + int(text_width) + 16
    return canvas

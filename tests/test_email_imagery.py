"""The email imagery frame (workers/mapframe.py): size, area outline, scale bar, north arrow and legend,
measured on the pixels of the rendered image."""

from __future__ import annotations

import numpy as np
import pytest

from workers.mapframe import FOOTER_PX, OUTLINE, SWATCH_PX, LegendEntry, frame, scale_bar
from workers.render import CLASS_COLOURS

RED, ORANGE = CLASS_COLOURS[3], CLASS_COLOURS[2]


def test_scale_bar_is_the_longest_1_2_5_step_within_three_tenths_of_the_width():
    # 1,000 m over 512 px: at most 300 m -> 200 m = 102.4 px.
    bar = scale_bar(1000.0, 512)
    assert (bar.metres, bar.pixels, bar.label) == (200.0, 102, "200 m")
    bar = scale_bar(30_000.0, 512)  # at most 9 km -> 5 km
    assert (bar.metres, bar.pixels, bar.label) == (5000.0, 85, "5 km")
    bar = scale_bar(4_000.0, 1000)  # at most 1.2 km -> 1 km
    assert (bar.metres, bar.pixels, bar.label) == (1000.0, 250, "1 km")
    with pytest.raises(ValueError, match="positive ground width"):
        scale_bar(0.0, 512)


def _square_aoi() -> tuple[np.ndarray, np.ndarray]:
    rgb = np.full((100, 125, 3), 60, np.uint8)  # 1,250 m × 1,000 m at 10 m
    aoi = np.zeros((100, 125), bool)
    aoi[25:75, 25:100] = True
    return rgb, aoi


def test_frame_upscales_to_512_and_draws_the_outline_on_the_area_edge():
    rgb, aoi = _square_aoi()
    image = np.asarray(frame(rgb, aoi=aoi, pixel_m=10.0, legend=[]))
    assert image.shape == (410 + FOOTER_PX, 512, 3)  # 125 × 100 px -> 512 × 410 (409.6 rounded)
    map_part = image[:410]
    yellow = np.all(map_part == OUTLINE, axis=-1)
    rows, cols = np.nonzero(yellow)
    # The area's columns 25..99 at 512/125 px each and rows 25..74 at 410/100 px each (nearest: output pixel
    # x shows source column floor((x + 0.5) / scale), a tie like (102 + 0.5) / 4.1 = 25 falling to the lower
    # column): x 102..409, y 103..307; a 2 px inner band.
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (102, 409, 103, 307)
    assert not yellow[110:300, 110:400].any()  # the inside is not painted over
    assert np.all(map_part[~yellow] == 60)  # nor anything else of the map


def test_footer_holds_a_measured_scale_bar_a_north_arrow_and_the_legend():
    rgb, aoi = _square_aoi()
    legend = [LegendEntry(RED, "vegetation loss"), LegendEntry(ORANGE, "new built-up land or bare ground")]
    image = np.asarray(frame(rgb, aoi=aoi, pixel_m=10.0, legend=legend))
    footer = image[410:]
    # 1,250 m over 512 px: at most 375 m -> 200 m = 81.92 px -> an 82 px bar (dark, 6 px thick).
    bar_row = footer[26]
    dark = np.all(bar_row < 40, axis=-1)
    assert np.count_nonzero(dark) >= 82 and np.nonzero(dark)[0][[0, 81]].tolist() == [10, 91] and not dark[92:400].any()
    for colour in (OUTLINE, RED, ORANGE):  # one swatch each, nothing else in those exact colours
        assert np.count_nonzero(np.all(footer == colour, axis=-1)) == SWATCH_PX ** 2, colour
    assert np.count_nonzero(np.all(footer == CLASS_COLOURS[1], axis=-1)) == 0  # water change: not present
    arrow = footer[:30, 480:]
    assert np.count_nonzero(np.all(arrow < 40, axis=-1)) > 50  # the filled half of the arrow


def test_frame_refuses_a_mask_of_another_shape():
    rgb, aoi = _square_aoi()
    with pytest.raises(ValueError, match=r"thumbnail \(100, 125\) and area mask \(50, 50\) differ in shape"):
        frame(rgb, aoi=aoi[:50, :50], pixel_m=10.0, legend=[])

"""The haze test catches the small cloud SCL missed on the real 2019-08-20 scene, and nothing else."""

from pathlib import Path

import numpy as np
import pytest
import rasterio

from eo.masks import haze_mask, scl_clear

COGS = Path(__file__).resolve().parent.parent / "data" / "sentinel2-romania" / "cogs"
# (date, DN offset of its processing baseline): baseline 05.00 dates carry +1000.
DATES = [("2015-08-31", 0), ("2017-07-06", 0), ("2019-08-20", 1000), ("2020-08-29", 1000)]


def _reflectance(date: str, band: str, offset: int) -> np.ndarray:
    with rasterio.open(COGS / date / f"{band}.tif") as src:
        return (src.read(1).astype(np.float32) - offset) / 10000


@pytest.mark.parametrize(("date", "offset"), DATES)
def test_haze_only_where_scl_missed_a_cloud(date, offset):
    with rasterio.open(COGS / date / "scl.tif") as src:
        scl_ok = scl_clear(src.read(1), buffer_px=0)
    hazy = haze_mask(_reflectance(date, "blue", offset), _reflectance(date, "red", offset), buffer_px=0)
    missed = int((hazy & scl_ok).sum())
    if date == "2019-08-20":
        # A small cumulus in the north-west that SCL classifies as vegetation.
        assert 10 <= missed <= 60
        rows, cols = np.nonzero(hazy & scl_ok)
        assert rows.mean() < 50 and cols.mean() < 50
    else:
        assert missed == 0


def test_haze_mask_is_buffered_and_ignores_nan():
    blue = np.full((9, 9), 0.02, dtype=np.float32)
    red = np.full((9, 9), 0.03, dtype=np.float32)
    blue[4, 4] = 0.3  # one white pixel
    blue[0, 0] = np.nan
    assert haze_mask(blue, red, buffer_px=0).sum() == 1
    grown = haze_mask(blue, red, buffer_px=2)
    assert grown[4, 4] and grown[2, 4] and grown[4, 6] and not grown[0, 0]

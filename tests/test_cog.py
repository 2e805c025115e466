"""Windowed COG reads over HTTP (the sample COGs served with Range support)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import rasterio
from shapely.geometry import box

from devtools import localstac
from eo.cog import CogReadError, gdal_env, read_aoi, utm_crs_for
from tests.fixtures_ingest import LOOPBACK_HOSTS, inner_aoi
from tests.test_security import LOOPBACK_OPT_IN


def test_read_aoi_reads_only_the_window_on_the_source_grid(cog_server, sample_data_dir, sample_footprint):
    path = "cogs/2020-08-29/red.tif"
    aoi = inner_aoi(sample_footprint, shrink=0.35)
    cog_server.reset_stats()
    raster = read_aoi(cog_server.href(path), aoi, catalogue=LOOPBACK_OPT_IN)
    stats = cog_server.stats()
    with rasterio.open(sample_data_dir / path) as src:
        assert raster.crs == src.crs and raster.transform.a == src.transform.a
        # Snapped to the source pixel grid: identical values to a plain window read.
        window = src.window(*raster.bounds).round_offsets().round_lengths()
        expected = src.read(1, window=window)
    assert raster.array.shape == (1, *expected.shape)
    np.testing.assert_array_equal(raster.array[0], expected)
    assert 0 < raster.mask.sum() < raster.mask.size  # the rotated AOI does not fill its bounding box
    # Fetched with HTTP Range requests (header, then the tiles of the window), never a plain full GET.
    assert stats["range_requests"] >= 2 and stats["status"].get("200", 0) <= 1  # the 200 is GDAL's HEAD


def test_read_aoi_on_a_common_utm_grid(cog_server, sample_footprint):
    aoi = inner_aoi(sample_footprint)
    crs = utm_crs_for(aoi)
    assert crs.to_epsg() == 32634
    a = read_aoi(cog_server.href("cogs/2020-08-29/nir.tif"), aoi, catalogue=LOOPBACK_OPT_IN, dst_crs=crs, resolution=20)
    b = read_aoi(cog_server.href("cogs/2015-08-31/nir.tif"), aoi, catalogue=LOOPBACK_OPT_IN, dst_crs=crs, resolution=20)
    assert a.transform == b.transform and a.shape == b.shape
    assert a.transform.c % 20 == 0 and a.transform.f % 20 == 0
    bounds = (a.bounds[0] - 100, a.bounds[1], a.bounds[2], a.bounds[3])
    c = read_aoi(cog_server.href("cogs/2015-08-31/nir.tif"), aoi, catalogue=LOOPBACK_OPT_IN, dst_crs=crs,
                 resolution=20, bounds=bounds)
    assert c.shape == (a.shape[0], a.shape[1] + 5)


def test_outside_the_file_is_nodata(cog_server, sample_footprint):
    _, miny, maxx, maxy = sample_footprint.bounds
    half_out = box(maxx - 0.002, miny + 0.004, maxx + 0.002, maxy - 0.004)
    raster = read_aoi(cog_server.href("cogs/2020-08-29/scl.tif"), half_out, catalogue=LOOPBACK_OPT_IN)
    values = raster.array[0][raster.mask]
    assert (values == 0).any() and (values != 0).any()


def test_corrupt_or_missing_cog_raises_a_clear_error(tmp_path, sample_data_dir, sample_footprint):
    good = sample_data_dir / "cogs/2020-08-29/red.tif"
    data = good.read_bytes()
    (tmp_path / "truncated.tif").write_bytes(data[: len(data) // 3])
    (tmp_path / "garbage.tif").write_bytes(b"this is not a tiff" * 100)
    shutil.copy(good, tmp_path / "good.tif")
    with localstac.CogServer(tmp_path) as server:
        catalogue = LOOPBACK_OPT_IN.model_copy(update={"allowed_hosts": LOOPBACK_HOSTS})
        assert read_aoi(server.href("good.tif"), sample_footprint, catalogue=catalogue).array.size
        for name in ("truncated.tif", "garbage.tif", "missing.tif"):
            href = server.href(name)
            with pytest.raises(CogReadError) as info:
                read_aoi(href, sample_footprint, catalogue=catalogue)
            assert info.value.href == href and href in str(info.value) and info.value.gdal_message


def test_gdal_env_sets_the_cog_options():
    with gdal_env(12) as env:
        options = env.options
    assert options["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    assert options["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"] == ".tif,.TIF,.tiff"
    assert options["GDAL_HTTP_MERGE_CONSECUTIVE_RANGES"] == "YES" and options["GDAL_HTTP_MULTIPLEX"] == "YES"
    assert options["VSI_CACHE"] == "TRUE" and options["GDAL_HTTP_TIMEOUT"] == 12

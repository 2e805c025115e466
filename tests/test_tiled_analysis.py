"""Large areas are analysed block by block: the same answer as one whole-area read, and areas up to the
service's size limit (10,000 km²) run end to end through a real worker over HTTP.

Synthetic COGs (tests/synthetic_cogs.py) on the area's own UTM grid, so a block read and a whole-area
read sample exactly the same source pixels and results can be compared for equality.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest
import shapely
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping, shape

from core.config import AnalysisSettings, CatalogueSettings
from devtools import localstac
from tests.fixtures_workers import (
    WorkerProcess,
    analysis_rows,
    insert_analysis,
    insert_area,
    insert_sample_scenes,
    insert_scene_copy,
    run_until_terminal,
    settings_env,
    truncate,
)
from tests.synthetic_cogs import Paint, write_pair
from workers.pipeline import thumbnails
from workers.raster import BLOCK_PX, SceneRef, SkipAnalysis
from workers.tiling import analyse_pair

ORIGIN = (400_000.0, 5_150_000.0)  # UTM 34N, about 46.5° N 19.7° E


def to_4326(geom):
    return shape(transform_geom("EPSG:32634", "EPSG:4326", mapping(geom)))


def scene(server: localstac.CogServer, files: dict[str, str], catalogue: CatalogueSettings, day: int) -> SceneRef:
    assets = {band: {"href": server.href(f"cogs/{path}"), "nodata": 0} for band, path in files.items()}
    return SceneRef(scene_id=day, item_id=f"SYNTH_{day}", acquired_at=datetime(2021, 7, day, tzinfo=UTC),
                    processing_baseline="02.14", assets=assets, catalogue=catalogue)


# 600 × 600 px (6 km): clearings across block edges (blocks of 128 px below), two squares meeting only at
# a block corner (one region under 8-connectivity), a 3 × 3 px patch under the 0.1 ha mapping unit, a
# cloud and a haze patch straddling block edges (their 3 px buffers must reach into the next block).
SMALL_CLEARED = [Paint(100, 300, 120, 140, 0), Paint(300, 312, 130, 300, 0), Paint(246, 256, 374, 384, 0),
                 Paint(256, 266, 384, 394, 0), Paint(450, 453, 300, 303, 0), Paint(380, 390, 10, 590, 0)]
SMALL_CLOUDS = [Paint(380, 400, 200, 260, 0)]
SMALL_HAZE = [Paint(330, 340, 250, 262, 0), Paint(120, 132, 300, 310, 0)]


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiled-small")
    files = write_pair(root / "cogs", ORIGIN, 600, SMALL_CLEARED, SMALL_CLOUDS, SMALL_HAZE)
    with localstac.CogServer(root) as server:
        catalogue = CatalogueSettings(name="synthetic", url=server.url, allowed_schemes=["http"],
                                      allowed_hosts=["127.0.0.1"], allow_private_hosts=True)
        yield scene(server, files["before"], catalogue, 1), scene(server, files["after"], catalogue, 11)


def small_area():
    x0, y0 = ORIGIN
    # A rotated square inside the 6 km file: the AOI mask is not the grid rectangle.
    return to_4326(shapely.affinity.rotate(box(x0 + 800, y0 - 5200, x0 + 5200, y0 - 800), 20))


def test_blocks_give_the_same_answer_as_one_read(small_pair):
    before, after = small_pair
    settings = AnalysisSettings(chip_size_m=640.0)  # 64 px chips: blocks of 128 px are 2 × 2 chips
    one, one_result = analyse_pair(small_area(), before, after, settings, block_px=4096)
    tiled, tiled_result = analyse_pair(small_area(), before, after, settings, block_px=128)
    assert one.blocks == 1 and tiled.blocks == 25

    assert tiled_result.metrics == one_result.metrics
    assert tiled_result.classes == one_result.classes
    assert tiled_result.regions_dropped == one_result.regions_dropped
    assert [vars(c) for c in tiled_result.chip_scores] == [vars(c) for c in one_result.chip_scores]
    assert tiled_result.caption == one_result.caption and tiled.notes == one.notes
    assert (tiled.valid_fraction, tiled.before_clear_fraction, tiled.after_clear_fraction) == \
           (one.valid_fraction, one.before_clear_fraction, one.after_clear_fraction)
    assert len(tiled_result.regions) == len(one_result.regions) >= 4
    for a, b in zip(tiled_result.regions, one_result.regions, strict=True):
        assert (a.change_class, a.pixels, a.hectares, a.mean_dndvi, a.linear, a.elongation) == \
               (b.change_class, b.pixels, b.hectares, b.mean_dndvi, b.linear, b.elongation)
        assert a.geom_utm.symmetric_difference(b.geom_utm).area == 0
    for role, png in thumbnails(tiled, tiled_result).items():
        assert png.data == thumbnails(one, one_result)[role].data, role

    # The haze patch was excluded, so was the cloud with its buffer; the pixels say how much.
    assert any("haze" in note for note in tiled.notes)
    loss = tiled_result.classes["vegetation_loss"]
    assert loss["regions"] == len(tiled_result.regions)
    assert tiled_result.regions_dropped >= 1  # the 3 × 3 px patch (0.09 ha)
    corner = [r for r in tiled_result.regions if r.pixels == 200]
    assert corner, "the two squares meeting at a block corner are one 8-connected region of 2 × 100 px"


def test_a_clearly_cloudy_large_pair_is_screened_on_overviews(tmp_path):
    files = write_pair(tmp_path / "cogs", ORIGIN, 2048, [], [Paint(0, 2048, 0, 2048, 0)])
    access_log = tmp_path / "access.jsonl"
    with localstac.CogServer(tmp_path, access_log=access_log) as server:
        catalogue = CatalogueSettings(name="synthetic", url=server.url, allowed_schemes=["http"],
                                      allowed_hosts=["127.0.0.1"], allow_private_hosts=True)
        before, after = scene(server, files["before"], catalogue, 1), scene(server, files["after"], catalogue, 11)
        geom = to_4326(box(ORIGIN[0] + 500, ORIGIN[1] - 20_000, ORIGIN[0] + 20_000, ORIGIN[1] - 500))
        with pytest.raises(SkipAnalysis, match=r"too cloudy to compare: only 0% .*estimated on a \d+ m overview"):
            analyse_pair(geom, before, after, AnalysisSettings(), block_px=512)
    requested = {json.loads(line)["path"] for line in access_log.read_text().splitlines()}
    assert any(path.endswith("scl_after.tif") for path in requested)
    assert not any(band in path for path in requested for band in ("red", "nir", "blue", "green"))


# 10,000 km²: a 100 km square on a 10 m grid is 10⁸ pixels, above the 64 M pixels one read may fetch.
BIG_PX = 10_000
B = BLOCK_PX + 2  # about a block edge in file pixels: the area's grid starts ~20 m (2 px) into the file
BIG_CLEARED = [Paint(B - 150, B + 150, 2 * B - 100, 2 * B + 100, 0),  # 600 ha across a block row and column edge
               Paint(B - 10, B, B - 10, B, 0), Paint(B, B + 10, B, B + 10, 0),  # 2 ha meeting at a block corner
               Paint(8000, 8003, 8000, 8003, 0)]  # 0.09 ha: under the mapping unit


@pytest.fixture(scope="module")
def big_cogs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiled-big")
    files = write_pair(root / "cogs", ORIGIN, BIG_PX, BIG_CLEARED)
    with localstac.CogServer(root) as server:
        yield server, files


def test_a_10000_km2_area_analyses_end_to_end(database_url, worker_settings, cog_server, big_cogs, send_task,
                                             tmp_path_factory):
    server, files = big_cogs
    truncate(database_url)
    sample = insert_sample_scenes(worker_settings.catalogues[0], cog_server.url, ["2015-08-31", "2016-08-15"])
    refs = {}
    for role, date in (("before", "2015-08-31"), ("after", "2016-08-15")):
        assets = {band: {"href": server.href(f"cogs/{path}"), "nodata": 0} for band, path in files[role].items()}
        refs[role] = insert_scene_copy(sample.ids[date], suffix="-synthetic", assets=assets)
    x0, y0 = ORIGIN
    geom = to_4326(box(x0 + 20, y0 - 99_980, x0 + 99_980, y0 - 20).segmentize(1000))
    area_id = insert_area(geom, name="ten thousand square kilometres")
    from monitor.geometry import geodesic_area_km2

    assert 9_500 < geodesic_area_km2(geom) <= worker_settings.max_area_km2
    analysis_id = insert_analysis(area_id, refs["after"], refs["before"])
    worker = WorkerProcess(settings_env(worker_settings), tmp_path_factory.mktemp("big-worker") / "worker.log").start()
    try:
        row = run_until_terminal([analysis_id], worker_settings, send_task, workers=[worker], timeout=900)[analysis_id]
    finally:
        worker.stop()
    assert row["status"] == "done", row["last_error"]
    stats = row["stats"]
    assert stats["grid"]["width"] * stats["grid"]["height"] > 64_000_000
    assert stats["grid"]["blocks"] > 1 and stats["grid"]["thumbnail_step_px"] > 1
    assert stats["regions"] == 2 and stats["regions_below_mapping_unit"] == 1
    assert stats["metrics"]["changed_ha"] == pytest.approx(602.0)
    assert stats["metrics"]["vegetation_loss_ha"] == pytest.approx(602.0)
    assert analysis_rows([analysis_id])[analysis_id]["status"] == "done"
    assert np.isclose(stats["valid_fraction"], 1.0)

"""End to end through a real Celery worker: real Redis, real PostGIS, the real Sentinel-2 sample COGs over
HTTP. One batch of analyses (change, no change, cloudy, corrupt COG, hostile hrefs) runs once for the
module; each test checks one outcome."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import rasterio
from geoalchemy2.shape import to_shape
from PIL import Image
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom
from shapely.geometry import mapping
from sqlalchemy import select

from core.config import get_settings
from core.db import session_scope
from core.models import Finding, FindingImage
from devtools import localstac
from eo.questions import load_templates
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
    wait_for,
)
from workers.mapframe import FOOTER_PX

SAMPLE = localstac.SAMPLE_DATA_DIR
DATES = ["2015-08-31", "2020-08-29", "2017-07-06", "2017-07-11", "2016-08-15", "2016-08-25"]
# Documented thresholds (workers/spectral.py docstring), restated here on purpose: the test computes the
# expected figure on its own.
NDVI_DROP, VEGETATED = -0.2, 0.3
CLEAR_SCL = (4, 5, 6, 7)


@pytest.fixture(scope="module")
def corrupt_cog_server(tmp_path_factory: pytest.TempPathFactory):
    """A second COG server holding a copy of a real red band whose tile data is garbled (header intact)."""
    root = tmp_path_factory.mktemp("corrupt-cogs")
    (root / "cogs").mkdir()
    data = bytearray((SAMPLE / "cogs/2020-08-29/red.tif").read_bytes())
    start = int(len(data) * 0.4)  # COG layout: header and IFDs first, full-resolution tiles last
    data[start:] = np.random.default_rng(0).integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    (root / "cogs/red.tif").write_bytes(bytes(data))
    with localstac.CogServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def batch(database_url, worker_settings, cog_server, corrupt_cog_server, send_task, tmp_path_factory) -> dict[str, Any]:
    truncate(database_url)
    catalogue = worker_settings.catalogues[0]
    scenes = insert_sample_scenes(catalogue, cog_server.url, DATES)
    ids = scenes.ids
    area_geom = scenes.footprint.buffer(-0.0003)  # inside the 1 km sample, about 30 m from its edge
    area_id = insert_area(area_geom, name="sample forest")
    corrupt_after = insert_scene_copy(ids["2020-08-29"], suffix="-corrupt",
                                      assets={"red": {"href": corrupt_cog_server.href("cogs/red.tif"), "nodata": 0}})
    metadata_after = insert_scene_copy(ids["2020-08-29"], suffix="-metadata", assets={
        "red": {"href": "http://169.254.169.254/latest/meta-data/red.tif", "nodata": 0}})
    file_after = insert_scene_copy(ids["2020-08-29"], suffix="-file", assets={
        "nir": {"href": "file:///etc/passwd", "nodata": 0}})
    analyses = {
        "change": insert_analysis(area_id, ids["2020-08-29"], ids["2015-08-31"]),
        "close": insert_analysis(area_id, ids["2017-07-11"], ids["2017-07-06"]),
        "cloudy": insert_analysis(area_id, ids["2016-08-25"], ids["2016-08-15"]),
        "corrupt": insert_analysis(area_id, corrupt_after, ids["2015-08-31"]),
        "metadata_href": insert_analysis(area_id, metadata_after, ids["2015-08-31"]),
        "file_href": insert_analysis(area_id, file_after, ids["2015-08-31"]),
    }
    worker = WorkerProcess(settings_env(worker_settings), tmp_path_factory.mktemp("worker") / "worker.log").start()
    try:
        rows = run_until_terminal(list(analyses.values()), worker_settings, send_task, workers=[worker])
        yield {"ids": analyses, "rows": rows, "area_geom": area_geom, "worker": worker, "send": send_task}
    finally:
        worker.stop()


def findings_of(analysis_id: int) -> list[Finding]:
    with session_scope(get_settings()) as session:
        return list(session.execute(select(Finding).where(Finding.analysis_id == analysis_id)
                                    .order_by(Finding.ordinal)).scalars())


def expected_vegetation_loss_ha(area_geom) -> float:
    """Independent figure: native-grid numpy on the COG files, harmonised by baseline, SCL-masked."""
    def read(date: str, band: str):
        with rasterio.open(SAMPLE / "cogs" / date / f"{band}.tif") as src:
            return src.read(1).astype(np.float64), src.transform, src.crs

    red_b, transform, crs = read("2015-08-31", "red")
    nir_b = read("2015-08-31", "nir")[0]
    red_a, nir_a = read("2020-08-29", "red")[0], read("2020-08-29", "nir")[0]
    # 2015 is baseline 02.04: DN / 10000. 2020 is baseline 05.00: (DN - 1000) / 10000.
    red_b, nir_b, red_a, nir_a = red_b / 1e4, nir_b / 1e4, (red_a - 1000) / 1e4, (nir_a - 1000) / 1e4
    clear = np.isin(read("2015-08-31", "scl")[0], CLEAR_SCL) & np.isin(read("2020-08-29", "scl")[0], CLEAR_SCL)
    aoi = geometry_mask([transform_geom("EPSG:4326", crs, mapping(area_geom))], out_shape=red_b.shape,
                        transform=transform, invert=True)
    ndvi_b = (nir_b - red_b) / (nir_b + red_b)
    ndvi_a = (nir_a - red_a) / (nir_a + red_a)
    loss = aoi & clear & (ndvi_a - ndvi_b <= NDVI_DROP) & (ndvi_b >= VEGETATED)
    return loss.sum() * abs(transform.a * transform.e) / 10_000


def test_change_pair_reports_vegetation_loss_matching_numpy(batch):
    row = batch["rows"][batch["ids"]["change"]]
    assert row["status"] == "done", row
    stats = row["stats"]
    assert stats["harmonisation"]["before"].startswith("DN / 10000")
    assert stats["harmonisation"]["after"].startswith("(DN - 1000) / 10000")
    assert stats["grid"]["crs"] == "EPSG:32634" and stats["grid"]["pixel_size_m"] == 10.0

    found = findings_of(batch["ids"]["change"])
    summary = found[0]
    assert summary.kind == "summary" and summary.ordinal == 0
    loss = summary.statistics["classes"]["vegetation_loss"]
    expected = expected_vegetation_loss_ha(batch["area_geom"])
    assert expected > 1.0  # the road and clear-cuts
    # Same masks and thresholds; the pipeline resamples onto the UTM grid (nearest), the test reads the
    # native EPSG:3035 grid: pixel counts agree within a few percent.
    assert loss["hectares_all_pixels"] == pytest.approx(expected, rel=0.08)
    assert 0 < loss["hectares"] <= loss["hectares_all_pixels"]

    regions = [f for f in found if f.kind == "region"]
    loss_regions = [f for f in regions if f.change_class == "vegetation_loss"]
    assert loss_regions, "the clear-cuts and the road must come out as regions"
    assert sum(f.hectares for f in loss_regions) == pytest.approx(loss["hectares"], abs=1e-6)
    assert all(f.hectares >= 0.1 for f in regions)  # minimum mapping unit
    assert all(f.analyser_name == "spectral" and f.analyser_version == "1" for f in regions)
    area = batch["area_geom"].buffer(0.001)
    for finding in regions:
        geom = to_shape(finding.geom)
        assert geom.is_valid and area.contains(geom)  # EPSG:4326, over the area
    assert any(f.statistics["linear"] for f in loss_regions), "the road is a long, narrow region"
    assert summary.caption.startswith("Vegetation loss of")
    assert "Built-up change not assessed" in summary.caption  # the sample has no swir16
    assert summary.hectares == pytest.approx(sum(f.hectares for f in regions), abs=1e-6)


def test_change_pair_writes_thumbnails_and_answers(batch):
    found = findings_of(batch["ids"]["change"])
    with session_scope(get_settings()) as session:
        images = {i.role: i for i in session.execute(
            select(FindingImage).where(FindingImage.finding_id == found[0].id)).scalars()}
    assert set(images) == {"before", "after", "overlay"}
    grid = batch["rows"][batch["ids"]["change"]]["stats"]["grid"]
    assert grid["width"] >= grid["height"] and grid["thumbnail_step_px"] == 1
    for image in images.values():
        png = Image.open(io.BytesIO(image.data))
        # Upscaled to 512 px on the longer side (nearest), plus the scale bar / legend strip under it.
        assert png.format == "PNG" and png.size == (image.width, image.height) == (
            512, round(grid["height"] * 512 / grid["width"]) + FOOTER_PX)
    before = np.asarray(Image.open(io.BytesIO(images["after"].data)).convert("RGB"), dtype=np.int16)
    overlay = np.asarray(Image.open(io.BytesIO(images["overlay"].data)).convert("RGB"), dtype=np.int16)
    assert ((overlay[..., 0] - before[..., 0]) > 60).any(), "changed pixels are tinted red on the overlay"

    answers = {f.statistics["template_id"]: f for f in found if f.kind == "answer"}
    assert set(answers) == {t.id for t in load_templates()}  # empty selection = all defaults
    veg = answers["vegetation_loss"]
    assert veg.answer.startswith("Yes") and veg.statistics["backing_statistic"] == "vegetation_loss_ha"
    assert answers["new_buildings"].answer.startswith("Cannot tell")  # no swir16: said, not guessed
    assert answers["new_roads"].answer.startswith("Likely")
    ordinals = [f.ordinal for f in found]
    assert ordinals == list(range(len(found)))


def test_close_clear_dates_show_no_significant_change(batch):
    row = batch["rows"][batch["ids"]["close"]]
    assert row["status"] == "done", row
    found = findings_of(batch["ids"]["close"])
    assert [f.kind for f in found if f.kind == "region"] == []
    assert found[0].caption.startswith("No significant change")
    assert found[0].hectares == 0
    assert row["stats"]["chips_passing_model_screen"] == 0


def test_cloudy_pair_is_skipped_with_its_reason(batch):
    row = batch["rows"][batch["ids"]["cloudy"]]
    assert row["status"] == "skipped"
    assert row["last_error"].startswith("too cloudy to compare: only 0% of the area is clear in both scenes")
    assert findings_of(batch["ids"]["cloudy"]) == []


def test_corrupt_cog_fails_readably_while_others_complete(batch):
    row = batch["rows"][batch["ids"]["corrupt"]]
    assert row["status"] == "failed"
    assert row["attempts"] == 1  # a corrupt file is not retried
    assert "unreadable or corrupt COG" in row["last_error"] and "red.tif" in row["last_error"]
    # GDAL's own words for the broken tile, the failing call and the codec's complaint, both kept.
    assert row["last_error"].endswith("(red.tif, band 1: IReadBlock failed at X offset 1, Y offset 0: "
                                      "TIFFReadEncodedTile() failed.; TIFFReadEncodedTile() failed.; "
                                      "ZIPDecode:Decoding error at scanline 32)")
    assert batch["rows"][batch["ids"]["change"]]["status"] == "done"
    assert findings_of(batch["ids"]["corrupt"]) == []


def test_hostile_hrefs_are_refused(batch):
    metadata = batch["rows"][batch["ids"]["metadata_href"]]
    assert metadata["status"] == "failed"
    assert metadata["last_error"].startswith("refused to open an asset")
    assert "169.254.169.254" in metadata["last_error"] and "allow-list" in metadata["last_error"]
    local_file = batch["rows"][batch["ids"]["file_href"]]
    assert local_file["status"] == "failed" and "file:// URLs are never opened" in local_file["last_error"]


def test_duplicate_message_for_a_done_analysis_does_nothing(batch):
    analysis_id = batch["ids"]["change"]
    before = [(f.id, f.ordinal) for f in findings_of(analysis_id)]
    batch["send"](analysis_id, "cpu")  # a re-delivery (visibility timeout, a second dispatcher…)
    wait_for(lambda: f"analysis {analysis_id} not claimed: status done" in batch["worker"].log(), 60,
             "the worker to receive the duplicate")
    assert [(f.id, f.ordinal) for f in findings_of(analysis_id)] == before
    assert analysis_rows([analysis_id])[analysis_id]["attempts"] == 1

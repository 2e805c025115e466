"""Acquisitions as mosaics, from poll to alert, on hand-made COGs over loopback HTTP and a local STAC API.

Cases of the issue, each with real granules of one datatake (values chosen here, so the right answers are
computed here):

- **straddle**: an area across 24°E (UTM 34 | 35) under a clear sky, imaged by a zone-34 and a zone-35
  granule: covered 1.0, clear 1.0, analysed on one grid (not "50 % clear" and never analysed);
- **overlap**: an area inside the ~10 km overlap of two MGRS tiles of one zone: one observation, one
  analysis and one alert per datatake (not one per tile);
- **two catalogues**: the straddling area with its zone-34 granules in an Earth Search v1 collection
  (offset removed, flag true) and its zone-35 granules in a Planetary Computer collection (ESA offset kept):
  one alert per acquisition, the same NDVI on both sides of the zone edge;
- **shared reads**: fractions from one read per granule and window are exactly those of per-area reads.

Surfaces: meadow (red 400, NIR 3200 → NDVI 0.7778) on both dates, except a clear-cut on the after date
(red 1000, NIR 1600 → 0.2308) of a box inside each area — for the straddling area across the zone edge, so
it is half in each granule. Planetary Computer pixels carry +1000 DN.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.features import geometry_mask
from rasterio.vrt import WarpedVRT
from shapely.geometry import box
from sqlalchemy import select

from core.config import AnalysisSettings, PollSettings, Settings, SmtpSettings, get_settings
from core.db import session_scope
from core.models import Acquisition, Analysis, Observation
from devtools import localstac
from eo.cog import utm_crs_for
from eo.masks import clear_mask
from eo.observe import Coverage, GranuleMask, ReadStats, observe_acquisition
from monitor.catalogues import poll_all
from monitor.pairing import process_pending
from monitor.reports import run_deliveries
from tests.fixtures_ingest import StacCollection, loopback_catalogue
from tests.handmade import item_for, utm_box, write_granule
from workers.pipeline import run_analysis

STRADDLE = box(23.99, 45.0, 24.01, 45.01)  # about half on each side of the 24°E zone boundary
OVERLAP = box(22.16, 45.03, 22.18, 45.045)  # inside the overlap of tiles 34TFR and 34TGR (22.15–22.2°E)
WEST, EAST = utm_box(32634, 23.9, 44.97, 24.0, 45.04), utm_box(32635, 24.0, 44.97, 24.1, 45.04)
TILE_A, TILE_B = utm_box(32634, 22.0, 45.0, 22.2, 45.07), utm_box(32634, 22.15, 45.0, 22.35, 45.07)
DATATAKES = {"before": "20240614T093029", "after": "20240619T093029"}
NDVI_BEFORE = round(2800 / 3600, 4)
NOW = datetime(2024, 6, 20, tzinfo=UTC)
CUTS = {"straddle": box(23.995, 45.002, 24.005, 45.007), "overlap": box(22.165, 45.035, 22.173, 45.04)}


def _hectares(geom) -> float:
    from monitor.geometry import geodesic_area_km2

    return geodesic_area_km2(geom) * 100


@pytest.fixture(scope="module")
def cogs(tmp_path_factory):
    root = tmp_path_factory.mktemp("handmade-mosaic")
    for when in ("before", "after"):
        cut = {"straddle": None, "overlap": None} if when == "before" else {
            k: (g, {"red": 1000, "nir": 1600, "green": 1200, "blue": 900}) for k, g in CUTS.items()}
        pc_cut = cut["straddle"] and (CUTS["straddle"], {b: v + 1000 for b, v in cut["straddle"][1].items()})
        kw = {"red": 400, "nir": 3200}
        write_granule(root, f"west-{when}", 32634, WEST, cut=cut["straddle"], **kw)
        write_granule(root, f"east-{when}", 32635, EAST, cut=cut["straddle"], **kw)
        write_granule(root, f"east-pc-{when}", 32635, EAST, red=1400, nir=4200, green=1800, blue=1300, cut=pc_cut)
        write_granule(root, f"tfr-{when}", 32634, TILE_A, cut=cut["overlap"], **kw)
        write_granule(root, f"tgr-{when}", 32634, TILE_B, cut=cut["overlap"], **kw)
    rng = np.random.default_rng(7)
    for name, epsg, bounds in (("mixed-west", 32634, WEST), ("mixed-east", 32635, EAST)):
        # SCL in 100 m patches: clear (4, 5), cloud (8, 9), shadow (3), no data (0) along one edge.
        h, w = round((bounds[3] - bounds[1]) / 20), round((bounds[2] - bounds[0]) / 20)
        patches = rng.choice(np.array([4, 5, 8, 9, 3, 4], dtype=np.uint8), size=(h // 5 + 1, w // 5 + 1))
        scl = np.kron(patches, np.ones((5, 5), dtype=np.uint8))[:h, :w]
        scl[:, -7:] = 0
        write_granule(root, name, epsg, bounds, red=400, nir=3200, scl_array=scl)
    with localstac.CogServer(root) as server:
        yield server


def _item(cogs, folder: str, *, shape_name: str, tile: str, when: str, epsg: int, bounds) -> dict:
    from tests.handmade import Granule

    granule = Granule(folder, epsg, bounds, {b: f"{folder}/{b}.tif" for b in ("blue", "green", "red", "nir", "scl")})
    stamp = DATATAKES[when]
    sensed = f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T09:30:{'29' if shape_name == 'pc' else '52'}Z"
    item_id = (f"S2B_MSIL2A_{stamp}_R136_T{tile}" if shape_name == "pc" else f"S2B_{tile}_{stamp[:8]}_0_L2A")
    return item_for(granule, cogs.url, shape_name=shape_name, item_id=item_id, platform="sentinel-2b", tile=tile,
                    sensed=sensed, baseline="05.10", flag=True if shape_name == "es-v1" else None, datatake=stamp)


def _settings(db, tmp_path, catalogues) -> Settings:
    return Settings(database_url=db, catalogues=catalogues, poll=PollSettings(lookback_days=30),
                    smtp=SmtpSettings(outbox_dir=tmp_path / "outbox"), analysis=AnalysisSettings(lease_seconds=60))


def _loop(settings: Settings) -> list[dict]:
    """Poll, pair, analyse every new analysis in-process, send alerts; the analyses as rows."""
    assert poll_all(settings, now=NOW).ok
    stats = process_pending(settings)
    for analysis_id in stats.analysis_ids:
        run_analysis(analysis_id, "test-worker", settings)
    run_deliveries(settings)
    with session_scope(get_settings()) as session:
        return [{"id": a.id, "status": a.status.value, "after": a.after_scene.acquisition_key,
                 "stats": a.stats, "error": a.last_error} for a in session.scalars(select(Analysis))]


def _observations(area_id: int) -> list[tuple[str, str, float | None, float | None]]:
    with session_scope(get_settings()) as session:
        rows = session.execute(
            select(Acquisition.key, Observation.status, Observation.covered_fraction, Observation.clear_fraction)
            .join(Acquisition, Acquisition.id == Observation.acquisition_id)
            .where(Observation.area_id == area_id).order_by(Acquisition.sensed_at)).all()
    return [(r.key, r.status.value, r.covered_fraction, r.clear_fraction) for r in rows]


def _emails(settings: Settings) -> list:
    return sorted(settings.smtp.outbox_dir.glob("**/*.eml"))


def _publish(collection: StacCollection, items: list[dict]) -> None:
    for item in items:
        collection.publish(item)


def _straddling_granules(cogs, stac_api, collection):
    """Publish a before and an after acquisition, each a zone-34 (west) and a zone-35 (east) granule meeting at
    the zone edge; returns the loopback catalogue of ``collection``."""
    _publish(collection, [
        _item(cogs, f"{side}-{when}", shape_name="es-v1", tile=tile, when=when, epsg=epsg, bounds=bounds)
        for when in ("before", "after")
        for side, tile, epsg, bounds in (("west", "34TGQ", 32634, WEST), ("east", "35TKL", 32635, EAST))])
    return loopback_catalogue(stac_api.url, [collection.id]).model_copy(
        update={"profiles": {collection.id: "earth-search-v1/sentinel-2-l2a"}})


def test_area_across_two_utm_zones_is_covered_clear_and_analysed_on_one_grid(cogs, stac_api, db, add_area, tmp_path,
                                                                           sample_data_dir):
    collection = StacCollection(stac_api, localstac.read_sample_collection(sample_data_dir))
    try:
        catalogue = _straddling_granules(cogs, stac_api, collection)
        settings = _settings(db, tmp_path, [catalogue])
        area = add_area("zone edge", STRADDLE, collections=[collection.id], recipients=["ana@example.org"])
        analyses = _loop(settings)
    finally:
        collection.delete()
    assert [(o[1], o[2], o[3]) for o in _observations(area)] == [("clear", 1.0, 1.0), ("clear", 1.0, 1.0)]
    assert len(analyses) == 1, analyses
    done = analyses[0]
    assert done["status"] == "done", done["error"]
    assert done["stats"]["grid"]["crs"] == "EPSG:32635"  # the area's centroid zone: one grid for both granules
    assert done["stats"]["valid_fraction"] == pytest.approx(1.0)
    assert done["stats"]["metrics"]["mean_ndvi_before"] == pytest.approx(NDVI_BEFORE, abs=1e-4)
    # The clear-cut across the zone edge is found whole: half of it comes from each granule.
    assert done["stats"]["metrics"]["changed_ha"] == pytest.approx(_hectares(CUTS["straddle"]), rel=0.05)
    assert len(_emails(settings)) == 1


def test_the_screen_history_reads_every_granule_of_an_acquisition(cogs, stac_api, db, add_area, tmp_path,
                                                                  sample_data_dir):
    """The time-series screen's history is read as mosaics like the pair: the straddling area's earlier
    acquisition has a zone-34 and a zone-35 granule, and its clear looks cover the whole area (the first
    granule alone, what the history read before, covers about half of it)."""
    from workers import screen
    from workers.pipeline import clear_history, load_context
    from workers.raster import common_grid

    collection = StacCollection(stac_api, localstac.read_sample_collection(sample_data_dir))
    try:
        catalogue = _straddling_granules(cogs, stac_api, collection)
        settings = _settings(db, tmp_path, [catalogue])
        add_area("zone edge", STRADDLE, collections=[collection.id])
        (done,) = _loop(settings)
        ctx = load_context(done["id"], settings)
        with session_scope(settings) as session:
            history = clear_history(session, ctx, settings)
        granules = [(h.scene_id, *(o.scene_id for o in h.others)) for h in history]
        assert granules == [(ctx.before.scene_id, *(o.scene_id for o in ctx.before.others))]
        assert len(granules[0]) == 2
        # A 20 m grid: nothing the analysis itself cached on its 10 m grid is reused.
        grid = common_grid(STRADDLE, 20.0)
        ndvi = screen.clear_looks(history[0], grid, settings.analysis.cloud_buffer_px)[0][grid.aoi()]
    finally:
        collection.delete()
    assert np.isfinite(ndvi).mean() == 1.0
    assert np.nanmax(np.abs(ndvi - NDVI_BEFORE)) < 1e-4


def test_area_in_the_overlap_of_two_tiles_gets_one_analysis_and_one_alert_per_datatake(cogs, stac_api, db, add_area,
                                                                                       tmp_path, sample_data_dir):
    collection = StacCollection(stac_api, localstac.read_sample_collection(sample_data_dir))
    try:
        _publish(collection, [
            _item(cogs, f"{tile.lower()[2:]}-{when}", shape_name="es-v1", tile=tile, when=when, epsg=32634,
                  bounds=bounds)
            for when in ("before", "after") for tile, bounds in (("34TFR", TILE_A), ("34TGR", TILE_B))])
        catalogue = loopback_catalogue(stac_api.url, [collection.id]).model_copy(
            update={"profiles": {collection.id: "earth-search-v1/sentinel-2-l2a"}})
        settings = _settings(db, tmp_path, [catalogue])
        area = add_area("overlap", OVERLAP, collections=[collection.id], recipients=["ana@example.org"])
        analyses = _loop(settings)
        again = _loop(settings)  # a second cycle finds the same four granules and changes nothing
    finally:
        collection.delete()
    observed = _observations(area)
    assert [o[0] for o in observed] == ["sentinel-2b|2024-06-14T09:30:29Z", "sentinel-2b|2024-06-19T09:30:29Z"]
    assert all(o[1:] == ("clear", 1.0, 1.0) for o in observed)
    assert [(a["after"], a["status"]) for a in analyses] == [("sentinel-2b|2024-06-19T09:30:29Z", "done")]
    assert analyses[0]["stats"]["metrics"]["changed_ha"] == pytest.approx(_hectares(CUTS["overlap"]), rel=0.05)
    assert again == analyses
    assert len(_emails(settings)) == 1


def test_straddling_area_served_by_two_catalogues_gets_one_alert_per_acquisition(cogs, stac_api, db, add_area,
                                                                                 tmp_path, sample_data_dir):
    es = StacCollection(stac_api, localstac.read_sample_collection(sample_data_dir))
    pc = StacCollection(stac_api, localstac.read_sample_collection(sample_data_dir))
    try:
        _publish(es, [_item(cogs, f"west-{when}", shape_name="es-v1", tile="34TGQ", when=when, epsg=32634,
                            bounds=WEST) for when in ("before", "after")])
        _publish(pc, [_item(cogs, f"east-pc-{when}", shape_name="pc", tile="35TKL", when=when, epsg=32635,
                            bounds=EAST) for when in ("before", "after")])
        catalogues = [
            loopback_catalogue(stac_api.url, [es.id], name="earth-search").model_copy(
                update={"profiles": {es.id: "earth-search-v1/sentinel-2-l2a"}}),
            loopback_catalogue(stac_api.url, [pc.id], name="planetary-computer").model_copy(
                update={"profiles": {pc.id: "planetary-computer/sentinel-2-l2a"}}),
        ]
        settings = _settings(db, tmp_path, catalogues)
        area = add_area("zone edge, two catalogues", STRADDLE, collections=[es.id, pc.id],
                        recipients=["ana@example.org"])
        analyses = _loop(settings)
    finally:
        es.delete()
        pc.delete()
    # Earth Search's datetime is the tile's sensing time, PC's the datatake start: one acquisition each date.
    assert [(o[1], o[2], o[3]) for o in _observations(area)] == [("clear", 1.0, 1.0), ("clear", 1.0, 1.0)]
    assert len(analyses) == 1 and analyses[0]["status"] == "done", analyses
    stats = analyses[0]["stats"]
    assert stats["valid_fraction"] == pytest.approx(1.0)
    # Both DN conventions on one grid: the PC half was brought to the first granule's rule before NDVI.
    assert stats["metrics"]["mean_ndvi_before"] == pytest.approx(NDVI_BEFORE, abs=1e-4)
    assert stats["metrics"]["changed_ha"] == pytest.approx(_hectares(CUTS["straddle"]), rel=0.05)
    assert len(_emails(settings)) == 1


def test_shared_observation_reads_give_exactly_the_per_area_fractions(cogs):
    catalogue = loopback_catalogue(cogs.url, [])
    granules = [GranuleMask(name, {"scl": {"href": cogs.href(f"{name}/scl.tif"), "nodata": 0}}, catalogue)
                for name in ("mixed-west", "mixed-east")]
    rnd = random.Random(11)
    areas = {}
    for k in range(80):  # both zones, across the edge, sub-pixel to ~25 km², some outside everything
        w = rnd.choice([0.0001, 0.002, 0.01, 0.03, 0.06])
        x, y = rnd.uniform(23.88, 24.1), rnd.uniform(44.96, 45.04)
        areas[k] = box(x, y, x + w, y + w * 0.7)
    shared_stats: list[ReadStats] = []
    alone_stats: list[ReadStats] = []
    shared = observe_acquisition(granules, areas, stats=shared_stats)
    alone = {k: observe_acquisition(granules, {k: g}, shared=False, stats=alone_stats)[k] for k, g in areas.items()}
    assert shared == alone
    partly = [c for c in shared.values() if 0 < c.covered_fraction < 1]
    cloudy = [c for c in shared.values() if c.clear_fraction is not None and c.clear_fraction < 1]
    assert partly and cloudy  # the cases that can differ are there
    assert {c.granules_used for c in shared.values()} >= {("mixed-west",), ("mixed-east",),
                                                          ("mixed-west", "mixed-east")}
    # One read per granule and 10 km cell of each zone's lattice, against one per granule and area.
    assert sum(s.reads for s in alone_stats) == 2 * len(areas)
    assert shared_stats[0].reads <= len(areas) / 4


def _reference_coverage(root, names, geom) -> Coverage:
    """One area counted the plain way, independently of eo.observe's packing: each granule warped (nearest,
    exact) onto the area's own lattice box, mosaicked first-come, the area rasterised at its true place
    (``all_touched`` when no pixel centre falls inside it)."""
    crs = utm_crs_for(geom)
    proj = shapely.transform(geom, Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform,
                             interleaved=False)
    minx, miny, maxx, maxy = proj.bounds
    col0, row0 = math.floor(minx / 20), math.floor(-maxy / 20)
    col1, row1 = max(math.ceil(maxx / 20), col0 + 1), max(math.ceil(-miny / 20), row0 + 1)
    shape_, transform = (row1 - row0, col1 - col0), Affine(20, 0, col0 * 20, 0, -20, -row0 * 20)
    first = np.zeros(shape_, dtype=np.uint8)
    clear = np.zeros(shape_, dtype=bool)
    for k, name in enumerate(names, start=1):
        with rasterio.open(root / name / "scl.tif") as src, WarpedVRT(
                src, crs=crs, transform=transform, width=shape_[1], height=shape_[0], nodata=0,
                resampling=Resampling.nearest, tolerance=1e-9) as vrt:
            values = vrt.read(1)
        seen = (values != 0) & (first == 0)
        first[seen] = k
        clear |= seen & clear_mask("scl", values)
    inside = geometry_mask([proj], out_shape=shape_, transform=transform, invert=True)
    if not inside.any():
        inside = geometry_mask([proj], out_shape=shape_, transform=transform, invert=True, all_touched=True)
    used = sorted(set(np.unique(first[inside]).tolist()) - {0})
    return Coverage(int(inside.sum()), int((first[inside] > 0).sum()), int(clear[inside].sum()),
                    tuple(names[k - 1] for k in used))


def test_packed_counts_equal_each_area_rasterised_at_its_true_place(cogs):
    """eo.observe counts every area in a slot of a packed atlas (its geometry moved by whole pixels, all areas
    rasterised at once): the counts are exactly those of each area rasterised alone where it lies, over the
    mosaic warped onto its own box — overlapping and nested areas, both zones, the edge, sub-pixel areas."""
    names = ("mixed-west", "mixed-east")
    catalogue = loopback_catalogue(cogs.url, [])
    granules = [GranuleMask(n, {"scl": {"href": cogs.href(f"{n}/scl.tif"), "nodata": 0}}, catalogue) for n in names]
    rnd = random.Random(5)
    areas = {}
    for k in range(120):
        w = rnd.choice([0.0001, 0.001, 0.004, 0.01, 0.03])
        x, y = rnd.uniform(23.9, 24.09), rnd.uniform(44.97, 45.03)
        areas[k] = box(x, y, x + w, y + w * 0.6).buffer(w / 4) if k % 3 else box(x, y, x + w, y + w * 0.6)
    areas[120] = areas[7].buffer(0.002)  # one area around another
    packed = observe_acquisition(granules, areas)
    reference = {k: _reference_coverage(cogs.root, names, g) for k, g in areas.items()}
    assert packed == reference
    assert any(0 < c.covered_fraction < 1 for c in packed.values())
    assert any(c.clear_fraction is not None and 0 < c.clear_fraction < 1 for c in packed.values())
    assert any(c.area_pixels < 3 for c in packed.values())  # sub-pixel areas: the pixels they touch


def test_aligned_mask_reads_equal_warped_reads_exactly(cogs, monkeypatch):
    """A lattice on the granule's own pixel grid is read as a plain window (no warp); forcing every read
    through the warped view gives exactly the same fractions (both zones, edges, sub-pixel areas)."""
    import eo.observe

    catalogue = loopback_catalogue(cogs.url, [])
    granules = [GranuleMask(name, {"scl": {"href": cogs.href(f"{name}/scl.tif"), "nodata": 0}}, catalogue)
                for name in ("mixed-west", "mixed-east")]
    rnd = random.Random(23)
    areas = {}
    for k in range(60):
        w = rnd.choice([0.0001, 0.003, 0.02, 0.05])
        x, y = rnd.uniform(23.88, 24.1), rnd.uniform(44.96, 45.04)
        areas[k] = box(x, y, x + w, y + w * 0.8)
    calls = {"aligned": 0}
    real = eo.observe._aligned

    def counting(src, w):
        got = real(src, w)
        calls["aligned"] += got is not None
        return got

    monkeypatch.setattr(eo.observe, "_aligned", counting)
    direct = observe_acquisition(granules, areas)
    assert calls["aligned"] > 0  # the plain-window path was taken for the zone-34 granule
    monkeypatch.setattr(eo.observe, "_aligned", lambda src, w: None)
    warped = observe_acquisition(granules, areas)
    assert direct == warped
    assert any(0 < c.covered_fraction < 1 for c in direct.values())

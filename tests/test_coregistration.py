"""Co-registration of acquisitions onto the area's geometry (workers/coregistration.py), on real dates.

The nrt cube's Sentinel-2B dates lie a median 0.65 row south of the dates' common geometry
(``benchmarks/reference/METHOD.md`` step 4, from every pair of 32 clear leaf-on dates); 2017-06-06 (2B)
lies 1.05 rows south. Here the service's estimator, on the area's UTM analysis grid, must find that from
eight other dates whose positions the reference network measured; a copy of a real date moved by whole
pixels must be recovered exactly; an estimate from images that do not match must fall back to no shift.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime

import numpy as np
import pytest
import rasterio
from rasterio.warp import transform as warp_transform
from shapely.geometry import shape

from core.config import CatalogueSettings
from devtools import localstac
from tests.fixtures_workers import ROOT, loopback_catalogue
from tests.test_screen import ALL_DATES, all_dates  # noqa: F401  (all_dates: the module-scoped COG server)
from workers import coregistration as coreg
from workers.raster import SceneRef, read_band

OFFSETS = ROOT / "benchmarks" / "reference" / "reference_dates.json"
KNOWN_2B = "2017-06-06"


@pytest.fixture(scope="module")
def cube(all_dates):  # noqa: F811  (test_screen's: the all-dates build served over loopback HTTP)
    return all_dates


def scene(catalogue: CatalogueSettings, href, day: str, baseline: str = "02.14") -> SceneRef:
    assets = {band: {"href": href(band)} for band in ("nir", "scl")}
    return SceneRef(scene_id=int(day.replace("-", "")), item_id=day, acquired_at=datetime.fromisoformat(day)
                    .replace(tzinfo=UTC), processing_baseline=baseline, assets=assets, catalogue=catalogue)


def cube_scene(server: localstac.CogServer, day: str) -> SceneRef:
    return scene(loopback_catalogue(server.url), lambda b: server.href(f"cogs/{day}/{b}.tif"), day)


@pytest.fixture(scope="module")
def area():
    items = localstac.read_sample_items(ALL_DATES)
    return shape(items[0]["geometry"]).buffer(-0.0006)  # the demo's and the benchmark's area


def cube_axes_on_grid(grid) -> tuple[np.ndarray, np.ndarray]:
    """One row south and one col east of the cube's EPSG:3035 grid, each as (rows, cols) of the area's UTM
    grid (8.5° of grid convergence here)."""
    with rasterio.open(ALL_DATES / "cogs" / KNOWN_2B / "nir.tif") as src:
        (x, y), step = src.xy(50, 50), src.res[0]
    xs, ys = warp_transform("EPSG:3035", grid.crs, [x, x, x + step], [y, y - step, y])
    return (np.array([ys[0] - ys[1], xs[1] - xs[0]]) / grid.pixel_size,
            np.array([ys[0] - ys[2], xs[2] - xs[0]]) / grid.pixel_size)


def test_a_known_sentinel2b_date_lies_a_row_south(cube, area):
    offsets = json.loads(OFFSETS.read_text())["offsets_px_of_delineation_and_pre_dates"]
    grid = coreg.window_grid(area, 10.0)
    row, col = cube_axes_on_grid(grid)

    def on_grid(pos):  # a position measured on the cube's grid, on the area's
        return tuple(float(v) for v in pos[0] * row + pos[1] * col)

    references = [(coreg.clear_nir(cube_scene(cube, day), grid, 3), on_grid(pos))
                  for day, pos in offsets.items() if day != KNOWN_2B]
    assert len(references) == 8
    est = coreg.estimate(coreg.clear_nir(cube_scene(cube, KNOWN_2B), grid, 3), references,
                         [pos for _, pos in references])
    expected = on_grid(offsets[KNOWN_2B])  # 1.05 cube rows: 1.04 rows, -0.15 cols of the area's grid
    # 7 pairs count: 2019-06-16's correlation peaks 5 rows, 3 cols off (its 2019 cuts), beyond MAX_SHIFT_PX.
    assert est.status == coreg.ESTIMATED and est.pairs == 7
    assert est.position[0] == pytest.approx(expected[0], abs=0.3)
    assert est.position[1] == pytest.approx(expected[1], abs=0.3)
    record = est.record(10.0)
    assert record["applied_px"] == [1, 0] and record["offset_m"] == [0.0, -10.0]  # read one row further south


def write_on_grid(path, array: np.ndarray, grid, shift_rows: int = 0, shift_cols: int = 0) -> None:
    """``array`` as a GeoTIFF on ``grid``, its features moved ``shift_rows`` south and ``shift_cols`` east
    (the georeferencing moved, the pixels kept: what a misregistered product is)."""
    from affine import Affine

    transform = grid.transform @ Affine.translation(shift_cols, shift_rows)
    with rasterio.open(path, "w", driver="GTiff", width=grid.width, height=grid.height, count=1,
                       dtype=array.dtype, crs=grid.crs, transform=transform, tiled=True, blockxsize=128,
                       blockysize=128) as dst:
        dst.write(array, 1)


def test_a_copy_moved_by_whole_pixels_is_recovered_exactly(cube, area, tmp_path):
    grid = coreg.window_grid(area, 10.0)
    days = ["2017-07-06", "2018-08-25", "2019-07-01"]  # 2A, 2A, 2B: positions measured among themselves
    raw = {}
    for day in [*days, "2019-08-20"]:
        ref = cube_scene(cube, day)
        raw[day] = {b: read_band(ref, b, grid).filled(0) for b in ("nir", "scl")}
        (tmp_path / day).mkdir()
        for band, values in raw[day].items():
            write_on_grid(tmp_path / day / f"{band}.tif", values, grid)
    moved = tmp_path / "moved"
    moved.mkdir()
    for band, values in raw["2019-08-20"].items():  # 1 row south, 1 col west
        write_on_grid(moved / f"{band}.tif", values, grid, shift_rows=1, shift_cols=-1)
    with localstac.CogServer(tmp_path) as server:
        cat = loopback_catalogue(server.url)
        refs = [scene(cat, lambda b, d=d: server.href(f"{d}/{b}.tif"), d) for d in days]
        positions = []
        for ref in refs:  # the first MIN_PAIRS acquisitions of an area are its anchors
            nir = coreg.clear_nir(ref, grid, 3)
            est = coreg.estimate(nir, [(coreg.clear_nir(r, grid, 3), p) for r, p in zip(refs, positions,
                                                                                        strict=False)], positions)
            assert est.status == coreg.ANCHOR and est.shift == (0.0, 0.0)
            positions.append(est.position)
        original = scene(cat, lambda b: server.href(f"2019-08-20/{b}.tif"), "2019-08-20")
        copy = scene(cat, lambda b: server.href(f"moved/{b}.tif"), "2019-08-21")
        references = [(coreg.clear_nir(r, grid, 3), p) for r, p in zip(refs, positions, strict=True)]
        base = coreg.estimate(coreg.clear_nir(original, grid, 3), references, positions)
        est = coreg.estimate(coreg.clear_nir(copy, grid, 3), references, positions)
        assert est.status == base.status == coreg.ESTIMATED, (base, est)
        assert est.position[0] - base.position[0] == pytest.approx(1.0, abs=0.05)
        assert est.position[1] - base.position[1] == pytest.approx(-1.0, abs=0.05)
        # Against the original as the area's geometry, the copy is read back onto it pixel for pixel.
        record = coreg.Estimate(coreg.ESTIMATED, est.position,
                                (est.position[0] - base.position[0], est.position[1] - base.position[1])).record(10.0)
        assert record["applied_px"] == [1, -1] and record["offset_m"] == [-10.0, -10.0]
        back = coreg.with_offset(copy, coreg.offset_m(record))
        for band in ("nir", "scl"):
            got = read_band(back, band, grid)
            inner = (slice(1, None), slice(0, -1))  # the row and col the move took out of the grid
            np.testing.assert_array_equal(got.filled(0)[inner], raw["2019-08-20"][band][inner])


def test_an_unstable_estimate_falls_back_to_no_shift(cube, area):
    grid = coreg.window_grid(area, 10.0)
    references = [(coreg.clear_nir(cube_scene(cube, day), grid, 3), (0.0, 0.0))
                  for day in ("2017-07-06", "2018-08-25", "2019-07-01")]
    noise = np.random.default_rng(7).normal(0.3, 0.05, references[0][0].shape).astype(np.float32)
    est = coreg.estimate(noise, references, [(0.0, 0.0)] * 3)  # nothing of the area in it: peaks anywhere
    assert (est.status, est.shift, est.position) == (coreg.FALLBACK, (0.0, 0.0), None)
    assert est.record(10.0)["offset_m"] == [0.0, 0.0]
    # References that contradict each other by more than MAX_SPREAD_PX: no shift either.
    spread = [(img, (0.0, 0.0) if k == 0 else (0.9 * (-1) ** k, 0.0)) for k, (img, _) in enumerate(references * 2)]
    real = coreg.clear_nir(cube_scene(cube, "2019-08-20"), grid, 3)
    est = coreg.estimate(real, spread, [p for _, p in spread])
    assert est.status == coreg.FALLBACK and est.shift == (0.0, 0.0) and "disagree" in est.reason


def test_the_pipeline_registers_each_acquisition_once_and_reads_it_moved(database_url, worker_settings, cube):
    """Through the real pipeline: three 2016 leaf-on dates (Sentinel-2A) anchor the area's geometry, then
    2017-06-06 (2B, 1.05 rows south of the cube's common geometry, ≈ 1.3 rows south of 2016's 2A dates) is
    estimated against them, stored on its observation, and read one row further south (its features moved
    one row north, onto the area's geometry)."""
    from sqlalchemy import select

    from core.config import get_settings
    from core.db import session_scope
    from core.models import Analysis, Observation
    from tests.fixtures_workers import insert_analysis, insert_area, insert_observation, insert_sample_scenes, truncate
    from workers.pipeline import run_analysis

    truncate(database_url)
    days = ["2016-06-16", "2016-08-05", "2016-08-15", "2017-06-06"]
    scenes = insert_sample_scenes(worker_settings.catalogues[0], cube.url, days, data_dir=ALL_DATES)
    area_id = insert_area(scenes.footprint.buffer(-0.0006), name="Romanian forest")
    for day in days:
        insert_observation(area_id, scenes.ids[day])
    stats = []
    for before, after in itertools.pairwise(days):
        analysis_id = insert_analysis(area_id, scenes.ids[after], scenes.ids[before])
        assert run_analysis(analysis_id, "test-inprocess", worker_settings) == "done"
        with session_scope(get_settings()) as s:
            stats.append(s.get(Analysis, analysis_id).stats["coregistration"])
    with session_scope(get_settings()) as s:
        stored = {o.scene_id: o.coregistration for o in s.execute(
            select(Observation).where(Observation.area_id == area_id)).scalars()}
    records = [stored[scenes.ids[d]] for d in days]
    assert [r["status"] for r in records] == ["anchor", "anchor", "anchor", "estimated"]
    assert [r["pairs"] for r in records] == [0, 1, 2, 3]
    assert all(r["applied_px"] == [0, 0] for r in records[:3])
    last = records[3]
    assert last["shift_px"][0] == pytest.approx(1.3, abs=0.3) and abs(last["shift_px"][1]) < 0.5
    assert last["applied_px"] == [1, 0] and last["offset_m"] == [0.0, -10.0]
    # The analyses recorded the pair's records; the before of each was estimated once (by its own analysis
    # as the after, or as the first before) and read back unchanged by the next.
    assert stats[2]["after"] == last and stats[2]["before"] == records[2] == stats[1]["after"]


def test_anchors_are_gated_and_a_small_window_is_not_estimated(cube, area):
    grid = coreg.window_grid(area, 10.0)
    real = coreg.clear_nir(cube_scene(cube, "2017-07-06"), grid, 3)
    noise = np.random.default_rng(7).normal(0.3, 0.05, real.shape).astype(np.float32)
    # The area's second acquisition against its first: a pair peaking anywhere does not anchor the area.
    est = coreg.estimate(noise, [(real, (0.0, 0.0))], [(0.0, 0.0)])
    assert (est.status, est.position, est.pairs) == (coreg.FALLBACK, None, 0) and "anchor gate" in est.reason
    # The first: nothing to pair with, but under 10 % clear is no geometry to anchor on.
    cloudy = real.copy()
    cloudy[real.shape[0] // 10:] = np.nan
    est = coreg.estimate(cloudy, [], [])
    assert est.status == coreg.FALLBACK and f"{np.isfinite(cloudy).mean():.0%} clear" in est.reason
    assert coreg.estimate(real, [], []).status == coreg.ANCHOR
    # Three registered but only two readable: the gate of an estimate (>= MIN_PAIRS pairs), not an anchor.
    est = coreg.estimate(real, [(real, (0.0, 0.0))] * 2, [(0.0, 0.0)] * 3, registered=3)
    assert est.status == coreg.FALLBACK and est.pairs == 2
    # A 0.2 ha area: its grid is 5 x 5 px, below MIN_WINDOW_PX; its correlation would be noise.
    centre = area.centroid
    small = centre.buffer(0.00025)  # ~ 40 m across
    small_grid = coreg.window_grid(small, 10.0)
    assert max(small_grid.width, small_grid.height) < coreg.MIN_WINDOW_PX
    tiny = coreg.clear_nir(cube_scene(cube, "2017-07-06"), small_grid, 3)
    est = coreg.estimate(tiny, [(tiny, (0.0, 0.0))] * 3, [(0.0, 0.0)] * 3)
    assert est.status == coreg.FALLBACK and est.shift == (0.0, 0.0) and "too small" in est.reason


class RegisteredArea:
    """An area of real cube dates in PostGIS, each acquisition registered through coregistration.register
    as the pipeline calls it (its SceneRef from workers.pipeline.acquisition_ref)."""

    def __init__(self, database_url, settings, cube, days):
        from tests.fixtures_workers import insert_area, insert_observation, insert_sample_scenes, truncate

        truncate(database_url)
        self.settings, self.cube, self.days = settings, cube, days
        self.scenes = insert_sample_scenes(settings.catalogues[0], cube.url, days, data_dir=ALL_DATES)
        self.geom = self.scenes.footprint.buffer(-0.0006)
        self.area_id = insert_area(self.geom, name="Romanian forest")
        for day in days:
            insert_observation(self.area_id, self.scenes.ids[day])

    def register(self, day):
        from core.db import session_scope
        from core.models import Area, Scene
        from workers.pipeline import acquisition_ref

        with session_scope(self.settings) as s:
            area_wkb = s.get(Area, self.area_id).geom
            ref = acquisition_ref(s, s.get(Scene, self.scenes.ids[day]), area_wkb, self.settings)
        return coreg.register(self.settings, self.area_id, self.geom, ref, acquisition_ref)

    def stored(self):
        from core.db import session_scope

        with session_scope(self.settings) as s:
            records = coreg.stored(s, self.area_id, list(self.scenes.ids.values()))
        return {day: records[self.scenes.ids[day]] for day in self.days}

    def sql(self, statement, **params):
        from sqlalchemy import text

        from core.db import session_scope

        with session_scope(self.settings) as s:
            return s.execute(text(statement), params).all() if statement.lstrip().startswith("SELECT") \
                else s.execute(text(statement), params)

    def break_asset(self, day, band="nir"):
        """The acquisition's ``band`` now 404s on the COG server (and its cached window is forgotten)."""
        self.sql("UPDATE scenes SET assets = jsonb_set(assets, ARRAY[:band, 'href'], to_jsonb(CAST(:href AS text))) "
                 "WHERE id = :id", band=band, href=self.cube.href(f"cogs/{day}/missing-{band}.tif"),
                 id=self.scenes.ids[day])
        coreg._CACHE.items.clear()


ANCHORS = ["2016-06-16", "2016-08-05", "2016-08-15"]


def test_an_unreadable_reference_is_dropped_and_an_unreadable_acquisition_not_stored(database_url, worker_settings,
                                                                                     cube):
    days = [*ANCHORS, "2017-06-06", "2017-07-06", "2017-07-11"]
    area = RegisteredArea(database_url, worker_settings, cube, days)
    for day in days[:4]:
        area.register(day)
    assert [area.stored()[d]["status"] for d in days[:4]] == ["anchor", "anchor", "anchor", "estimated"]
    area.break_asset("2016-08-05")  # a reference of 2017-07-06 (an HTTP 404 now)
    record = area.register("2017-07-06")
    assert [d["item_id"] for d in record["dropped"]] == [area.sql(
        "SELECT item_id FROM scenes WHERE id = :id", id=area.scenes.ids["2016-08-05"])[0][0]]
    assert record["dropped"][0]["reason"].startswith("CogReadError")
    assert record["pairs"] <= 3 and area.stored()["2017-07-06"] == record  # stored: estimated from the others
    # The acquisition itself unreadable: no shift, said why, not stored (the next analysis tries again).
    area.break_asset("2017-07-11")
    record = area.register("2017-07-11")
    assert record["status"] == coreg.FALLBACK and record["applied_px"] == [0, 0] and "not read" in record["reason"]
    assert area.stored()["2017-07-11"] is None


def test_concurrent_registrations_of_an_area_give_the_records_of_one_at_a_time(database_url, worker_settings,
                                                                               cube):
    import threading

    days = [*ANCHORS, "2017-06-06", "2017-07-06"]
    area = RegisteredArea(database_url, worker_settings, cube, days)
    for day in days:
        area.register(day)
    one_at_a_time = area.stored()
    assert [r["status"] for r in one_at_a_time.values()] == ["anchor"] * 3 + ["estimated"] * 2
    area.sql("UPDATE observations SET coregistration = NULL WHERE area_id = :a", a=area.area_id)
    barrier, errors = threading.Barrier(len(days)), []

    def run(day):
        try:
            barrier.wait()
            area.register(day)
        except Exception as exc:  # reported below with the day
            errors.append((day, exc))

    threads = [threading.Thread(target=run, args=(day,)) for day in reversed(days)]  # the newest first
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert area.stored() == one_at_a_time


def test_an_upgraded_product_is_re_estimated(database_url, worker_settings, cube):
    from core.db import session_scope
    from core.models import Scene
    from workers.pipeline import acquisition_ref

    days = [*ANCHORS, "2017-06-06"]
    area = RegisteredArea(database_url, worker_settings, cube, days)
    for day in days:
        area.register(day)
    before = area.stored()["2017-06-06"]
    old_id = area.sql("SELECT item_id FROM scenes WHERE id = :id", id=area.scenes.ids["2017-06-06"])[0][0]
    assert before["item_ids"] == [old_id] and before["applied_px"] == [1, 0]
    # Reprocessed (new baseline): the scene row keeps its id, the item id changes (monitor/catalogues/store.py).
    area.sql("UPDATE scenes SET item_id = item_id || '_N0500', processing_baseline = '05.00' WHERE id = :id",
             id=area.scenes.ids["2017-06-06"])
    with session_scope(worker_settings) as s:
        ref = acquisition_ref(s, s.get(Scene, area.scenes.ids["2017-06-06"]), s.get(Scene, area.scenes.ids[
            "2017-06-06"]).footprint, worker_settings)
        # Until re-estimated the old record is not applied: read as imaged.
        assert coreg.apply_stored(s, area.area_id, [ref])[0].offset_m == (0.0, 0.0)
    after = area.register("2017-06-06")
    assert after["item_ids"] == [f"{old_id}_N0500"] and area.stored()["2017-06-06"] == after
    assert after["status"] == coreg.ESTIMATED and after["applied_px"] == [1, 0]  # the same pixels, estimated anew

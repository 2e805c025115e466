"""Video (time-series) frames for the model are acquisition mosaics, read like the pair.

An area across 24°E (UTM 34 | 35) is imaged on three dates, each by a zone-34 and a zone-35 granule of
one datatake (hand-made COGs over loopback HTTP, published to the local STAC API), with the same meadow
everywhere. The earlier acquisition's frame must show the whole area like the pair's frames do; read
from the observation's first granule alone, half of it was no data (black).
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from shapely.geometry import box
from sqlalchemy import select

from core.config import AnalysisSettings, PollSettings, Settings
from core.db import session_scope
from core.models import Analysis, Scene
from devtools import localstac
from monitor.catalogues import poll_all
from monitor.pairing import process_pending
from tests.fixtures_ingest import StacCollection, loopback_catalogue
from tests.handmade import Granule, item_for, utm_box, write_granule
from workers.pipeline import load_context, sequence_frames
from workers.tiling import analyse_pair

STRADDLE = box(23.99, 45.0, 24.01, 45.01)
SIDES = {"west": ("34TGQ", 32634, utm_box(32634, 23.9, 44.97, 24.0, 45.04)),
         "east": ("35TKL", 32635, utm_box(32635, 24.0, 44.97, 24.1, 45.04))}
DATATAKES = ("20240609T093029", "20240614T093029", "20240619T093029")


@pytest.fixture(scope="module")
def cogs(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-mosaic")
    for stamp in DATATAKES:
        for side, (_, epsg, bounds) in SIDES.items():
            write_granule(root, f"{side}-{stamp}", epsg, bounds, red=400, nir=3200, green=600, blue=300)
    with localstac.CogServer(root) as server:
        yield server


def _items(cogs) -> list[dict]:
    items = []
    for stamp in DATATAKES:
        for side, (tile, epsg, bounds) in SIDES.items():
            folder = f"{side}-{stamp}"
            granule = Granule(folder, epsg, bounds,
                              {b: f"{folder}/{b}.tif" for b in ("blue", "green", "red", "nir", "scl")})
            items.append(item_for(granule, cogs.url, shape_name="es-v1", item_id=f"S2B_{tile}_{stamp[:8]}_0_L2A",
                                  platform="sentinel-2b", tile=tile,
                                  sensed=f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T09:30:52Z", baseline="05.10",
                                  flag=True, datatake=stamp))
    return items


def test_video_frames_are_acquisition_mosaics(cogs, stac_api, db, add_area, sample_data_dir):
    collection = StacCollection(stac_api, localstac.read_sample_collection(sample_data_dir))
    try:
        for item in _items(cogs):
            collection.publish(item)
        catalogue = loopback_catalogue(stac_api.url, [collection.id]).model_copy(
            update={"profiles": {collection.id: "earth-search-v1/sentinel-2-l2a"}})
        settings = Settings(database_url=db, catalogues=[catalogue], poll=PollSettings(lookback_days=30),
                            analysis=AnalysisSettings(video_frames=3))
        area_id = add_area("zone edge", STRADDLE, collections=[collection.id], recipients=["ana@example.org"])
        assert poll_all(settings, now=datetime(2024, 6, 20, tzinfo=UTC)).ok
        process_pending(settings)
        with session_scope(settings) as session:
            latest = session.scalars(select(Analysis).join(Scene, Scene.id == Analysis.after_scene_id)
                                     .where(Analysis.area_id == area_id)
                                     .order_by(Scene.acquired_at.desc())).first()
            analysis_id = latest.id
        ctx = load_context(analysis_id, settings)
        assert len(ctx.after.others) == 1  # the pair itself is read as a two-granule mosaic
        pair, _ = analyse_pair(ctx.area_geom, ctx.before, ctx.after, settings.analysis)
        frames, dates = sequence_frames(ctx, pair, settings)
    finally:
        collection.delete()
    assert dates == ["2024-06-09", "2024-06-14", "2024-06-19"]
    aoi = pair.thumbs.aoi
    assert aoi.sum() > 100 and all(f.shape[:2] == aoi.shape for f in frames)
    earliest, before, after = frames
    # The same meadow on every date: the earlier acquisition's mosaic equals the pair's frames pixel for
    # pixel over the area, with no black (no-data) pixel anywhere in it.
    assert np.array_equal(before[aoi], after[aoi])
    assert np.array_equal(earliest[aoi], before[aoi])
    assert (earliest[aoi].max(axis=-1) > 0).all()

"""The committed Sentinel-2 sample data and the local STAC API / COG server built on it.

Two groups:
- sample data (no services): item/collection structure, valid COGs, cloud cover from SCL, the emulated
  baseline offset against the original cube, a real NDVI drop between 2015-08-31 and 2020-08-29, the
  bad fixtures, and that scripts/build-sample-data reproduces the committed files;
- services (real PostgreSQL + stac-fastapi-pgstac + COG server subprocesses): counts, numeric
  cloud filter and sort, paging, datetime, publishing while running, reading COGs over HTTP.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import urllib.request
from datetime import datetime
from importlib.machinery import SourceFileLoader
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import rasterio
from rasterio.windows import Window

from devtools import localstac

if "tests.fixtures_stac" not in sys.modules:
    # Until tests/conftest.py registers the plugin (pytest_plugins = ["tests.fixtures_stac"]), take the
    # fixtures from it directly; once registered this branch is skipped, so nothing starts twice.
    from tests.fixtures_stac import cog_server, sample_data_dir, sample_items, stac_api, stac_db_dsn  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build-sample-data"
COLLECTION = "sentinel-2-l2a"
ID_PATTERN = re.compile(r"^S2[AB]_(\d{2}[C-X][A-Z]{2})_(\d{8})_(\d+)_L2A$")
REFLECTANCE_ASSETS = ("blue", "green", "red", "nir")


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def load_builder():
    """scripts/build-sample-data as a module (it has no .py suffix)."""
    if "build_sample_data" in sys.modules:
        return sys.modules["build_sample_data"]
    loader = SourceFileLoader("build_sample_data", str(BUILD_SCRIPT))
    spec = importlib.util.spec_from_loader("build_sample_data", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_sample_data"] = module  # dataclasses resolve annotations through sys.modules
    loader.exec_module(module)
    return module


def nrt_cube_path() -> Path | None:
    """The original nrt 0.2.1 cube if this machine has it (the build script caches it)."""
    env = os.environ.get("UNIRS_NRT_NC")
    path = Path(env) if env else load_builder().DEFAULT_CACHE / load_builder().NC_NAME
    return path if path.exists() else None


def by_date(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {it["properties"]["datetime"][:10]: it for it in items}


def cog_path(data_dir: Path, item: dict[str, Any], asset: str) -> Path:
    return (data_dir / "items" / item["assets"][asset]["href"]).resolve()


def reflectance(data_dir: Path, item: dict[str, Any], asset: str) -> np.ndarray:
    """Harmonised reflectance: the rule the pipeline must apply (baseline >= 04.00: (DN - 1000) / 1e4)."""
    with rasterio.open(cog_path(data_dir, item, asset)) as ds:
        dn = ds.read(1).astype(float)
    offset = 1000 if float(item["properties"]["s2:processing_baseline"]) >= 4 else 0
    return (dn - offset) / 10000.0


def ndvi(data_dir: Path, item: dict[str, Any]) -> np.ndarray:
    red, nir = reflectance(data_dir, item, "red"), reflectance(data_dir, item, "nir")
    return (nir - red) / (nir + red)


def sha256_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def client_for(api: localstac.StacApiServer):
    from pystac_client import Client

    client = Client.open(api.url)
    # stac-fastapi 7 advertises the v1.1.0 sort conformance URI; pystac-client 0.9.1 only matches v1.0.*
    # and would warn "does not conform to SORT" although sorting works.
    client.add_conforms_to("SORT")
    return client


def aoi_inside(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A small polygon in the middle of the sample footprint."""
    minx, miny, maxx, maxy = items[0]["bbox"]
    cx, cy, dx, dy = (minx + maxx) / 2, (miny + maxy) / 2, (maxx - minx) / 8, (maxy - miny) / 8
    ring = [[cx - dx, cy - dy], [cx + dx, cy - dy], [cx + dx, cy + dy], [cx - dx, cy + dy], [cx - dx, cy - dy]]
    return {"type": "Polygon", "coordinates": [ring]}


# ---------------------------------------------------------------------------------------------------
# sample data
# ---------------------------------------------------------------------------------------------------


def test_curated_subset_covers_the_scenarios(sample_items):
    dates = by_date(sample_items)
    assert 12 <= len(sample_items) <= 20
    assert {"2015-08-31", "2020-08-29", "2017-07-06", "2017-07-11"} <= set(dates)
    cover = [it["properties"]["eo:cloud_cover"] for it in sample_items]
    assert sum(c == 0 for c in cover) >= 8 and max(cover) > 90 and any(20 < c < 60 for c in cover)
    # seasonal set: late August in at least five different years
    assert len({d[:4] for d in dates if d[5:7] == "08" and int(d[8:]) >= 15}) >= 5
    baselines = {it["properties"]["s2:processing_baseline"] for it in sample_items}
    assert "05.00" in baselines and any(b.startswith("02.") for b in baselines)


def test_items_have_the_earth_search_shape(sample_data_dir, sample_items):
    import pystac

    for item in sample_items:
        p = item["properties"]
        m = ID_PATTERN.match(item["id"])
        assert m, item["id"]
        tile, day, seq = m.groups()
        mgrs = f"{p['mgrs:utm_zone']}{p['mgrs:latitude_band']}{p['mgrs:grid_square']}"
        assert p["grid:code"] == f"MGRS-{tile}" == f"MGRS-{mgrs}"
        assert tile == "34TER" and p["s2:sequence"] == seq == "0"
        assert day == p["datetime"][:10].replace("-", "")
        assert item["collection"] == COLLECTION and item["type"] == "Feature"
        assert p["platform"] == "sentinel-2" + item["id"][2].lower() and item["id"][:2] == "S2"
        for key in ("datetime", "created", "updated", "s2:generation_time"):
            assert datetime.fromisoformat(p[key].replace("Z", "+00:00")).tzinfo is not None
        assert isinstance(p["eo:cloud_cover"], float) and 0 <= p["eo:cloud_cover"] <= 100
        assert re.fullmatch(r"\d{2}\.\d{2}", p["s2:processing_baseline"])
        uri = re.fullmatch(r"S2[AB]_MSIL2A_(\d{8})T\d{6}_N(\d{4})_R(\d{3})_T(\w{5})_(\d{8}T\d{6})\.SAFE",
                           p["s2:product_uri"])
        assert uri and uri.group(1) == day and uri.group(2) == p["s2:processing_baseline"].replace(".", "")
        assert uri.group(3) == "136" and uri.group(4) == tile
        assert p["proj:epsg"] == 3035 and "sat:relative_orbit" not in p
        # geometry: EPSG:4326 footprint, bbox consistent with it
        ring = item["geometry"]["coordinates"][0]
        assert item["geometry"]["type"] == "Polygon" and ring[0] == ring[-1]
        xs, ys = [c[0] for c in ring], [c[1] for c in ring]
        assert item["bbox"] == [min(xs), min(ys), max(xs), max(ys)]
        assert 22.1 < min(xs) < max(xs) < 22.2 and 45.1 < min(ys) < max(ys) < 45.3
        # assets: relative hrefs to existing COGs, scale/offset by baseline
        offset = -0.1 if float(p["s2:processing_baseline"]) >= 4 else 0.0
        assert set(item["assets"]) == {"blue", "green", "red", "nir", "scl", "visual"}
        for key, asset in item["assets"].items():
            assert not asset["href"].startswith(("http", "/")) and cog_path(sample_data_dir, item, key).exists()
            assert asset["type"] == "image/tiff; application=geotiff; profile=cloud-optimized"
            assert asset["proj:shape"] == [100, 100] and len(asset["proj:transform"]) == 6
            if key in REFLECTANCE_ASSETS:
                rb = asset["raster:bands"][0]
                assert (rb["scale"], rb["offset"], rb["data_type"]) == (0.0001, offset, "uint16")
                assert asset["eo:bands"][0]["name"] == key
        pystac.Item.from_dict(item)  # parses; schema validation needs the network (and jsonschema)


def test_collection_describes_the_emulation(sample_data_dir, sample_items):
    import pystac

    coll = localstac.read_sample_collection(sample_data_dir)
    pystac.Collection.from_dict(coll)
    assert coll["id"] == COLLECTION
    assert "Contains modified Copernicus Sentinel data" in coll["description"]
    assert "05.00" in coll["description"] and "+ 1000" in coll["description"]
    times = sorted(it["properties"]["datetime"] for it in sample_items)
    assert coll["extent"]["temporal"]["interval"] == [[times[0], times[-1]]]
    readme = (sample_data_dir / "README.md").read_text()
    assert "Contains modified Copernicus Sentinel data" in readme and "nrt==0.2.1" in readme


def test_assets_are_cloud_optimized_geotiffs(sample_data_dir, sample_items):
    expected = {"blue": ("uint16", 1), "green": ("uint16", 1), "red": ("uint16", 1), "nir": ("uint16", 1),
                "scl": ("uint8", 1), "visual": ("uint8", 3)}
    for item in sample_items:
        for key, (dtype, count) in expected.items():
            with rasterio.open(cog_path(sample_data_dir, item, key)) as ds:
                assert ds.driver == "GTiff" and ds.profile["tiled"] and ds.block_shapes[0] == (32, 32)
                assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
                assert ds.overviews(1) == [2, 4]
                assert (ds.dtypes[0], ds.count, ds.nodata) == (dtype, count, 0)
                assert ds.crs.to_epsg() == 3035
                assert list(ds.transform)[:6] == item["assets"][key]["proj:transform"]


def test_cloud_cover_is_computed_from_scl(sample_data_dir, sample_items):
    for item in sample_items:
        with rasterio.open(cog_path(sample_data_dir, item, "scl")) as ds:
            scl = ds.read(1)
        cloudy = np.isin(scl, (8, 9, 10)).sum() / np.count_nonzero(scl) * 100
        assert item["properties"]["eo:cloud_cover"] == pytest.approx(cloudy, abs=1e-3)
        shadow = (scl == 3).sum() / np.count_nonzero(scl) * 100
        assert item["properties"]["s2:cloud_shadow_percentage"] == pytest.approx(shadow, abs=1e-3)


def test_baseline_05_dns_are_the_original_dns_plus_1000(sample_data_dir, sample_items):
    nc = nrt_cube_path()
    if nc is None:
        pytest.skip("original cube not on this machine: run scripts/build-sample-data once "
                    "(downloads nrt==0.2.1 into ~/.cache/unirs-monitor) or set UNIRS_NRT_NC")
    builder = load_builder()
    cube = builder.read_cube(nc)
    index = {d.isoformat(): i for i, d in enumerate(cube.dates)}
    seen_shifted = 0
    for day, item in by_date(sample_items).items():
        shifted = item["properties"]["s2:processing_baseline"] == "05.00"
        seen_shifted += shifted
        for key in REFLECTANCE_ASSETS:
            raw = cube.bands[builder.BANDS[key]["nc"]][index[day]].astype(np.int64)
            with rasterio.open(cog_path(sample_data_dir, item, key)) as ds:
                cog = ds.read(1).astype(np.int64)
            np.testing.assert_array_equal(cog, np.where(raw == 0, 0, raw + 1000) if shifted else raw)
        with rasterio.open(cog_path(sample_data_dir, item, "scl")) as ds:
            np.testing.assert_array_equal(ds.read(1), cube.bands["SCL"][index[day]])
    assert seen_shifted >= 5


def test_a_real_change_between_2015_and_2020(sample_data_dir, sample_items):
    dates = by_date(sample_items)
    change = ndvi(sample_data_dir, dates["2020-08-29"]) - ndvi(sample_data_dir, dates["2015-08-31"])
    stable = ndvi(sample_data_dir, dates["2017-07-11"]) - ndvi(sample_data_dir, dates["2017-07-06"])
    assert (change < -0.25).sum() >= 50  # the road and clear-cuts (about 100 px)
    assert (stable < -0.25).sum() <= 5
    # Harmonisation matters: read without the offset, the baseline-05.00 scene looks like a collapse.
    with rasterio.open(cog_path(sample_data_dir, dates["2020-08-29"], "red")) as r, \
            rasterio.open(cog_path(sample_data_dir, dates["2020-08-29"], "nir")) as n:
        red, nir = r.read(1).astype(float), n.read(1).astype(float)
    naive = (nir - red) / (nir + red)
    assert np.median(naive) < np.median(ndvi(sample_data_dir, dates["2020-08-29"])) - 0.2


def test_bad_fixtures_are_bad_in_the_documented_way(sample_data_dir, sample_items):
    fixtures = {it["id"]: it for it in localstac.read_sample_items(sample_data_dir, "fixtures")}
    manifest = json.loads((sample_data_dir / "fixtures" / "manifest.json").read_text())
    assert {f["id"] for f in manifest["fixtures"]} == set(fixtures)

    original = by_date(sample_items)["2020-08-29"]
    dup = fixtures["S2B_34TER_20200829_1_L2A"]
    for key in ("datetime", "grid:code", "platform"):
        assert dup["properties"][key] == original["properties"][key]
    assert dup["properties"]["s2:processing_baseline"] > original["properties"]["s2:processing_baseline"]
    assert dup["properties"]["s2:generation_time"] > original["properties"]["s2:generation_time"]
    assert dup["properties"]["updated"] > original["properties"]["updated"]

    assert fixtures["bad-no-geometry"]["geometry"] is None
    assert fixtures["bad-no-datetime"]["properties"]["datetime"] is None
    assert not {"red", "nir", "scl"} & set(fixtures["bad-no-usable-assets"]["assets"])
    assert fixtures["bad-json-types"]["properties"]["eo:cloud_cover"] == "abc"
    hrefs = [a["href"] for a in fixtures["bad-hostile-hrefs"]["assets"].values()]
    assert "file:///etc/passwd" in hrefs and any("169.254.169.254" in h for h in hrefs)
    assert any(h.startswith("../../") for h in hrefs)


def test_rewrite_asset_hrefs_only_maps_paths_inside_the_data_dir(sample_data_dir, sample_items):
    base = "http://127.0.0.1:9/"
    item = localstac.rewrite_asset_hrefs(sample_items[0], base)
    day = sample_items[0]["properties"]["datetime"][:10]
    assert item["assets"]["red"]["href"] == f"http://127.0.0.1:9/cogs/{day}/red.tif"
    assert sample_items[0]["assets"]["red"]["href"].startswith("../")  # the input is not modified
    assert all(not link["href"].startswith("..") for link in item["links"])
    hostile = localstac.read_sample_items(sample_data_dir, "fixtures")
    hostile = next(it for it in hostile if it["id"] == "bad-hostile-hrefs")
    rewritten = localstac.rewrite_asset_hrefs(hostile, base, item_dir="fixtures")
    for key, asset in rewritten["assets"].items():
        assert asset["href"] == hostile["assets"][key]["href"]  # absolute or escaping: untouched


def test_build_script_help():
    out = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "--all-dates" in out.stdout


def test_build_script_reproduces_the_committed_files(sample_data_dir, tmp_path):
    nc = nrt_cube_path()
    if nc is None:
        pytest.skip("original cube not on this machine: run scripts/build-sample-data once or set UNIRS_NRT_NC")
    subprocess.run([sys.executable, str(BUILD_SCRIPT), "--nc", str(nc), "--out", str(tmp_path / "out"), "-q"],
                   check=True, capture_output=True)
    assert sha256_tree(tmp_path / "out") == sha256_tree(sample_data_dir)


# ---------------------------------------------------------------------------------------------------
# local STAC API + COG server
# ---------------------------------------------------------------------------------------------------


def test_prepare_database_is_idempotent_and_configured(stac_db_dsn):
    assert localstac.prepare_database(stac_db_dsn) == "0.10.0"
    with psycopg.connect(stac_db_dsn) as conn:
        context = conn.execute("SELECT value FROM pgstac.pgstac_settings WHERE name = 'context'").fetchone()
        rows = dict(conn.execute("SELECT name, definition->>'type' FROM pgstac.queryables").fetchall())
    assert context == ("on",)
    assert rows["eo:cloud_cover"] == "number" and rows["grid:code"] == "string"


def test_search_returns_every_item_once(stac_api, sample_items):
    search = client_for(stac_api).search(collections=[COLLECTION], intersects=aoi_inside(sample_items),
                                         datetime="2015-01-01/2021-12-31", limit=100)
    ids = [it.id for it in search.items()]
    assert search.matched() == len(sample_items) == len(ids)
    assert sorted(ids) == sorted(it["id"] for it in sample_items)


@pytest.mark.parametrize("limit", [3, 5])
def test_paging_with_a_small_limit_returns_each_item_exactly_once(stac_api, sample_items, limit):
    search = client_for(stac_api).search(collections=[COLLECTION], limit=limit,
                                         sortby=[{"field": "properties.datetime", "direction": "asc"}])
    pages = [[f["id"] for f in page["features"]] for page in search.pages_as_dicts()]
    ids = [i for page in pages for i in page]
    assert len(pages) >= math.ceil(len(sample_items) / limit) and all(len(p) <= limit for p in pages)
    assert len(ids) == len(set(ids)) == len(sample_items)
    assert ids == [it["id"] for it in sorted(sample_items, key=lambda it: it["properties"]["datetime"])]


def test_cloud_cover_query_is_numeric(stac_api, sample_items):
    client = client_for(stac_api)
    found = {}
    for threshold in (5, 50):
        # The poller's search shape (stac-and-pipeline-notes.md 4.6).
        search = client.search(collections=[COLLECTION], intersects=aoi_inside(sample_items),
                               datetime="2015-06-01T00:00:00Z/..", query={"eo:cloud_cover": {"lte": threshold}},
                               sortby=[{"field": "properties.datetime", "direction": "asc"}], limit=4)
        found[threshold] = {it.id for it in search.items()}
        expected = {it["id"] for it in sample_items if it["properties"]["eo:cloud_cover"] <= threshold}
        assert found[threshold] == expected
        assert search.matched() == len(expected)
    assert found[5] < found[50] < {it["id"] for it in sample_items}


def test_sort_by_cloud_cover_is_numeric(stac_api, sample_items):
    search = client_for(stac_api).search(collections=[COLLECTION], limit=4,
                                         sortby=[{"field": "properties.eo:cloud_cover", "direction": "desc"}])
    covers = [it.properties["eo:cloud_cover"] for it in search.items()]
    assert covers == sorted(covers, reverse=True) and len(covers) == len(sample_items)
    assert covers[0] == 100.0  # a textual sort would put "99.79" first


def test_datetime_and_property_filters(stac_api, sample_items):
    client = client_for(stac_api)
    in_2020 = {it.id for it in client.search(collections=[COLLECTION], datetime="2020").items()}
    assert in_2020 == {it["id"] for it in sample_items if it["properties"]["datetime"].startswith("2020")}
    reprocessed = client.search(collections=[COLLECTION], query={"s2:processing_baseline": {"eq": "05.00"}})
    assert {it.id for it in reprocessed.items()} == {
        it["id"] for it in sample_items if it["properties"]["s2:processing_baseline"] == "05.00"}


def test_published_item_appears_while_the_service_runs(stac_api, sample_data_dir, sample_items):
    dup = next(it for it in localstac.read_sample_items(sample_data_dir, "fixtures")
               if it["id"] == "S2B_34TER_20200829_1_L2A")
    client = client_for(stac_api)
    stored = stac_api.publish_item(dup)
    try:
        assert stored["id"] == dup["id"]
        search = client.search(collections=[COLLECTION], datetime="2020-08-29")
        assert {it.id for it in search.items()} == {"S2B_34TER_20200829_0_L2A", dup["id"]}
        assert client.search(collections=[COLLECTION]).matched() == len(sample_items) + 1
        fetched = client.get_collection(COLLECTION).get_item(dup["id"])
        assert fetched.assets["red"].href == f"{stac_api.asset_base_url}/cogs/2020-08-29/red.tif"
    finally:
        stac_api.delete_item(dup["id"], COLLECTION)
    assert client.search(collections=[COLLECTION]).matched() == len(sample_items)


def test_cog_read_over_http_equals_the_local_file(stac_api, cog_server, sample_data_dir):
    item = client_for(stac_api).get_collection(COLLECTION).get_item("S2B_34TER_20200829_0_L2A")
    href = item.assets["red"].href
    assert href.startswith(cog_server.url + "/")
    window = Window(col_off=10, row_off=20, width=40, height=30)
    cog_server.reset_stats()
    with rasterio.Env(**localstac.GDAL_HTTP_ENV), rasterio.open(href) as remote:
        remote_data = remote.read(1, window=window)
        remote_overview = remote.read(1, out_shape=(25, 25))
    with rasterio.open(sample_data_dir / "cogs" / "2020-08-29" / "red.tif") as local:
        np.testing.assert_array_equal(remote_data, local.read(1, window=window))
        np.testing.assert_array_equal(remote_overview, local.read(1, out_shape=(25, 25)))
    stats = cog_server.stats()
    served = stats["paths"]["/cogs/2020-08-29/red.tif"]
    assert served["requests"] >= 1 and stats["range_requests"] >= 1 and served["bytes"] > 0


def test_range_request_returns_206_and_is_counted(cog_server, sample_data_dir):
    path = "cogs/2015-08-31/nir.tif"
    content = (sample_data_dir / path).read_bytes()
    before = cog_server.stats()["bytes_sent"]
    req = urllib.request.Request(cog_server.href(path), headers={"Range": "bytes=100-599"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as resp:
        body = resp.read()
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 100-599/{len(content)}"
    assert body == content[100:600]
    assert cog_server.stats()["bytes_sent"] - before == 500
    records = list(localstac.read_access_log(cog_server.access_log))
    assert any(r["path"] == "/" + path and r["range"] == "bytes=100-599" and r["status"] == 206 for r in records)


def test_cog_server_does_not_serve_outside_its_root(cog_server):
    conn = http.client.HTTPConnection(cog_server.host, cog_server.port, timeout=10)
    try:
        conn.request("GET", "/../../../../etc/passwd")  # sent verbatim, no client-side normalisation
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 404 and b"root:" not in body

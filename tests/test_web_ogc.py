"""Findings as OGC API Features: the conformance endpoints, a paging walk through every ``next`` link,
bbox/datetime/property filters scoped to the user, and GDAL's own OAPIF driver reading it over HTTP."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select, update

from core.db import session_scope
from core.models import Finding
from tests import factories

CORE = "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core"


def _world(database_url: str, owner_id: int, analyses: int = 3, name: str = "Apuseni") -> list[int]:
    """``analyses`` analyses of one area (5 findings each: summary, 2 regions, 2 answers), a year apart."""
    with session_scope(database_url) as session:
        area = factories.area(session, name=name)
        area.owner_id = owner_id
        cat = factories.catalogue(session)
        before = factories.scene(session, cat, datetime(2015, 8, 31, 9, 40, tzinfo=UTC))
        ids = []
        for i in range(analyses):
            after = factories.scene(session, cat, datetime(2017 + i, 8, 29, 9, 40, tzinfo=UTC))
            an = factories.analysis(session, area, after, before)
            ids += [f.id for f in factories.findings(session, an)]
        return ids


def _path(href: str) -> str:
    parts = urlsplit(href)
    return f"{parts.path}?{parts.query}"


def test_landing_conformance_and_collections(web_client, alice):
    landing = web_client.get("/ogc").json()
    rels = {link["rel"] for link in landing["links"]}
    assert {"self", "service-desc", "conformance", "data"} <= rels
    assert CORE in web_client.get("/ogc/conformance").json()["conformsTo"]
    assert web_client.get("/ogc/collections").status_code == 401
    _world(web_client.app.state.settings.database_url, alice.id, analyses=1)
    cols = web_client.get("/ogc/collections", headers=alice.auth()).json()["collections"]
    assert [c["id"] for c in cols] == ["findings", "change_regions"]
    regions = cols[1]
    assert regions["extent"]["spatial"]["bbox"][0] == pytest.approx([23.12, 46.52, 23.152, 46.556])
    assert regions["extent"]["temporal"]["interval"][0][0].startswith("2017-08-29")
    assert any(link["rel"] == "items" for link in regions["links"])


def test_paging_walk_visits_every_feature_once(web_client, alice, bob):
    mine = _world(web_client.app.state.settings.database_url, alice.id, analyses=3)
    _world(web_client.app.state.settings.database_url, bob.id, analyses=1, name="Bob's")
    page = web_client.get("/ogc/collections/findings/items?limit=4", headers=alice.auth())
    assert page.headers["content-type"] == "application/geo+json"
    seen, pages = [], 0
    while True:
        body = page.json()
        assert body["numberMatched"] == 15 and body["numberReturned"] == len(body["features"]) <= 4
        seen += [f["id"] for f in body["features"]]
        pages += 1
        nxt = [link["href"] for link in body["links"] if link["rel"] == "next"]
        if not nxt:
            break
        page = web_client.get(_path(nxt[0]), headers=alice.auth())
    assert pages == 4 and sorted(seen) == sorted(mine)


def test_filters(web_client, alice):
    _world(web_client.app.state.settings.database_url, alice.id, analyses=3)

    def ids(query: str) -> list:
        r = web_client.get(f"/ogc/collections/change_regions/items?limit=100&{query}", headers=alice.auth())
        assert r.status_code == 200, r.text
        return [(f["properties"]["change_class"], f["properties"]["observed_at"][:4]) for f in r.json()["features"]]

    assert len(ids("")) == 6
    assert ids("change_class=vegetation_loss") == [("vegetation_loss", y) for y in ("2019", "2018", "2017")]
    assert sorted(ids("datetime=2018-01-01T00:00:00Z/2018-12-31T23:59:59Z")) == [
        ("new_built_up_or_bare", "2018"), ("vegetation_loss", "2018")]
    assert len(ids("datetime=../2018-08-29T09:40:00Z")) == 4  # inclusive end
    assert [c for c, _ in ids("bbox=23.149,46.549,23.16,46.56")] == ["new_built_up_or_bare"] * 3
    assert ids("bbox=0,0,1,1") == []
    assert ids("area_id=999999") == []
    bad = web_client.get("/ogc/collections/findings/items?colour=red", headers=alice.auth())
    assert bad.status_code == 400 and "colour" in bad.json()["detail"]
    assert web_client.get("/ogc/collections/findings/items?bbox=1,2,3", headers=alice.auth()).status_code == 400
    assert web_client.get("/ogc/collections/findings/items?datetime=yesterday", headers=alice.auth()).status_code == 400
    assert web_client.get("/ogc/collections/nope/items", headers=alice.auth()).status_code == 404


def test_single_item_and_other_users_item(web_client, alice, bob):
    mine = _world(web_client.app.state.settings.database_url, alice.id, analyses=1)
    with session_scope(web_client.app.state.settings.database_url) as session:
        session.execute(update(Finding).where(Finding.id == mine[1])
                        .values(alert_state="atmospheric", screen_verdict="atmospheric"))
    feature = web_client.get(f"/ogc/collections/change_regions/items/{mine[1]}", headers=alice.auth()).json()
    assert feature["id"] == mine[1] and feature["geometry"]["type"] == "Polygon"
    # A cloud edge must read as one in QGIS too, not as a loss.
    assert (feature["properties"]["alert_state"], feature["properties"]["screen_verdict"]) == (
        "atmospheric", "atmospheric")
    listed = web_client.get("/ogc/collections/change_regions/items?limit=100", headers=alice.auth()).json()
    assert {f["id"]: f["properties"]["alert_state"] for f in listed["features"]} == {
        fid: ("atmospheric" if fid == mine[1] else None) for fid in (f["id"] for f in listed["features"])}
    assert web_client.get(f"/ogc/collections/change_regions/items/{mine[1]}", headers=bob.auth()).status_code == 404
    # The summary is a finding but not a change region.
    assert web_client.get(f"/ogc/collections/change_regions/items/{mine[0]}", headers=alice.auth()).status_code \
        == 404


def test_gdal_oapif_driver_reads_the_regions(served_app, alice):
    pyogrio = pytest.importorskip("pyogrio")
    if "OAPIF" not in pyogrio.list_drivers():
        pytest.skip("this GDAL has no OAPIF driver")
    mine = _world(served_app.database_url, alice.id, analyses=2)
    # GDAL ≥ 3.9: HTTP bearer authentication for every request of the driver.
    pyogrio.set_gdal_config_options({"GDAL_HTTP_AUTH": "BEARER", "GDAL_HTTP_BEARER": alice.token})
    try:
        layers = [name for name, _ in pyogrio.list_layers(f"OAPIF:{served_app.url}/ogc")]
        assert layers == ["findings", "change_regions"]
        meta, fids, geometry, fields = pyogrio.raw.read(f"OAPIF:{served_app.url}/ogc", layer="change_regions",
                                                        return_fids=True)
    finally:
        pyogrio.set_gdal_config_options({"GDAL_HTTP_AUTH": None, "GDAL_HTTP_BEARER": None})
    classes = dict(zip(meta["fields"], fields, strict=True))["change_class"]
    assert sorted(classes) == ["new_built_up_or_bare"] * 2 + ["vegetation_loss"] * 2
    assert len(geometry) == 4 and meta["crs"] == "EPSG:4326"
    with session_scope(served_app.database_url) as session:
        regions = session.scalars(select(Finding.id).where(Finding.id.in_(mine), Finding.kind == "region")).all()
    # GDAL keeps the server's integer feature ids as its FIDs.
    assert sorted(int(f) for f in fids) == sorted(regions) and len(regions) == 4

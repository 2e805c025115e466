"""A poll advances its cursor only over what it really read; page links and redirects stay on policy.

Real local STAC API behind the fault-injecting proxy of tests/fixtures_ingest.py.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from urllib3.response import HTTPResponse

from core.config import get_settings
from core.db import session_scope
from core.models import PollState, QuarantinedItem, Scene
from eo.security import HrefRefused
from monitor.catalogues import poll_all
from monitor.catalogues.client import CappedRetry, check_api_url
from tests.fixtures_egress import RangeFileServer
from tests.fixtures_ingest import inner_aoi, loopback_catalogue


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def stored_ids() -> list[str]:
    with session_scope(get_settings()) as session:
        return sorted(session.execute(select(Scene.item_id)).scalars())


def state_of(collection: str) -> PollState | None:
    with session_scope(get_settings()) as session:
        return session.execute(select(PollState).where(PollState.collection == collection)).scalar_one_or_none()


def emptied(body: bytes) -> bytes:
    """The page with its items dropped and everything else (numberMatched, links) kept: a faulty proxy."""
    page = json.loads(body)
    page["features"] = []
    page.pop("numberReturned", None)
    return json.dumps(page).encode()


def with_settings(cfg, **poll):
    return cfg.model_copy(update={"poll": cfg.poll.model_copy(update=poll)})


def test_cursor_skip_scenario_stores_the_late_item(stac_collection, make_settings, add_area, fault_proxy,
                                                   items_by_date, sample_footprint):
    cfg = make_settings(fault_proxy.url, [stac_collection.id], lookback_days=10)
    add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    late = items_by_date["2020-08-04"]  # acquired 2020-08-04, published only after poll A

    a = poll_all(cfg, now=utc("2020-08-05T00:00:00"))
    assert a.ok and a.total("items_seen") == 0
    stac_collection.publish(late)

    # Poll B: window 07-26 .. 08-16 holds the item, but the proxy serves the page without it.
    fault_proxy.fail(emptied)
    b = poll_all(cfg, now=utc("2020-08-16T00:00:00"))
    assert not b.ok and "matched 1 items but paging returned only 0" in b.polls[0].error
    assert state_of(stac_collection.id).cursor == utc("2020-08-05T00:00:00")  # not moved past the item

    # Poll C: had B advanced the cursor to 08-16, its window would start 08-06 and miss the item.
    c = poll_all(cfg, now=utc("2020-08-17T00:00:00"))
    assert c.ok and c.total("new_scenes") == 1
    assert stored_ids() == ["S2A_34TER_20200804_0_L2A"]
    assert state_of(stac_collection.id).cursor == utc("2020-08-17T00:00:00")


def test_an_empty_page_with_a_next_link_fails_the_poll(stac_collection, make_settings, add_area, fault_proxy,
                                                       items_by_date, sample_footprint):
    for date in ("2020-08-04", "2020-08-29", "2020-07-30"):
        stac_collection.publish(items_by_date[date])
    add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    cfg = make_settings(fault_proxy.url, [stac_collection.id], page_size=1, lookback_days=40)
    fault_proxy.fail("pass", emptied)
    result = poll_all(cfg, now=utc("2020-08-30T12:00:00"))
    assert not result.ok and "page 2 is empty but has a next link" in result.polls[0].error
    assert len(stored_ids()) == 1 and state_of(stac_collection.id).cursor is None
    assert poll_all(cfg, now=utc("2020-08-30T12:00:00")).ok and len(stored_ids()) == 3


@pytest.mark.parametrize("fault, message", [
    (lambda body: body[: len(body) // 2], "is not JSON"),
    (lambda body: b"[1, 2, 3]", "is a JSON list, not an object"),
    (lambda body: json.dumps({**json.loads(body), "numberReturned": 7}).encode(), "says numberReturned 7"),
    (lambda body: json.dumps({"type": "FeatureCollection", "links": []}).encode(), "not a FeatureCollection"),
])
def test_unreadable_pages_keep_the_cursor(stac_collection, make_settings, add_area, fault_proxy, items_by_date,
                                          sample_footprint, fault, message):
    stac_collection.publish(items_by_date["2020-08-04"])
    add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    cfg = make_settings(fault_proxy.url, [stac_collection.id])
    fault_proxy.fail(fault)
    result = poll_all(cfg, now=utc("2020-08-06T00:00:00"))
    assert not result.ok and message in result.polls[0].error
    assert state_of(stac_collection.id).cursor is None


def test_a_nan_item_is_quarantined_and_its_page_mates_stored(stac_collection, make_settings, add_area, fault_proxy,
                                                             items_by_date, sample_footprint):
    for date in ("2020-08-04", "2020-08-29", "2020-07-30"):
        stac_collection.publish(items_by_date[date])
    add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    cfg = make_settings(fault_proxy.url, [stac_collection.id], lookback_days=40)

    def nan_cloud(body: bytes) -> bytes:
        page = json.loads(body)
        page["features"][1]["properties"]["eo:cloud_cover"] = math.nan
        return json.dumps(page).encode()  # allow_nan: the literal NaN that orjson refuses

    fault_proxy.fail(nan_cloud)
    result = poll_all(cfg, now=utc("2020-08-30T12:00:00"))
    assert result.ok, result.polls[0].error
    assert result.total("items_seen") == 3 and result.total("new_scenes") == 2 and result.total("quarantined") == 1
    with session_scope(get_settings()) as session:
        (item_id, reason), = session.execute(select(QuarantinedItem.item_id, QuarantinedItem.reason)).all()
    # The second feature of the page in pgstac's default order (newest first: 08-29, 08-04, 07-30).
    assert item_id == "S2A_34TER_20200804_0_L2A"
    assert "non-finite numbers" in reason and len(stored_ids()) == 2 and item_id not in stored_ids()


def test_an_off_host_next_link_is_refused(stac_collection, make_settings, add_area, fault_proxy, items_by_date,
                                          sample_footprint, sample_data_dir):
    for date in ("2020-08-04", "2020-08-29"):
        stac_collection.publish(items_by_date[date])
    add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    cfg = make_settings(fault_proxy.url, [stac_collection.id], page_size=1, lookback_days=40)
    with RangeFileServer(sample_data_dir, host="127.0.0.2") as elsewhere:
        def off_host(body: bytes) -> bytes:
            page = json.loads(body)
            for link in page["links"]:
                if link["rel"] == "next":
                    link["href"] = f"{elsewhere.url}/search"
            return json.dumps(page).encode()

        fault_proxy.fail(off_host)
        result = poll_all(cfg, now=utc("2020-08-30T12:00:00"))
        assert elsewhere.requests == []
    assert not result.ok and "link refused" in result.polls[0].error and "127.0.0.2" in result.polls[0].error
    assert state_of(stac_collection.id).cursor is None and len(stored_ids()) == 1


def test_a_search_redirected_off_host_is_refused(stac_collection, make_settings, add_area, fault_proxy,
                                                 items_by_date, sample_footprint, sample_data_dir):
    stac_collection.publish(items_by_date["2020-08-04"])
    add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    cfg = make_settings(fault_proxy.url, [stac_collection.id])
    with RangeFileServer(sample_data_dir, host="127.0.0.2") as elsewhere:
        fault_proxy.fail((307, {"Location": f"{elsewhere.url}/search"}))
        result = poll_all(cfg, now=utc("2020-08-06T00:00:00"))
        assert elsewhere.requests == []
    assert not result.ok and "127.0.0.2" in result.polls[0].error
    assert state_of(stac_collection.id).cursor is None


def test_check_api_url():
    cat = loopback_catalogue("http://127.0.0.1:8080/api", ["c"])
    assert check_api_url("http://127.0.0.1:8080/api/search?token=x", cat)
    assert check_api_url("http://127.0.0.1:9999/other", cat)  # not the API, but on the allow-list
    for url in ("http://127.0.0.2:8080/search", "file:///etc/passwd", "ftp://127.0.0.1/x",
                "http://127.0.0.1:8080/a b"):
        with pytest.raises(HrefRefused):
            check_api_url(url, cat)


def test_retry_after_is_capped():
    retry = CappedRetry(total=3, respect_retry_after_header=True, status_forcelist=[429], max_retry_after=60.0)
    asks_ten_minutes = HTTPResponse(body=b"", headers={"Retry-After": "600"}, status=429)
    assert retry.get_retry_after(asks_ten_minutes) == 60.0
    assert retry.new(total=2).get_retry_after(asks_ten_minutes) == 60.0  # the cap survives each retry
    polite = HTTPResponse(body=b"", headers={"Retry-After": "2"}, status=429)
    assert retry.get_retry_after(polite) == 2.0


def test_a_600_second_retry_after_does_not_block_the_poll(stac_collection, make_settings, add_area, fault_proxy,
                                                          items_by_date, sample_footprint):
    stac_collection.publish(items_by_date["2020-08-04"])
    add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    cfg = with_settings(make_settings(fault_proxy.url, [stac_collection.id]), max_retry_after_seconds=0.1)
    fault_proxy.fail((429, {"Retry-After": "600"}))
    result = poll_all(cfg, now=utc("2020-08-06T00:00:00"))
    assert result.ok and stored_ids() == ["S2A_34TER_20200804_0_L2A"] and fault_proxy.pending() == 0


def test_the_poll_deadline_stops_retrying_a_hanging_catalogue(stac_collection, make_settings, add_area, fault_proxy,
                                                              items_by_date, sample_footprint):
    stac_collection.publish(items_by_date["2020-08-04"])
    add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    cfg = with_settings(make_settings(fault_proxy.url, [stac_collection.id], max_retries=5, timeout_seconds=2.0),
                        deadline_seconds=1.0)
    fault_proxy.stall_seconds = 3.0
    fault_proxy.fail("stall", "stall", "stall", "stall", "stall", "stall")
    result = poll_all(cfg, now=utc("2020-08-06T00:00:00"))
    assert not result.ok and "deadline" in result.polls[0].error
    assert fault_proxy.pending() == 5  # one stalled try, then no retry past the deadline
    assert state_of(stac_collection.id).cursor is None

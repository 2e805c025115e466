"""Fixtures for ingest / pairing / scheduler tests (pytest plugin module, see tests/conftest.py).

- ``stac_collection``: a fresh, empty collection in the shared local STAC API (``stac_api``), so a test
  publishes exactly the items it wants and cannot disturb the others; deleted afterwards.
- ``make_settings``: settings pointing at the test database with a loopback catalogue (the explicit
  opt-in to http + 127.0.0.1 that production never has).
- ``add_area``: insert a watched area directly (the areas CLI has its own tests).
- ``FaultProxy``: a reverse proxy on loopback that answers the next requests with chosen failures
  (HTTP statuses, or a stall longer than the client's timeout) and then forwards to the real API.
"""

from __future__ import annotations

import copy
import http.client
import http.server
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from geoalchemy2.shape import from_shape
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry

from core.config import CatalogueSettings, PollSettings, Settings, get_settings
from core.db import session_scope
from core.models import Area
from devtools import localstac
from monitor.geometry import geodesic_area_km2

LOOPBACK_HOSTS = ["127.0.0.1"]


def loopback_catalogue(url: str, collections: list[str], *, name: str = "local", page_size: int = 100,
                       timeout_seconds: float = 10.0) -> CatalogueSettings:
    return CatalogueSettings(
        name=name, url=url, collections=collections, allowed_schemes=["http"], allowed_hosts=LOOPBACK_HOSTS,
        allow_private_hosts=True, page_size=page_size, timeout_seconds=timeout_seconds,
    )


class StacCollection:
    """A throw-away collection in the local STAC API."""

    def __init__(self, api: localstac.StacApiServer, template: dict[str, Any]):
        self.api = api
        self.id = f"s2-test-{uuid.uuid4().hex[:8]}"
        body = copy.deepcopy(template)
        body["id"] = self.id
        body["links"] = []
        status, result = localstac.http_json("POST", f"{api.url}/collections", body)
        if status not in (200, 201):
            raise RuntimeError(f"creating collection {self.id}: HTTP {status}: {result}")

    def publish(self, item: dict[str, Any]) -> dict[str, Any]:
        return self.api.publish_item(copy.deepcopy(item), collection_id=self.id)

    def delete(self) -> None:
        localstac.http_json("DELETE", f"{self.api.url}/collections/{self.id}")


@pytest.fixture
def stac_collection(stac_api: localstac.StacApiServer, sample_data_dir) -> Iterator[StacCollection]:
    collection = StacCollection(stac_api, localstac.read_sample_collection(sample_data_dir))
    yield collection
    collection.delete()


@pytest.fixture
def items_by_date(sample_items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Sample items keyed by acquisition date ("2020-08-29")."""
    return {it["properties"]["datetime"][:10]: it for it in sample_items}


@pytest.fixture
def make_settings(db: str) -> Callable[..., Settings]:
    def make(url: str, collections: list[str], *, page_size: int = 100, lookback_days: float = 10.0,
             max_retries: int = 2, timeout_seconds: float = 10.0, group_distance_km: float = 50.0) -> Settings:
        return Settings(
            database_url=db,
            catalogues=[loopback_catalogue(url, collections, page_size=page_size, timeout_seconds=timeout_seconds)],
            poll=PollSettings(lookback_days=lookback_days, max_retries=max_retries, backoff_factor=0.01,
                              group_distance_km=group_distance_km),
        )

    return make


@pytest.fixture
def sample_footprint(sample_items: list[dict[str, Any]]) -> BaseGeometry:
    return shape(sample_items[0]["geometry"])


@pytest.fixture
def add_area(db: str) -> Callable[..., int]:
    def add(name: str, geom: BaseGeometry, **options: Any) -> int:
        multi = geom if isinstance(geom, MultiPolygon) else MultiPolygon([geom])
        with session_scope(get_settings()) as session:
            area = Area(name=name, geom=from_shape(multi, srid=4326), area_km2=geodesic_area_km2(multi),
                        **{"collections": ["sentinel-2-l2a"], "questions": [], "recipients": [], **options})
            session.add(area)
            session.flush()
            return area.id

    return add


def inner_aoi(footprint: BaseGeometry, shrink: float = 0.25) -> Polygon:
    """A box in the middle of the footprint (``shrink`` of its size trimmed on each side)."""
    minx, miny, maxx, maxy = footprint.bounds
    dx, dy = (maxx - minx) * shrink, (maxy - miny) * shrink
    return Polygon([(minx + dx, miny + dy), (maxx - dx, miny + dy), (maxx - dx, maxy - dy), (minx + dx, maxy - dy)])


# --- fault-injecting reverse proxy ------------------------------------------------------------------


class FaultProxy:
    """HTTP reverse proxy on 127.0.0.1 that fails chosen requests, then forwards.

    ``fail(*actions, path="/search")`` queues actions for the next matching requests: an int is an HTTP
    status to answer with (``Retry-After: 0`` on 429/503 so the client does not sleep), ``"stall"`` holds
    the request for ``stall_seconds`` and then drops the connection (a read timeout for the client),
    ``"pass"`` forwards that request normally, ``(status, {header: value})`` answers with those headers
    (``(429, {"Retry-After": "600"})``, ``(302, {"Location": ...})``), and a callable forwards the request
    and replaces the response body with ``action(body_bytes)`` (an emptied page, bad JSON, a NaN item).
    The Host header is forwarded unchanged, so the API's paging links point back at the proxy.
    """

    def __init__(self, upstream: str, stall_seconds: float = 3.0):
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.stall_seconds = stall_seconds
        self.lock = threading.Lock()
        self.actions: list[tuple[str, Any]] = []
        self.log: list[tuple[str, str, Any]] = []  # (method, path, outcome)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                action = proxy._next_action(self.path)
                if action == "stall":
                    proxy._record(self.command, self.path, "stall")
                    time.sleep(proxy.stall_seconds)
                    self.close_connection = True
                    return
                if isinstance(action, int | tuple):
                    status, extra = (action, {}) if isinstance(action, int) else action
                    proxy._record(self.command, self.path, status)
                    payload = json.dumps({"code": "Injected", "description": f"injected HTTP {status}"}).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    if status in (429, 503) and "Retry-After" not in extra:
                        self.send_header("Retry-After", "0")
                    for name, value in extra.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                # No Accept-Encoding upstream: the body is relayed as plain bytes.
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length",
                                                "accept-encoding")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if callable(action):
                    data = action(data)
                    proxy._record(self.command, self.path, f"rewritten {resp.status}")
                else:
                    proxy._record(self.command, self.path, resp.status)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length",
                                         "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, *actions: Any, path: str = "/search") -> None:
        with self.lock:
            self.actions.extend((path, a) for a in actions)

    def pending(self) -> int:
        with self.lock:
            return len(self.actions)

    def _next_action(self, request_path: str) -> Any:
        with self.lock:
            if self.actions and request_path.split("?", 1)[0].endswith(self.actions[0][0]):
                action = self.actions.pop(0)[1]
                return None if action == "pass" else action
        return None

    def _record(self, method: str, path: str, outcome: Any) -> None:
        with self.lock:
            self.log.append((method, path, outcome))

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fault_proxy(stac_api: localstac.StacApiServer) -> Iterator[FaultProxy]:
    with FaultProxy(stac_api.url) as proxy:
        yield proxy

"""Talking to one STAC API: a pystac-client ``Client`` with real retries and timeouts, and the search.

pystac-client retries only connection errors by default (§4.5); catalogues answer 429 / 502 / 503 / 504
under load, so we pass a urllib3 ``Retry`` that also retries those statuses — for POST too
(``allowed_methods=None``: a search is a read even when it is a POST) — with exponential backoff and
``Retry-After`` honoured. 500 is not retried: it is usually a query the server cannot answer, and the
poll records it and tries again next cycle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

from pystac_client import Client, ItemSearch
from pystac_client.stac_api_io import StacApiIO
from shapely.geometry import mapping
from shapely.geometry.base import BaseGeometry
from urllib3 import Retry

from core.config import CatalogueSettings, PollSettings

logger = logging.getLogger(__name__)

RETRY_STATUSES = (429, 502, 503, 504)


def make_stac_io(catalogue: CatalogueSettings, poll: PollSettings) -> StacApiIO:
    retry = Retry(
        total=poll.max_retries,
        backoff_factor=poll.backoff_factor,
        status_forcelist=list(RETRY_STATUSES),
        allowed_methods=None,
        respect_retry_after_header=True,
        raise_on_status=True,
    )
    # (connect, read) seconds; a stuck server must not hang the scheduler forever.
    timeout = (min(10.0, catalogue.timeout_seconds), catalogue.timeout_seconds)
    return StacApiIO(timeout=timeout, max_retries=retry)


def open_client(catalogue: CatalogueSettings, poll: PollSettings,
                response_hooks: Sequence[Callable[..., Any]] = ()) -> Client:
    """Open the catalogue's landing page (one GET) with retrying I/O.

    ``response_hooks`` are requests response hooks (called once per HTTP response, retries included
    as one): the poller counts requests with them.
    """
    stac_io = make_stac_io(catalogue, poll)
    stac_io.session.hooks["response"].extend(response_hooks)
    # Client.open() re-applies its own `timeout` argument to the StacApiIO: pass the same one again.
    client = Client.open(catalogue.url, stac_io=stac_io, timeout=stac_io.timeout)
    # Our searches use only the `query` extension (Earth Search ignores CQL2 `filter` silently); servers
    # that do not advertise item-search conformance still answer /search.
    client.add_conforms_to("ITEM_SEARCH")
    client.add_conforms_to("QUERY")
    return client


def make_search(
    client: Client,
    *,
    collection: str,
    intersects: BaseGeometry,
    start: datetime,
    end: datetime | None,
    max_cloud_cover: float | None,
    page_size: int,
) -> ItemSearch:
    """The POST /search for one collection, area geometry and time window (nothing is sent yet)."""
    query: dict[str, Any] | None = None
    if max_cloud_cover is not None and max_cloud_cover < 100:
        # STACQL `query`, typed dict form (the list shorthand sends numbers as strings).
        query = {"eo:cloud_cover": {"lte": max_cloud_cover}}
    return client.search(
        method="POST",
        collections=[collection],
        intersects=mapping(intersects),
        datetime=(start, end),
        query=query,
        limit=page_size,
    )


def search_items(client: Client, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Yield raw item dicts of every page (arguments as :func:`make_search`)."""
    # items_as_dicts() skips pystac object construction; it follows `next` links (GET or POST bodies).
    yield from make_search(client, **kwargs).items_as_dicts()

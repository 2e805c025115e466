"""Talking to one STAC API: a pystac-client ``Client`` with real retries, timeouts and a URL policy.

pystac-client retries only connection errors by default (§4.5); catalogues answer 429 / 502 / 503 / 504
under load, so we pass a urllib3 ``Retry`` that also retries those statuses — for POST too
(``allowed_methods=None``: a search is a read even when it is a POST) — with exponential backoff and
``Retry-After`` honoured up to ``poll.max_retry_after_seconds`` (a server asking for 10 minutes must not
stall the cycle and the leader). 500 is not retried: it is usually a query the server cannot answer, and
the poll records it and tries again next cycle. Every request and retry checks the poll's deadline
(``poll.deadline_seconds``).

Every URL requested — the landing page's ``search`` link, each ``next`` page link, each HTTP redirect —
is on the catalogue's own origin or passes :func:`eo.security.check_href` like an asset href
(:func:`check_api_url`): a catalogue cannot make the poller fetch an arbitrary host.

Paging is ours, not pystac-client's (:func:`search_pages`): pystac-client ends a search silently at the
first empty page and parses pages with orjson, which refuses a whole page for one ``NaN``. Here a page is
parsed leniently (stdlib ``json``; a bad item is quarantined later, its page-mates stored) and the search
fails with :class:`InconsistentSearch` when what was paged does not add up (``numberMatched`` /
``context.matched`` vs items paged, ``numberReturned`` vs the page, an empty page with a ``next`` link),
so the poll keeps its cursor instead of skipping what it never saw.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

from pystac_client import Client, ItemSearch
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from requests import Response
from shapely.geometry import mapping
from shapely.geometry.base import BaseGeometry
from urllib3 import Retry
from urllib3.exceptions import MaxRetryError

from core.config import CatalogueSettings, PollSettings
from eo.security import HrefRefused, check_href

logger = logging.getLogger(__name__)

RETRY_STATUSES = (429, 502, 503, 504)
# A search whose paging never ends (a `next` loop) is a broken server, not a big result.
MAX_PAGES = 10_000


class InconsistentSearch(RuntimeError):
    """What the catalogue paged does not add up; the poll must not advance its cursor."""


class PollDeadlineExceeded(RuntimeError):
    """The poll ran past ``poll.deadline_seconds``."""


def check_api_url(url: str, catalogue: CatalogueSettings) -> str:
    """``url`` if it may be requested for ``catalogue``'s API, else raise :class:`HrefRefused`.

    Same scheme, host and port as ``catalogue.url`` is the API itself (configured by the operator);
    anything else is checked like an asset href (allow-list, public addresses, no ``file://``).
    """
    api, target = urlsplit(catalogue.url), urlsplit(url)
    try:
        same_origin = (target.scheme.lower(), (target.hostname or "").lower(), target.port) == (
            api.scheme.lower(), (api.hostname or "").lower(), api.port)
    except ValueError as exc:  # a port that is not a number
        raise HrefRefused(f"link {url!r} is not a valid URL: {exc}") from None
    if same_origin and not any(ch in url for ch in "\\ \t\r\n\x00"):
        return url
    try:
        return check_href(url, catalogue, sign=False)
    except HrefRefused as exc:
        raise HrefRefused(f"catalogue {catalogue.name!r} link refused: {exc}") from None


class CappedRetry(Retry):
    """urllib3 ``Retry`` with ``Retry-After`` capped and a wall-clock deadline (monotonic seconds)."""

    def __init__(self, *args: Any, max_retry_after: float = 60.0, deadline: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_retry_after = max_retry_after
        self.deadline = deadline

    def new(self, **kw: Any) -> CappedRetry:
        retry = super().new(**kw)
        retry.max_retry_after, retry.deadline = self.max_retry_after, self.deadline
        return retry

    def _remaining(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def get_retry_after(self, response: Any) -> float | None:
        seconds = super().get_retry_after(response)
        if seconds is None:
            return None
        return max(0.0, min(seconds, self.max_retry_after, self._remaining()))

    def get_backoff_time(self) -> float:
        return max(0.0, min(super().get_backoff_time(), self._remaining()))

    def increment(self, *args: Any, **kwargs: Any) -> CappedRetry:
        if self._remaining() <= 0:
            raise MaxRetryError(kwargs.get("_pool"), kwargs.get("url") or (args[1] if len(args) > 1 else None),
                                PollDeadlineExceeded("poll deadline reached while retrying"))
        return super().increment(*args, **kwargs)


class PolicyStacApiIO(StacApiIO):
    """StacApiIO that checks every URL (and redirect) against the catalogue and honours the deadline."""

    def __init__(self, catalogue: CatalogueSettings, deadline: float | None, **kwargs: Any):
        super().__init__(**kwargs)
        self.catalogue = catalogue
        self.deadline = deadline
        self._kwargs = kwargs
        self.response_hooks: list[Callable[..., Any]] = []
        self.session.hooks["response"].append(self._check_redirect)

    def add_response_hooks(self, hooks: Sequence[Callable[..., Any]]) -> None:
        """requests response hooks (one call per HTTP response, retries included as one); kept by :meth:`fork`."""
        self.response_hooks.extend(hooks)
        self.session.hooks["response"].extend(hooks)

    def fork(self) -> PolicyStacApiIO:
        """The same I/O (policy, retries, timeout, deadline, response hooks) on its own HTTP session, for
        another thread: requests does not promise a ``Session`` is safe to share between threads."""
        other = PolicyStacApiIO(self.catalogue, self.deadline, **self._kwargs)
        other.timeout = self.timeout
        other.add_response_hooks(self.response_hooks)
        return other

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise PollDeadlineExceeded(f"poll deadline reached before requesting more of {self.catalogue.name!r}")

    def request(self, href: str, *args: Any, **kwargs: Any) -> str:
        self.check_deadline()
        check_api_url(str(href), self.catalogue)
        return super().request(href, *args, **kwargs)

    def _check_redirect(self, response: Response, *args: Any, **kwargs: Any) -> None:
        if response.is_redirect:
            check_api_url(urljoin(response.url, response.headers["location"]), self.catalogue)


def make_stac_io(catalogue: CatalogueSettings, poll: PollSettings, deadline: float | None = None) -> PolicyStacApiIO:
    retry = CappedRetry(
        total=poll.max_retries,
        backoff_factor=poll.backoff_factor,
        status_forcelist=list(RETRY_STATUSES),
        allowed_methods=None,
        respect_retry_after_header=True,
        raise_on_status=True,
        max_retry_after=poll.max_retry_after_seconds,
        deadline=deadline,
    )
    # (connect, read) seconds; a stuck server must not hang the scheduler forever.
    timeout = (min(10.0, catalogue.timeout_seconds), catalogue.timeout_seconds)
    return PolicyStacApiIO(catalogue, deadline, timeout=timeout, max_retries=retry)


def open_client(catalogue: CatalogueSettings, poll: PollSettings,
                response_hooks: Sequence[Callable[..., Any]] = (), *, deadline: float | None = None) -> Client:
    """Open the catalogue's landing page (one GET) with retrying, policy-checked I/O.

    ``response_hooks`` are requests response hooks (called once per HTTP response, retries included
    as one): the poller counts requests with them. ``deadline`` is a ``time.monotonic()`` value after
    which no request or retry starts.
    """
    stac_io = make_stac_io(catalogue, poll, deadline)
    stac_io.add_response_hooks(response_hooks)
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
    extra_query: dict[str, Any] | None = None,
) -> ItemSearch:
    """The POST /search for one collection, area geometry and time window (nothing is sent yet).

    ``extra_query`` adds STACQL ``query`` terms (the late sweep's ``{"updated": {"gte": …}}``).
    """
    query: dict[str, Any] = dict(extra_query or {})
    if max_cloud_cover is not None and max_cloud_cover < 100:
        # STACQL `query`, typed dict form (the list shorthand sends numbers as strings).
        query["eo:cloud_cover"] = {"lte": max_cloud_cover}
    return client.search(
        method="POST",
        collections=[collection],
        intersects=mapping(intersects),
        datetime=(start, end),
        query=query or None,
        limit=page_size,
    )


def first_page_size(client: Client, collection: str, query: dict[str, Any]) -> int:
    """How many items (0 or 1) the first page of a whole-collection search with STACQL ``query`` holds.

    One request; the late sweep asks this to learn whether the API honours a filter on a property
    (a server that ignores an unknown ``query`` term answers as if there were none).
    """
    search = client.search(method="POST", collections=[collection], query=query, limit=1)
    stac_io = search._stac_io
    if not isinstance(stac_io, PolicyStacApiIO):
        raise TypeError("first_page_size needs a client from open_client()")
    page = _read_page(stac_io, search.url, search.method, search.get_parameters())
    features = page.get("features")
    if not isinstance(features, list):
        raise InconsistentSearch("the probe's answer is not a FeatureCollection with a features list")
    return len(features)


def search_pages(client: Client, *, stac_io: PolicyStacApiIO | None = None, **kwargs: Any) -> Iterator[list[Any]]:
    """Yield the ``features`` of each page of the search, checking that the paging adds up.

    ``kwargs`` are :func:`make_search`'s; ``stac_io`` (a :meth:`PolicyStacApiIO.fork` of the client's)
    sends the requests instead of the client's own, so several threads can page searches of one client.

    Raises :class:`InconsistentSearch` (after yielding what was read) when the catalogue's count
    (``numberMatched`` or ``context.matched``) exceeds the items paged, when a page holds fewer features
    than its ``numberReturned``, when an empty page still has a ``next`` link, or when a page is not a
    FeatureCollection; :class:`HrefRefused` for a ``next`` link off the policy; ``APIError`` for HTTP
    errors and JSON that does not parse.
    """
    search = make_search(client, **kwargs)
    stac_io = stac_io or search._stac_io
    if not isinstance(stac_io, PolicyStacApiIO):
        raise TypeError("search_pages needs a client from open_client()")
    url, method, parameters = search.url, search.method, search.get_parameters()
    matched: int | None = None
    paged = 0
    for number in range(1, MAX_PAGES + 1):
        page = _read_page(stac_io, url, method, parameters)
        features = page.get("features")
        if page.get("type") != "FeatureCollection" or not isinstance(features, list):
            raise InconsistentSearch(f"page {number} of the search is not a FeatureCollection with a features list")
        if matched is None:
            matched = _number_matched(page)
        returned = page.get("numberReturned", (page.get("context") or {}).get("returned"))
        if isinstance(returned, int) and returned != len(features):
            raise InconsistentSearch(f"page {number} says numberReturned {returned} but holds {len(features)} items")
        paged += len(features)
        if features:
            yield features
        link = next((lk for lk in page.get("links") or [] if isinstance(lk, dict) and lk.get("rel") == "next"), None)
        if link is None:
            break
        if not features:
            raise InconsistentSearch(f"page {number} is empty but has a next link ({paged} items paged so far)")
        url, method, parameters = _follow(link, url, method, parameters)
    else:
        raise InconsistentSearch(f"the search did not end after {MAX_PAGES} pages")
    if matched is not None and paged < matched:
        raise InconsistentSearch(f"the catalogue matched {matched} items but paging returned only {paged}")


def _read_page(stac_io: PolicyStacApiIO, url: str, method: str, parameters: dict[str, Any] | None) -> dict:
    text = stac_io.request(url, method=method, parameters=parameters)
    try:
        # stdlib json on purpose: it reads NaN/Infinity, so one such item is quarantined, not the page.
        page = json.loads(text)
    except ValueError as exc:
        raise APIError(f"search page from {url} is not JSON: {exc}") from None
    if not isinstance(page, dict):
        raise InconsistentSearch(f"search page from {url} is a JSON {type(page).__name__}, not an object")
    return page


def _number_matched(page: dict[str, Any]) -> int | None:
    value = page.get("numberMatched")
    if value is None and isinstance(page.get("context"), dict):
        value = page["context"].get("matched")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _follow(link: dict[str, Any], url: str, method: str,
            parameters: dict[str, Any] | None) -> tuple[str, str, dict[str, Any] | None]:
    """The request a STAC ``next`` link describes (GET href, or POST with ``body``, ``merge``)."""
    href = link.get("href")
    if not isinstance(href, str) or not href:
        raise InconsistentSearch(f"next link without an href: {str(link)[:200]}")
    href = urljoin(url, href)
    next_method = str(link.get("method") or "GET").upper()
    body = link.get("body")
    if next_method == "POST":
        if link.get("merge") and isinstance(parameters, dict) and isinstance(body, dict):
            body = {**parameters, **body}
        return href, "POST", body if isinstance(body, dict) else {}
    return href, "GET", None

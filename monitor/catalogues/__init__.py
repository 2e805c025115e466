"""Catalogue adapters: STAC search (grouped, retried, paged), item parsing, scene upserts, the poll cursor.

- :mod:`monitor.catalogues.items`   raw STAC item -> normalised scene fields, or :class:`MalformedItem`
- :mod:`monitor.catalogues.groups`  nearby areas -> one search geometry per group
- :mod:`monitor.catalogues.client`  pystac-client with urllib3 retries and timeouts
- :mod:`monitor.catalogues.store`   catalogue / scene / quarantine writes
- :mod:`monitor.catalogues.poller`  one poll of all catalogues (cursor, look-back, failure bookkeeping)
"""

from monitor.catalogues.items import MalformedItem, ParsedItem, parse_item
from monitor.catalogues.poller import CollectionPoll, PollSummary, create_observations, poll_all, poll_catalogue
from monitor.catalogues.store import IngestStats, ingest_items, upsert_catalogue

__all__ = [
    "CollectionPoll",
    "IngestStats",
    "MalformedItem",
    "ParsedItem",
    "PollSummary",
    "create_observations",
    "ingest_items",
    "parse_item",
    "poll_all",
    "poll_catalogue",
    "upsert_catalogue",
]

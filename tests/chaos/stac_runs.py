"""R3: STAC faults through a loopback fault proxy in front of the real local STAC API (pgstac).

One try = one fault on a fresh collection holding a few sample items (drawn at random), polled by the real
poller (``monitor.catalogues.poll_all``) through :class:`tests.fixtures_ingest.FaultProxy`: the faulted
poll, then clean polls. Every published item must be stored as exactly one scene by the last poll; a poll
that failed must leave the cursor where it was, a poll that succeeded moves it to its own ``now``.

Faults: 429 with ``Retry-After: 600`` (capped by ``poll.max_retry_after_seconds``), HTTP 500 past the
retries, a hanging server (read timeout), a truncated JSON page, an empty page with matches pending
(the cursor-skip scenario: the item is published after poll A and the emptied poll B must not move the
cursor past it), a ``next`` link off the allow-list (to 127.0.0.2, which must receive nothing), and an
item with a ``NaN`` cloud cover (quarantined; its page-mates stored; stored once the catalogue serves it
clean again).

- lost: a published item not stored after the clean poll, or a cursor moved by a failed poll;
- duplicated: an item id stored as more than one scene;
- tracebacks: an exception out of ``poll_all`` (it must report failures, never raise).
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from geoalchemy2.shape import from_shape
from shapely.geometry import MultiPolygon, shape
from sqlalchemy import func, select

from core.config import PollSettings, Settings
from core.db import session_scope
from core.models import Area, PollState, QuarantinedItem, Scene
from devtools import localstac
from monitor.catalogues import poll_all
from monitor.geometry import geodesic_area_km2
from tests.chaos.lab import Lab, Tally, truncate_app
from tests.fixtures_egress import RangeFileServer
from tests.fixtures_ingest import FaultProxy, StacCollection, inner_aoi, loopback_catalogue

# Longer than the sample's 2015-2020 span, so every drawn item is inside a first poll's window.
LOOKBACK_DAYS = 2500.0
MAX_CLOUD = 80.0  # the area's max_cloud_cover (the model default)
FAULTS = ("429 Retry-After", "500", "hang", "bad JSON", "empty page", "off-host next", "NaN item")


def emptied(body: bytes) -> bytes:
    """The page without its items, numberMatched and links kept (what a faulty cache or proxy serves)."""
    page = json.loads(body)
    page["features"] = []
    page.pop("numberReturned", None)
    return json.dumps(page).encode()


def nan_cloud(body: bytes) -> bytes:
    page = json.loads(body)
    if page.get("features"):
        page["features"][0]["properties"]["eo:cloud_cover"] = math.nan
    return json.dumps(page).encode()  # allow_nan: the literal NaN strict parsers refuse


def clear(proxy: FaultProxy) -> None:
    """Drop the faults not yet used (a poll may make fewer requests than were queued)."""
    with proxy.lock:
        proxy.actions.clear()


class Trial:
    """One fault on one fresh collection; ``poll(now)`` polls and checks the cursor rule."""

    def __init__(self, lab: Lab, proxy: FaultProxy, tally: Tally, fault: str, items: list[dict[str, Any]],
                 page_size: int):
        self.lab, self.proxy, self.tally, self.fault = lab, proxy, tally, fault
        self.collection = StacCollection(lab.stac_api, localstac.read_sample_collection())
        self.items = items
        self.published: set[str] = set()
        self.cursor_errors: list[str] = []
        catalogue = loopback_catalogue(proxy.url, [self.collection.id], page_size=page_size, timeout_seconds=1.0)
        self.settings = Settings(
            database_url=lab.app_url, catalogues=[catalogue],
            poll=PollSettings(lookback_days=LOOKBACK_DAYS, max_retries=2, backoff_factor=0.01,
                              max_retry_after_seconds=0.1, deadline_seconds=30.0),
        )
        truncate_app(lab.app_url)
        footprint = shape(items[0]["geometry"])
        multi = MultiPolygon([inner_aoi(footprint)])
        with session_scope(self.settings) as session:
            session.add(Area(name=f"chaos {self.collection.id}", geom=from_shape(multi, srid=4326),
                             area_km2=geodesic_area_km2(multi), collections=[self.collection.id], questions=[],
                             recipients=[], properties={}, max_cloud_cover=MAX_CLOUD))

    def publish(self, item: dict[str, Any]) -> None:
        self.collection.publish(item)
        self.published.add(item["id"])

    def cursor(self) -> datetime | None:
        with session_scope(self.settings) as session:
            return session.execute(select(PollState.cursor).where(
                PollState.collection == self.collection.id)).scalar_one_or_none()

    def poll(self, now: datetime) -> bool | None:
        before = self.cursor()
        try:
            result = poll_all(self.settings, now=now)
        except Exception as exc:
            self.tally.tracebacks += 1
            self.tally.note(f"R3 {self.fault}: poll_all raised {type(exc).__name__}: {exc}")
            return None
        after = self.cursor()
        if not result.ok and after != before:
            self.cursor_errors.append(f"failed poll moved the cursor {before} -> {after}")
        if result.ok and after != now:
            self.cursor_errors.append(f"successful poll at {now} left the cursor at {after}")
        return result.ok

    def stored(self) -> dict[str, int]:
        with session_scope(self.settings) as session:
            return dict(session.execute(select(Scene.item_id, func.count()).where(
                Scene.collection == self.collection.id).group_by(Scene.item_id)).all())

    def quarantined(self) -> int:
        with session_scope(self.settings) as session:
            return session.execute(select(func.count()).select_from(QuarantinedItem).where(
                QuarantinedItem.collection == self.collection.id)).scalar_one()

    def score(self, extra_problem: str | None = None) -> None:
        stored = self.stored()
        missing = sorted(self.published - set(stored))
        doubled = sorted(i for i, n in stored.items() if n > 1)
        self.tally.tries += 1
        self.tally.lost += len(missing) + (1 if self.cursor_errors else 0)
        self.tally.duplicated += len(doubled)
        problems = ([f"not stored: {missing}"] if missing else []) + ([f"doubled: {doubled}"] if doubled else []) \
            + self.cursor_errors + ([extra_problem] if extra_problem else [])
        if problems:
            self.tally.note(f"R3 {self.fault}: " + "; ".join(problems))
        else:
            self.tally.passed += 1

    def close(self) -> None:
        self.collection.delete()


def _when(item: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(item["properties"]["datetime"].replace("Z", "+00:00")).astimezone(UTC)


def _run_fault(trial: Trial, fault: str, rng: random.Random) -> str | None:
    """Inject ``fault`` into a poll, then poll clean; returns a problem the generic checks cannot see."""
    proxy, items = trial.proxy, trial.items
    newest = max(_when(i) for i in items)
    now = newest + timedelta(days=1)
    hour = timedelta(hours=1)
    if fault == "empty page":
        late, *others = items
        now = _when(late) + timedelta(days=1)
        for item in others:
            if _when(item) < now:
                trial.publish(item)  # already there at poll A
        trial.poll(now)  # poll A: the late item is not published yet
        trial.publish(late)
        proxy.fail(*[emptied] * 8)
        # Poll B: its window (from poll A's cursor) holds the late item; had B moved the cursor to its own
        # now, poll C's window would start two days after the item.
        ok = trial.poll(now + timedelta(days=LOOKBACK_DAYS + 1))
        clear(proxy)
        trial.poll(now + timedelta(days=LOOKBACK_DAYS + 2))
        return "the emptied poll B was reported ok" if ok else None
    for item in items:
        trial.publish(item)
    if fault == "off-host next":
        with RangeFileServer(localstac.SAMPLE_DATA_DIR, host="127.0.0.2") as elsewhere:
            def off_host(body: bytes) -> bytes:
                page = json.loads(body)
                for link in page.get("links", []):
                    if link.get("rel") == "next":
                        link["href"] = f"{elsewhere.url}/search"
                return json.dumps(page).encode()

            proxy.fail(off_host)
            ok = trial.poll(now)
            clear(proxy)
            trial.poll(now + hour)
            if elsewhere.requests:
                return f"127.0.0.2 was asked {elsewhere.requests}"
        return "the off-host poll was reported ok" if ok else None
    actions: dict[str, list[Any]] = {
        "429 Retry-After": [(429, {"Retry-After": str(rng.choice([60, 600, 3600]))})],
        "500": [500] * 3,
        "hang": ["stall"] * 3,
        "bad JSON": [lambda body: body[: len(body) // 2]],
        "NaN item": [nan_cloud],
    }
    proxy.stall_seconds = 2.0
    proxy.fail(*actions[fault])
    ok = trial.poll(now)
    clear(proxy)
    stored = trial.stored()
    problem = None
    if fault == "429 Retry-After" and not (ok and set(stored) == trial.published):
        problem = "a capped Retry-After should not fail the poll or leave items behind"
    elif fault == "NaN item" and not (ok and len(stored) == len(trial.published) - 1 and trial.quarantined() == 1):
        problem = f"the NaN item's poll: ok={ok}, {len(stored)} of {len(trial.published)} stored, " \
                  f"{trial.quarantined()} quarantined (expected all but the NaN item stored, it quarantined)"
    elif fault in ("500", "hang", "bad JSON") and ok is not False:
        problem = f"the faulted poll was reported ok={ok}"
    trial.poll(now + hour)
    trial.poll(now + 2 * hour)  # the first clean poll may stop at a deadline; the second must finish the job
    return problem


def r3_stac_faults(lab: Lab, rounds: int = 3, *, seed: int = 3, log: Callable[[str], None] = print) -> Tally:
    """``rounds`` × every fault of :data:`FAULTS`, each on 2–4 random sample items and page size 1–2."""
    rng = random.Random(seed)
    tally = Tally()
    # The search asks for the area's cloud cover limit (80 %): the two overcast sample items are never wanted.
    samples = [i for i in localstac.read_sample_items() if i["properties"]["eo:cloud_cover"] <= MAX_CLOUD]
    with FaultProxy(lab.stac_api.url) as proxy:
        for n in range(rounds):
            for fault in FAULTS:
                items = [copy.deepcopy(i) for i in rng.sample(samples, rng.randint(2, 4))]
                clear(proxy)
                trial = Trial(lab, proxy, tally, fault, items, page_size=rng.randint(1, 2))
                try:
                    problem = _run_fault(trial, fault, rng)
                    trial.score(problem)
                finally:
                    clear(proxy)
                    trial.close()
            log(f"R3 round {n + 1}/{rounds}: {tally.passed}/{tally.tries} passed")
    return tally

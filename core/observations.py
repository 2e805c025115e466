"""The observation job: every ``observations.status`` transition, the task name and the dispatch rule.

This is the only module that changes an observation row after the poll created it (``pending``, one per
active area × acquisition a granule of which touches it), the poll's re-open of a ``partial`` one included.
The control plane (:mod:`monitor.observations` dispatches, :mod:`monitor.pairing` settles) and whoever
computes the fractions (a ``cpu`` worker's ``unirs.observe`` task, or the scheduler's process itself:
:mod:`eo.observe_rows`) call the functions below.

::

    pending, not computed ──save──▶ pending + fractions ──settle_clear (pairing)──▶ clear
                           ├─save─▶ cloudy | partial | failed
                           └─give_up (max attempts started, none stored an outcome)─▶ failed, final
    partial, a granule of its acquisition first seen after it was computed ──reopen_late_partial (poll)──▶ pending
    failed by save, computed > FAILED_RETRY_AFTER ago, created < FAILED_GIVE_UP_AFTER ago ──save──▶ (as above)

- A row is **due** while it waits for fractions (``pending`` with ``computed_at`` NULL, or a ``failed`` one whose
  retry is due). :func:`save` writes only rows that are still due, so a task run twice (a re-delivered message,
  a re-send racing a slow worker) writes once: the second run finds nothing due, and a row pairing already
  settled is never reset to ``pending``.
- **Dispatch** is per acquisition (the message carries the acquisition id only): :func:`mark_sent` stamps
  ``dispatched_at`` on its due rows in the transaction that publishes the message. A due row whose stamp — or
  the start of its last attempt (``started_at``), when later — is older than ``resend_seconds`` (or older than
  its last failed computation) is sent again — that is how a
  task lost with a killed worker or an emptied broker comes back: the durable state is the row, not the queue.
- **Attempts**: whoever computes a row first calls :func:`begin` (``attempts`` + 1, ``started_at``), and
  :func:`note_error` when the computation raised. A row that had ``max_attempts`` attempts and no outcome — the
  task raised each time, or its worker died — is given up (:func:`give_up`, by the dispatcher once the last
  attempt is stale, or by :func:`begin` when asked to start once more): ``failed`` with the one-line reason, a
  WARNING naming the acquisition, and pairing moves on (a failed observation is not clear). :func:`save`
  resets the count. A given-up row is not retried (it would fail again, and may kill a worker each time).
- **Sends**: :func:`mark_sent` counts ``dispatches`` (reset by :func:`begin`, :func:`save` and the re-open):
  attempts count only starts, so a message lost before any worker took it, or sent to a queue nobody
  consumes, would be re-sent every ``resend_seconds`` without end. Each send without a start doubles the
  delay before the next (10 min, 20, 40 … up to ``backoff_max``, ``analysis.resend_backoff_max_seconds``):
  the broker is not flooded while no worker runs, and the work is not lost — it is not failed for it, and
  runs when a worker comes back. ``doctor`` counts rows sent :data:`UNSTARTED_WARN_SENDS` times unstarted.
- All times are the database's ``now()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

from core.jobs import Queue, resend_backoff
from core.models import ObservationStatus

#: Celery task name of one acquisition's observations (messages carry the acquisition id only).
TASK_NAME = "unirs.observe"
QUEUE = Queue.CPU
FAILED_RETRY_AFTER = timedelta(hours=1)
FAILED_GIVE_UP_AFTER = timedelta(days=3)
#: A dispatched acquisition whose rows are still due this long after is sent again (lost message, dead worker).
RESEND_SECONDS = 600.0

logger = logging.getLogger(__name__)

_S = ObservationStatus
_RETRY = int(FAILED_RETRY_AFTER.total_seconds())
_GIVE_UP = int(FAILED_GIVE_UP_AFTER.total_seconds())
#: SQL condition (table alias ``o``): the row waits for fractions. A given-up row (attempts left over, none
#: started after it was settled) is not retried.
DUE = (f"((o.status = '{_S.PENDING.value}' AND o.computed_at IS NULL) OR "
       f"(o.status = '{_S.FAILED.value}' AND o.computed_at < now() - make_interval(secs => {_RETRY}) "
       f"AND o.created_at > now() - make_interval(secs => {_GIVE_UP}) "
       f"AND (o.attempts = 0 OR o.started_at > o.computed_at)))")
#: Sends without a start after which ``doctor`` says no worker seems to take the queue's messages.
UNSTARTED_WARN_SENDS = 3
#: Default cap of the re-send back-off (``analysis.resend_backoff_max_seconds``).
RESEND_BACKOFF_MAX_SECONDS = 6 * 3600.0
#: SQL: the re-send delay of a row (``dispatches`` is 0 again once a worker starts it).
RESEND_DELAY = resend_backoff(":resend", "o.dispatches")
#: Timed from the later of the dispatch and the start of the last attempt: a message that waited 15 min in a
#: busy cpu queue and started 1 min ago is running, not lost (GREATEST ignores a NULL started_at).
_NOT_IN_FLIGHT = ("(o.dispatched_at IS NULL "
                  f"OR GREATEST(o.dispatched_at, o.started_at) < now() - make_interval(secs => {RESEND_DELAY}) "
                  "OR o.dispatched_at < o.computed_at)")


@dataclass(frozen=True)
class Outcome:
    """What one acquisition saw of one area: the status and fractions to store (``clear`` ones are stored as
    ``pending`` with their fractions; pairing settles them)."""

    status: ObservationStatus
    covered: float | None
    clear: float | None
    reason: str | None
    scene_id: int | None = None


def classify(covered: float, clear: float | None, min_covered: float, min_clear: float) -> tuple[ObservationStatus,
                                                                                                   str | None]:
    """The status and reason of an observation from its fractions (0..1) and the area's minimums."""
    if clear is None or covered < min_covered:
        return ObservationStatus.PARTIAL, (f"the acquisition imaged {100 * covered:.0f}% of the area (minimum "
                                           f"{100 * min_covered:.0f}%); the rest is outside its granules or no-data")
    if clear < min_clear:
        imaged = "" if covered >= 0.995 else f" ({100 * covered:.0f}% of the area imaged)"
        return ObservationStatus.CLOUDY, (f"AOI clear fraction {100 * clear:.0f}% is below the area's minimum "
                                          f"{100 * min_clear:.0f}%{imaged}")
    return ObservationStatus.CLEAR, None


def due_areas(session: Session, acquisition_id: int, area_ids: list[int] | None = None) -> list[int]:
    """Active areas whose observation of ``acquisition_id`` is due (waits for fractions)."""
    only = "" if area_ids is None else "AND o.area_id = ANY(:areas)"
    rows = session.execute(text(f"""
        SELECT o.area_id FROM observations o JOIN areas a ON a.id = o.area_id
         WHERE o.acquisition_id = :q AND a.status = 'active' AND {DUE} {only}
         ORDER BY o.area_id"""),  # noqa: S608 — only constants and enum values are interpolated
        {"q": acquisition_id, **({} if area_ids is None else {"areas": area_ids})})
    return [r.area_id for r in rows]


def due_acquisitions(session: Session, *, area_ids: list[int] | None = None, unsent_only: bool = False,
                     resend_seconds: float = RESEND_SECONDS, backoff_max: float = RESEND_BACKOFF_MAX_SECONDS,
                     limit: int | None = None) -> dict[int, list[int]]:
    """Acquisition id → area ids with due observations, oldest acquisition first (``unsent_only``: only rows
    not in flight, i.e. never dispatched, or dispatched and last started longer ago than the re-send delay:
    ``resend_seconds``, doubled per send no worker started, at most ``backoff_max``)."""
    params: dict[str, object] = {"resend": resend_seconds, "backoff_max": backoff_max}
    where = [DUE, "a.status = 'active'"]
    if unsent_only:
        where.append(_NOT_IN_FLIGHT)
    if area_ids is not None:
        where.append("o.area_id = ANY(:areas)")
        params["areas"] = area_ids
    rows = session.execute(text(f"""
        SELECT o.acquisition_id, o.area_id FROM observations o
          JOIN areas a ON a.id = o.area_id JOIN acquisitions q ON q.id = o.acquisition_id
         WHERE {' AND '.join(where)}
         ORDER BY q.sensed_at, q.id, o.area_id {'' if limit is None else 'LIMIT :limit'}"""),  # noqa: S608
        {**params, **({} if limit is None else {"limit": limit})})
    groups: dict[int, list[int]] = {}
    for r in rows:
        groups.setdefault(r.acquisition_id, []).append(r.area_id)
    return groups


def mark_sent(session: Session, acquisition_id: int, resend_seconds: float = RESEND_SECONDS,
              backoff_max: float = RESEND_BACKOFF_MAX_SECONDS) -> int:
    """Stamp ``dispatched_at`` on the acquisition's due rows not in flight (as :func:`due_acquisitions`) and
    count the send; returns how many (0: nothing to send). Call it in the transaction that publishes the
    message, before the commit."""
    result = session.execute(text(f"""
        UPDATE observations o SET dispatched_at = now(), dispatches = o.dispatches + 1 FROM areas a
         WHERE a.id = o.area_id AND a.status = 'active' AND o.acquisition_id = :q AND {DUE} AND {_NOT_IN_FLIGHT}"""),  # noqa: S608
        {"q": acquisition_id, "resend": resend_seconds, "backoff_max": backoff_max})
    return result.rowcount


def begin(session: Session, acquisition_id: int, max_attempts: int, area_ids: list[int] | None = None) -> list[int]:
    """Start an attempt at the acquisition's due rows (of ``area_ids`` when given): rows that already had
    ``max_attempts`` attempts without an outcome are given up, the others get ``attempts`` + 1 and ``started_at``
    now (their ``reason`` cleared for :func:`note_error`). Returns the area ids to compute, ascending."""
    give_up(session, max_attempts, acquisition_id=acquisition_id, area_ids=area_ids)
    only = "" if area_ids is None else "AND o.area_id = ANY(:areas)"
    rows = session.execute(text(f"""
        UPDATE observations o SET attempts = o.attempts + 1, started_at = now(), reason = NULL, dispatches = 0
          FROM areas a
         WHERE a.id = o.area_id AND a.status = 'active' AND o.acquisition_id = :q AND {DUE} {only}
        RETURNING o.area_id"""),  # noqa: S608
        {"q": acquisition_id, **({} if area_ids is None else {"areas": area_ids})})
    return sorted(r.area_id for r in rows)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message``, first line only, at most ``limit`` characters (what an observation reason holds)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    line = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return line if len(line) <= limit else line[:limit - 1] + "…"


def note_error(session: Session, acquisition_id: int, area_ids: list[int], error: str) -> None:
    """Record why the current attempt at these rows raised (one line); :func:`give_up` reports the last one."""
    session.execute(text(f"""
        UPDATE observations o SET reason = :why
         WHERE o.acquisition_id = :q AND o.area_id = ANY(:areas) AND {DUE}"""),  # noqa: S608
        {"q": acquisition_id, "areas": area_ids, "why": error})


@dataclass(frozen=True)
class GaveUp:
    """One observation settled ``failed`` by :func:`give_up`."""

    acquisition_id: int
    acquisition_key: str
    area_id: int
    area_name: str
    reason: str


_LOST = "none stored a result (the worker died, or the task ran past the re-send delay)"


def give_up(session: Session, max_attempts: int, *, resend_seconds: float | None = None,
            backoff_max: float = RESEND_BACKOFF_MAX_SECONDS, acquisition_id: int | None = None,
            area_ids: list[int] | None = None) -> list[GaveUp]:
    """Settle ``failed`` the due rows that had ``max_attempts`` attempts without an outcome (only those not in
    flight when ``resend_seconds`` is given: the dispatcher's rule), reason "observation task gave up after N
    attempts, …" with the last attempt's error; logs one WARNING per acquisition. Returns the rows settled.
    Rows sent but never started are not given up (no worker ran them: the work waits, see Sends)."""
    where = [DUE, "a.status = 'active'", "o.attempts >= :max"]
    params: dict[str, object] = {"max": max_attempts, "lost": _LOST}
    if resend_seconds is not None:
        where.append(_NOT_IN_FLIGHT)
        params["resend"] = resend_seconds
        params["backoff_max"] = backoff_max
    if acquisition_id is not None:
        where.append("o.acquisition_id = :q")
        params["q"] = acquisition_id
    if area_ids is not None:
        where.append("o.area_id = ANY(:areas)")
        params["areas"] = area_ids
    rows = session.execute(text(f"""
        UPDATE observations o
           SET status = '{_S.FAILED.value}', computed_at = now(),
               reason = format('observation task gave up after %s attempts, %s', o.attempts,
                               COALESCE('the last failed with ' || o.reason, :lost))
          FROM areas a, acquisitions q
         WHERE a.id = o.area_id AND q.id = o.acquisition_id AND {' AND '.join(where)}
        RETURNING o.acquisition_id, q.key, o.area_id, a.name, o.reason"""),  # noqa: S608
        params)
    settled = sorted((GaveUp(r.acquisition_id, r.key, r.area_id, r.name, r.reason) for r in rows),
                     key=lambda g: (g.acquisition_id, g.area_id))
    by_acquisition: dict[int, list[GaveUp]] = {}
    for g in settled:
        by_acquisition.setdefault(g.acquisition_id, []).append(g)
    for group in by_acquisition.values():
        logger.warning("acquisition %s (id %d): observation failed for %s: %s", group[0].acquisition_key,
                       group[0].acquisition_id, ", ".join(repr(g.area_name) for g in group), group[0].reason)
    return settled


_SAVE = text(f"""
    UPDATE observations o
       SET status = CAST(:st AS observation_status), covered_fraction = :cov, clear_fraction = :clr, reason = :why,
           scene_id = COALESCE(:sid, o.scene_id), computed_at = now(), attempts = 0, dispatches = 0
     WHERE o.area_id = :a AND o.acquisition_id = :q AND {DUE}""")  # noqa: S608


def save(session: Session, acquisition_id: int, outcomes: dict[int, Outcome]) -> None:
    """Write the outcomes (area id → :class:`Outcome`) of one acquisition in one batched UPDATE, only into rows
    still due; clear ones stay ``pending`` (with their fractions) for pairing."""
    if not outcomes:
        return
    rows = [{"a": area_id, "q": acquisition_id,
             "st": (_S.PENDING if o.status is _S.CLEAR else o.status).value,
             "cov": o.covered, "clr": o.clear, "why": o.reason, "sid": o.scene_id}
            for area_id, o in outcomes.items()]
    session.connection().execute(_SAVE, rows)


_REOPEN = text(f"""
    UPDATE observations o
       SET status = '{_S.PENDING.value}', computed_at = NULL, dispatched_at = NULL, started_at = NULL, attempts = 0,
           dispatches = 0
     WHERE o.status = '{_S.PARTIAL.value}' AND o.area_id = ANY(:areas) AND EXISTS (
           SELECT 1 FROM scenes s JOIN areas a ON a.id = o.area_id
            WHERE s.id = ANY(:scenes) AND a.status = 'active' AND s.acquisition_id = o.acquisition_id
              AND ST_Intersects(a.geom, s.footprint) AND s.first_seen_at > o.computed_at)""")  # noqa: S608


def reopen_late_partial(session: Session, area_ids: list[int], scene_ids: list[int]) -> int:
    """The poll's re-open: ``partial`` rows of ``area_ids`` whose acquisition got a granule among ``scene_ids``
    touching the area after the row was computed are due again (``pending``, not computed), their dispatch
    stamp and attempts cleared so the next dispatch pass sends them at once. Returns how many rows."""
    if not area_ids or not scene_ids:
        return 0
    return session.execute(_REOPEN, {"areas": area_ids, "scenes": scene_ids}).rowcount


# One UPDATE over the unnested (area, reason) arrays: a statement per row cost 1.5 s for 22,000 rows.
_SETTLE = text(f"""
    UPDATE observations o SET status = '{_S.CLEAR.value}', reason = r.why
      FROM unnest(CAST(:a AS bigint[]), CAST(:why AS text[])) AS r(area_id, why)
     WHERE o.area_id = r.area_id AND o.acquisition_id = :q AND o.status = '{_S.PENDING.value}'
       AND o.computed_at IS NOT NULL""")  # noqa: S608


def settle_clear(session: Session, acquisition_id: int, reasons: dict[int, str]) -> None:
    """Pairing's outcome for computed clear rows (area id → why this before acquisition, or why none)."""
    if reasons:
        session.connection().execute(_SETTLE, {"a": list(reasons), "q": acquisition_id, "why": list(reasons.values())})

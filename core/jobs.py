"""The analysis job: its identity, every status transition, the task name and the queue-routing rule.

This is the only module that writes ``analyses.status``. The control plane (``monitor.pairing`` inserts,
``monitor.dispatch`` queues and recovers) and the execution side (``workers.leases`` claims, heartbeats,
finishes) call the functions below; they never spell a status in SQL themselves.

::

    pending ──queue_next_pending──▶ queued ──claim──▶ running ──finish──▶ done | skipped | failed
                                      ▲                 │
                                      ├─requeue_lost────┤ lease expired (worker lost), attempts < max
                                      │                 │          (fail_lost at max_attempts)
                                      └─release─────────┘ transient error, attempts < max

- **claim** is one atomic ``UPDATE … RETURNING``: a row is taken only if it is queued/pending, or running with
  an expired lease, and has attempts left; two deliveries of one message cannot both run it, and a finished
  row is never touched again (exactly-once results on top of at-least-once delivery).
- **fencing**: every later write is guarded by ``worker`` *and* ``attempts`` of the claim, so a worker whose
  lease was taken over writes nothing (:class:`LeaseLost`).
- **sends**: every publish counts ``dispatches`` (the claim resets it): attempts count only claims, so a
  message lost before any worker took it would be re-sent (2 × lease backstop, or each pass while the broker
  holds fewer messages) without end; each send no worker claimed doubles the delay before the next, up to
  ``analysis.resend_backoff_max_seconds`` — the row waits for a worker, it is not failed for the lack of one.
- All times are the database's ``now()``: worker and dispatcher clocks never disagree.

Identity: an :class:`AnalyserSpec` says what an analysis *asks for* (spectral statistics, optionally the UniRS
model). The scheduler decides it from settings it can see (``analysis.gpu_workers``); the worker decides what
it actually *runs* from what it has loaded and records that (``analyses.analyser_run``, checkpoint included),
so a finding is never labelled with a checkpoint the worker did not load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.orm import Session

from core.config import Settings
from core.models import Analysis, AnalysisStatus

#: Celery task name of one analysis (messages carry the analysis id only).
TASK_NAME = "unirs.analyse"


class Queue(StrEnum):
    CPU = "cpu"
    GPU = "gpu"


QUEUES = tuple(q.value for q in Queue)

SPECTRAL_NAME = "spectral"
SPECTRAL_VERSION = "1"
UNIRS_NAME = "unirs"
LAST_ERROR_MAX = 4000


class LeaseLost(RuntimeError):
    """This worker no longer holds the analysis (its lease expired and the row moved on)."""


@dataclass(frozen=True)
class AnalyserSpec:
    """What an analysis asks for (stored in ``analyses.analyser``) or what a worker ran (``analyser_run``).

    ``model`` is True when the UniRS model is requested/run; ``checkpoint`` names the checkpoint actually
    loaded (only known to a worker, None in a request). Stored as text: ``spectral@1``,
    ``unirs+spectral@1`` (requested) or ``unirs@<checkpoint>+spectral@1`` (run).
    """

    spectral_version: str = SPECTRAL_VERSION
    model: bool = False
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is not None and not self.model:
            raise ValueError("a checkpoint without the model makes no sense")
        if self.checkpoint is not None and any(c in self.checkpoint for c in "@+\r\n"):
            raise ValueError(f"checkpoint name {self.checkpoint!r} must not contain '@', '+' or line breaks")

    @property
    def id(self) -> str:
        spectral = f"{SPECTRAL_NAME}@{self.spectral_version}"
        if not self.model:
            return spectral
        unirs = UNIRS_NAME if self.checkpoint is None else f"{UNIRS_NAME}@{self.checkpoint}"
        return f"{unirs}+{spectral}"

    def __str__(self) -> str:
        return self.id

    @classmethod
    def parse(cls, value: str) -> AnalyserSpec:
        """Inverse of :attr:`id`; raises ``ValueError`` on anything else (rows written by older versions
        carry ``unirs@<checkpoint>+spectral@1`` as the *request*; that still parses)."""
        model, checkpoint, spectral_version = False, None, None
        for part in value.split("+"):
            name, _, version = part.partition("@")
            if name == UNIRS_NAME:
                model, checkpoint = True, version or None
            elif name == SPECTRAL_NAME and version:
                spectral_version = version
            else:
                raise ValueError(f"unknown analyser part {part!r} in {value!r}")
        if spectral_version is None:
            raise ValueError(f"analyser {value!r} has no spectral@<version> part")
        return cls(spectral_version=spectral_version, model=model, checkpoint=checkpoint)

    def requested(self) -> AnalyserSpec:
        """The request form (no checkpoint): what the idempotency key and routing depend on."""
        return AnalyserSpec(self.spectral_version, self.model, None)

    def ran_with(self, checkpoint: str | None) -> AnalyserSpec:
        """What a worker ran for this request: with the model only if it has a checkpoint loaded."""
        if self.model and checkpoint:
            return AnalyserSpec(self.spectral_version, True, checkpoint)
        return AnalyserSpec(self.spectral_version, False, None)


def requested_analyser(settings: Settings) -> AnalyserSpec:
    """The analyser new analyses ask for: the model when any GPU worker is configured
    (``analysis.gpu_workers`` > 0, seen by the scheduler), else spectral statistics only."""
    return AnalyserSpec(model=settings.analysis.gpu_workers > 0)


def queue_for(analyser: AnalyserSpec | str) -> Queue:
    """``gpu`` when the analyser asks for the UniRS model, else ``cpu``."""
    spec = analyser if isinstance(analyser, AnalyserSpec) else AnalyserSpec.parse(analyser)
    return Queue.GPU if spec.model else Queue.CPU


# --- transitions: control plane ----------------------------------------------------------------------


def create_pending(session: Session, *, idempotency_key: str, area_id: int, after_scene_id: int,
                   before_scene_id: int | None, analyser: AnalyserSpec, question_set: str, pairing_policy: str,
                   pair_reason: str | None) -> int | None:
    """Insert a ``pending`` analysis (the outbox row) unless one with this idempotency key exists; returns
    the new id, or None for a duplicate. ``analyser`` is stored in its request form."""
    return session.execute(
        insert(Analysis)
        .values(idempotency_key=idempotency_key, area_id=area_id, after_scene_id=after_scene_id,
                before_scene_id=before_scene_id, analyser=analyser.requested().id, question_set=question_set,
                pairing_policy=pairing_policy, pair_reason=pair_reason, status=AnalysisStatus.PENDING,
                attempts=0, stats={})
        .on_conflict_do_nothing(index_elements=[Analysis.idempotency_key])
        .returning(Analysis.id)
    ).scalar_one_or_none()


def create_pending_many(session: Session, rows: list[dict[str, Any]], *, analyser: AnalyserSpec) -> list[int]:
    """:func:`create_pending` for many rows in a few statements (pairing settles whole acquisitions).

    Each row: ``idempotency_key``, ``area_id``, ``after_scene_id``, ``before_scene_id``, ``question_set``,
    ``pairing_policy``, ``pair_reason``. Returns the ids of the rows actually inserted (duplicates skipped)."""
    if not rows:
        return []
    # The rows as parallel arrays unnested by one INSERT … SELECT: a 1,000-row VALUES clause per chunk cost
    # more to build and parse than the insert itself (pairing 10,000 areas: 17 of 23 s).
    columns = {name: [row[name] for row in rows] for name in _MANY_COLUMNS}
    return list(session.connection().execute(
        _INSERT_MANY, {**columns, "analyser": analyser.requested().id}).scalars())


_MANY_COLUMNS = ("idempotency_key", "area_id", "after_scene_id", "before_scene_id", "question_set",
                 "pairing_policy", "pair_reason")
_INSERT_MANY = text(f"""
    INSERT INTO analyses (idempotency_key, area_id, after_scene_id, before_scene_id, analyser, question_set,
                          pairing_policy, pair_reason, status, attempts, stats)
    SELECT k, a, af, bf, :analyser, qs, pp, pr, '{AnalysisStatus.PENDING.value}', 0, '{{}}'::jsonb
      FROM unnest(CAST(:idempotency_key AS text[]), CAST(:area_id AS bigint[]), CAST(:after_scene_id AS bigint[]),
                  CAST(:before_scene_id AS bigint[]), CAST(:question_set AS text[]), CAST(:pairing_policy AS text[]),
                  CAST(:pair_reason AS text[])) AS r(k, a, af, bf, qs, pp, pr)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id""")  # noqa: S608 — only an enum value is interpolated


_S = AnalysisStatus

_FAIL_LOST = text(f"""
    UPDATE analyses
       SET status = '{_S.FAILED.value}', finished_at = now(), lease_expires_at = NULL,
           last_error = 'worker lost ' || attempts || ' times; last worker ' || coalesce(worker, 'unknown')
                        || ' (lease expired at ' || lease_expires_at || ')'
     WHERE id IN (SELECT id FROM analyses
                   WHERE status = '{_S.RUNNING.value}' AND lease_expires_at < now() AND attempts >= :max_attempts
                   ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED)
 RETURNING id, last_error
""")  # noqa: S608 — only enum values are interpolated

_REQUEUE_LOST = text(f"""
    UPDATE analyses
       SET status = '{_S.QUEUED.value}', queued_at = now(), dispatches = dispatches + 1,
           last_error = 'attempt ' || attempts || ' lost: worker ' || coalesce(worker, 'unknown')
                        || ' stopped heartbeating (lease expired at ' || lease_expires_at || '); re-queued',
           lease_expires_at = NULL, worker = NULL
     WHERE id = (SELECT id FROM analyses
                  WHERE status = '{_S.RUNNING.value}' AND lease_expires_at < now() AND attempts < :max_attempts
                  ORDER BY lease_expires_at LIMIT 1 FOR UPDATE SKIP LOCKED)
 RETURNING id, analyser, last_error
""")  # noqa: S608

def resend_backoff(delay: str, sends: str = "dispatches") -> str:
    """SQL: the re-send delay ``delay`` doubled for each send after the first that no worker started (``sends``,
    reset by a start or claim), at most ``:backoff_max`` seconds but never below ``delay`` (a cap set under the
    base must not make re-sends faster); the exponent is capped so the power stays a small float. Used for
    analyses here and observations in core/observations.py."""
    return (f"GREATEST({delay}, LEAST({delay} * power(2, LEAST(GREATEST({sends} - 1, 0), 30)), "
            ":backoff_max))")


# A `queued` row with `worker` NULL was published by the dispatcher (pending → queued, lost → re-queued,
# or re-sent); one the worker gave back (release) keeps that worker's name and has no message.
_RESEND_QUEUED = text(f"""
    UPDATE analyses SET queued_at = now(), worker = NULL, dispatches = dispatches + 1
     WHERE id = (SELECT id FROM analyses
                  WHERE status = '{_S.QUEUED.value}'
                    AND queued_at < now() - make_interval(secs => {resend_backoff(':stale_seconds')})
                  ORDER BY queued_at LIMIT 1 FOR UPDATE SKIP LOCKED)
 RETURNING id, analyser
""")  # noqa: S608

_SENT_QUEUED = text(f"""
    SELECT analyser, count(*) AS n FROM analyses
     WHERE status = '{_S.QUEUED.value}' AND worker IS NULL GROUP BY analyser
""")  # noqa: S608

_RESEND_SENT = text(f"""
    UPDATE analyses SET queued_at = now(), dispatches = dispatches + 1
     WHERE id = (SELECT id FROM analyses
                  WHERE status = '{_S.QUEUED.value}' AND worker IS NULL AND analyser = ANY(:analysers)
                    AND queued_at < now() - make_interval(secs => {resend_backoff(':min_age')}) AND queued_at < :before
                  ORDER BY queued_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
 RETURNING id, analyser
""")  # noqa: S608

_QUEUE_PENDING = text(f"""
    UPDATE analyses SET status = '{_S.QUEUED.value}', queued_at = now(), dispatches = dispatches + 1
     WHERE id = (SELECT id FROM analyses WHERE status = '{_S.PENDING.value}'
                  ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
 RETURNING id, analyser
""")  # noqa: S608


@dataclass(frozen=True)
class Moved:
    """A row a control-plane transition moved: its id, the queue it goes to, and why (if recovered)."""

    id: int
    queue: Queue
    reason: str | None = None


def fail_lost(session: Session, settings: Settings, *, limit: int) -> list[Moved]:
    """``running`` with an expired lease and no attempts left → ``failed`` with the reason."""
    rows = session.execute(_FAIL_LOST, {"max_attempts": settings.analysis.max_attempts, "limit": limit}).all()
    return [Moved(r.id, Queue.CPU, r.last_error) for r in rows]


def requeue_lost(session: Session, settings: Settings) -> Moved | None:
    """One ``running`` row with an expired lease and attempts left → ``queued`` (to be re-sent)."""
    row = session.execute(_REQUEUE_LOST, {"max_attempts": settings.analysis.max_attempts}).one_or_none()
    return Moved(row.id, queue_for(row.analyser), row.last_error) if row else None


def touch_stale_queued(session: Session, stale_seconds: float, backoff_max: float) -> Moved | None:
    """One row ``queued`` for longer than ``stale_seconds`` — doubled per send no worker claimed, at most
    ``backoff_max`` — (message lost with the broker, or given back after a transient error): its ``queued_at``
    is renewed and it is to be re-sent (``dispatches`` + 1). Status unchanged."""
    row = session.execute(_RESEND_QUEUED, {"stale_seconds": stale_seconds,
                                           "backoff_max": backoff_max}).one_or_none()
    return Moved(row.id, queue_for(row.analyser)) if row else None


def sent_queued_counts(session: Session) -> dict[Queue, tuple[int, list[str]]]:
    """Per queue: how many ``queued`` rows should have a message in the broker, and their analysers."""
    counts: dict[Queue, tuple[int, list[str]]] = {}
    for row in session.execute(_SENT_QUEUED):
        queue = queue_for(row.analyser)
        n, analysers = counts.get(queue, (0, []))
        counts[queue] = (n + row.n, [*analysers, row.analyser])
    return counts


def resend_sent_queued(session: Session, analysers: list[str], min_age_seconds: float,
                       before: Any, backoff_max: float) -> Moved | None:
    """One published ``queued`` row of these analysers, older than ``min_age_seconds`` and queued before
    ``before`` (the start of this dispatch pass, so a row is re-sent once per pass): its ``queued_at`` is
    renewed and it is to be re-sent. Used when the broker holds fewer messages than such rows (lost with
    a broker restart; ``min_age_seconds`` doubled per send no worker claimed, at most ``backoff_max``). Status
    unchanged."""
    row = session.execute(_RESEND_SENT, {"analysers": analysers, "min_age": min_age_seconds,
                                         "before": before, "backoff_max": backoff_max}).one_or_none()
    return Moved(row.id, queue_for(row.analyser)) if row else None


def queue_next_pending(session: Session) -> Moved | None:
    """The oldest ``pending`` row → ``queued``."""
    row = session.execute(_QUEUE_PENDING).one_or_none()
    return Moved(row.id, queue_for(row.analyser)) if row else None


# --- transitions: execution side ---------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    analysis_id: int
    attempts: int
    worker: str
    previous_error: str | None = None  # why the last attempt did not finish (kept in the stats of this one)


_CLAIM = text(f"""
    UPDATE analyses
       SET status = '{_S.RUNNING.value}', attempts = attempts + 1, worker = :worker,
           lease_expires_at = now() + make_interval(secs => :lease), heartbeat_at = now(),
           started_at = now(), finished_at = NULL, dispatches = 0
     WHERE id = :id
       AND attempts < :max_attempts
       AND (status IN ('{_S.QUEUED.value}', '{_S.PENDING.value}')
            OR (status = '{_S.RUNNING.value}' AND lease_expires_at < now()))
 RETURNING attempts, last_error
""")  # noqa: S608

_STATE = text("SELECT status::text AS status, worker, attempts, lease_expires_at FROM analyses WHERE id = :id")

_GUARD = f"id = :id AND status = '{_S.RUNNING.value}' AND worker = :worker AND attempts = :attempts"

_HEARTBEAT = text(f"""
    UPDATE analyses SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => :lease)
     WHERE {_GUARD}
""")  # noqa: S608

_FINISH = text(f"""
    UPDATE analyses
       SET status = CAST(:status AS analysis_status), finished_at = now(), lease_expires_at = NULL,
           last_error = :last_error, stats = :stats, analyser_run = :analyser_run
     WHERE {_GUARD}
 RETURNING id
""").bindparams(bindparam("stats", type_=JSONB))  # noqa: S608

# Transient trouble: give the row back while attempts last, as `queued` *without* a message; the
# dispatcher re-sends rows queued longer than the resend delay, which is the back-off.
_RELEASE = text(f"""
    UPDATE analyses
       SET status = CASE WHEN attempts >= :max_attempts THEN '{_S.FAILED.value}'::analysis_status
                         ELSE '{_S.QUEUED.value}'::analysis_status END,
           finished_at = CASE WHEN attempts >= :max_attempts THEN now() END,
           queued_at = now(), lease_expires_at = NULL, last_error = :last_error
     WHERE {_GUARD}
 RETURNING status::text
""")  # noqa: S608

FINAL_STATUSES = (AnalysisStatus.DONE, AnalysisStatus.SKIPPED, AnalysisStatus.FAILED)


def claim(session: Session, analysis_id: int, worker: str, settings: Settings) -> Claim | dict[str, Any] | None:
    """Take the analysis for this worker. Returns the :class:`Claim`, or the row's current state (a dict:
    status, worker, attempts, lease_expires_at) when it is not claimable, or None when it does not exist."""
    claimed = session.execute(_CLAIM, {
        "id": analysis_id, "worker": worker, "lease": settings.analysis.lease_seconds,
        "max_attempts": settings.analysis.max_attempts,
    }).one_or_none()
    if claimed is not None:
        return Claim(analysis_id, claimed.attempts, worker, claimed.last_error)
    row = session.execute(_STATE, {"id": analysis_id}).mappings().one_or_none()
    return dict(row) if row is not None else None


def _params(c: Claim) -> dict[str, Any]:
    return {"id": c.analysis_id, "worker": c.worker, "attempts": c.attempts}


def extend_lease(session: Session, c: Claim, lease_seconds: float) -> bool:
    """Heartbeat: push the lease forward; False when the row is no longer this claim's."""
    return session.execute(_HEARTBEAT, {**_params(c), "lease": lease_seconds}).rowcount > 0


def finish(session: Session, c: Claim, status: AnalysisStatus, *, stats: dict[str, Any],
           last_error: str | None = None, analyser_run: AnalyserSpec | None = None) -> None:
    """Move the claimed row to done / skipped / failed inside ``session``; raises :class:`LeaseLost` if the
    row is no longer this claim's (the caller's transaction, findings included, must then roll back)."""
    status = AnalysisStatus(status)
    if status not in FINAL_STATUSES:
        raise ValueError(f"finish() ends an analysis; {status.value!r} is not a final status")
    row = session.execute(_FINISH, {**_params(c), "status": status.value, "stats": json_safe(stats),
                                    "last_error": truncate(last_error),
                                    "analyser_run": analyser_run.id if analyser_run else None}).one_or_none()
    if row is None:
        raise LeaseLost(f"analysis {c.analysis_id}: lease of {c.worker} (attempt {c.attempts}) was lost; "
                        f"not marking it {status.value}")


def release(session: Session, c: Claim, reason: str, settings: Settings) -> AnalysisStatus | None:
    """Give the row back for another attempt (or fail it when attempts are used up); the new status, or
    None when the row was no longer this claim's."""
    status = session.execute(_RELEASE, {**_params(c), "last_error": truncate(reason),
                                        "max_attempts": settings.analysis.max_attempts}).scalar_one_or_none()
    return AnalysisStatus(status) if status else None


def truncate(message: str | None) -> str | None:
    if message is None:
        return None
    return message if len(message) <= LAST_ERROR_MAX else message[: LAST_ERROR_MAX - 1] + "…"


def json_safe(value: Any) -> Any:
    """JSONB-storable copy: numpy scalars to Python, NaN/inf to null, dates to ISO strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)

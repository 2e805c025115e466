"""The poll re-opens a ``partial`` observation when a granule of its acquisition arrives late
(:func:`core.observations.reopen_late_partial`, called by :func:`monitor.catalogues.poller.create_observations`).

Re-opened, the row is due again with no dispatch stamp, so the next dispatch pass sends it at once (it used to
keep the stamp of its first computation's dispatch and wait out the re-send delay as if in flight).
"""

from __future__ import annotations

from sqlalchemy import text

from core.db import session_scope
from monitor.catalogues.poller import create_observations
from monitor.observations import dispatch_observations
from tests.test_observation_tasks import _rows, _setup


def test_a_late_granule_reopens_a_partial_observation_and_it_is_sent_at_once(db, worker_settings, cog_server):
    areas, acquisitions = _setup(worker_settings, cog_server)
    late, on_time, _ = acquisitions
    with session_scope(worker_settings) as session:
        # Both computed partial a minute after their dispatch; `late` before its granules were first seen.
        session.execute(text(
            "UPDATE observations o SET status = 'partial', covered_fraction = 0.3, reason = 'imaged 30%', "
            "dispatched_at = now() - interval '1 minute', started_at = now() - interval '1 minute', attempts = 1, "
            "computed_at = CASE WHEN o.acquisition_id = :late "
            "  THEN (SELECT min(first_seen_at) FROM scenes WHERE acquisition_id = :late) - interval '1 hour' "
            "  ELSE now() END "
            "WHERE o.acquisition_id IN (:late, :on_time)"), {"late": late, "on_time": on_time})
        scene_ids = list(session.execute(text("SELECT id FROM scenes ORDER BY id")).scalars())
    with session_scope(worker_settings) as session:
        create_observations(session, areas, scene_ids)  # the poll offering every granule again
    rows = _rows()
    assert {(rows[(a, late)]["status"], rows[(a, late)]["computed_at"], rows[(a, late)]["dispatched_at"])
            for a in areas} == {("pending", None, None)}
    with session_scope(worker_settings) as session:
        attempts = session.execute(text("SELECT DISTINCT attempts, started_at FROM observations "
                                        "WHERE acquisition_id = :q"), {"q": late}).all()
    assert [tuple(r) for r in attempts] == [(0, None)]
    assert {rows[(a, on_time)]["status"] for a in areas} == {"partial"}  # no granule after its computation
    sent: list[int] = []
    dispatch_observations(worker_settings, send=lambda q, _queue: sent.append(q))
    assert sorted(sent) == sorted([late, acquisitions[2]])  # the re-opened one and the never-sent one

"""What the real worker writes, once per test session, for the report tests (pytest plugin, registered in
tests/conftest.py).

``worker_output`` runs ``workers.pipeline.run_analysis`` — the body of the Celery task — on the bundled
Sentinel-2 sample (COGs over HTTP from the loopback COG server) in a database of its own, and keeps the
rows the worker wrote: the analysis (its ``stats``, ``analyser_run``) and every finding with its images.
``insert_worker_world`` copies them under a new area into the test's database; ``alert_email_html`` is
the browser preview of the 2018-08-25 alert built from them (for screenshots and layout tests). Report tests built on it
break when the worker's output drifts (a renamed statistic, another caption, other hectares, other
thumbnails), which rows made up by hand never do.

The area is the demo's (the 1 km sample less 60 m); pairs (after date ← before date):

- ``2018-08-25`` ← ``2017-07-11``, the demo's pair (2017-08-30 is 17 % clear): 0.25 ha of vegetation
  loss next to 1.30 ha of July → August greening (the loss-only headline, the one hectare rounding rule);
- ``2020-08-29`` ← ``2015-08-31``: five years of clear-cuts and a forest road.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from geoalchemy2.shape import from_shape, to_shape
from shapely.geometry import MultiPolygon, shape
from shapely.geometry.base import BaseGeometry
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import jobs, migrate
from core.config import CatalogueSettings, Settings
from core.db import reset_engines, session_scope
from core.models import (
    AlertFrequency,
    Analysis,
    AnalysisStatus,
    Area,
    Finding,
    FindingImage,
    Observation,
    ObservationStatus,
    Scene,
)
from devtools import dbadmin, localstac
from monitor.catalogues.items import parse_item
from monitor.catalogues.store import upsert_catalogue, upsert_scene
from monitor.geometry import geodesic_area_km2

PAIRS = {"2018-08-25": "2017-07-11", "2020-08-29": "2015-08-31"}
COLLECTION = "sentinel-2-l2a"
# Columns a copy gets anew (keys, links to rows of the worker's database, timestamps of the copy).
_ANALYSIS_OWN = {"id", "idempotency_key", "area_id", "after_scene_id", "before_scene_id", "created_at", "queued_at",
                 "started_at", "finished_at", "lease_expires_at", "heartbeat_at"}
_FINDING_OWN = {"id", "analysis_id", "area_id", "first_finding_id", "created_at", "state_changed_at", "geom"}
_IMAGE_OWN = {"id", "finding_id"}


@dataclass(frozen=True)
class WorkerRun:
    """One analysis as the worker left it: column values, findings (with ``images`` and a shapely ``geom``)."""

    after_date: str
    before_date: str
    analysis: dict[str, Any]
    findings: list[dict[str, Any]]

    @property
    def summary(self) -> dict[str, Any]:
        return next(f for f in self.findings if f["kind"] == "summary")

    def regions(self) -> list[dict[str, Any]]:
        return [f for f in self.findings if f["kind"] == "region"]


@dataclass(frozen=True)
class WorkerOutput:
    catalogue: CatalogueSettings
    items: dict[str, dict[str, Any]]  # date -> STAC item, hrefs on the COG server
    area: BaseGeometry  # the sample area, EPSG:4326
    runs: dict[str, WorkerRun]  # after date -> run
    alert_html: Path  # browser preview of the 2018-08-25 alert email (:func:`write_alert_preview`)


def _columns(row: Any, skip: set[str]) -> dict[str, Any]:
    return {c.key: getattr(row, c.key) for c in row.__table__.columns if c.key not in skip}


def _insert_scenes(session: Session, catalogue: CatalogueSettings, items: dict[str, dict[str, Any]],
                   dates: list[str]) -> dict[str, int]:
    cat_id = upsert_catalogue(session, catalogue)
    ids = {}
    for date in dates:
        scene_id, _ = upsert_scene(session, cat_id, COLLECTION, parse_item(items[date], catalogue), items[date])
        if scene_id is None:  # already stored (another world of the same test): the stored row
            scene_id = session.execute(select(Scene.id).where(Scene.item_id == items[date]["id"])).scalar_one()
        ids[date] = scene_id
    return ids


def _area_row(session: Session, geom: BaseGeometry, **columns: Any) -> Area:
    multi = geom if isinstance(geom, MultiPolygon) else MultiPolygon([geom])
    area = Area(geom=from_shape(multi, srid=4326), area_km2=geodesic_area_km2(multi), collections=[COLLECTION],
                properties={}, **columns)
    session.add(area)
    session.flush()
    return area


def write_alert_preview(settings: Settings, analysis_id: int, path: Path, recipient: str = "ana@example.org") -> Path:
    """The alert email of ``analysis_id`` as the reports stage builds it (templates, inline images, the
    GeoJSON attachment), written to ``path`` as the outbox's browser preview (images as data URIs)."""
    from monitor.reports.context import load_analysis_report
    from monitor.reports.message import build_message
    from monitor.reports.render import render_alert
    from monitor.reports.transport import preview_html

    with session_scope(settings) as session:
        report = load_analysis_report(session, analysis_id, settings.public_url)
    message = build_message(render_alert(report, recipient), sender=settings.smtp.from_address(), recipient=recipient,
                            message_id=f"<preview-{analysis_id}@unirs-monitor>", delivery_key=f"analysis:{analysis_id}")
    path.write_text(preview_html(message), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def worker_output(cog_server: localstac.CogServer,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerOutput]:
    from tests.conftest import ADMIN_URL
    from tests.fixtures_workers import loopback_catalogue
    from workers.pipeline import run_analysis

    libpq = dbadmin.create_scratch_database(ADMIN_URL, "unirs_worker_output")
    url = dbadmin.sqlalchemy_url(libpq)
    try:
        migrate.upgrade(url)
        settings = Settings(database_url=url, catalogues=[loopback_catalogue(cog_server.url)])
        catalogue = settings.catalogues[0]
        items = {}
        for item in localstac.read_sample_items():
            item = localstac.rewrite_asset_hrefs(item, cog_server.url)
            item["collection"] = COLLECTION
            items[item["properties"]["datetime"][:10]] = item
        area_geom = shape(items["2020-08-29"]["geometry"]).buffer(-0.0006)  # the demo area
        runs, analysis_ids = {}, {}
        for after in sorted(PAIRS):  # each pair over an area of its own: no confirmation across the two
            before = PAIRS[after]
            with session_scope(settings) as session:
                scene_ids = _insert_scenes(session, catalogue, items, [before, after])
                area_id = _area_row(session, area_geom, name=f"sample forest {after}", recipients=[],
                                    questions=[]).id
                analysis_id = jobs.create_pending(
                    session, idempotency_key=uuid.uuid4().hex, area_id=area_id, after_scene_id=scene_ids[after],
                    before_scene_id=scene_ids[before], analyser=jobs.AnalyserSpec(), question_set="@1",
                    pairing_policy="latest",
                    pair_reason=f"latest earlier clear acquisition of tile 34TER: {before} (clear 100%)")
            outcome = run_analysis(analysis_id, "fixture-worker", settings)
            with session_scope(settings) as session:
                analysis = session.get(Analysis, analysis_id)
                if outcome != "done":
                    raise AssertionError(f"the worker did not finish the sample pair ending {after}: {outcome}: "
                                         f"{analysis.last_error}")
                findings = []
                for f in session.execute(select(Finding).where(Finding.analysis_id == analysis_id)
                                         .order_by(Finding.ordinal)).scalars():
                    row = _columns(f, _FINDING_OWN)
                    row["geom"] = to_shape(f.geom) if f.geom is not None else None
                    row["images"] = [_columns(i, _IMAGE_OWN) for i in f.images]
                    findings.append(row)
                runs[after] = WorkerRun(after, before, _columns(analysis, _ANALYSIS_OWN), findings)
                analysis_ids[after] = analysis_id
        with session_scope(settings) as session:  # the preview's area reads like the demo's
            area = session.get(Analysis, analysis_ids["2018-08-25"]).area
            area.name, area.recipients = "Romanian forest", ["ana@example.org"]
        preview = write_alert_preview(settings, analysis_ids["2018-08-25"],
                                      tmp_path_factory.mktemp("email-preview") / "alert-2018-08-25.html")
        yield WorkerOutput(catalogue, items, area_geom, runs, preview)
    finally:
        reset_engines()
        dbadmin.drop_database(libpq)


def insert_worker_world(session: Session, output: WorkerOutput, after: str = "2018-08-25", *,
                        name: str = "Romanian forest", recipients: tuple[str, ...] = ("ana@example.org",),
                        frequency: str = "immediate", min_ha: float = 0.2, finished_at: datetime | None = None,
                        area: Area | None = None, **area_columns: Any) -> Analysis:
    """A new area over the sample (or ``area``) with a ``done`` analysis carrying exactly what the worker
    wrote for the pair ending on ``after`` (findings, images, stats); the two scenes from the sample items.
    Returns the analysis (flushed, in ``session``)."""
    run = output.runs[after]
    if area is None:
        area = _area_row(session, output.area, name=name, recipients=list(recipients),
                         alert_frequency=AlertFrequency(frequency), min_alert_hectares=min_ha, questions=[],
                         **area_columns)
    scene_ids = _insert_scenes(session, output.catalogue, output.items, [run.before_date, after])
    stats = run.analysis["stats"]
    for date, fraction in ((run.before_date, stats["before_clear_fraction"]), (after, stats["after_clear_fraction"])):
        session.add(Observation(area_id=area.id, scene_id=scene_ids[date], clear_fraction=fraction,
                                acquisition_id=session.get(Scene, scene_ids[date]).acquisition_id,
                                covered_fraction=1.0, status=ObservationStatus.CLEAR, computed_at=datetime.now(UTC)))
    analysis = Analysis(idempotency_key=uuid.uuid4().hex, area_id=area.id, after_scene_id=scene_ids[after],
                        before_scene_id=scene_ids[run.before_date],
                        finished_at=finished_at or datetime.now(UTC) - timedelta(hours=2),
                        **{**run.analysis, "status": AnalysisStatus.DONE})
    session.add(analysis)
    session.flush()
    for finding in run.findings:
        columns = {k: v for k, v in finding.items() if k not in ("images", "geom")}
        row = Finding(analysis_id=analysis.id, area_id=area.id, **columns,
                      geom=from_shape(finding["geom"], srid=4326) if finding["geom"] is not None else None)
        row.images = [FindingImage(**image) for image in finding["images"]]
        session.add(row)
    session.flush()
    return analysis


@pytest.fixture(scope="session")
def alert_email_html(worker_output: WorkerOutput) -> Path:
    """An HTML file: the 2018-08-25 alert email of the worker's real findings, images inline (data URIs)."""
    return worker_output.alert_html

"""Hand-made rows shaped like the workers' (area, catalogue, scenes, analysis, findings, PNG thumbnails), for
tests of the findings query, the web API and metrics, and for states the worker does not produce on the
sample (the report test of empty states). Report tests use what the real worker writes instead
(tests/fixtures_reports.py), so a drift in the worker's output breaks them."""

from __future__ import annotations

import io
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from geoalchemy2.shape import from_shape
from PIL import Image, ImageDraw
from shapely.geometry import MultiPolygon, box

from core.models import (
    Acquisition,
    AlertFrequency,
    Analysis,
    AnalysisStatus,
    Area,
    Catalogue,
    Finding,
    FindingImage,
    Observation,
    ObservationStatus,
    Scene,
)

_seq = itertools.count(1)
# analysis.stats the way workers/pipeline.py analysis_stats() writes it (bookkeeping included).
WORKER_STATS = {
    "analyser": "unirs@0.3.1", "worker": "celery@gpu-1", "attempt": 1, "previous_error": None,
    "grid": {"crs": "EPSG:32634", "pixel_size_m": 10.0, "width": 780, "height": 1110},
    "valid_fraction": 0.912, "before_clear_fraction": 0.97, "after_clear_fraction": 0.88,
    "harmonisation": {"before": "dn/10000", "after": "(dn-1000)/10000"}, "bands": ["blue", "green", "red", "nir"],
    "notes": [], "metrics": {"changed_ha": 4.3, "mean_dndvi": -0.214}, "regions": 2, "regions_below_mapping_unit": 5,
    "chips_total": 12, "chip_scores": [{"chip": i, "score": 0.01 * i} for i in range(12)],
    "chips_passing_model_screen": 3, "chips_sent_to_model": 3, "event": None,
    "timings_s": {"read": 2.1, "spectral": 0.4, "model": 6.3},
}
FOREST = box(23.10, 46.50, 23.20, 46.60)  # the bundled Romanian forest sample, lon/lat


def png(role: str, size: int = 96) -> bytes:
    """A small real PNG that looks like what it stands for (green forest, a brown clear-cut, a red mask)."""
    colours = {"before": (34, 120, 50), "after": (34, 120, 50), "overlay": (20, 20, 20)}
    img = Image.new("RGB", (size, size), colours[role])
    draw = ImageDraw.Draw(img)
    if role in ("after", "overlay"):
        draw.rectangle([size // 3, size // 4, size * 2 // 3, size // 2], fill=(150, 100, 60) if role == "after"
                       else (230, 30, 30))
    draw.line([0, size * 3 // 4, size, size * 2 // 3], fill=(200, 200, 190), width=3)  # the road
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def area(session, name: str = "Apuseni forest", recipients=("ana@example.org",), frequency="immediate",
         min_ha: float = 0.5, geom=FOREST, **kw: Any) -> Area:
    row = Area(
        name=name, geom=from_shape(MultiPolygon([geom]), srid=4326), area_km2=85.0,
        recipients=list(recipients), alert_frequency=AlertFrequency(frequency), min_alert_hectares=min_ha,
        collections=["sentinel-2-l2a"], questions=[], properties={}, max_cloud_cover=80.0, min_clear_fraction=0.7,
        **kw,
    )
    session.add(row)
    session.flush()
    return row


def catalogue(session) -> Catalogue:
    row = Catalogue(name=f"earth-search-{next(_seq)}", url="https://earth-search.aws.element84.com/v1")
    session.add(row)
    session.flush()
    return row


def scene(session, cat: Catalogue, when: datetime, platform: str = "sentinel-2b", cloud: float | None = 12.5,
          footprint=FOREST, collection: str = "sentinel-2-l2a") -> Scene:
    n = next(_seq)
    item_id = f"S2B_34TFS_{when:%Y%m%d}_{n}_L2A"
    key = f"{platform}|{when.isoformat()}|{n}"
    acq = Acquisition(key=key, platform=platform, sensed_at=when, relative_orbit=36)
    session.add(acq)
    session.flush()
    row = Scene(
        catalogue_id=cat.id, collection=collection, acquisition_id=acq.id, acquisition_key=key,
        granule_key=f"{key}|34TFS",
        item_id=item_id, version_rank=["05.10", when.isoformat(), 0, 1], platform=platform, tile="34TFS",
        relative_orbit=36, acquired_at=when, cloud_cover=cloud, processing_baseline="05.10",
        footprint=from_shape(footprint, srid=4326), assets={}, item={"id": item_id}, versions_seen=1,
    )
    session.add(row)
    session.flush()
    return row


def observe(session, area_row: Area, scene_row: Scene, clear: float) -> None:
    session.add(Observation(
        area_id=area_row.id, acquisition_id=scene_row.acquisition_id, scene_id=scene_row.id, covered_fraction=1.0,
        clear_fraction=clear,
        status=ObservationStatus.CLEAR if clear >= 0.7 else ObservationStatus.CLOUDY,
        computed_at=scene_row.acquired_at,
    ))
    session.flush()


def analysis(session, area_row: Area, after: Scene, before: Scene | None, *, status: str = "done",
             finished_at: datetime | None = None, pair_reason: str = "latest earlier clear scene of tile 34TFS, "
             "relative orbit 36 (clear 96 %)", stats: dict | None = None, last_error: str | None = None,
             analyser: str = "unirs@0.3.1") -> Analysis:
    n = next(_seq)
    row = Analysis(
        idempotency_key=f"key-{n}", area_id=area_row.id, after_scene_id=after.id,
        before_scene_id=before.id if before else None, analyser=analyser, question_set="q@1",
        pairing_policy="latest", pair_reason=pair_reason, status=AnalysisStatus(status), attempts=1,
        stats=stats if stats is not None else WORKER_STATS,
        finished_at=finished_at or datetime.now(UTC), last_error=last_error,
    )
    session.add(row)
    session.flush()
    return row


def findings(session, an: Analysis, *, caption: str = "A new forest road and two clear-cuts appear.",
             regions: list[tuple[Any, str, float]] | None = None, answers: list[dict] | None = None,
             images: bool = True, confidence: float = 0.86) -> list[Finding]:
    """A summary (with thumbnails), one region finding per (geometry, class, hectares), and answers."""
    after = an.after_scene
    before = an.before_scene
    common = {
        "analysis_id": an.id, "area_id": an.area_id, "analyser_name": an.analyser.split("@")[0],
        "analyser_version": an.analyser.split("@")[1], "observed_at": after.acquired_at,
        "before_observed_at": before.acquired_at if before else None,
    }
    if regions is None:
        regions = [(box(23.12, 46.52, 23.13, 46.525), "vegetation_loss", 3.2),
                   (box(23.15, 46.55, 23.152, 46.556), "new_built_up_or_bare", 1.1)]
    rows = []
    ordinal = itertools.count()
    total = sum(r[2] for r in regions)
    summary = Finding(kind="summary", ordinal=next(ordinal), caption=caption, confidence=confidence,
                      hectares=total, statistics={"changed_ha": total}, **common)
    if images:
        summary.images = [FindingImage(role=r, mime_type="image/png", width=96, height=96, data=png(r))
                          for r in ("before", "after", "overlay")]
    rows.append(summary)
    for geom, cls, ha in regions:
        rows.append(Finding(kind="region", ordinal=next(ordinal), change_class=cls, geom=from_shape(geom, srid=4326),
                            hectares=ha, caption=f"{cls} of {ha} ha", confidence=0.8, statistics={"dndvi": -0.3},
                            **common))
    for a in answers if answers is not None else [
        {"question": "Has forest been cleared?", "answer": "Yes", "confidence": 0.91,
         "statistics": {"template_id": "forest_loss", "backing_statistic": "forest_loss_ha", "value": 3.2,
                        "unit": "ha", "threshold": 0.5, "statistic_says_yes": True, "agrees": True,
                        "comparison": "yes/no", "model_says_yes": True, "model_answer": "Yes", "chip_index": 2,
                        "answers_per_chip": ["Yes", "No", "Yes"]}},
        {"question": "How many hectares changed?", "answer": "about 9", "confidence": 0.55,
         "statistics": {"template_id": "changed_area", "backing_statistic": "changed_ha", "value": total,
                        "unit": "ha", "threshold": None, "statistic_says_yes": True, "agrees": False,
                        "comparison": "number", "model_value": 9.0, "model_answer": "about 9", "chip_index": 2}},
    ]:
        rows.append(Finding(kind="answer", ordinal=next(ordinal), **a, **common))
    session.add_all(rows)
    session.flush()
    return rows


def world(session, *, name="Apuseni forest", recipients=("ana@example.org",), frequency="immediate",
          min_ha=0.5, days_ago: float = 0.1, **finding_kw: Any) -> Analysis:
    """One area with a done analysis of a Sentinel-2 pair and its findings; returns the analysis."""
    now = datetime.now(UTC)
    a = area(session, name=name, recipients=recipients, frequency=frequency, min_ha=min_ha)
    cat = catalogue(session)
    before = scene(session, cat, datetime(2015, 8, 31, 9, 40, tzinfo=UTC), cloud=3.0)
    after = scene(session, cat, datetime(2020, 8, 29, 9, 40, tzinfo=UTC), cloud=21.4)
    observe(session, a, before, 0.97)
    observe(session, a, after, 0.88)
    an = analysis(session, a, after, before, finished_at=now - timedelta(days=days_ago))
    findings(session, an, **finding_kw)
    return an

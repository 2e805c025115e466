"""One analysis from claim to done: the body of the Celery task, independent of Celery.

``run_analysis(id, worker)``: claim the row (:mod:`workers.leases`), heartbeat while working, then

1. load the area and both acquisitions as mosaics of their granules touching the area, with their
   catalogues (short read-only transaction): an area across two tiles, even of two UTM zones, is read
   onto its one grid from both;
2. raster prep and spectral analysis, block by block (:mod:`workers.tiling`, :mod:`workers.raster`,
   :mod:`workers.spectral`) — a pair that cannot be compared ends ``skipped`` with the reason;
3. UniRS (:mod:`workers.unirs`) on the chips that pass the spectral screen, when the analyser asks for it
   and this worker has weights;
4. thumbnails (:mod:`workers.render`) and findings, written with the status change in one transaction
   (:mod:`workers.findings_writer`).

Failures end with a readable ``last_error``: refused hrefs, unreadable/corrupt COGs and pixels that
contradict the item's radiometry metadata (:class:`eo.radiometry.RadiometryMismatch`) fail the analysis at
once (retrying cannot fix them); transient trouble (HTTP 5xx/timeouts, database errors, anything
unexpected) gives the row back (``queued``, re-sent by the dispatcher after 2 × lease) until
``analysis.max_attempts``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
from geoalchemy2.shape import from_shape, to_shape
from shapely.geometry.base import BaseGeometry
from sqlalchemy import func, select

from core.config import Settings
from core.db import session_scope
from core.jobs import AnalyserSpec
from core.models import Analysis, AnalysisStatus, Observation, ObservationStatus, Scene
from eo.change_classes import DEFAULT_ALERT_CLASSES, format_hectares, label
from eo.cog import CogReadError
from eo.questions import QuestionTemplate, UnknownQuestion, ids_from_question_set, templates_for
from eo.radiometry import RadiometryMismatch
from eo.security import HrefRefused, catalogue_for_scene
from workers import confirmation, coregistration, leases, mapframe, render, screen, spectral, unirs
from workers.findings_writer import FindingRow, region_confidence, union_or, write_done
from workers.raster import SceneRef, SkipAnalysis
from workers.tiling import PreparedPair, analyse_pair, frame, overlay_classes

logger = logging.getLogger(__name__)

#: Test-only hook: seconds to wait after claiming, before any work (gives tests a window to kill a worker).
TEST_DELAY_ENV = "UNIRS_TEST_TASK_DELAY_SECONDS"
# GDAL/curl messages that mean "try again later", not "this file is broken".
_TRANSIENT = re.compile(r"HTTP (?:error|response) code: ?(?:5\d\d|429)|timed? ?out|Connection (?:refused|reset)|"
                        r"Could not resolve|couldn't connect", re.IGNORECASE)


@dataclass
class AnalysisContext:
    analysis_id: int
    area_id: int
    area_name: str
    area_geom: BaseGeometry
    analyser: AnalyserSpec
    question_ids: list[str]
    before: SceneRef | None
    after: SceneRef
    pair_reason: str | None
    alert_classes: tuple[str, ...] = DEFAULT_ALERT_CLASSES  # the area's; heads the summary (headline_class)


class PermanentFailure(Exception):
    """The analysis cannot succeed by retrying; the message is the reason users see."""


def _scene_ref(session: Any, scene: Scene, settings: Settings) -> SceneRef:
    try:
        catalogue = catalogue_for_scene(session, scene, settings)
    except KeyError as exc:
        raise PermanentFailure(f"scene {scene.item_id}: {exc.args[0]}") from None
    return SceneRef(scene_id=scene.id, item_id=scene.item_id, acquired_at=scene.acquired_at,
                    processing_baseline=scene.processing_baseline, assets=dict(scene.assets or {}),
                    catalogue=catalogue)


def acquisition_ref(session: Any, scene: Scene, area_geom: Any, settings: Settings) -> SceneRef:
    """The acquisition of ``scene`` over the area as a mosaic: ``scene`` first (the granule pairing saw image
    the area first), then the acquisition's other granules touching the area in pairing's order (id)."""
    others = session.execute(
        select(Scene).where(Scene.acquisition_id == scene.acquisition_id, Scene.id != scene.id,
                            func.ST_Intersects(Scene.footprint, area_geom))
        .order_by(Scene.id)
    ).scalars().all()
    ref = _scene_ref(session, scene, settings)
    ref.others = tuple(_scene_ref(session, other, settings) for other in others)
    return ref


def load_context(analysis_id: int, settings: Settings) -> AnalysisContext:
    with session_scope(settings) as session:
        analysis = session.get(Analysis, analysis_id)
        if analysis is None:
            raise PermanentFailure(f"analysis {analysis_id} disappeared")
        area = analysis.area
        question_ids = ids_from_question_set(analysis.question_set) or list(area.questions or [])
        before = analysis.before_scene
        return AnalysisContext(
            analysis_id=analysis.id, area_id=area.id, area_name=area.name, area_geom=to_shape(area.geom),
            analyser=AnalyserSpec.parse(analysis.analyser), question_ids=question_ids,
            before=acquisition_ref(session, before, area.geom, settings) if before else None,
            after=acquisition_ref(session, analysis.after_scene, area.geom, settings),
            pair_reason=analysis.pair_reason,
            alert_classes=tuple(area.alert_classes or DEFAULT_ALERT_CLASSES),
        )


def _test_delay(heartbeat: leases.Heartbeat) -> None:
    seconds = float(os.environ.get(TEST_DELAY_ENV) or 0)
    if seconds <= 0:
        return
    logger.warning("test hook %s: waiting %.1f s before analysis %s", TEST_DELAY_ENV, seconds,
                   heartbeat.claim.analysis_id)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        heartbeat.check()
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def run_analysis(analysis_id: int, worker: str, settings: Settings) -> str:
    """Claim and run one analysis; returns its final status or why nothing was done."""
    claim = leases.claim(analysis_id, worker, settings)
    if claim is None:
        return "not claimed"
    try:
        with leases.Heartbeat(claim, settings) as heartbeat:
            _test_delay(heartbeat)
            ctx = load_context(analysis_id, settings)
            return _analyse(ctx, claim, heartbeat, settings)
    except leases.LeaseLost as exc:
        logger.warning("%s; results discarded", exc)
        return "lease lost"
    except SkipAnalysis as exc:
        return _finish(claim, AnalysisStatus.SKIPPED, str(exc), {"skip_reason": str(exc), "worker": worker},
                       settings)
    except HrefRefused as exc:
        return _fail(claim, f"refused to open an asset: {exc}", settings)
    except (PermanentFailure, UnknownQuestion, RadiometryMismatch) as exc:
        return _fail(claim, str(exc), settings)
    except CogReadError as exc:
        detail = describe_read_error(exc)
        if _TRANSIENT.search(detail):
            return leases.release(claim, f"transient read error (will retry): {detail}", settings) or "released"
        return _fail(claim, f"unreadable or corrupt COG: {detail}", settings)
    except Exception as exc:
        logger.exception("analysis %s: unexpected error", analysis_id)
        return leases.release(claim, f"unexpected error: {type(exc).__name__}: {exc}", settings) or "released"


def describe_read_error(exc: CogReadError) -> str:
    """The CogReadError message plus GDAL's own words from the exception chain (rasterio's top-level
    message is often just "Read failed. See previous exception for details.")."""
    details: list[str] = []
    cause: BaseException | None = exc.__cause__
    while cause is not None and len(details) < 6:
        text = str(cause).strip()
        if text and "See previous exception" not in text and text not in details and text not in str(exc):
            details.append(text)
        cause = cause.__cause__ or cause.__context__
    return f"{exc} ({'; '.join(details)})" if details else str(exc)


def _fail(claim: leases.Claim, reason: str, settings: Settings) -> str:
    return _finish(claim, AnalysisStatus.FAILED, reason, {"failure": reason, "worker": claim.worker}, settings)


def _finish(claim: leases.Claim, status: AnalysisStatus, reason: str, stats: dict, settings: Settings) -> str:
    """End the analysis now; a worker whose lease was taken over writes nothing (the new owner decides)."""
    try:
        leases.finish_now(claim, status, settings, stats=stats, last_error=reason)
    except leases.LeaseLost as exc:
        logger.warning("%s", exc)
        return "lease lost"
    return status.value


def _analyse(ctx: AnalysisContext, claim: leases.Claim, heartbeat: leases.Heartbeat, settings: Settings) -> str:
    timings: dict[str, float] = {}
    started = time.monotonic()
    if ctx.before is None:
        raise SkipAnalysis("no earlier clear scene of this area to compare with")
    templates = templates_for(ctx.question_ids)
    # Both acquisitions read on the area's geometry (pre-2021 Sentinel-2A/2B products lie up to a pixel apart).
    ctx.before, ctx.after, registered = coregistration.onto_area(settings, ctx.area_id, ctx.area_geom, ctx.before,
                                                                 ctx.after, acquisition_ref)

    with session_scope(settings) as session:
        earlier = confirmation.earlier_regions(session, ctx.area_id, ctx.after.acquired_at)
    settler = confirmation.Settler(earlier)
    pair, result = analyse_pair(ctx.area_geom, ctx.before, ctx.after, settings.analysis, on_block=settler.add)
    settled = settler.finish(ctx.after)
    with session_scope(settings) as session:
        history = clear_history(session, ctx, settings)
    screened = screen.screen(result.regions, pair.grid, ctx.before, ctx.after, history,
                             settings.analysis.cloud_buffer_px, settings.analysis.min_mapping_unit_ha)
    if screened.found:
        result.regions.extend(screened.found)
        result.notes.append(f"the time-series screen found {len(screened.found)} loss region(s) "
                            f"({sum(r.hectares for r in screened.found):.2f} ha) the pair's dNDVI missed")
    verdicts = screened.verdicts + screened.found_verdicts
    result.regions, verdicts = confirmation.split_grown(result.regions, verdicts, earlier, settled, pair.grid.crs,
                                                        pair.grid.pixel_size, settings.analysis.min_mapping_unit_ha)
    states = confirmation.new_states(result.regions, earlier, settled,
                                     [v.verdict if v.verdict in screen.NOT_CHANGE else None for v in verdicts])
    timings["prepare_and_spectral"] = time.monotonic() - started
    heartbeat.check()

    model_result: unirs.UnirsResult | None = None
    notes = list(result.notes)
    checkpoint: str | None = None
    if ctx.analyser.model:
        model = unirs.get_model(settings)
        checkpoint = unirs.loaded_checkpoint()
        if model is None:
            notes.append("the analysis asked for UniRS but this worker has no weights (model.weights_path unset): "
                         "spectral analysis only")
        else:
            heartbeat.check()
            model_result = unirs.run(model, pair, result, templates, settings,
                                     frames=lambda: sequence_frames(ctx, pair, settings))
            timings["model"] = model_result.seconds
            notes.extend(model_result.notes)

    t0 = time.monotonic()
    images = thumbnails(pair, result)
    ran = ctx.analyser.ran_with(checkpoint if model_result is not None else None)
    rows = build_rows(ctx, pair, result, model_result, templates, images, ran.checkpoint or "none", settings,
                      states, verdicts)
    timings["render"] = time.monotonic() - t0
    timings["total"] = time.monotonic() - started
    stats = analysis_stats(ctx, claim, pair, result, model_result, notes, timings, settings)
    stats["analyser_run"] = ran.id
    stats["coregistration"] = registered
    stats["confirmation"] = {
        "confirmed": sum(s.state == confirmation.CONFIRMED for s in settled),
        "dismissed": sum(s.state == confirmation.DISMISSED for s in settled),
        "redetected": sum(s.state == confirmation.REDETECTED for s in states),
        "seasonal": sum(s.state == confirmation.SEASONAL for s in states),
    }
    heartbeat.check()
    write_done(claim, settings, area_id=ctx.area_id, observed_at=ctx.after.acquired_at,
               before_observed_at=ctx.before.acquired_at, rows=rows, stats=stats, analyser_run=ran,
               settlements=settled)
    # Alerts are the scheduler's reports job: it picks up this `done` row on its next run.
    return AnalysisStatus.DONE.value


def thumbnails(pair: PreparedPair, result: spectral.SpectralResult) -> dict[str, render.Png]:
    """Before, after and overlay PNGs from the thumbnail canvas (every f-th pixel; f = 1 up to 1024 px), framed
    for a reader (:func:`workers.mapframe.frame`: ≥ 512 px, area outline, scale bar, north arrow, legend)."""
    thumbs = pair.thumbs
    value_range = render.stretch_range(thumbs.before, thumbs.after, valid=thumbs.valid)
    img_b, img_a = render.to_uint8(thumbs.before, value_range), render.to_uint8(thumbs.after, value_range)
    codes = overlay_classes(pair, result.regions)
    tinted = render.overlay(img_a, codes, thumbs.aoi)
    legend = [mapframe.LegendEntry(render.CLASS_COLOURS[code], label(name))
              for name, code in spectral.CLASS_CODES.items() if (codes == code).any()]
    pixel_m, outline = thumbs.grid.pixel_size, mapframe.outline_for(thumbs.aoi)

    def framed(job: tuple[str, np.ndarray, list]) -> tuple[str, render.Png]:
        role, rgb8, entries = job
        return role, render.encode_png(mapframe.frame(rgb8, aoi=thumbs.aoi, pixel_m=pixel_m, legend=entries,
                                                      outline=outline))

    # The three encodes at once: Pillow's zlib encoder releases the GIL (same bytes, one image per thread).
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="png") as pool:
        images = dict(pool.map(framed, (("before", img_b, []), ("after", img_a, []), ("overlay", tinted, legend))))
    # The map part (above the legend strip) covers the thumbnail grid: stored so the page can place it.
    for png in images.values():
        png.bounds = {"crs": thumbs.grid.crs.to_string(), "bbox": list(thumbs.grid.bounds),
                      "map_height_px": png.height - mapframe.FOOTER_PX}
    return images


def clear_history(session: Any, ctx: AnalysisContext, settings: Settings) -> list[SceneRef]:
    """The area's clear acquisitions of the last :data:`workers.screen.HISTORY_DAYS` before the after scene
    (newest :data:`workers.screen.MAX_HISTORY`), each as its mosaic over the area (:func:`acquisition_ref`),
    like the pair: the time-series screen's history."""
    since = ctx.after.acquired_at - timedelta(days=screen.HISTORY_DAYS)
    scenes = session.execute(
        select(Scene)
        .join(Observation, Observation.scene_id == Scene.id)
        .where(Observation.area_id == ctx.area_id, Observation.status == ObservationStatus.CLEAR,
               Scene.acquired_at < ctx.after.acquired_at, Scene.acquired_at >= since)
        .order_by(Scene.acquired_at.desc()).limit(screen.MAX_HISTORY)
    ).scalars().all()
    # The observation names the first granule that imaged the area; across a tile or zone edge the rest of
    # the area is in the acquisition's other granules (read alone, it left that part without history).
    area_geom = from_shape(ctx.area_geom, srid=4326)
    return coregistration.apply_stored(session, ctx.area_id, [acquisition_ref(session, s, area_geom, settings)
                                                              for s in scenes])


def sequence_frames(ctx: AnalysisContext, pair: PreparedPair, settings: Settings) -> tuple[list[np.ndarray], list[str]]:
    """RGB renders of the last ``video_frames`` clear acquisitions of the area (before and after included), on
    the thumbnail grid (full resolution up to 1024 px a side, decimated above)."""
    limit = max(2, settings.analysis.video_frames)
    with session_scope(settings) as session:
        scenes = session.execute(
            select(Scene)
            .join(Observation, Observation.scene_id == Scene.id)
            .where(Observation.area_id == ctx.area_id, Observation.status == ObservationStatus.CLEAR,
                   Scene.acquired_at <= ctx.after.acquired_at,
                   Scene.id.not_in([ctx.after.scene_id, ctx.before.scene_id]))
            .order_by(Scene.acquired_at.desc()).limit(limit - 2)
        ).scalars().all()
        # Each frame is its acquisition's mosaic, read like the pair: the granule the observation names
        # covers only part of an area across a tile or zone edge.
        area_geom = from_shape(ctx.area_geom, srid=4326)
        others = coregistration.apply_stored(session, ctx.area_id,
                                             [acquisition_ref(session, s, area_geom, settings) for s in scenes])
    frames: list[tuple[Any, np.ndarray]] = [
        (ctx.before.acquired_at, pair.thumbs.before),
        (ctx.after.acquired_at, pair.thumbs.after),
    ]
    for scene in others:
        try:
            frames.append((scene.acquired_at, frame(scene, pair)))
        except (CogReadError, HrefRefused, SkipAnalysis) as exc:  # one bad frame must not sink the analysis
            logger.warning("video frame %s left out: %s", scene.item_id, exc)
    frames.sort(key=lambda f: f[0])
    frames = frames[-limit:]
    value_range = render.stretch_range(*(f[1] for f in frames), valid=pair.thumbs.aoi)
    return [render.to_uint8(f[1], value_range) for f in frames], [f"{f[0]:%Y-%m-%d}" for f in frames]


def headline_class(classes: dict[str, dict[str, Any]], alert_classes: tuple[str, ...] | list[str]) -> str | None:
    """The summary finding's class: the largest (hectares) of the changed classes the area alerts on, so an
    area watching for loss is headed by its loss even when more land greened (the alert and the caption
    lead with loss too); the largest changed class when none of those changed; None when nothing did.
    ``classes``: :attr:`spectral.SpectralResult.classes` (class id → {"hectares": ..., ...})."""
    changed = {c: info["hectares"] for c, info in classes.items() if info and info["hectares"] > 0}
    pool = {c: ha for c, ha in changed.items() if c in alert_classes} or changed
    return max(pool, key=pool.__getitem__) if pool else None


def build_rows(ctx: AnalysisContext, pair: PreparedPair, result: spectral.SpectralResult,
               model_result: unirs.UnirsResult | None, templates: list[QuestionTemplate],
               images: dict[str, render.Png], checkpoint: str, settings: Settings,
               states: list[confirmation.NewState] | None = None,
               verdicts: list[screen.Verdict] | None = None) -> list[FindingRow]:
    spectral_id = (spectral.NAME, spectral.VERSION)
    unirs_id = (unirs.NAME, checkpoint)
    best = model_result.best if model_result else None
    valid_fraction = round(pair.valid_fraction, 3)
    summary_stats: dict[str, Any] = {
        "metrics": result.metrics, "classes": result.classes, "spectral_caption": result.caption,
        "model_caption": best.caption if best else None, "pair_reason": ctx.pair_reason,
        "regions": len(result.regions), "regions_below_mapping_unit": result.regions_dropped,
    }
    rows = [FindingRow(
        kind="summary", analyser_name=(unirs_id if best else spectral_id)[0],
        analyser_version=(unirs_id if best else spectral_id)[1],
        geom=union_or([r.geom_4326 for r in result.regions], ctx.area_geom),
        change_class=headline_class(result.classes, ctx.alert_classes),
        hectares=result.metrics["changed_ha"],
        caption=best.caption if best else result.caption,
        confidence=valid_fraction, statistics=summary_stats, images=images,
    )]
    states = states or [confirmation.NewState(confirmation.PROBABLE, None, {}) for _ in result.regions]
    verdicts = verdicts or [screen.Verdict(screen.UNSCREENED, {"why": "not screened"}) for _ in result.regions]
    for region, state, verdict in zip(result.regions, states, verdicts, strict=True):
        rows.append(FindingRow(
            kind="region", analyser_name=spectral_id[0], analyser_version=spectral_id[1], geom=region.geom_4326,
            change_class=region.change_class, hectares=region.hectares, alert_state=state.state,
            first_finding_id=state.first_finding_id, screen_verdict=verdict.verdict,
            caption=f"{spectral.CLASS_LABELS[region.change_class].capitalize()} of {format_hectares(region.hectares)}"
                    + (" (long and narrow: road or track?)" if region.linear else ""),
            confidence=region_confidence(region.mean_dndvi, valid_fraction),
            statistics={"pixels": region.pixels, "mean_dndvi": region.mean_dndvi, "linear": region.linear,
                        "elongation": region.elongation, "before_means": region.before_means, **state.statistics,
                        "screen": {"verdict": verdict.verdict, **verdict.statistics}},
        ))
    for k, template in enumerate(templates):
        text, says_yes, value = result.answer(template)
        stats: dict[str, Any] = {"template_id": template.id, "backing_statistic": template.backing_statistic,
                                 "value": value, "unit": template.unit, "spectral_answer": text,
                                 "statistic_says_yes": says_yes}
        answer, analyser, confidence = text, spectral_id, valid_fraction if says_yes is not None else None
        if best is not None:
            answer = best.answers[k] if k < len(best.answers) else ""
            agree = unirs.agreement(answer, template, value, says_yes, settings.analysis.min_mapping_unit_ha)
            stats.update(agree, model_answer=answer, chip_index=best.chip_index,
                         answers_per_chip=[c.answers[k] if k < len(c.answers) else None for c in model_result.chips])
            analyser = unirs_id
            confidence = round(valid_fraction * (1.0 if agree["agrees"] else 0.5), 3)
        else:
            stats["agrees"] = None  # nothing to agree with: the answer *is* the statistic
        rows.append(FindingRow(kind="answer", analyser_name=analyser[0], analyser_version=analyser[1],
                               question=template.text, answer=answer, confidence=confidence, statistics=stats))
    if model_result is not None and model_result.event is not None:
        event = model_result.event
        rows.append(FindingRow(
            kind="event", analyser_name=unirs_id[0], analyser_version=unirs_id[1], geom=ctx.area_geom,
            caption=f"Event over {event.frames} acquisitions ({event.dates[0]} … {event.dates[-1]}): {event.label}",
            answer=event.label, confidence=round(event.score, 3),
            statistics={"raw_text": event.raw_text, "frames": event.frames, "dates": event.dates,
                        "classes": list(unirs.EVENT_CLASSES)},
        ))
    return rows


def analysis_stats(ctx: AnalysisContext, claim: leases.Claim, pair: PreparedPair, result: spectral.SpectralResult,
                   model_result: unirs.UnirsResult | None, notes: list[str], timings: dict[str, float],
                   settings: Settings) -> dict[str, Any]:
    grid = pair.grid
    return {
        "analyser": ctx.analyser.id, "worker": claim.worker, "attempt": claim.attempts,
        "previous_error": claim.previous_error,
        "grid": {"crs": grid.crs.to_string(), "pixel_size_m": grid.pixel_size, "width": grid.width,
                 "height": grid.height, "blocks": pair.blocks, "thumbnail_step_px": pair.thumbs.factor},
        "valid_fraction": round(pair.valid_fraction, 4),
        "before_clear_fraction": round(pair.before_clear_fraction, 4),
        "after_clear_fraction": round(pair.after_clear_fraction, 4),
        "harmonisation": {"before": pair.before.harmonisation, "after": pair.after.harmonisation},
        "radiometry": {"before": pair.before.radiometry, "after": pair.after.radiometry},
        "bands": list(pair.bands), "notes": notes, "metrics": result.metrics,
        "regions": len(result.regions), "regions_below_mapping_unit": result.regions_dropped,
        "chips_total": len(result.chip_scores),
        "chip_scores": [{"chip": c.index, "score": c.score, "changed_pixels": c.changed_pixels,
                         "valid_pixels": c.valid_pixels} for c in result.chip_scores],
        # The spectral screen, recorded even when no model ran: what *would* have reached the GPU.
        "chips_passing_model_screen": sum(c.score >= settings.analysis.model_score_threshold
                                          for c in result.chip_scores),
        "chips_kept_off_model": model_result.chips_kept_off_model if model_result else None,
        "chips_sent_to_model": len(model_result.chips) if model_result else 0,
        "chips_over_model_limit": model_result.chips_over_limit if model_result else 0,
        "event": model_result.event.label if model_result and model_result.event else None,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }

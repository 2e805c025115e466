"""Fast tests of the worker pieces without a worker process: question templates, masks, harmonisation,
answer agreement, Celery configuration, the worker CLI, and the analysis state machine (claim, heartbeat,
fencing, dispatcher transitions) against the real database with a fake publisher."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from core.config import AnalysisSettings, CatalogueSettings, Settings, get_settings
from core.db import session_scope
from eo.masks import dilate, qa_pixel_clear, scl_clear
from eo.questions import (
    UnknownQuestion,
    ids_from_question_set,
    load_templates,
    templates_for,
)
from monitor.dispatch import dispatch_once
from monitor.doctor import DoctorWarning, check_analyses
from tests.fixtures_workers import analysis_rows, insert_analysis, insert_area, insert_sample_scenes
from workers import leases
from workers.celery_app import app
from workers.cli import worker
from workers.raster import SceneRef, harmonisation_rule
from workers.unirs import agreement

CATALOGUE = CatalogueSettings(name="unit", url="http://127.0.0.1:9", allowed_schemes=["http"],
                              allowed_hosts=["127.0.0.1"], allow_private_hosts=True)


# --- question templates ----------------------------------------------------------------------------


def test_default_templates_each_name_a_backing_statistic():
    templates = load_templates()
    assert [t.id for t in templates] == ["new_buildings", "vegetation_loss", "water_change", "new_roads", "bare_soil"]
    assert all(t.backing_statistic.endswith("_ha") and t.unit == "ha" for t in templates)
    assert templates_for([]) == templates and templates_for(None) == templates
    assert [t.id for t in templates_for(["bare_soil", "new_roads"])] == ["new_roads", "bare_soil"]
    with pytest.raises(UnknownQuestion, match="nope"):
        templates_for(["nope"])
    assert ids_from_question_set("new_roads,vegetation_loss@1") == ["new_roads", "vegetation_loss"]
    assert ids_from_question_set("@1") == []


def test_editing_a_template_makes_a_new_question_set():
    """The question set an analysis records carries a digest of the templates' content: editing a question
    or a threshold changes it (and with it the idempotency key), the file's description does not."""
    from importlib import resources

    from eo.questions import parse_file, question_set_id, templates_version

    text = resources.files("eo").joinpath("data", "questions.json").read_text(encoding="utf-8")
    templates, version = parse_file(text)
    assert version == templates_version() and len(version) == 12 and list(templates) == load_templates()
    assert question_set_id(["new_roads", "bare_soil"]) == f"bare_soil,new_roads@{version}"
    raw = json.loads(text)
    assert "version" not in raw  # no hand-kept number that editing forgets to bump
    reworded = json.loads(text)
    reworded["templates"][3]["text"] = "Has a new road or track appeared?"
    stricter = json.loads(text)
    stricter["templates"][1]["answer"]["threshold"] = 0.6
    described = json.loads(text) | {"description": "another note"}
    versions = {parse_file(json.dumps(doc))[1] for doc in (reworded, stricter)}
    assert len(versions) == 2 and version not in versions
    assert parse_file(json.dumps(described, indent=4))[1] == version  # layout and description are not content
    assert ids_from_question_set(question_set_id(["new_roads"], "0123abcd4567")) == ["new_roads"]


def test_template_answers_from_statistics():
    veg = templates_for(["vegetation_loss"])[0]
    assert veg.answer_from(1.3) == ("Yes: about 1.30 ha of vegetation was lost (NDVI fell by 0.2 or more).", True)
    assert veg.answer_from(0.0)[1] is False
    text_, yes = veg.answer_from(None, "dNDVI needs red and nir")
    assert yes is None and "dNDVI needs red and nir" in text_


# --- masks and harmonisation -----------------------------------------------------------------------


def test_dilate_grows_a_disk_and_clips_at_edges():
    mask = np.zeros((9, 9), dtype=bool)
    mask[4, 4] = True
    assert dilate(mask, 2).sum() == 13  # the radius-2 disk
    corner = np.zeros((5, 5), dtype=bool)
    corner[0, 0] = True
    assert dilate(corner, 1).sum() == 3  # the radius-1 disk is a cross; no wrap-around
    assert (dilate(mask, 0) == mask).all()


def test_scl_mask_buffers_clouds_and_shadows():
    scl = np.full((20, 20), 4, dtype=np.uint8)
    scl[10, 10] = 9  # one cloud pixel
    scl[0, 0] = 0  # no data
    scl[19, 19] = 11  # snow: not clear by default
    clear = scl_clear(scl, buffer_px=3)
    assert not clear[10, 13] and not clear[7, 10] and clear[10, 14]
    assert not clear[0, 0] and not clear[19, 19]
    assert scl_clear(scl, 3, extra_clear=(11,))[19, 19]


def test_scl_classes_by_table_equal_isin_for_every_value():
    from eo.masks import CLEAR_SCL, CLOUD_SCL, _in_classes

    every = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for classes in (CLEAR_SCL, CLOUD_SCL, (*CLEAR_SCL, 11)):
        assert (_in_classes(every, classes) == np.isin(every, classes)).all()
        assert int(_in_classes(every, classes).sum()) == len(set(classes))
    wide = every.astype(np.uint16) * 7  # not uint8: the np.isin path, same answer
    assert (_in_classes(wide, CLEAR_SCL) == np.isin(wide, CLEAR_SCL)).all()


def test_landsat_qa_pixel_mask():
    qa = np.full((10, 10), 1 << 6, dtype=np.uint16)  # clear bit
    qa[5, 5] = 1 << 3  # cloud
    qa[0, 9] = 1 << 0  # fill
    clear = qa_pixel_clear(qa, buffer_px=1)
    assert not clear[5, 5] and not clear[5, 6] and clear[5, 7] and not clear[0, 9]


def test_mask_band_nodata_is_never_clear():
    # Outside a Landsat footprint the warped QA_PIXEL read is filled with the nodata value (0 by default),
    # which has no cloud bit set: the declared nodata must still count as not clear.
    from workers.raster import _clear_mask

    qa = np.full((4, 4), 1 << 6, dtype=np.uint16)
    qa[:, :2] = 0  # fill written by the warp
    clear = _clear_mask("qa_pixel", np.ma.masked_equal(qa, 0), buffer_px=0)
    assert not clear[:, :2].any() and clear[:, 2:].all()


def _scene(baseline: str | None, assets=None) -> SceneRef:
    return SceneRef(1, "x", datetime(2020, 1, 1, tzinfo=UTC), baseline, assets or {}, CATALOGUE)


@pytest.mark.parametrize(("baseline", "dn", "reflectance"), [
    ("05.00", 1500, 0.05), ("04.00", 1000, 0.0), ("02.12", 1500, 0.15), ("03.01", 500, 0.05),
])
def test_sentinel2_harmonisation_follows_the_processing_baseline(baseline, dn, reflectance):
    scale, offset, _ = harmonisation_rule(_scene(baseline), "red")
    assert dn * scale + offset == pytest.approx(reflectance)


def test_non_sentinel2_uses_asset_scale_and_offset():
    landsat = _scene(None, {"red": {"scale": 2.75e-5, "offset": -0.2}})
    scale, offset, rule = harmonisation_rule(landsat, "red")
    assert 20000 * scale + offset == pytest.approx(0.35) and "asset" in rule


# --- model answers next to statistics --------------------------------------------------------------


def test_model_answers_are_compared_with_their_statistic():
    veg = templates_for(["vegetation_loss"])[0]
    assert agreement("Yes, trees were cut.", veg, 1.3, True, 0.1)["agrees"] is True
    assert agreement("no", veg, 1.3, True, 0.1)["agrees"] is False
    numeric = agreement("About 1.5 hectares.", veg, 1.3, True, 0.1)
    assert numeric["agrees"] is True and numeric["comparison"] == "number"
    assert agreement("There are 40 ha.", veg, 1.3, True, 0.1)["agrees"] is False
    unreadable = agreement("Weed Describe", veg, 1.3, True, 0.1)
    assert unreadable["agrees"] is False and unreadable["comparison"] == "unreadable"
    assert agreement("yes", veg, None, None, 0.1)["comparison"] == "no statistic"


# --- Celery configuration and CLI ------------------------------------------------------------------


def test_celery_reliability_settings():
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit >= 3600
    import workers.tasks  # noqa: F401  (the worker imports it through `include`)

    assert "unirs.analyse" in app.tasks


def test_worker_cli_builds_the_celery_command():
    runner = CliRunner()
    gpu = runner.invoke(worker, ["--queues", "gpu", "--print-command"])
    assert gpu.exit_code == 0, gpu.output
    assert "--queues gpu --pool solo --concurrency 1" in gpu.output and "UNIRS_WORKER_QUEUES=gpu" in gpu.output
    cpu = runner.invoke(worker, ["--queues", "cpu", "-c", "3", "--print-command"])
    assert "--queues cpu --pool prefork --concurrency 3" in cpu.output
    assert runner.invoke(worker, ["--queues", "tpu", "--print-command"]).exit_code != 0


# --- state machine ---------------------------------------------------------------------------------


@pytest.fixture
def rows(db):
    scenes = insert_sample_scenes(CATALOGUE, CATALOGUE.url, ["2015-08-31", "2020-08-29"])
    area_id = insert_area(scenes.footprint)
    return {"area": area_id, "after": scenes.ids["2020-08-29"], "before": scenes.ids["2015-08-31"]}


def _settings(**analysis) -> Settings:
    return Settings(catalogues=[CATALOGUE], analysis=AnalysisSettings(**{"lease_seconds": 30, **analysis}))


class FakeBroker:
    def __init__(self, fail: bool = False):
        self.sent: list[tuple[int, str]] = []
        self.fail = fail

    def __call__(self, analysis_id: int, queue: str) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((analysis_id, queue))


def _expire_lease(analysis_id: int, attempts: int | None = None) -> None:
    with session_scope(get_settings()) as session:
        session.execute(text("UPDATE analyses SET lease_expires_at = now() - interval '1 second', "
                             "attempts = coalesce(:attempts, attempts) WHERE id = :id"),
                        {"id": analysis_id, "attempts": attempts})


def test_dispatch_queues_pending_work_by_analyser(rows):
    spectral_id = insert_analysis(rows["area"], rows["after"], rows["before"])
    unirs_id = insert_analysis(rows["area"], rows["after"], None, analyser="unirs@x+spectral@1")
    broker = FakeBroker()
    summary = dispatch_once(_settings(), send=broker)
    assert summary["queued"] == 2 and summary["errors"] == []
    assert sorted(broker.sent) == sorted([(spectral_id, "cpu"), (unirs_id, "gpu")])
    assert {r["status"] for r in analysis_rows([spectral_id, unirs_id]).values()} == {"queued"}
    assert dispatch_once(_settings(), send=broker)["queued"] == 0  # nothing sent twice


def test_dispatch_keeps_rows_when_the_broker_is_down(rows):
    analysis_id = insert_analysis(rows["area"], rows["after"], rows["before"])
    summary = dispatch_once(_settings(), send=FakeBroker(fail=True))
    assert summary["queued"] == 0 and "broker down" in summary["errors"][0]
    assert analysis_rows([analysis_id])[analysis_id]["status"] == "pending"


def test_claim_is_exclusive_and_fenced(rows):
    settings = _settings()
    analysis_id = insert_analysis(rows["area"], rows["after"], rows["before"])
    first = leases.claim(analysis_id, "worker-a", settings)
    assert first is not None and first.attempts == 1
    assert leases.claim(analysis_id, "worker-b", settings) is None  # lease still valid

    _expire_lease(analysis_id)  # worker-a stalls past its lease; worker-b takes over
    second = leases.claim(analysis_id, "worker-b", settings)
    assert second is not None and second.attempts == 2
    with pytest.raises(leases.LeaseLost):
        leases.finish_now(first, "done", settings, stats={})  # worker-a's late result is refused
    leases.finish_now(second, "done", settings, stats={"ok": True})
    assert leases.claim(analysis_id, "worker-c", settings) is None  # done stays done
    row = analysis_rows([analysis_id])[analysis_id]
    assert row["status"] == "done" and row["worker"] == "worker-b" and row["stats"] == {"ok": True}


def test_heartbeat_extends_the_lease_and_notices_a_lost_one(rows):
    settings = _settings(lease_seconds=3, heartbeat_seconds=1)
    analysis_id = insert_analysis(rows["area"], rows["after"], rows["before"])
    claim = leases.claim(analysis_id, "worker-a", settings)

    def lease_left() -> float:
        with session_scope(get_settings()) as session:
            return session.execute(text("SELECT extract(epoch FROM lease_expires_at - now()) FROM analyses "
                                        "WHERE id = :id"), {"id": analysis_id}).scalar_one()

    with leases.Heartbeat(claim, settings) as beat:
        import time

        time.sleep(3.5)  # longer than the lease: only the heartbeat keeps it alive
        assert lease_left() > 0 and not beat.lost.is_set()
        _expire_lease(analysis_id)
        assert leases.claim(analysis_id, "worker-b", settings) is not None
        deadline = time.monotonic() + 10
        while not beat.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert beat.lost.is_set()
        with pytest.raises(leases.LeaseLost):
            beat.check()


def test_dispatch_requeues_lost_work_then_fails_it_with_the_reason(rows):
    settings = _settings(max_attempts=3)
    analysis_id = insert_analysis(rows["area"], rows["after"], rows["before"])
    broker = FakeBroker()
    for attempt in (1, 2, 3):
        dispatch_once(settings, send=broker)
        claim = leases.claim(analysis_id, f"worker-{attempt}", settings)
        assert claim is not None and claim.attempts == attempt
        _expire_lease(analysis_id)  # the worker dies: no heartbeat any more
    summary = dispatch_once(settings, send=broker)
    assert summary["failed"] == 1
    row = analysis_rows([analysis_id])[analysis_id]
    assert row["status"] == "failed"
    assert row["last_error"].startswith("worker lost 3 times; last worker worker-3")
    assert broker.sent.count((analysis_id, "cpu")) == 3  # queued once, re-queued twice


def test_transient_errors_give_the_row_back_until_attempts_run_out(rows):
    settings = _settings(max_attempts=2)
    analysis_id = insert_analysis(rows["area"], rows["after"], rows["before"])
    claim = leases.claim(analysis_id, "w", settings)
    assert leases.release(claim, "HTTP 503", settings) == "queued"  # re-sent by the dispatcher later
    claim = leases.claim(analysis_id, "w", settings)
    assert leases.release(claim, "HTTP 503 again", settings) == "failed"
    assert analysis_rows([analysis_id])[analysis_id]["last_error"] == "HTTP 503 again"


def test_stats_are_stored_as_json(rows):
    analysis_id = insert_analysis(rows["area"], rows["after"], rows["before"])
    settings = _settings()
    claim = leases.claim(analysis_id, "w", settings)
    leases.finish_now(claim, "done", settings,
                      stats={"nan": float("nan"), "n": np.int64(3), "when": datetime(2020, 1, 1)})
    assert json.loads(json.dumps(analysis_rows([analysis_id])[analysis_id]["stats"])) == {
        "nan": None, "n": 3, "when": "2020-01-01T00:00:00"}


def test_read_errors_are_split_into_transient_and_permanent():
    from eo.cog import CogReadError
    from workers.pipeline import _TRANSIENT, describe_read_error

    try:
        try:
            raise OSError("ZIPDecode:Decoding error at scanline 32")
        except OSError as inner:
            raise CogReadError("http://h/red.tif", "Read failed. See previous exception for details.") from inner
    except CogReadError as exc:
        detail = describe_read_error(exc)
    assert "ZIPDecode:Decoding error" in detail and not _TRANSIENT.search(detail)
    assert _TRANSIENT.search("cannot read http://h/x.tif: HTTP response code: 503")
    assert not _TRANSIENT.search("cannot read http://h/x.tif: HTTP response code: 404")


def test_radiometry_check_counted_in_blocks_agrees_with_one_check():
    from eo.radiometry import RadiometryMismatch, ReflectanceRule, check_pixel_counts, check_pixels, red_counts

    offset_in = ReflectanceRule(1e-4, -0.1, "(DN - 1000) / 10000", "esa-baseline", "generic", True)
    red = np.full((10, 10), 1500, dtype=np.uint16)
    red[:, :1] = 900  # 10 % of the clear pixels below 1000 DN: impossible with the offset in the pixels
    everywhere = np.ones((10, 10), dtype=bool)
    with pytest.raises(RadiometryMismatch):
        check_pixels("S2", offset_in, np.ma.asarray(red), everywhere)
    halves = [red_counts(red[:, :5].ravel()), red_counts(red[:, 5:].ravel())]
    assert halves == [(10, 50, 900), (0, 50, 1500)]
    with pytest.raises(RadiometryMismatch):  # the sums decide, as one check over the whole area does
        check_pixel_counts("S2", offset_in, sum(h[0] for h in halves), sum(h[1] for h in halves), 900)
    assert check_pixel_counts("S2", offset_in, 5, 100, 900) is None


def _age_queued(analysis_id: int, seconds: int) -> None:
    with session_scope(get_settings()) as session:
        session.execute(text("UPDATE analyses SET queued_at = now() - make_interval(secs => :s) WHERE id = :id"),
                        {"id": analysis_id, "s": seconds})


def test_a_message_no_worker_ever_claims_is_resent_with_a_doubling_delay(rows):
    """Attempts count claims only: a row whose messages are all lost before a worker takes one was re-sent
    every 2 × lease without end. Each send no worker claimed doubles the delay before the next (60 s, 120,
    240 … at most ``analysis.resend_backoff_max_seconds``); nothing fails for it; a claim starts again at
    2 × lease."""
    settings = _settings(resend_backoff_max_seconds=1000)
    lost = insert_analysis(rows["area"], rows["after"], rows["before"])
    claimed = insert_analysis(rows["area"], rows["after"], None)
    broker = FakeBroker()  # holds what was sent; no worker ever takes it

    def sends() -> tuple[int, int]:
        return broker.sent.count((lost, "cpu")), broker.sent.count((claimed, "cpu"))

    assert dispatch_once(settings, send=broker)["queued"] == 2
    _age_queued(lost, 61)  # older than 2 × lease (60 s): the backstop re-sends
    _age_queued(claimed, 61)
    assert dispatch_once(settings, send=broker)["resent"] == 2 and sends() == (2, 2)
    claim = leases.claim(claimed, "w", settings)  # a worker takes the second row's message, then gives it back
    assert leases.release(claim, "HTTP 503", settings) == "queued"
    _age_queued(lost, 61)  # its second send waits 120 s
    _age_queued(claimed, 61)  # claimed since: 60 s again
    summary = dispatch_once(settings, send=broker)
    assert (summary["resent"], summary["failed"], sends()) == (1, 0, (2, 3))
    _age_queued(lost, 121)
    assert dispatch_once(settings, send=broker)["resent"] == 1 and sends() == (3, 3)
    _age_queued(lost, 239)  # the third waits 240 s
    assert dispatch_once(settings, send=broker)["resent"] == 0 and sends() == (3, 3)
    _age_queued(lost, 241)
    assert dispatch_once(settings, send=broker)["resent"] == 1 and sends() == (4, 3)
    with session_scope(settings) as session:  # many sends later the delay is the cap (1000 s here)
        session.execute(text("UPDATE analyses SET dispatches = 40 WHERE id = :id"), {"id": lost})
    _age_queued(lost, 999)
    assert dispatch_once(settings, send=broker)["resent"] == 0
    _age_queued(lost, 1001)
    assert dispatch_once(settings, send=broker)["resent"] == 1 and sends() == (5, 3)
    assert {r["status"] for r in analysis_rows([lost, claimed]).values()} == {"queued"}
    with pytest.raises(DoctorWarning) as warned:  # the claimed one (1 send since its claim) is not counted
        check_analyses(settings)
    assert str(warned.value) == ("1 analysis(es) sent up to 41 times, never claimed by a worker: is a worker "
                                 "consuming the 'cpu' queue? (re-sent with a doubling delay; nothing is lost)")


def test_the_resend_delay_never_drops_below_its_base_when_the_cap_is_set_lower(rows):
    """A cap under 2 × lease must not make the back-off re-send faster than the plain backstop."""
    settings = _settings(resend_backoff_max_seconds=10)
    lost = insert_analysis(rows["area"], rows["after"], rows["before"])
    broker = FakeBroker()
    assert dispatch_once(settings, send=broker)["queued"] == 1
    for _ in range(3):
        _age_queued(lost, 59)  # under 2 × lease (60 s): not yet, whatever the cap
        assert dispatch_once(settings, send=broker)["resent"] == 0
        _age_queued(lost, 61)
        assert dispatch_once(settings, send=broker)["resent"] == 1
    assert broker.sent.count((lost, "cpu")) == 4

"""The UniRS path end to end: a GPU-queue worker (``--pool solo``) loads a tiny random-weight checkpoint
(written in the real layout by model.testing) in worker_process_init and analyses the real sample pair.
The model's words are random; what is checked is the plumbing: chips through the spectral screen, caption
and answers through analyse_pair, the event class through classify_sequence, answers stored next to the
statistics that back them."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from monitor.db import session_scope
from monitor.models import Finding
from monitor.questions import templates_for
from tests.fixtures_workers import (
    insert_analysis,
    insert_area,
    insert_observation,
    insert_sample_scenes,
    run_until_terminal,
)

DATES = ["2015-08-31", "2018-08-25", "2019-08-20", "2020-08-04", "2020-08-29"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    from model.testing import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("unirs") / "unirs-tiny", layout="unirs", preset="tiny")


def test_unirs_analyser_runs_end_to_end(db, worker_settings, cog_server, send_task, start_worker, tiny_checkpoint):
    settings = worker_settings.model_copy(deep=True)
    settings.model.weights_path = tiny_checkpoint
    settings.model.max_new_tokens = 8
    # The 1 km sample changes on 1.7 % of its pixels: below the default screen (2 %) the model would not run.
    settings.analysis.model_score_threshold = 0.005
    scenes = insert_sample_scenes(settings.catalogues[0], cog_server.url, DATES)
    area_id = insert_area(scenes.footprint.buffer(-0.0003), questions=["vegetation_loss", "new_roads"])
    for date in DATES:
        insert_observation(area_id, scenes.ids[date])
    analysis_id = insert_analysis(area_id, scenes.ids["2020-08-29"], scenes.ids["2015-08-31"],
                                  analyser="unirs@unirs-tiny+spectral@1", question_set="new_roads,vegetation_loss@1")

    worker = start_worker(settings=settings, queues="gpu", pool="solo",
                          extra_env={"UNIRS_ANALYSIS__MODEL_SCORE_THRESHOLD": "0.005",
                                     "UNIRS_MODEL__MAX_NEW_TOKENS": "8"})
    assert "UniRS loaded from" in worker.log()  # once, at process start, before any task
    row = run_until_terminal([analysis_id], settings, send_task, workers=[worker], timeout=300)[analysis_id]
    assert row["status"] == "done", row
    stats = row["stats"]
    assert stats["chips_total"] == 1 and stats["chips_sent_to_model"] == 1 and stats["chips_kept_off_model"] == 0
    assert stats["event"] is not None
    assert worker.log().count("UniRS loaded from") == 1

    with session_scope() as session:
        found = list(session.execute(select(Finding).where(Finding.analysis_id == analysis_id)
                                     .order_by(Finding.ordinal)).scalars())
    summary = found[0]
    assert summary.analyser_name == "unirs" and summary.analyser_version == "unirs-tiny"
    assert summary.statistics["model_caption"] == summary.caption
    assert summary.statistics["spectral_caption"].startswith("Vegetation loss of")
    regions = [f for f in found if f.kind == "region"]
    assert regions and all(f.analyser_name == "spectral" for f in regions)

    answers = [f for f in found if f.kind == "answer"]
    assert [a.question for a in answers] == [t.text for t in templates_for(["vegetation_loss", "new_roads"])]
    for answer in answers:
        assert answer.analyser_name == "unirs"
        stats = answer.statistics
        assert stats["backing_statistic"] in ("vegetation_loss_ha", "linear_change_ha")
        assert stats["value"] > 0 and stats["statistic_says_yes"] is True
        assert isinstance(stats["agrees"], bool) and stats["model_answer"] == answer.answer
        assert stats["comparison"] in ("yes/no", "number", "unreadable")

    events = [f for f in found if f.kind == "event"]
    assert len(events) == 1
    assert events[0].statistics["frames"] == len(DATES)
    assert events[0].statistics["dates"] == DATES

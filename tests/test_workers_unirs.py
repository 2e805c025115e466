"""The UniRS path end to end: a GPU-queue worker (``--pool solo``) loads a tiny random-weight checkpoint
(written in the real layout by model.testing) in worker_process_init and analyses the real sample pair.
The model's words are random; what is checked is the plumbing: chips through the spectral screen, caption
and answers through analyse_pair, the event class through classify_sequence, answers stored next to the
statistics that back them."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from core.config import get_settings
from core.db import session_scope
from core.jobs import requested_analyser
from core.models import Finding
from eo.questions import templates_for
from tests.fixtures_workers import (
    insert_analysis,
    insert_area,
    insert_observation,
    insert_sample_scenes,
    run_until_terminal,
)
from workers.unirs import checkpoint_label

DATES = ["2015-08-31", "2018-08-25", "2019-08-20", "2020-08-04", "2020-08-29"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    from model.testing import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("unirs") / "unirs-tiny", layout="unirs", preset="tiny")


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Same directory name and preset, different random weights: must not be mistaken for the first."""
    from model.testing import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("other") / "unirs-tiny", layout="unirs", preset="tiny",
                                   seed=1)


def test_checkpoint_labels_tell_same_named_checkpoints_apart(tiny_checkpoint, other_checkpoint):
    assert tiny_checkpoint.name == other_checkpoint.name == "unirs-tiny"
    label = checkpoint_label(tiny_checkpoint)
    assert label.startswith("unirs-tiny.") and len(label) == len("unirs-tiny.") + 8
    assert label == checkpoint_label(tiny_checkpoint)
    assert label != checkpoint_label(other_checkpoint)


def test_unirs_analyser_runs_end_to_end(db, worker_settings, cog_server, send_task, start_worker, tiny_checkpoint,
                                        other_checkpoint):
    # docker-compose as shipped: the scheduler has no weights but knows a GPU worker exists; only the GPU
    # worker has the checkpoint. The analysis must go to the gpu queue (this worker consumes nothing else)
    # and record the checkpoint the worker loaded, not anything the scheduler could have guessed.
    scheduler_settings = worker_settings.model_copy(deep=True)
    scheduler_settings.analysis.gpu_workers = 1
    scheduler_settings.model.weights_path = other_checkpoint  # a stale scheduler config must not leak in
    settings = worker_settings.model_copy(deep=True)
    settings.model.weights_path = tiny_checkpoint
    settings.model.max_new_tokens = 8
    # The 1 km sample changes on 1.7 % of its pixels: below the default screen (2 %) the model would not run.
    settings.analysis.model_score_threshold = 0.005
    scenes = insert_sample_scenes(settings.catalogues[0], cog_server.url, DATES)
    area_id = insert_area(scenes.footprint.buffer(-0.0003), questions=["vegetation_loss", "new_roads"])
    for date in DATES:
        insert_observation(area_id, scenes.ids[date])
    requested = requested_analyser(scheduler_settings)
    assert requested.id == "unirs+spectral@1"
    analysis_id = insert_analysis(area_id, scenes.ids["2020-08-29"], scenes.ids["2015-08-31"],
                                  analyser=requested.id, question_set="new_roads,vegetation_loss@1")

    worker = start_worker(settings=settings, queues="gpu", pool="solo",
                          extra_env={"UNIRS_ANALYSIS__MODEL_SCORE_THRESHOLD": "0.005",
                                     "UNIRS_MODEL__MAX_NEW_TOKENS": "8"})
    assert "UniRS loaded from" in worker.log()  # once, at process start, before any task
    row = run_until_terminal([analysis_id], scheduler_settings, send_task, workers=[worker],
                             timeout=300)[analysis_id]
    assert row["status"] == "done", row
    label = checkpoint_label(tiny_checkpoint)
    assert row["analyser"] == "unirs+spectral@1"
    assert row["analyser_run"] == f"unirs@{label}+spectral@1" == row["stats"]["analyser_run"]
    stats = row["stats"]
    assert stats["chips_total"] == 1 and stats["chips_sent_to_model"] == 1 and stats["chips_kept_off_model"] == 0
    assert stats["event"] is not None
    assert worker.log().count("UniRS loaded from") == 1

    with session_scope(get_settings()) as session:
        found = list(session.execute(select(Finding).where(Finding.analysis_id == analysis_id)
                                     .order_by(Finding.ordinal)).scalars())
    summary = found[0]
    assert summary.analyser_name == "unirs" and summary.analyser_version == label
    assert summary.statistics["model_caption"] == summary.caption
    assert summary.statistics["spectral_caption"].startswith("Vegetation loss of")
    regions = [f for f in found if f.kind == "region"]
    assert regions and all(f.analyser_name == "spectral" for f in regions)

    answers = [f for f in found if f.kind == "answer"]
    assert [a.question for a in answers] == [t.text for t in templates_for(["vegetation_loss", "new_roads"])]
    assert [a.statistics["backing_statistic"] for a in answers] == ["vegetation_loss_ha", "linear_change_ha"]
    # The tiny random checkpoint answers with no yes/no and no number: neither answer can be compared.
    assert [a.statistics["comparison"] for a in answers] == ["unreadable", "unreadable"]
    for answer in answers:
        assert answer.analyser_name == "unirs"
        stats = answer.statistics
        assert stats["value"] > 0 and stats["statistic_says_yes"] is True
        assert isinstance(stats["agrees"], bool) and stats["model_answer"] == answer.answer

    events = [f for f in found if f.kind == "event"]
    assert len(events) == 1
    assert events[0].statistics["frames"] == len(DATES)
    assert events[0].statistics["dates"] == DATES


def test_gpu_worker_without_weights_says_the_model_did_not_run(db, worker_settings, cog_server, send_task,
                                                               start_worker):
    scheduler_settings = worker_settings.model_copy(deep=True)
    scheduler_settings.analysis.gpu_workers = 1
    scenes = insert_sample_scenes(worker_settings.catalogues[0], cog_server.url, ["2015-08-31", "2020-08-29"])
    area_id = insert_area(scenes.footprint.buffer(-0.0003))
    analysis_id = insert_analysis(area_id, scenes.ids["2020-08-29"], scenes.ids["2015-08-31"],
                                  analyser=requested_analyser(scheduler_settings).id)
    worker = start_worker(settings=worker_settings, queues="gpu", pool="solo")
    row = run_until_terminal([analysis_id], scheduler_settings, send_task, workers=[worker])[analysis_id]
    assert (row["status"], row["analyser"], row["analyser_run"]) == ("done", "unirs+spectral@1", "spectral@1")
    assert any("asked for UniRS but this worker has no weights" in n for n in row["stats"]["notes"])
    with session_scope(get_settings()) as session:
        summary = session.execute(select(Finding).where(Finding.analysis_id == analysis_id,
                                                        Finding.kind == "summary")).scalar_one()
    assert (summary.analyser_name, summary.analyser_version) == ("spectral", "1")
